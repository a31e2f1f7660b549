"""Tests of the self-contained model file (sppdet.model_file, ``sppdet export``) and of the
trained parts' loaders (sppdet.model), on the tiny synthetic run of tests/test_cli_e2e.py.

float32 export is a bit-exact copy of the run: ``detect --model`` gives ``detect --run``'s
detections. float16 storage (the default) moves SVM scores by about 1e-3 on these runs (the
demo-config run: at most 2e-3, the same mAP for every ablation row).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sppdet
from sppdet.bbox_reg import BBoxRegressor
from sppdet.detect import Detector
from sppdet.errors import SppdetError
from sppdet.fastpath import resolve_fc_dtype
from sppdet.model import load_bbox, load_detector, load_detectors
from sppdet.model_file import FORMAT, VERSION, export_model, read_model
from sppdet.run import Run
from sppdet_cli.main import cli
from tests import test_cli_e2e
from tests.test_cli_e2e import invoke

trained = test_cli_e2e.trained  # the same module-scoped fixture: one tiny trained run


@pytest.fixture(scope="module")
def exported(trained) -> dict[str, Path]:
    root = trained["root"]
    out = {"float32": root / "m32.pt", "float16": root / "m16.pt", "int8": root / "m8.pt"}
    for dtype, path in out.items():
        res = invoke("export", trained["run"], "--out", path, "--dtype", dtype)
        assert f"export: {path}" in res.output
    return out


def load_blob(path: Path) -> dict:
    """The dict inside a model file (gzip-compressed ``torch.save``)."""
    data = Path(path).read_bytes()
    assert data[:2] == b"\x1f\x8b"  # gzip
    return torch.load(io.BytesIO(gzip.decompress(data)), map_location="cpu", weights_only=True)


def val_images(trained, n: int = 3) -> list[Path]:
    data = trained["data"] / "VOC2007"
    ids = (data / "ImageSets/Main/val.txt").read_text().split()[:n]
    return [data / "JPEGImages" / f"{i}.jpg" for i in ids]


def detect_json(tmp: Path, *args) -> list:
    out = tmp / "d.json"
    invoke("detect", *args, "--score-threshold", -100, "--json", out)
    return json.loads(out.read_text())


def test_float32_model_detects_exactly_as_the_run(trained, exported, tmp_path):
    images = val_images(trained)
    by_run = detect_json(tmp_path, *images, "--run", trained["run"])
    by_model = detect_json(tmp_path, *images, "--model", exported["float32"])
    assert sum(len(r["detections"]) for r in by_run) > 10
    assert by_model == by_run
    # the softmax rows too, and sppdet.load_model gives the same detector
    soft = ("--scorer", "softmax")
    soft_run = detect_json(tmp_path, *images, "--run", trained["run"], *soft)
    assert detect_json(tmp_path, *images, "--model", exported["float32"], *soft) == soft_run
    det = sppdet.load_model(exported["float32"], device="cpu")
    assert isinstance(det, Detector) and det.classes == trained["classes"]
    # fc as detect's default (auto: int8 only with int8 dot products); None: the model's
    assert det.config.fc_dtype == resolve_fc_dtype("auto", torch.device("cpu"))
    own = sppdet.load_model(exported["float32"], device="cpu", fc_dtype=None)
    stored = read_model(exported["float32"], "cpu").test.fc_dtype
    assert own.config.fc_dtype == resolve_fc_dtype(stored, torch.device("cpu"))


def test_float16_model_is_close_to_the_run(trained, exported, tmp_path):
    images = val_images(trained, 8)
    run = Run.open(trained["run"])
    props = [np.array([[2, 2, 40, 40], [30, 20, 90, 80], [10, 50, 60, 95]], np.float32)]
    a = load_detector(run.with_test(score_threshold=-1e9, fc_dtype="float32"))
    m = read_model(exported["float16"], "cpu")
    b = load_detector(m, dataclasses.replace(m.test, score_threshold=-1e9, fc_dtype="float32"))
    from sppdet.imageio import load_image

    for path in images:
        image = load_image(path)
        da, db = a.detect(image, props[0]), b.detect(image, props[0])
        # the same windows pass NMS; scores within 1e-2 (float16 weights, fp32 arithmetic)
        assert len(da.scores) == len(db.scores) > 0
        order_a, order_b = np.lexsort((da.scores, da.labels)), np.lexsort((db.scores, db.labels))
        np.testing.assert_allclose(da.scores[order_a], db.scores[order_b], atol=1e-2)
        np.testing.assert_allclose(da.boxes[order_a], db.boxes[order_b], atol=0.5)
    assert exported["float16"].stat().st_size < 0.6 * exported["float32"].stat().st_size


def test_int8_model_rounds_weights_per_channel_and_stays_close(trained, exported, tmp_path):
    run_head = torch.load(Run.open(trained["run"]).path("finetune", "model.pt"), weights_only=True)
    blob = load_blob(exported["int8"])
    head = read_model(exported["int8"], "cpu").head()
    for name in ("fc6", "fc7"):
        q, scale = blob["head"]["state"][f"{name}.weight"], blob["head"]["scales"][f"{name}.weight"]
        assert q.dtype == torch.int8 and q.abs().max() == 127 and scale.shape == (q.shape[0],)
        w = run_head["model"][f"{name}.weight"].float()
        err = (getattr(head, name).weight.detach() - w).abs()
        assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()  # round to nearest of each row
        assert err.max() > 0  # it is a rounding: not the float32 weights
    assert blob["version"] == VERSION
    # the box regressors too, one scale per class and coordinate; the trunk stays float16
    run = Run.open(trained["run"])
    trunk = blob["trunk"].values()
    assert all(isinstance(v, torch.Tensor) for v in trunk)
    assert any(v.dtype == torch.float16 for v in trunk)
    assert blob["bbox"]["weights"]["int8"].dtype == torch.int8
    rounded = read_model(exported["int8"], "cpu").bbox().weights
    err = np.abs(rounded - load_bbox(run).weights)
    assert (err <= blob["bbox"]["weights"]["scale"].numpy() / 2 * (1 + 1e-5)).all()
    # detections: the same windows pass NMS, scores within a few 1e-2 of the float32 run
    a = load_detector(run.with_test(score_threshold=-1e9, fc_dtype="float32"))
    m = read_model(exported["int8"], "cpu")
    b = load_detector(m, dataclasses.replace(m.test, score_threshold=-1e9, fc_dtype="float32"))
    from sppdet.imageio import load_image

    props = np.array([[2, 2, 40, 40], [30, 20, 90, 80], [10, 50, 60, 95]], np.float32)
    for path in val_images(trained, 8):
        da, db = a.detect(load_image(path), props), b.detect(load_image(path), props)
        assert len(da.scores) == len(db.scores) > 0
        order_a, order_b = np.lexsort((da.scores, da.labels)), np.lexsort((db.scores, db.labels))
        np.testing.assert_allclose(da.scores[order_a], db.scores[order_b], atol=5e-2)
        np.testing.assert_allclose(da.boxes[order_a], db.boxes[order_b], atol=1.0)  # regressed
    # int8 saves a byte per fc6 / fc7 weight against float16 (less the row scales)
    fc_numel = sum(blob["head"]["state"][f"{n}.weight"].numel() for n in ("fc6", "fc7"))
    saved = exported["float16"].stat().st_size - exported["int8"].stat().st_size
    assert saved > 0.95 * fc_numel


def test_version_1_files_are_still_read(exported, tmp_path):
    blob = load_blob(exported["float16"])
    blob["version"] = 1
    del blob["head"]["scales"]  # version 1 had no int8 weights
    torch.save(blob, tmp_path / "v1.pt")
    a, b = read_model(tmp_path / "v1.pt", "cpu").head(), read_model(exported["float16"]).head()
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb.to(va.device)), k


def test_the_file_holds_what_the_test_path_needs(trained, exported):
    blob = load_blob(exported["float16"])
    assert (blob["format"], blob["version"]) == (FORMAT, VERSION)
    assert blob["config"]["features"]["backbone"] == "zf5"
    assert blob["config"]["test"]["scorer"] == "svm" and blob["classes"] == list(trained["classes"])
    assert set(blob["svms"]) == {"fc7"} and blob["bbox"]["feature_scale"] > 0
    assert blob["head"]["state"]["fc6.weight"].dtype == torch.float16
    assert blob["head"]["state"]["fc6.bias"].dtype == torch.float32  # small tensors stay
    p = blob["provenance"]
    assert p["training_data"]["split"] == "train" and p["commit"]
    assert blob["preprocessing"]["scales"] == [64] and len(blob["preprocessing"]["mean"]) == 3


def test_export_scorer_sets_the_models_default(trained, tmp_path):
    model = tmp_path / "soft.pt"
    invoke("export", trained["run"], "--out", model, "--dtype", "float32", "--scorer", "softmax")
    assert load_blob(model)["config"]["test"]["scorer"] == "softmax"
    images = val_images(trained)
    soft_run = detect_json(tmp_path, *images, "--run", trained["run"], "--scorer", "softmax")
    assert detect_json(tmp_path, *images, "--model", model) == soft_run  # no --scorer needed
    assert sum(len(r["detections"]) for r in soft_run) > 0


def test_eval_with_a_model_file(trained, exported, tmp_path):
    data = trained["data"]
    j = tmp_path / "m.json"
    invoke("eval", "--voc2007", "--model", exported["float32"], "--devkit", data, "--split",
           "val", "--model-dir", tmp_path / "mrun", "--json", j, "--limit", 4)  # fmt: skip
    res = json.loads(j.read_text())
    assert 0 <= res["map"] <= 1 and set(res["ap"]) == set(trained["classes"])
    assert (tmp_path / "mrun" / "eval" / "val" / "eval.json").is_file()


def test_the_default_model_dir_is_keyed_by_the_files_bytes(exported, tmp_path):
    """A re-exported model of the same name gets its own default directory (the old one was
    made with the old file's settings and would be refused)."""
    from sppdet_cli.eval_cmd import default_model_dir

    a, b = tmp_path / "a" / "voc.pt", tmp_path / "b" / "voc.pt"
    for path, src in ((a, exported["float32"]), (b, exported["float16"])):
        path.parent.mkdir()
        path.write_bytes(Path(src).read_bytes())
    assert default_model_dir(a).parent == Path("runs")
    assert default_model_dir(a).name.startswith("voc-")
    assert default_model_dir(a) != default_model_dir(b)
    assert default_model_dir(a) == default_model_dir(Path(exported["float32"])).with_name(
        "voc-" + default_model_dir(Path(exported["float32"])).name.rsplit("-", 1)[1]
    )


def test_a_file_that_is_not_a_model_is_a_one_line_error(trained, exported, tmp_path):
    image = val_images(trained, 1)[0]
    bad = tmp_path / "notes.pt"
    bad.write_text("not a model\n")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "state.pt")
    (tmp_path / "cut.pt").write_bytes(exported["int8"].read_bytes()[:1000])  # a cut download
    for path in (bad, tmp_path / "state.pt", tmp_path / "cut.pt"):
        res = CliRunner().invoke(cli, ["detect", str(image), "--model", str(path)])
        assert res.exit_code == 2, res.output
        assert res.output.startswith("error: ") and res.output.count("\n") == 1
        assert "is not an sppdet model file" in res.output


