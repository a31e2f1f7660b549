"""Tests of sppdet.configutil: strict merging of nested deltas into frozen dataclasses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from sppdet.configutil import merge, to_dict
from sppdet.errors import ConfigError
from sppdet.features import FeatureConfig, SPPConfig


@dataclass(frozen=True)
class Inner:
    lr: float = 0.001
    steps: tuple[int, ...] = (10, 20)
    name: str = "a"


@dataclass(frozen=True)
class Outer:
    inner: Inner = field(default_factory=Inner)
    weights: str | None = None
    seed: int = 0
    flag: bool = False
    mode: Literal["paper", "round"] = "paper"
    ratio: Optional[float] = 0.5  # noqa: UP045 - typing.Optional is a typing.Union, not X | None
    limit: int | None = None


def test_empty_delta_returns_the_same_config():
    cfg = Outer()
    assert merge(cfg, None) is cfg
    assert merge(cfg, {}) is cfg


def test_merge_replaces_nested_fields_only():
    cfg = Outer(seed=7)
    out = merge(cfg, {"inner": {"lr": 0.1}, "mode": "round"})
    assert out.inner == Inner(lr=0.1)  # steps and name keep their values
    assert out.mode == "round"
    assert out.seed == 7
    assert cfg == Outer(seed=7)  # the input is not modified
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.seed = 1  # type: ignore[misc]


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="unknown key 'sede'") as info:
        merge(Outer(), {"sede": 1}, "exp.yaml")
    assert str(info.value).startswith("exp.yaml: ")
    assert "seed" in str(info.value)  # the known keys are listed
    with pytest.raises(ConfigError, match=r"exp.yaml.inner: unknown key 'rate'"):
        merge(Outer(), {"inner": {"rate": 1.0}}, "exp.yaml")


@pytest.mark.parametrize(
    "delta,where",
    [
        ({"seed": "3"}, "config.seed"),
        ({"seed": 1.5}, "config.seed"),
        ({"seed": True}, "config.seed"),  # bool is an int subclass, still wrong
        ({"flag": 1}, "config.flag"),
        ({"flag": "yes"}, "config.flag"),
        ({"inner": {"lr": "fast"}}, "config.inner.lr"),
        ({"inner": {"lr": False}}, "config.inner.lr"),
        ({"inner": {"steps": 5}}, "config.inner.steps"),
        ({"inner": {"steps": [1, "x"]}}, "config.inner.steps"),
        ({"inner": {"name": 3}}, "config.inner.name"),
        ({"inner": 3}, "inner must be a mapping"),
        ({"mode": "nearest"}, "config.mode"),
        ({"weights": 3}, "config.weights"),
        ({"ratio": "half"}, "config.ratio"),
        ({"limit": 2.5}, "config.limit"),
    ],
)
def test_wrong_types_are_errors(delta, where):
    with pytest.raises(ConfigError) as info:
        merge(Outer(), delta)
    assert where in str(info.value)
    assert "\n" not in str(info.value)


def test_coercions():
    out = merge(
        Outer(),
        {"inner": {"lr": 1, "steps": [1, 2, 3]}, "ratio": 2, "weights": "w.pt", "limit": 4},
    )
    assert out.inner.lr == 1.0
    assert type(out.inner.lr) is float
    assert out.inner.steps == (1, 2, 3)
    assert isinstance(out.inner.steps, tuple)
    assert out.ratio == 2.0
    assert type(out.ratio) is float
    assert out.weights == "w.pt"
    assert out.limit == 4
    # None for Optional fields, in both spellings.
    back = merge(out, {"weights": None, "ratio": None, "limit": None})
    assert (back.weights, back.ratio, back.limit) == (None, None, None)
    # None for a non-Optional field is an error.
    with pytest.raises(ConfigError, match="config.seed"):
        merge(Outer(), {"seed": None})


def test_to_dict_round_trips_through_yaml():
    cfg = merge(Outer(), {"inner": {"lr": 0.25, "steps": [5]}, "weights": "x", "mode": "round"})
    d = to_dict(cfg)
    assert d["inner"]["steps"] == [5]
    assert merge(Outer(), yaml.safe_load(yaml.safe_dump(d))) == cfg


def test_merge_needs_a_dataclass():
    with pytest.raises(TypeError):
        merge({"a": 1}, {"a": 2})


def test_real_configs():
    feat = merge(FeatureConfig(), {"scales": [480, 576, 688], "weights": None, "backbone": "zf5"})
    assert feat.scales == (480, 576, 688)
    assert feat.backbone == "zf5"
    spp = merge(SPPConfig(), {"levels": [4, 3, 2, 1]})
    assert spp.levels == (4, 3, 2, 1)
    with pytest.raises(ConfigError, match="'scale'"):
        merge(FeatureConfig(), {"scale": [688]})


@pytest.mark.xfail(
    strict=True,
    raises=ConfigError,
    reason="PyYAML (YAML 1.1) reads '1e-3' (no dot) as the string '1e-3', and merge rejects a "
    "string for a float field, so lr: 1e-3 in an experiment file is an error",
)
def test_yaml_exponent_floats_are_accepted():
    delta = yaml.safe_load("inner:\n  lr: 1e-3\n")
    assert merge(Outer(), delta, "exp.yaml").inner.lr == 0.001
