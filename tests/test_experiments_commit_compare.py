"""Tests of experiments.commit_compare: one experiment at several commits, against the first."""

from __future__ import annotations

from experiments.commit_compare import compare


def _ablations(fc7_ap: dict, softmax_ap: dict) -> dict:
    def row(ap):
        return {"map": sum(ap.values()) / len(ap), "ap": ap}

    return {"val_fc7": row(fc7_ap), "val_softmax": row(softmax_ap)}


def test_each_run_against_the_first_per_variant():
    old = _ablations({"cat": 0.5, "dog": 0.25}, {"cat": 0.5, "dog": 0.5})
    same = _ablations({"cat": 0.5, "dog": 0.25}, {"cat": 0.5, "dog": 0.5})
    moved = _ablations({"cat": 0.5, "dog": 0.25}, {"cat": 0.375, "dog": 0.5})
    out = compare({"old": old, "same": same, "moved": moved})
    assert out["reference"] == "old" and set(out["variants"]) == {"fc7", "softmax"}
    fc7, softmax = out["variants"]["fc7"], out["variants"]["softmax"]
    assert all(r["same_floats"] and r["diff_points"] == 0 for r in fc7.values())
    assert softmax["same"]["same_floats"] and not softmax["moved"]["same_floats"]
    assert softmax["moved"]["max_class_ap_diff_points"] == 12.5
    assert softmax["moved"]["diff_points"] == -6.25
