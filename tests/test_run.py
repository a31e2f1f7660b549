"""Tests of sppdet.run: reopening a run directory with the same or other cached-stage settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

import sppdet.run_config as run_config_module
from experiments.repro import _config as repro_config
from sppdet.datasets import Dataset
from sppdet.errors import CacheMismatchError, ConfigError
from sppdet.run import REMOVED_KEYS, Run, build_config, run_config
from sppdet.run_config import CHANGED_DEFAULTS, RunConfig
from sppdet.svm import SVMConfig


def _cfg(**sections):
    return build_config(None, **sections)


def test_reopen_with_same_config_returns_the_stored_one(tmp_path):
    cfg = _cfg(features={"backbone": "zf5", "weights": "random"})
    Run.create(tmp_path, cfg)
    again = Run.create(tmp_path, dataclasses.replace(cfg, workers=3))  # not a cached section
    assert again.config.features == cfg.features
    assert again.config.workers == cfg.workers  # the stored config wins


def test_other_features_or_computed_proposal_settings_are_refused(tmp_path):
    cfg = _cfg(features={"backbone": "zf5", "weights": "random", "scales": [240]})
    Run.create(tmp_path / "a", cfg)
    with pytest.raises(CacheMismatchError, match="features"):
        Run.create(tmp_path / "a", _cfg(features={"backbone": "zf5", "scales": [480]}))
    Run.create(tmp_path / "b", cfg)
    with pytest.raises(CacheMismatchError, match="proposals"):
        Run.create(tmp_path / "b", dataclasses.replace(cfg, proposals=_cfg(
            proposals={"ks": [100]}).proposals))  # fmt: skip


def test_imported_proposals_ignore_selective_search_settings(tmp_path):
    (tmp_path / "boxes.npz").touch()
    data = {"proposals": str(tmp_path / "boxes.npz")}
    Run.create(tmp_path, _cfg(data=data, proposals={"ks": [50, 100]}))
    run = Run.create(tmp_path, _cfg(data=data, proposals={"ks": [50, 100, 150]}))
    assert run.config.proposals.ks == (50, 100)  # the run keeps what it was made with


def test_open_needs_a_run_directory_and_a_valid_config(tmp_path):
    with pytest.raises(Exception, match="not a run directory"):
        Run.open(tmp_path)
    (tmp_path / "config.yaml").write_text("features:\n  no_such_key: 1\n")
    with pytest.raises(ConfigError, match="no_such_key"):
        Run.open(tmp_path)


def test_with_test_conv_dtype_computes_maps_on_the_fly(tmp_path):
    run = Run.create(tmp_path / "r", build_config())
    same = run.with_test(conv_dtype="float32", scorer="softmax")
    assert same.config.features == run.config.features
    assert same.config.test.scorer == "softmax"
    bf16 = run.with_test(conv_dtype="bfloat16")
    # the run's cache holds float32 maps: other dtypes are computed, never cached over them
    assert bf16.config.features.conv_dtype == "bfloat16" and not bf16.config.features.cache
    no_images = Dataset("voc2007_val", ("cat",), (), tmp_path, "val")
    assert bf16.provider(no_images).cache is None
    assert run.config.features.conv_dtype == "float32"  # the run itself is unchanged


def test_with_test_auto_conv_dtype_resolves_for_the_device(tmp_path, monkeypatch):
    import sppdet.fastpath as fp

    run = Run.create(tmp_path / "r", dataclasses.replace(build_config(), device="cpu"))
    monkeypatch.setattr(fp, "cpu_has_native_bf16", lambda: True)
    assert run.with_test(conv_dtype="auto").config.features.conv_dtype == "bfloat16"
    monkeypatch.setattr(fp, "cpu_has_native_bf16", lambda: False)
    auto = run.with_test(conv_dtype="auto")
    assert auto.config.features == run.config.features  # float32: the cache stays in use


def test_training_limit_is_set_by_the_training_split_whichever_split_came_first(tmp_path):
    # a val extraction created the run: it must not make val the training split or fix its limit
    run = Run.create(tmp_path, build_config())
    assert run.settle_training_limit("val", 5) is run
    run = Run.create(tmp_path, build_config()).settle_training_limit("train", 150)
    reopened = Run.open(tmp_path).config.data
    assert (reopened.train_split, reopened.limit) == ("train", 150)
    assert run.config.data.limit == 150


def test_another_training_limit_is_refused_once_training_proposals_exist(tmp_path):
    run = Run.create(tmp_path, build_config()).settle_training_limit("train", 150)
    run.path("proposals").mkdir()
    run.path("proposals", "train.npz").write_bytes(b"")
    assert run.settle_training_limit("train", 150).config.data.limit == 150
    with pytest.raises(CacheMismatchError, match="the first 150 train images.*not all"):
        run.settle_training_limit("train", None)


def test_concurrent_creation_keeps_the_first_config(tmp_path):
    first = build_config(features={"scales": [64]})
    Run.create(tmp_path, first)
    # a creator that lost the race (the file appeared after its exists() check) reopens it
    from sppdet.storage import atomic_create_text

    assert not atomic_create_text(tmp_path / "config.yaml", "overwritten: true\n")
    assert Run.open(tmp_path).config.features.scales == first.features.scales
    assert not list(tmp_path.glob(".config.yaml.*"))  # no temp file left behind


def test_finetune_settings_from_the_command_line_are_stored_until_fine_tuning_starts(tmp_path):
    run = Run.create(tmp_path, _cfg(features={"backbone": "zf5", "top_blocks": 2}))
    assert run.with_finetune(conv_blocks=None) is run  # nothing given: nothing written
    tuned = run.with_finetune(conv_blocks=2, conv_lr=0.002)
    stored = Run.open(tmp_path).config.finetune
    assert (
        (stored.conv_blocks, stored.conv_lr)
        == (2, 0.002)
        == (
            tuned.config.finetune.conv_blocks,
            tuned.config.finetune.conv_lr,
        )
    )
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "checkpoint.pt").write_bytes(b"")
    assert Run.open(tmp_path).with_finetune(conv_blocks=2).config.finetune.conv_blocks == 2
    with pytest.raises(CacheMismatchError, match="conv_blocks"):
        Run.open(tmp_path).with_finetune(conv_blocks=1)


def test_removed_settings_load_at_their_kept_value_only(tmp_path, caplog):
    kept = {}
    for (section, key), value in REMOVED_KEYS.items():
        kept.setdefault(section, {})[key] = value
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**kept, "workers": 2}))
    with caplog.at_level("WARNING", logger="sppdet.run"):
        run = Run.open(tmp_path)
    assert run.config.workers == 2 and "spp.rule was removed" in caplog.text
    kept["spp"]["rule"] = "round"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(kept))
    with pytest.raises(ConfigError, match="spp.rule = 'round' was removed"):
        Run.open(tmp_path)


def test_stored_configs_lacking_a_changed_default_read_its_value_before(tmp_path, monkeypatch):
    # A default that changes (here svm.C as if it had been 0.5 before its key was stored):
    # an old config.yaml lacking the key keeps the old value; a new one, or a user's config
    # file (build_config: deltas on today's defaults), takes the default.
    monkeypatch.setitem(run_config_module.CHANGED_DEFAULTS, ("svm", "C"), 0.5)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"svm": {"pos_weight": 3.0}}))
    assert Run.open(tmp_path).config.svm.C == 0.5
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"workers": 2}))  # no svm section
    assert Run.open(tmp_path).config.svm.C == 0.5
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"svm": {"C": 0.002}}))
    assert Run.open(tmp_path).config.svm.C == 0.002
    assert run_config({"svm": {}}, "x").svm.C == SVMConfig().C
    assert build_config().svm.C == SVMConfig().C
    got = repro_config({"config": {"svm": {"pos_weight": 3.0}}}, "result")
    assert got["svm"]["C"] == 0.5


def test_changed_defaults_are_real_settings_and_legacy_in_the_stage_manifests():
    from sppdet.run_config import LEGACY_SETTINGS

    for (section, key), before in CHANGED_DEFAULTS.items():
        assert hasattr(getattr(RunConfig(), section), key), (section, key)
        # a stage manifest written before the key existed must read as that same value
        assert LEGACY_SETTINGS[section][key] == before, (section, key)


def test_committed_results_configs_still_load():
    files = sorted(Path("results").glob("*.json"))
    configs = [(f, json.loads(f.read_text()).get("config")) for f in files]
    configs = [(f, c) for f, c in configs if c]
    assert configs, "no results with a config"
    for f, c in configs:
        run_config(c, str(f))


def test_a_config_extends_its_base_section_by_section(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text(
        "features:\n  backbone: zf5\n  scales: [64]\nsvm:\n  C: 0.01\nworkers: 3\n"
    )
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../base.yaml\nfeatures:\n  scales: [48]\n")
    (tmp_path / "sub" / "top.yaml").write_text("base: mid.yaml\nsvm:\n  tol: 0.5\n")
    cfg = build_config(tmp_path / "sub" / "top.yaml")
    assert cfg.features.backbone == "zf5" and cfg.features.scales == (48,)  # mid overrides base
    assert (cfg.svm.C, cfg.svm.tol, cfg.workers) == (0.01, 0.5, 3)  # sections merge key by key
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="include it again"):
        build_config(tmp_path / "loop.yaml")
    (tmp_path / "bad.yaml").write_text("base: absent.yaml\n")
    with pytest.raises(ConfigError, match="cannot read config .*absent.yaml"):
        build_config(tmp_path / "bad.yaml")


def test_the_committed_configs_load():
    configs = sorted(Path(__file__).resolve().parent.parent.glob("configs/*.yaml"))
    assert len(configs) >= 5
    for path in configs:
        build_config(path)  # strict: an unknown key or a broken base is an error


@pytest.mark.parametrize(
    ("section", "values", "match"),
    [
        ("features", {"scales": [0]}, "features.scales"),
        ("features", {"scales": [-688]}, "features.scales"),
        ("features", {"max_size": 0}, "features.max_size"),
        ("features", {"backbone": "mobilenet_v3"}, "unknown backbone 'mobilenet_v3'"),
        ("features", {"conv_dtype": "int4"}, "features.conv_dtype"),
        ("spp", {"levels": [6, 0]}, "spp.levels"),
        ("data", {"limit": 0}, "data.limit"),
        ("proposals", {"backend": "edgeboxes"}, "proposals.backend"),
    ],
)
def test_bad_settings_are_refused_when_the_config_is_built(section, values, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**{section: values})


def test_bad_workers_and_missing_files_are_refused_before_a_run_is_written(tmp_path):
    with pytest.raises(ConfigError, match="workers"):
        dataclasses.replace(_cfg(), workers=0)
    missing = tmp_path / "no_such_weights.pth"
    with pytest.raises(ConfigError, match=f"features.weights: {missing} does not exist"):
        Run.create(tmp_path / "r", _cfg(features={"weights": str(missing)}))
    assert not (tmp_path / "r").exists()


def test_later_stage_settings_are_taken_until_their_stage_runs(tmp_path, caplog):
    cfg = _cfg(features={"backbone": "zf5", "weights": "random"})
    Run.create(tmp_path, cfg)
    more = _cfg(features={"backbone": "zf5", "weights": "random"}, finetune={"iterations": 77})
    run = Run.create(tmp_path, more)
    assert run.config.finetune.iterations == 77
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("# accepted ") and "finetune.iterations: 12000 -> 77" in text
    assert Run.open(tmp_path).config.finetune.iterations == 77
    (tmp_path / "finetune").mkdir()
    (tmp_path / "finetune" / "model.pt").touch()  # fine-tuning has run: no more changes
    fewer = _cfg(features={"backbone": "zf5", "weights": "random"}, finetune={"iterations": 5})
    with pytest.raises(CacheMismatchError, match="finetune.iterations: 77 -> 5"):
        Run.create(tmp_path, fewer)
    # the SVMs have not run: their settings are still taken; the note of the first change stays
    svm = dataclasses.replace(more, svm=dataclasses.replace(more.svm, C=0.0001))
    assert Run.create(tmp_path, svm).config.svm.C == 0.0001
    notes = [ln for ln in (tmp_path / "config.yaml").read_text().splitlines() if ln[:1] == "#"]
    assert len(notes) == 2 and "svm.C: 0.001 -> 0.0001" in notes[1]
