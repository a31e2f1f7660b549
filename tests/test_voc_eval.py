"""Tests of sppdet.voc_eval: hand-worked VOC cases, a naive float64 reference, comp4 I/O."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sppdet.boxes import from_voc
from sppdet.comp4 import read_comp4, write_comp4
from sppdet.errors import DataError
from sppdet.voc_eval import (
    VOC07_RECALL_THRESHOLDS,
    Detections,
    evaluate_class,
    evaluate_detections,
    format_ap_table,
    voc_ap,
)
from sppdet_cli.eval_cmd import command

EMPTY = (np.zeros((0, 4), np.float32), np.zeros(0, bool))


def make_dataset(classes, images):
    """A Dataset from ``{image_id: (VOC 1-based boxes, labels, difficult)}``."""
    from sppdet.datasets import Dataset, ImageRecord

    records = tuple(
        ImageRecord(
            image_id=image_id,
            path=Path(f"{image_id}.jpg"),
            width=200,
            height=200,
            boxes=from_voc(np.array(boxes, np.float64).reshape(-1, 4)),
            labels=np.array(labels, np.int64),
            difficult=np.array(difficult, bool),
        )
        for image_id, (boxes, labels, difficult) in images.items()
    )
    return Dataset("tiny", tuple(classes), records, Path("."), "val")


def _gt(*voc_boxes, difficult=None):
    """One image's ground truth from VOC 1-based inclusive boxes."""
    diff = np.zeros(len(voc_boxes), bool) if difficult is None else np.asarray(difficult)
    return from_voc(np.array(voc_boxes, np.float64)), diff


def _eval(ids, scores, voc_boxes, gt, **kw):
    return evaluate_class(ids, scores, from_voc(np.array(voc_boxes, np.float64)), gt, **kw)


def test_perfect_detections_give_ap_one():
    gt = {"a": _gt([1, 1, 50, 50], [60, 60, 100, 90]), "b": _gt([5, 5, 30, 40]), "c": EMPTY}
    boxes = [[1, 1, 50, 50], [60, 60, 100, 90], [5, 5, 30, 40]]
    for metric in (True, False):
        r = _eval(["a", "a", "b"], [0.9, 0.8, 0.7], boxes, gt, use_07_metric=metric)
        assert r.ap == pytest.approx(1.0)
        assert r.npos == 3 and r.tp.all() and not r.fp.any()


def test_duplicate_detection_is_false_positive():
    gt = {"a": _gt([10, 10, 50, 50])}
    r = _eval(["a", "a"], [0.9, 0.8], [[10, 10, 50, 50], [11, 10, 50, 50]], gt)
    assert r.tp.tolist() == [True, False] and r.fp.tolist() == [False, True]
    np.testing.assert_allclose(r.precision, [1.0, 0.5])
    assert r.ap == pytest.approx(1.0)  # max precision at every recall level is still 1


def test_difficult_match_is_ignored_and_not_counted_in_npos():
    gt = {"a": _gt([10, 10, 50, 50], [100, 100, 150, 150], difficult=[True, False])}
    r = _eval(["a", "a"], [0.9, 0.8], [[10, 10, 50, 50], [100, 100, 150, 150]], gt)
    assert r.npos == 1
    assert r.tp.tolist() == [False, True] and r.fp.tolist() == [False, False]
    assert math.isnan(r.precision[0])  # devkit: 0/0 before the first TP or FP
    assert r.ap == pytest.approx(1.0)  # MATLAB max skips that NaN


def test_iou_exactly_half_is_a_true_positive_with_plus_one_areas():
    # GT 1..10 x 1..10 is 100 pixels; detection 1..20 x 1..10 is 200 pixels and contains it:
    # "+1" IoU = 100 / 200 = 0.5 exactly -> TP (devkit >=). Without the +1 it would be
    # 81 / 171 < 0.5 (FP), so this also checks that internal boxes carry the +1 correctly.
    gt = {"a": _gt([1, 1, 10, 10])}
    r = _eval(["a"], [1.0], [[1, 1, 20, 10]], gt)
    assert r.tp.tolist() == [True]
    # One pixel wider: 100 / 210 < 0.5 -> FP.
    r = _eval(["a"], [1.0], [[1, 1, 21, 10]], gt)
    assert r.fp.tolist() == [True]
    # py-faster-rcnn's strict ">" would reject the 0.5 case; a higher threshold does too.
    r = _eval(["a"], [1.0], [[1, 1, 20, 10]], gt, iou_threshold=0.5000001)
    assert r.fp.tolist() == [True]


