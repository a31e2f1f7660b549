"""Tests of sppdet.viz: files are valid PNGs, drawings land where the boxes are."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from sppdet.viz import draw_detections, plot_ap_comparison, plot_pr_curves, plot_recall_curve


def test_import_has_no_pyplot_side_effect():
    code = "import sys, sppdet.viz; assert 'matplotlib.pyplot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_plot_pr_curves(tmp_path):
    rec = np.array([0.1, 0.2, 0.2, 0.5])
    prec = np.array([np.nan, 1.0, 0.66, 0.5])
    per_class = {f"c{k}": SimpleNamespace(recall=rec, precision=prec, ap=0.4) for k in range(7)}
    per_class["none"] = SimpleNamespace(recall=rec, precision=prec, ap=float("nan"))
    path = tmp_path / "pr.png"
    plot_pr_curves(per_class, path)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > im.height  # 5 columns x 2 rows
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file
    with pytest.raises(ValueError):
        plot_pr_curves({}, tmp_path / "empty.png")


def test_plot_recall_curve(tmp_path):
    path = tmp_path / "sub" / "recall.png"
    n = np.array([100, 300, 1000, 2000])
    plot_recall_curve(n, {"IoU 0.5": [0.6, 0.8, 0.9, 0.95], "IoU 0.7": [0.3, 0.5, 0.6, 0.7]}, path)
    with Image.open(path) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="IoU"):
        plot_recall_curve(n, {"IoU": [0.5]}, path)


def test_draw_detections(tmp_path):
    image = np.zeros((80, 120, 3), np.uint8)
    boxes = np.array([[20.0, 30.0, 60.0, 70.0]])
    path = tmp_path / "det.png"
    draw_detections(
        image, boxes, [1], [0.87], ["cat", "dog"], path, gt_boxes=np.array([[5, 5, 15, 15]])
    )
    with Image.open(path) as im:
        out = np.asarray(im.convert("RGB"))
    assert out.shape == image.shape
    assert tuple(out[50, 20]) == (255, 127, 14)  # left edge of the box in class 1's colour
    assert tuple(out[50, 59]) == (255, 127, 14)  # right edge: last pixel inside [20, 60)
    assert out[50, 40].sum() == 0  # interior untouched
    assert tuple(out[10, 5]) == (255, 255, 255)  # ground truth in white
    assert out[25, 25].sum() > 0  # caption above the box
    with pytest.raises(ValueError):
        draw_detections(image, boxes, [0, 1], [0.5], ["cat", "dog"], path)


def test_plot_ap_comparison(tmp_path):
    aps = {"spp": {"cat": 0.5, "dog": float("nan")}, "rcnn": {"cat": 0.4, "dog": float("nan")}}
    path = tmp_path / "ap.png"
    plot_ap_comparison(aps, path, title="pool5")
    with Image.open(path) as im:
        assert im.format == "PNG"
    with pytest.raises(ValueError, match="different classes"):
        plot_ap_comparison({"a": {"cat": 0.1}, "b": {"dog": 0.1}}, tmp_path / "x.png")
    with pytest.raises(ValueError):
        plot_ap_comparison({}, tmp_path / "y.png")
