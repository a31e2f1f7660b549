"""COCO data from the command line: ``extract``, ``train``, ``eval --coco``, ``detect``, ``bench``
on COCO jsons made here from a tiny synthetic VOC set (one json per split, category ids that are
not 1..K, a crowd object), checked against pycocotools run directly on the results file."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from sppdet.boxes import to_xywh
from sppdet.datasets import load_voc
from sppdet_cli.main import cli
from tests.test_cli_e2e import CONFIG, invoke

CATEGORY_IDS = (3, 7, 11, 15)  # sorted (the loader's class order) but not 1..K


def write_coco_split(devkit: Path, split: str, out: Path, *, first_image_id: int) -> Path:
    """The VOC ``split`` as a COCO json (difficult objects as crowd ones); file names relative
    to ``JPEGImages``. Written here, independently of sppdet's own converter."""
    ds = load_voc(devkit, split)
    cats = [{"id": i, "name": c} for i, c in zip(CATEGORY_IDS, ds.classes, strict=True)]
    images, anns = [], []
    for n, rec in enumerate(ds):
        image_id = first_image_id + n
        images.append(
            {"id": image_id, "file_name": rec.path.name, "width": rec.width, "height": rec.height}
        )
        for box, label, crowd in zip(
            to_xywh(rec.boxes).tolist(), rec.labels.tolist(), rec.difficult.tolist(), strict=True
        ):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "bbox": box,
                         "category_id": CATEGORY_IDS[label], "area": box[2] * box[3],
                         "iscrowd": int(crowd)})  # fmt: skip
    out.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return out


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory) -> dict[str, Path]:
    """make-synthetic -> COCO jsons -> extract (train, val) -> train, once for the module."""
    root = tmp_path_factory.mktemp("coco")
    data, run, cfg = root / "data", root / "run", root / "cfg.yaml"
    cfg.write_text(CONFIG)
    invoke("make-synthetic", data, "--images", 16, "--size", "96x96", "--seed", 1)
    train = write_coco_split(data, "train", root / "train.json", first_image_id=100)
    val = write_coco_split(data, "val", root / "val.json", first_image_id=500)
    images = data / "VOC2007" / "JPEGImages"
    for split, ann in (("train", train), ("val", val)):
        out = invoke("extract", "--coco", ann, "--images", images, "--split", split,
                     "--out", run, "--config", cfg)  # fmt: skip
        assert f"extract {split}: 8 images" in out.output
    invoke("train", run, "--quiet")
    return {"root": root, "run": run, "train": train, "val": val, "images": images, "cfg": cfg}


def test_run_keeps_the_category_mapping_and_training_file(coco_run):
    run = coco_run["run"]
    stored = json.loads((run / "categories.json").read_text())
    assert [c["id"] for c in stored["categories"]] == list(CATEGORY_IDS)
    assert [c["name"] for c in stored["categories"]] == ["disc", "square", "triangle", "star"]
    config = (run / "config.yaml").read_text()
    assert f"coco: {coco_run['train']}" in config and "devkit: null" in config
    for part in ("finetune/model.pt", "svm_fc7/svm.npz", "bbox/bbox.npz"):
        assert (run / part).is_file(), part


