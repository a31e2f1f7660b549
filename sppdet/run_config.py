"""A run's configuration: one frozen dataclass per stage (:class:`RunConfig`), read from YAML
files (``base:`` chains, strict merge: unknown keys are errors) and from command-line options.

Split from :mod:`sppdet.run` (which re-exports these names), so that the run directory's logic
and the config's definition and parsing stay in files of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sppdet.bbox_reg import BBoxRegConfig
from sppdet.configutil import merge
from sppdet.detect import TestConfig
from sppdet.errors import ConfigError
from sppdet.features import FeatureConfig, SPPConfig
from sppdet.finetune import FinetuneConfig
from sppdet.proposals import ProposalConfig
from sppdet.svm import SVMConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class DataConfig:
    """Where the training data is."""

    devkit: str | None = None  # a VOCdevkit directory (or its VOC<year> subdirectory)
    # or a COCO json of the training split (its categories are the classes; sppdet.data_source)
    coco: str | None = None
    images: str | None = None  # the COCO json's image directory (default: the json's directory)
    year: str = "2007"  # VOC<year>
    train_split: str = "train"  # ImageSets/Main/<split>.txt used for training
    limit: int | None = None  # first N training images only (quick runs)
    classes: str | None = None  # class-list file; None: VOC<year>/classes.txt or the 20 VOC ones
    proposals: str | None = None  # precomputed proposals (.npz / R-CNN .mat) to import

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"data.limit must be >= 1 (or absent: every image), not {self.limit}")
        if self.devkit is not None and self.coco is not None:
            raise ConfigError("data: give a VOC devkit or a COCO json (data.coco), not both")
        if self.images is not None and self.coco is None:
            raise ConfigError("data.images is the image directory of data.coco, which is unset")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run does, one frozen dataclass per stage."""

    data: DataConfig = field(default_factory=DataConfig)
    proposals: ProposalConfig = field(default_factory=ProposalConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    spp: SPPConfig = field(default_factory=SPPConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    svm: SVMConfig = field(default_factory=SVMConfig)
    bbox: BBoxRegConfig = field(default_factory=BBoxRegConfig)
    test: TestConfig = field(default_factory=TestConfig)
    device: str = "auto"  # auto | cpu | cuda[:N]
    workers: int = 1  # worker processes for proposal computation

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be >= 1, not {self.workers}")


#: Sections whose change invalidates cached proposals / features of an existing run.
_CACHE_SECTIONS = ("proposals", "features", "spp")
#: Settings of later stages: a change is taken while the stage that uses it has not run, and
#: refused after (``data.limit``: :meth:`Run.settle_training_limit`; ``data.devkit``,
#: ``data.train_split``, ``device`` and ``workers`` are the run's, whatever a command says).
_STAGE_SECTIONS = ("finetune", "svm", "bbox", "test", "data.year", "data.classes")
#: What each of them shows a stage has run (``test``: nothing; evaluations record their own).
_STAGE_OUTPUTS = {
    "finetune": ("finetune/model.pt", "finetune/checkpoint.pt"),
    "svm": ("svm_*/svm.npz", "svm_*/checkpoint.npz"),
    "bbox": ("bbox/bbox.npz",),
    "data": ("finetune/*", "svm_*/*", "bbox/*"),
}


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping")
    return data


def load_config_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's settings, its ``base:`` file (a path relative to it) merged in first:
    the file's keys override the base's, section by section."""
    path = Path(path)
    if path.resolve() in _seen:
        raise ConfigError(f"config {path}: its base files include it again")
    data = load_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config {path}: base must be a file name, not {base!r}")
    out = load_config_yaml(path.parent / base, (*_seen, path.resolve()))
    for key, value in data.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = {**out[key], **value} if both else value
    return out


#: Settings removed because nothing used them (every committed config and results file has the
#: value kept here): ``spp.rule`` "round" and ``spp.shrink`` (the released code's window
#: mapping), ``finetune.init`` "torch" (PyTorch's fc init, measured worse than He's),
#: and ``svm.loss`` "squared_hinge" (liblinear -s 1; R-CNN and SPP-net use the L1 hinge). Old
#: ``config.yaml`` and ``results/*.json`` configs still carry them: the kept value is read with
#: a warning, any other is an error (that run cannot be reproduced by this code).
REMOVED_KEYS: dict[tuple[str, str], Any] = {
    ("spp", "rule"): "paper",
    ("spp", "shrink"): 0.0,
    ("finetune", "init"): "he",
    ("svm", "loss"): "hinge",
}


def run_config(
    data: Mapping[str, Any] | None, where: str, base: RunConfig | None = None
) -> RunConfig:
    """``base`` (default: the defaults) with the nested mapping ``data`` merged in, strictly
    (unknown keys are errors), the :data:`REMOVED_KEYS` accepted at their kept value."""
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (data or {}).items()}
    for (section, key), kept in REMOVED_KEYS.items():
        if key not in data.get(section, {}):
            continue
        value = data[section].pop(key)
        if value != kept:
            raise ConfigError(
                f"{where}: {section}.{key} = {value!r} was removed (only {kept!r} remains)"
            )
        log.warning("%s: %s.%s was removed (always %r now); ignored", where, section, key, kept)
    return merge(RunConfig() if base is None else base, data, where)


#: Settings left out of stage manifests (``check_manifest``'s ``legacy``) and of evaluation
#: keys (``sppdet.eval_blocks``) at these values, so stages trained and evaluations saved
#: before they were added (at their default) or removed (at the value that remains, see
#: :data:`REMOVED_KEYS`) stay valid. A default that changed has its earlier value here and in
#: :data:`CHANGED_DEFAULTS`.
LEGACY_SETTINGS = {
    "svm": {
        "retrain_growth": 0.0,
        "loss": "hinge",
        "dedup_neg_iou": None,
        "pos_iou": None,
        "prior": "none",
        "prior_scaling": 10.0,
    },
    "bbox": {"layer": "pool5", "method": "ridge"},
    "finetune": {"bbox_loss_weight": 0.0},
    "test": {"box_vote_iou": 0.0},
}


#: Settings whose default changed after runs were stored without them: a stored config
#: (``config.yaml``, a results file's ``config``) that lacks one was made with the value here,
#: not with today's default, so it is read with this value (:func:`stored_run_config`). Without
#: it, an old run reopened would take the new default and its stage manifests would be refused.
#: Entries are added when a default changes; a key whose default never changed needs none.
CHANGED_DEFAULTS: dict[tuple[str, str], Any] = {
    ("svm", "dedup_neg_iou"): None,
}


def stored_run_config(data: Mapping[str, Any] | None, where: str) -> RunConfig:
    """A stored run config: as :func:`run_config`, with each :data:`CHANGED_DEFAULTS` key it
    lacks set to the value it was made with."""
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (data or {}).items()}
    for (section, key), before in CHANGED_DEFAULTS.items():
        data.setdefault(section, {}).setdefault(key, before)
    return run_config(data, where)


def build_config(yaml_path: str | Path | None = None, **overrides: dict) -> RunConfig:
    """Defaults, then the YAML deltas, then per-section overrides (from CLI options)."""
    cfg = RunConfig()
    if yaml_path is not None:
        cfg = run_config(load_config_yaml(yaml_path), str(yaml_path))
    delta = {k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in overrides.items()}
    return merge(cfg, {k: v for k, v in delta.items() if v}, "command line")
