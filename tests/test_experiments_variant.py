"""Tests of experiments.variant: a run's variant shares its stages by hard links."""

from __future__ import annotations

import os

import pytest
import yaml

from experiments.variant import make_variant


def test_variant_shares_stages_by_hard_links_and_changes_only_its_settings(tmp_path):
    base, run = tmp_path / "base", tmp_path / "base__v"
    (base / "finetune").mkdir(parents=True)
    (base / "finetune" / "model.pt").write_bytes(b"weights")
    (base / "svm_fc7").mkdir()
    (tmp_path / "maps").mkdir()
    (base / "features").symlink_to("../maps")
    (base / "config.yaml").write_text(yaml.safe_dump({"svm": {"C": 0.001, "neg_iou": 0.3}}))
    (base / "ablations.json").write_text("{}")
    assert make_variant(base, run, ["finetune", "features", "ablations.json"], {"svm.C": 0.0003})
    assert os.path.samefile(run / "finetune" / "model.pt", base / "finetune" / "model.pt")
    assert os.path.samefile(run / "ablations.json", base / "ablations.json")
    assert os.readlink(run / "features") == "../maps"
    assert not (run / "svm_fc7").exists() and not run.with_name("base__v.tmp").exists()
    assert yaml.safe_load((run / "config.yaml").read_text()) == {
        "svm": {"C": 0.0003, "neg_iou": 0.3}
    }
    # an existing variant is left as it is (a rerun resumes it)
    assert not make_variant(base, run, ["finetune"], {"svm.C": 0.5})
    assert yaml.safe_load((run / "config.yaml").read_text())["svm"]["C"] == 0.0003
    with pytest.raises(SystemExit, match="nosuch.C"):
        make_variant(base, tmp_path / "other", [], {"nosuch.C": 1})
