"""experiments.repro: a rerun reproduces a committed result only when it is the same experiment."""

from __future__ import annotations

import copy

import pytest

from experiments.repro import NotAReproductionError, compare_results


def result(variant: str, m: float, **extra) -> dict:
    return {
        "protocol": "VOC2007 train->val",
        "variant": variant,
        "command": "python scripts/voc07.py --config c.yaml",
        "config": {"features": {"scales": [688]}},
        "weights_sha256": "abc",
        "scales": [688],
        "val_images": 10,
        "map": m,
        "ap": {"cat": m + 0.01, "dog": m - 0.01},
        "commit": "c1",
        "machine": {"cpu_model": "AMD EPYC"},
        **extra,
    }


def test_within_and_beyond_tolerance():
    committed = [result("fc7", 0.40), result("pool5", 0.30)]
    rerun = [result("fc7", 0.403, commit="c2"), result("pool5", 0.292, commit="c2")]
    out = compare_results(committed, rerun, tol_points=0.5)
    assert out["variants"]["fc7"]["diff_points"] == pytest.approx(0.3)
    assert out["variants"]["fc7"]["reproduced"] is True
    assert out["variants"]["pool5"]["diff_points"] == pytest.approx(-0.8)
    assert out["variants"]["pool5"]["reproduced"] is False
    assert out["reproduced"] is False
    assert out["variants"]["fc7"]["rerun_commit"] == "c2"
    assert out["variants"]["fc7"]["identical"] is False
    assert compare_results(committed, committed)["variants"]["fc7"]["identical"] is True
    assert compare_results(committed, rerun, tol_points=1.0)["reproduced"] is True


def test_the_script_moved_to_experiments_is_the_same_command():
    # results committed when the script was scripts/voc07.py, rerun as python -m experiments.voc07
    rerun = result("fc7", 0.40, command="python -m experiments.voc07 --config c.yaml")
    assert compare_results([result("fc7", 0.40)], [rerun])["reproduced"] is True
    rerun = result("fc7", 0.40, command="python -m experiments.voc07 --config other.yaml")
    with pytest.raises(NotAReproductionError, match="command"):
        compare_results([result("fc7", 0.40)], [rerun])


def test_per_class_difference_reported():
    rerun = result("fc7", 0.40)
    rerun["ap"]["dog"] -= 0.05
    out = compare_results([result("fc7", 0.40)], [rerun])
    assert out["variants"]["fc7"]["max_class_ap_diff_points"] == pytest.approx(5.0)


def test_config_key_added_later_with_its_default_is_the_same_experiment():
    rerun = result("fc7", 0.40)
    rerun["config"] = {"features": {"scales": [688], "conv_dtype": "float32"}}
    assert compare_results([result("fc7", 0.40)], [rerun])["reproduced"] is True


def test_speed_only_knobs_do_not_make_another_experiment():
    # the committed 1-scale run wrote rcnn_batch 64; a rerun after the default became 8 (and
    # stripe tiling appeared) computes the same maps up to rounding
    committed = result("fc7", 0.40)
    committed["config"] = {"features": {"scales": [688], "rcnn_batch": 64}}
    rerun = result("fc7", 0.40)
    rerun["config"] = {"features": {"scales": [688], "rcnn_batch": 8, "stripe_pixels": 0}}
    assert compare_results([committed], [rerun])["reproduced"] is True
    rerun["config"]["features"]["scales"] = [480]  # a real difference is still refused
    with pytest.raises(NotAReproductionError, match="scales"):
        compare_results([committed], [rerun])


@pytest.mark.parametrize(
    "change",
    [
        {"command": "python scripts/voc07.py --config other.yaml"},
        {"weights_sha256": "def"},
        {"config": {"features": {"scales": [480]}}},
        {"config": {"features": {"conv_dtype": "bfloat16"}}},
        {"config": {"no_such_section": {}}},
    ],
)
def test_different_experiment_is_refused(change):
    rerun = copy.deepcopy(result("fc7", 0.40))
    rerun.update(change)
    with pytest.raises(NotAReproductionError):
        compare_results([result("fc7", 0.40)], [rerun])


def test_missing_variant_is_refused():
    with pytest.raises(NotAReproductionError, match="pool5"):
        compare_results([result("fc7", 0.4), result("pool5", 0.3)], [result("fc7", 0.4)])


def test_refusal_names_the_differing_config_key():
    rerun = result("fc7", 0.40)
    rerun["config"] = {"features": {"scales": [480]}}
    with pytest.raises(
        NotAReproductionError, match=r"config\.features\.scales \(\[688\] -> \[480\]\)"
    ):
        compare_results([result("fc7", 0.40)], [rerun])