def test_other_format_versions_are_refused(exported, tmp_path):
    blob = load_blob(exported["float16"])
    blob["version"] = VERSION + 1
    path = tmp_path / "future.pt"
    torch.save(blob, path)
    with pytest.raises(
        SppdetError, match=f"format version {VERSION + 1}.*reads versions 1, 2, 3: re-export"
    ):
        read_model(path)


def test_no_shipped_model_says_how_to_make_one(trained, monkeypatch, tmp_path):
    monkeypatch.setattr("sppdet.model_file.DEFAULT_MODEL", tmp_path / "absent.pt")
    with pytest.raises(SppdetError, match="no model ships yet.*sppdet export"):
        sppdet.load_model()
    res = CliRunner().invoke(cli, ["detect", str(val_images(trained, 1)[0])])
    assert res.exit_code == 2 and "no model ships yet" in res.output


def test_export_needs_a_trained_run(tmp_path):
    from sppdet.run import RunConfig

    run = Run.create(tmp_path / "empty", RunConfig())
    with pytest.raises(SppdetError, match="nothing trained"):
        export_model(run, tmp_path / "m.pt")


def test_importing_sppdet_has_no_side_effects():
    code = "import sys, sppdet; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------- sppdet.model (the run)


def test_box_regressors_carry_their_feature_scale(trained, tmp_path):
    run = Run.open(trained["run"])
    stats = json.loads((trained["run"] / "bbox" / "stats.json").read_text())
    assert BBoxRegressor.load(run.path("bbox", "bbox.npz")).feature_scale == stats["feature_scale"]
    # a run trained before the scale was stored: read from stats.json
    old = Run(tmp_path / "old", run.config)
    (tmp_path / "old" / "bbox").mkdir(parents=True)
    (tmp_path / "old" / "bbox" / "stats.json").write_text(json.dumps({"feature_scale": 0.5}))
    model = dataclasses.replace(load_bbox(run), feature_scale=None)
    model.save(old.path("bbox", "bbox.npz"))
    assert load_bbox(old).feature_scale == 0.5