def test_touching_boxes_do_not_overlap():
    # Detection 11..20 starts right after GT 1..10: "+1" intersection width 0 -> no candidate.
    r = _eval(["a"], [1.0], [[11, 1, 20, 10]], {"a": _gt([1, 1, 10, 10])})
    assert r.fp.tolist() == [True]


def test_best_overlap_wins_and_first_ground_truth_on_ties():
    # The detection overlaps both GTs (IoU 1 with the second); it must go to the second.
    gt = {"a": _gt([1, 1, 12, 10], [1, 1, 10, 10])}
    r = _eval(["a", "a"], [0.9, 0.8], [[1, 1, 10, 10], [1, 1, 10, 10]], gt)
    assert r.tp.tolist() == [True, False]  # second det: same best GT -> duplicate
    # Two identical GTs: the first takes the first detection, the second is then a duplicate
    # of GT 0 (the devkit does not fall back to the next-best GT).
    gt = {"a": _gt([1, 1, 10, 10], [1, 1, 10, 10])}
    r = _eval(["a", "a"], [0.9, 0.8], [[1, 1, 10, 10], [1, 1, 10, 10]], gt)
    assert r.tp.tolist() == [True, False] and r.fp.tolist() == [False, True]


def test_equal_scores_keep_input_order():
    # MATLAB sort(-confidence) is stable: with equal scores the FP listed first stays first.
    gt = {"a": _gt([1, 1, 10, 10])}
    r = _eval(["a", "a"], [0.5, 0.5], [[50, 50, 60, 60], [1, 1, 10, 10]], gt)
    assert r.order.tolist() == [0, 1]
    np.testing.assert_allclose(r.precision, [0.0, 0.5])
    assert r.ap == pytest.approx(0.5)
    r = _eval(["a", "a"], [0.5, 0.5], [[1, 1, 10, 10], [50, 50, 60, 60]], gt)
    assert r.ap == pytest.approx(1.0)


def _three_gt_case():
    # 3 GT in three images; sorted detections are TP, FP, TP, FP, FP.
    gt = {"a": _gt([1, 1, 10, 10]), "b": _gt([1, 1, 10, 10]), "c": _gt([1, 1, 10, 10])}
    ids = ["a", "x", "b", "x", "x"]
    gt["x"] = EMPTY
    boxes = [[1, 1, 10, 10]] * 5
    return ids, [0.9, 0.8, 0.7, 0.6, 0.5], boxes, gt