def test_result_without_map_is_refused():
    broken = result("fc7", 0.40)
    del broken["map"]
    with pytest.raises(NotAReproductionError, match="lacks map"):
        compare_results([result("fc7", 0.40)], [broken])


def test_results_record_run_paths_as_the_committed_results_do(tmp_path, monkeypatch):
    """A run made now stores absolute paths; its results record them relative to the repository
    root, as the committed ones do, so a rerun in a clone beside it is the same experiment."""
    import argparse
    import json
    from pathlib import Path

    from experiments import repro, voc07
    from sppdet.run import Run, build_config

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    # what is recorded is checked, not the data: ../shared need not exist (a fresh clone)
    monkeypatch.setattr("sppdet.run.check_paths_exist", lambda config: None)
    config = root / "configs" / "voc07_d17_1scale.yaml"
    run = Run.create(tmp_path / "run", build_config(config))
    assert Path(run.config.data.devkit).is_absolute()
    (tmp_path / "run" / "eval" / "val_fc7").mkdir(parents=True)
    summary = {"variant": "val_fc7", "map": 0.5, "ap": {"cat": 0.5}, "images": 1, "commit": "c"}
    (tmp_path / "run" / "eval" / "val_fc7" / "eval.json").write_text(
        json.dumps({**summary, "seconds_per_image": {"total": 1.0}})
    )
    monkeypatch.setattr(voc07, "machine", lambda: {})
    args = argparse.Namespace(
        run=tmp_path / "run", results=tmp_path / "results", recipe=None, config=config, name="x"
    )
    voc07.write_results(args, {"train": {"seconds": 1.0, "peak_rss_gb": 1.0}})
    written = json.loads((tmp_path / "results" / "x_fc7.json").read_text())
    committed = json.loads((root / "results" / "voc07_d17_1scale_fc7.json").read_text())
    # merged onto today's defaults, as repro compares them (keys added since read as defaults)
    data = [repro._config(r, "x")["data"] for r in (written, committed)]
    assert data[0] == data[1]
    assert set(committed["config"]["data"]) <= set(written["config"]["data"])
    assert written["config"]["features"]["weights"] == committed["config"]["features"]["weights"]
    assert written["weights"] == committed["weights"]


def test_results_name_a_recipe_only_for_a_run_made_with_it(tmp_path, monkeypatch):
    """write_results refuses a run whose settings differ from --config's in any key (a variant
    run with one more change), and a variant's files name the run its stage times come from."""
    import argparse
    import dataclasses
    import json
    from pathlib import Path

    from experiments import voc07
    from sppdet.run import Run, build_config

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    monkeypatch.setattr("sppdet.run.check_paths_exist", lambda config: None)
    monkeypatch.setattr(voc07, "machine", lambda: {})
    config = root / "configs" / "voc07_lite0_dedup_1scale.yaml"
    cfg = build_config(config)
    other = dataclasses.replace(cfg, svm=dataclasses.replace(cfg.svm, dedup_neg_iou=None))
    summary = {"variant": "val_fc7", "map": 0.5, "ap": {"cat": 0.5}, "images": 1, "commit": "c"}
    for name, made in (("same", cfg), ("other", other)):
        Run.create(tmp_path / name, made)
        (tmp_path / name / "eval" / "val_fc7").mkdir(parents=True)
        (tmp_path / name / "eval" / "val_fc7" / "eval.json").write_text(
            json.dumps({**summary, "seconds_per_image": {"total": 1.0}})
        )
    args = argparse.Namespace(
        results=tmp_path / "results", recipe="r", config=config, name="x", stages_from=None
    )
    stages = {"train": {"seconds": 1.0, "peak_rss_gb": 1.0}}
    with pytest.raises(SystemExit, match="svm.dedup_neg_iou: None"):
        voc07.write_results(argparse.Namespace(**vars(args), run=tmp_path / "other"), stages)
    args = argparse.Namespace(**{**vars(args), "stages_from": Path("runs/base")})
    monkeypatch.setattr(
        "sys.argv", ["voc07", "--run", "r", "--write-results", "--stages-from", "b"]
    )
    voc07.write_results(argparse.Namespace(**vars(args), run=tmp_path / "same"), stages)
    written = json.loads((tmp_path / "results" / "x_fc7.json").read_text())
    assert written["stages_from"] == "runs/base" and written["recipe"] == "r"
    assert written["command"] == "python -m experiments.voc07 --run r"
