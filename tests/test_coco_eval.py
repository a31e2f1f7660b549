"""Tests of sppdet.coco_eval on a tiny COCO json made here."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sppdet.boxes import from_xywh
from sppdet.coco_data import load_coco
from sppdet.coco_eval import COCO_STAT_NAMES, evaluate_coco
from sppdet.errors import DataError
from sppdet.voc_eval import Detections

# Category ids out of order on purpose: classes follow increasing id ("cat" = 3, "dog" = 7).
ANNOTATIONS = [
    (1, 7, [10.0, 10.0, 60.0, 40.0]),
    (1, 3, [100.0, 20.0, 50.0, 80.0]),
    (2, 3, [5.0, 5.0, 150.0, 150.0]),
    (2, 7, [30.0, 160.0, 20.0, 20.0]),
]


@pytest.fixture
def coco_dataset(tmp_path):
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200} for i in (1, 2)]
    for im in images:
        (tmp_path / im["file_name"]).write_bytes(b"")  # the loader only checks existence
    anns = [
        {"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for n, (i, c, b) in enumerate(ANNOTATIONS)
    ]
    cats = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]
    path = tmp_path / "instances_tiny.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return load_coco(path, tmp_path)


def _perfect(names_by_cat):
    dets = {}
    for cat_id, name in names_by_cat.items():
        rows = [(str(i), b) for i, c, b in ANNOTATIONS if c == cat_id]
        dets[name] = Detections(
            [i for i, _ in rows], np.linspace(0.9, 0.5, len(rows)), from_xywh([b for _, b in rows])
        )
    return dets


def test_perfect_detections_give_ap_one(coco_dataset, capsys):
    assert coco_dataset.classes == ("cat", "dog")
    stats = evaluate_coco(coco_dataset, _perfect({3: "cat", 7: "dog"}))
    assert list(stats) == list(COCO_STAT_NAMES)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert stats["AR100"] == pytest.approx(1.0)
    assert capsys.readouterr().out == ""  # pycocotools prints suppressed


def test_swapped_classes_give_ap_zero(coco_dataset):
    stats = evaluate_coco(coco_dataset, _perfect({3: "dog", 7: "cat"}))
    assert stats["AP"] == pytest.approx(0.0)


def test_shifted_boxes_lower_ap(coco_dataset):
    dets = _perfect({3: "cat", 7: "dog"})
    cat = dets["cat"]
    dets["cat"] = Detections(cat.image_ids, cat.scores, cat.boxes + np.array([15, 0, 15, 0]))
    stats = evaluate_coco(coco_dataset, dets)
    assert 0.0 < stats["AP"] < 1.0


def test_errors_and_empty(coco_dataset):
    bad = {"cat": Detections(["99"], [1.0], np.array([[0, 0, 5, 5]]))}
    with pytest.raises(DataError, match="99"):
        evaluate_coco(coco_dataset, bad)
    assert evaluate_coco(coco_dataset, {})["AP"] == 0.0