def test_eval_coco_metrics_equal_pycocotools_on_the_results_file(coco_run):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from sppdet.coco_eval import COCO_STAT_NAMES

    run, val, images = coco_run["run"], coco_run["val"], coco_run["images"]
    out = invoke("eval", "--coco", val, "--images", images, "--run", run)
    assert "COCO: AP " in out.output and "mAP" in out.output
    summary = json.loads((run / "eval/val/eval.json").read_text())
    results = json.loads((run / "eval/val/coco_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= set(CATEGORY_IDS)
    assert {r["image_id"] for r in results} <= set(range(500, 508))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools on the file, as a user would
        gt = COCO(str(val))
        ev = COCOeval(gt, gt.loadRes(str(run / "eval/val/coco_results.json")), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert [summary["coco"][k] for k in COCO_STAT_NAMES] == pytest.approx(list(ev.stats))
    assert 0 < summary["coco"]["AP50"] <= 1
    # the same comp4 files evaluated as files: the same VOC and COCO numbers
    j = coco_run["root"] / "dets.json"
    invoke("eval", "--coco", val, "--images", images, "--detections", run / "eval/val",
           "--json", j)  # fmt: skip
    again = json.loads(j.read_text())
    assert again["map"] == pytest.approx(summary["map"], abs=1e-12)
    assert again["coco"] == pytest.approx(summary["coco"], abs=1e-9)
    assert (j.parent / "coco_results.json").is_file()


def test_crowd_objects_are_ignored_as_difficult_ones(coco_run):
    """A crowd object loads as VOC's difficult one (neither positive nor negative): the same
    json with it not crowd counts one more positive of its class."""
    from sppdet.coco_data import load_coco
    from sppdet.voc_eval import Detections, evaluate_detections

    val = json.loads(coco_run["val"].read_text())
    crowd = [a for a in val["annotations"] if a["iscrowd"]]
    assert crowd, "the synthetic val split has a difficult object"
    counted = dict(val, annotations=[dict(a, iscrowd=0) for a in val["annotations"]])
    path = coco_run["root"] / "val_counted.json"
    path.write_text(json.dumps(counted))
    a, b = (load_coco(p, coco_run["images"], split="val") for p in (coco_run["val"], path))
    assert sum(int(r.difficult.sum()) for r in a) == len(crowd)
    assert sum(int(r.difficult.sum()) for r in b) == 0
    cls = CATEGORY_IDS.index(crowd[0]["category_id"])
    empty = {c: Detections.empty() for c in a.classes}
    npos = [evaluate_detections(d, empty).per_class[a.classes[cls]].npos for d in (a, b)]
    assert npos[1] - npos[0] == sum(a2["category_id"] == crowd[0]["category_id"] for a2 in crowd)


def test_detect_and_bench_on_coco(coco_run):
    run, images = coco_run["run"], coco_run["images"]
    first = sorted(images.glob("*.jpg"))[0]
    dj = coco_run["root"] / "det.json"
    invoke("detect", first, "--run", run, "--score-threshold", -5, "--json", dj)
    dets = json.loads(dj.read_text())[0]["detections"]
    assert dets and {d["class"] for d in dets} <= {"disc", "square", "triangle", "star"}
    out_dir = coco_run["root"] / "bench"
    invoke("bench", "--coco", coco_run["val"], "--images", images, "--run", run, "--limit", 2,
           "--methods", "spp_1scale", "--out-dir", out_dir, "--quiet")  # fmt: skip
    assert list(out_dir.glob("*.json"))


def test_data_errors_are_one_line(coco_run, tmp_path):
    run, images = coco_run["run"], coco_run["images"]
    val = json.loads(coco_run["val"].read_text())
    other = dict(val, categories=[dict(c, name=c["name"].upper()) for c in val["categories"]])
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps(other))
    cases = [
        (("eval", "--coco", bad, "--images", images, "--run", run), "categories"),
        (("eval", "--voc2007", "--coco", coco_run["val"], "--run", run), "--voc2007 evaluates"),
        (("eval", "--run", run, "--split", "val"), "give the benchmark"),
        (
            (
                "extract",
                "--coco",
                coco_run["val"],
                "--devkit",
                tmp_path,
                "--split",
                "val",
                "--out",
                tmp_path / "r",
            ),
            "not both",
        ),  # fmt: skip
        (("extract", "--images", images, "--split", "val", "--out", tmp_path / "r"), "--coco"),
        (("extract", "--split", "val", "--out", run), "--coco FILE"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(cli, [str(a) for a in args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, result.output


def test_train_skips_the_svms_a_softmax_scored_run_does_not_use(coco_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(coco_run["run"], run)
    shutil.rmtree(run / "svm_fc7")
    config = (run / "config.yaml").read_text()
    assert "scorer: svm" in config
    (run / "config.yaml").write_text(config.replace("scorer: svm", "scorer: softmax"))
    out = invoke("train", run, "--quiet").output
    assert "svm" not in out.split("train:")[1] and not (run / "svm_fc7").exists()
    out = invoke("train", run, "--quiet", "--svm").output
    assert "svm " in out and (run / "svm_fc7" / "svm.npz").is_file()