def test_eleven_point_ap_worked_by_hand():
    # rec  = 1/3, 1/3, 2/3, 2/3, 2/3 ; prec = 1, 1/2, 2/3, 1/2, 2/5
    # t = 0, .1, .2, .3 (<= 1/3): max prec = 1            -> 4 * 1
    # t = .4, .5, .6   (<= 2/3): max prec over rec=2/3 = 2/3 -> 3 * 2/3 = 2
    # t = .7 .. 1: no recall that high                      -> 0
    # AP = (4 + 2) / 11 = 6/11
    r = _eval(*_three_gt_case())
    np.testing.assert_allclose(r.recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(r.precision, [1, 1 / 2, 2 / 3, 1 / 2, 2 / 5])
    assert r.ap == pytest.approx(6 / 11, abs=1e-12)


def test_all_point_ap_worked_by_hand():
    # Envelope of prec (right-to-left max): 1, 2/3, 2/3, 1/2, 2/5, then 0 at recall 1.
    # Recall steps: 0 -> 1/3 at precision 1, 1/3 -> 2/3 at 2/3, 2/3 -> 1 at 0.
    # AP = 1/3 * 1 + 1/3 * 2/3 = 5/9
    r = _eval(*_three_gt_case(), use_07_metric=False)
    assert r.ap == pytest.approx(5 / 9, abs=1e-12)


def test_eleven_point_thresholds_follow_matlab_colon():
    # MATLAB 0:0.1:1 -> t_3 = 0 + 3 * 0.1 = 0.30000000000000004, t_6 = 1 - 4 * 0.1 = 0.6.
    assert VOC07_RECALL_THRESHOLDS[3] == 0.30000000000000004
    assert VOC07_RECALL_THRESHOLDS[6] == 0.6 and VOC07_RECALL_THRESHOLDS[7] == 0.7
    # npos = 10, detections TP TP TP FP FP FP TP: recall 3/10 == 0.3 < t_3, so at t_3 only the
    # point (rec 0.4, prec 4/7) counts: AP = (3 * 1 + 2 * 4/7) / 11 = 29/77 (np.arange: 32/77).
    rec = np.array([1, 2, 3, 3, 3, 3, 4]) / 10
    prec = np.array([1, 1, 1, 3 / 4, 3 / 5, 3 / 6, 4 / 7])
    assert voc_ap(rec, prec) == pytest.approx(29 / 77, abs=1e-12)
    # npos = 5, three TPs then an FP: recall 3/5 == 0.6 counts at t_6 (np.arange would skip it).
    rec, prec = np.array([1, 2, 3, 3]) / 5, np.array([1, 1, 1, 3 / 4])
    assert voc_ap(rec, prec) == pytest.approx(7 / 11, abs=1e-12)


def test_no_detections_and_no_ground_truth():
    r = evaluate_class([], [], np.zeros((0, 4)), {"a": _gt([1, 1, 10, 10])})
    assert r.ap == 0.0 and r.npos == 1
    r = evaluate_class(["a"], [1.0], from_voc([[1, 1, 5, 5]]), {"a": EMPTY})
    assert math.isnan(r.ap) and r.npos == 0


def test_unknown_image_is_an_error():
    with pytest.raises(DataError, match="zzz"):
        evaluate_class(["zzz"], [1.0], np.zeros((1, 4)), {"a": EMPTY})


def _naive_ap(ids, scores, boxes, gt, use_07_metric):
    """Reference: the devkit loop on internal continuous boxes in float64 (IoU without +1)."""
    order = sorted(range(len(scores)), key=lambda d: -scores[d])
    used = {k: [False] * len(v[0]) for k, v in gt.items()}
    npos = sum(int((~d).sum()) for _, d in gt.values())
    tp, fp = [], []
    for d in order:
        b = [float(v) for v in boxes[d]]
        best, jbest = -math.inf, -1
        for j, g in enumerate(np.asarray(gt[ids[d]][0], np.float64)):
            iw = min(b[2], g[2]) - max(b[0], g[0])
            ih = min(b[3], g[3]) - max(b[1], g[1])
            if iw > 0 and ih > 0:
                union = (b[2] - b[0]) * (b[3] - b[1]) + (g[2] - g[0]) * (g[3] - g[1]) - iw * ih
                if iw * ih / union > best:
                    best, jbest = iw * ih / union, j
        t = f = 0
        if best >= 0.5:
            if not gt[ids[d]][1][jbest]:
                t, f = (0, 1) if used[ids[d]][jbest] else (1, 0)
                used[ids[d]][jbest] = True
        else:
            f = 1
        tp.append(t)
        fp.append(f)
    ctp, cfp = np.cumsum(tp, dtype=float), np.cumsum(fp, dtype=float)
    rec = ctp / npos
    with np.errstate(invalid="ignore"):
        prec = ctp / (ctp + cfp)
    if use_07_metric:
        return sum(
            (np.nanmax(prec[rec >= t]) if (rec >= t).any() else 0.0) / 11
            for t in VOC07_RECALL_THRESHOLDS
        )
    mrec = np.r_[0, rec, 1]
    mpre = np.fmax.accumulate(np.r_[0, prec, 0][::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_reference_on_random_data(seed):
    rng = np.random.default_rng(seed)
    gt, ids, boxes = {}, [], []
    for k in range(30):
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 80, (n, 2))
        g = np.c_[xy, xy + rng.uniform(5, 40, (n, 2))]
        gt[f"im{k}"] = (g, rng.random(n) < 0.2)
        for box in g:  # jittered copies (hits, near-misses, duplicates) ...
            for _ in range(int(rng.integers(0, 3))):
                ids.append(f"im{k}")
                boxes.append(box + rng.normal(0, 4, 4))
    for _ in range(40):  # ... and random boxes
        ids.append(f"im{int(rng.integers(0, 30))}")
        xy = rng.uniform(0, 80, 2)
        boxes.append(np.r_[xy, xy + rng.uniform(5, 40, 2)])
    scores = np.round(rng.random(len(ids)), 2)  # 2 decimals: many ties
    boxes = np.array(boxes)
    for metric in (True, False):
        r = evaluate_class(ids, scores, boxes, gt, use_07_metric=metric)
        assert r.ap == pytest.approx(_naive_ap(ids, scores, boxes, gt, metric), abs=1e-12)


def _two_class_dataset():
    return make_dataset(
        ("cat", "dog"),
        {
            "000001": ([[1, 1, 50, 50], [60, 60, 90, 90]], [0, 1], [False, False]),
            "000002": ([[10, 10, 40, 40]], [0], [True]),
            "000003": ([], [], []),
        },
    )


def _two_class_detections():
    return {
        "cat": Detections(
            ["000001", "000002", "000003"],
            [0.9, 0.8, 0.123456789],
            from_voc([[1, 1, 50, 50], [10, 10, 40, 40], [2.5, 3.25, 20.125, 30.0625]]),
        ),
        "dog": Detections(["000001"], [0.5], from_voc([[70, 70, 100, 100]])),
    }


def test_evaluate_detections_and_table():
    result = evaluate_detections(_two_class_dataset(), _two_class_detections())
    assert result.ap["cat"] == pytest.approx(1.0)  # TP, difficult (ignored), FP
    assert result.ap["dog"] == 0.0  # IoU 21*21 / (2*31*31 - 441) < 0.5
    assert result.map == pytest.approx(0.5)
    assert result.to_json() == {"map": 0.5, "ap": {"cat": 1.0, "dog": 0.0}}
    table = format_ap_table(result)
    assert "cat" in table and "100.0" in table and "50.0" in table


def test_class_without_ground_truth_is_left_out_of_map(caplog):
    ds = make_dataset(("cat", "dog"), {"1": ([[1, 1, 9, 9]], [0], [False])})
    dets = {"cat": Detections(["1"], [1.0], from_voc([[1, 1, 9, 9]]))}
    with caplog.at_level(logging.WARNING):
        result = evaluate_detections(ds, dets)
    assert math.isnan(result.ap["dog"]) and result.map == 1.0
    assert "dog" in caplog.text
    assert result.to_json()["ap"]["dog"] is None


def test_comp4_round_trip(tmp_path):
    ds, dets = _two_class_dataset(), _two_class_detections()
    paths = write_comp4(tmp_path, "val", ds.classes, dets)
    assert [p.name for p in paths] == ["comp4_det_val_cat.txt", "comp4_det_val_dog.txt"]
    first = paths[0].read_text().splitlines()[0]
    assert first == "000001 0.900000 1.000 1.000 50.000 50.000"  # VOC 1-based on disk
    back = read_comp4(tmp_path, "val", ds.classes, image_ids=ds.image_ids)
    for name in ds.classes:
        assert back[name].image_ids.tolist() == dets[name].image_ids.tolist()
        np.testing.assert_allclose(back[name].scores, dets[name].scores, atol=5e-7)
        np.testing.assert_allclose(back[name].boxes, dets[name].boxes, atol=5e-4)
    again = evaluate_detections(ds, back)
    assert again.ap == evaluate_detections(ds, dets).ap


def test_comp4_errors(tmp_path, caplog):
    ds = _two_class_dataset()
    path = tmp_path / "comp4_det_val_cat.txt"
    path.write_text("000001 0.9 1 1 50 50\n\n000001 0.8 1 1 50\n")
    with pytest.raises(DataError, match=r"comp4_det_val_cat\.txt:3"):
        read_comp4(tmp_path, "val", ["cat"])
    path.write_text("000001 0.9 1 1 50 nan\n")
    with pytest.raises(DataError, match=":1"):
        read_comp4(tmp_path, "val", ["cat"])
    path.write_text("000001 0.9 1 1 50 50\n999999 0.8 1 1 50 50\n")
    with pytest.raises(DataError, match="999999"):
        read_comp4(tmp_path, "val", ["cat"], image_ids=ds.image_ids)
    kept = read_comp4(tmp_path, "val", ["cat"], image_ids=ds.image_ids, strict=False)["cat"]
    assert kept.image_ids.tolist() == ["000001"]
    with caplog.at_level(logging.WARNING):  # a class without its file: no detections
        missing = read_comp4(tmp_path, "val", ["cat", "dog"])
    assert len(missing["dog"]) == 0 and "comp4_det_val_dog.txt" in caplog.text
    assert len(missing["cat"]) == 2


def test_comp4_dir_without_any_file_of_the_split_is_an_error(tmp_path):
    """No file for any class is a mistake (wrong directory, split or classes), not mAP 0."""
    with pytest.raises(DataError, match="holds no comp4 files") as info:
        read_comp4(tmp_path, "val", ["cat", "dog"])
    assert "comp4_det_val_cat.txt" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "comp4_det_test_cat.txt").write_text("000001 0.9 1 1 50 50\n")
    (tmp_path / "comp4_det_my_test_hot_dog.txt").write_text("")  # "_" in split and class
    with pytest.raises(DataError, match=r"for split\(s\) my_test, test$"):
        read_comp4(tmp_path, "val", ["cat", "hot_dog"])
    with pytest.raises(DataError, match="name none of these classes"):
        read_comp4(tmp_path, "val", ["bird"])
    with pytest.raises(DataError, match="detections directory not found"):
        read_comp4(tmp_path / "none", "val", ["cat"])
    (tmp_path / "comp4_det_val_hot_dog.txt").write_text("")  # one empty file is enough
    assert len(read_comp4(tmp_path, "val", ["cat", "hot_dog"])["cat"]) == 0


def test_detections_concat_and_validation():
    a = Detections(["x"], [1.0], np.zeros((1, 4), np.float32))
    both = Detections.concat([a, Detections.empty(), a])
    assert len(both) == 2 and both.boxes.dtype == np.float64
    with pytest.raises(ValueError):
        Detections(["x", "y"], [1.0], np.zeros((1, 4)))


def _write_voc_tree(root, images):
    """A tiny VOCdevkit/VOC2007 tree: {image_id: [(class, VOC box, difficult), ...]}."""
    voc = root / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (voc / sub).mkdir(parents=True)
    for image_id, objects in images.items():
        objs = "".join(
            f"<object><name>{c}</name><difficult>{int(d)}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for c, b, d in objects
        )
        xml = f"<annotation><size><width>200</width><height>150</height></size>{objs}</annotation>"
        (voc / "Annotations" / f"{image_id}.xml").write_text(xml)
        (voc / "JPEGImages" / f"{image_id}.jpg").write_bytes(b"")
    (voc / "ImageSets/Main/val.txt").write_text("".join(f"{i}\n" for i in images))


def test_cli_end_to_end(tmp_path):
    _write_voc_tree(
        tmp_path / "VOCdevkit",
        {"000001": [("cat", (1, 1, 50, 50), False)], "000002": [("dog", (10, 10, 60, 60), True)]},
    )
    dets = {
        "cat": Detections(["000001", "000002"], [0.9, 0.95], from_voc([[1, 1, 50, 50], [5] * 4])),
        "dog": Detections(["000002"], [0.5], from_voc([[10, 10, 60, 60]])),
    }
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    write_comp4(tmp_path / "dets", "val", ["cat", "dog"], dets)
    out = tmp_path / "res.json"
    args = ["--voc2007", "--devkit", str(tmp_path / "VOCdevkit"), "--split", "val"]
    args += ["--classes", str(tmp_path / "classes.txt"), "--json", str(out)]
    result = CliRunner().invoke(command, [*args, "--detections", str(tmp_path / "dets")])
    assert result.exit_code == 0, result.output
    assert "mAP" in result.output
    # cat: FP (0.95) then TP -> prec 0.5 at recall 1 -> AP 0.5; dog: only a difficult GT -> nan.
    saved = json.loads(out.read_text())
    assert saved["map"] == pytest.approx(0.5) and saved["ap"]["cat"] == pytest.approx(0.5)
    assert list(saved) == ["map", "ap"] and saved["ap"]["dog"] is None
    result = CliRunner().invoke(command, args)  # no --detections
    assert result.exit_code == 2 and "--detections" in result.output
    plots = ["--use-2010-metric", "--plots", str(tmp_path / "plots"), "--limit", "1"]
    result = CliRunner().invoke(command, [*args, "--detections", str(tmp_path / "dets"), *plots])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plots" / "pr_curves.png").is_file()
