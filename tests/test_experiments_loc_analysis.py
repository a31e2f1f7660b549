"""Tests of experiments.loc_analysis: the same comp4 detections scored at several IoU
thresholds, on the tiny synthetic run of tests/test_cli_e2e.py."""

from __future__ import annotations

import json

import pytest

from experiments.loc_analysis import analyse, table
from sppdet.datasets import load_voc
from tests import test_cli_e2e
from tests.test_cli_e2e import devkit_aps, invoke

trained = test_cli_e2e.trained  # the same module-scoped fixture: one tiny trained run


def test_map_at_each_threshold_is_the_devkits_and_falls_with_the_threshold(trained, tmp_path):
    data, run, classes = trained["data"], trained["run"], trained["classes"]
    invoke("eval", "--voc2007", "--run", run, "--devkit", data, "--split", "val",
           "--name", "loc", "--json", tmp_path / "e.json")  # fmt: skip
    folder = run / "eval" / "loc"
    res = analyse(load_voc(data, "val", classes=data / "VOC2007" / "classes.txt"), folder)
    at_05 = json.loads((tmp_path / "e.json").read_text())
    assert res["map"]["0.5"] == pytest.approx(at_05["map"], abs=1e-12)
    assert res["ap"]["0.5"] == pytest.approx(devkit_aps(data, folder, classes), abs=1e-9)
    maps = [res["map"][t] for t in ("0.1", "0.3", "0.5", "0.7")]
    assert maps == sorted(maps, reverse=True) and maps[0] > maps[-1]
    text = table({"run": res})
    gap = 100 * (res["map"]["0.1"] - res["map"]["0.5"])
    assert text.splitlines()[2].endswith(f"| {gap:.1f} |")