def test_detectors_of_one_run_share_their_parts(trained):
    run = Run.open(trained["run"])
    tests = {
        "fc7": dataclasses.replace(run.config.test, bbox_reg=False),
        "soft": dataclasses.replace(run.config.test, scorer="softmax"),
    }
    dets = load_detectors(run, tests)
    assert dets["fc7"].trained_head is dets["soft"].trained_head
    assert dets["fc7"].bbox is None and dets["soft"].bbox is not None


def test_conv_finetuned_run_exports_its_tuned_blocks(trained, tmp_path):
    """A run that fine-tuned its top conv block: the file holds the tuned block, and the
    float32 export detects exactly as the run (fc7 SVMs and box regression on the tuned trunk)."""
    cfg = tmp_path / "cfg.yaml"
    # ZF-5's children end conv5, relu5: the top 2 hold conv5
    text = test_cli_e2e.CONFIG.replace("features:\n", "features:\n  top_blocks: 2\n")
    cfg.write_text(text.replace("finetune:\n", "finetune:\n  conv_blocks: 2\n"))
    run = tmp_path / "run"
    invoke("extract", "--devkit", trained["data"], "--split", "train", "--out", run,
           "--config", cfg, "--limit", 4)  # fmt: skip
    invoke("train", run, "--quiet")
    model = tmp_path / "m.pt"
    invoke("export", run, "--out", model, "--dtype", "float32")
    blob = load_blob(model)
    assert "0.weight" in blob["trunk_top"] and blob["config"]["conv_blocks"] == 2
    tuned, frozen = blob["trunk_top"]["0.weight"], blob["trunk"]["12.weight"]
    assert tuned.shape == frozen.shape and not torch.equal(tuned, frozen)
    images = val_images(trained, 2)
    assert detect_json(tmp_path, *images, "--model", model) == detect_json(
        tmp_path, *images, "--run", run
    )


def test_bench_with_a_model_file(trained, exported, tmp_path):
    out = invoke("bench", "--devkit", trained["data"], "--limit", 1, "--model",
                 exported["float16"], "--model-dir", tmp_path / "mrun", "--methods",
                 "spp_1scale", "--out-dir", tmp_path, "--name", "b", "--quiet")  # fmt: skip
    assert "spp_1scale" in out.output
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["methods"]["spp_1scale"]["seconds_per_image"] > 0
