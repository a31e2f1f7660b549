"""Tests of sppdet.evaluate's pass over test variants (:func:`detect_variants`).

The variants of one image share pool5, fc features and scores; the pass must give exactly the
detections of each detector run on its own, and compute each shared value once.
"""

from __future__ import annotations

import numpy as np
import torch

from sppdet.detect import STAGES, Detector
from sppdet.detect import TestConfig as DetConfig  # not "Test*": pytest would collect it
from sppdet.evaluate import detect_variants
from sppdet.timing import StageTimer
from sppdet.window_features import SPPImage
from tests import test_detect
from tests.test_detect import (
    CLASSES,
    HIDDEN,
    SPP,
    H,
    LinearSVM,
    ShiftingRegressor,
    W,
    as_rows,
    disjoint_boxes,
)

# the same tiny parts as tests/test_detect.py
extractor, head, maps = test_detect.extractor, test_detect.head, test_detect.maps

VARIANTS = {
    "fc7": {"scorer": "svm", "bbox_reg": False},
    "fc7_bb": {"scorer": "svm", "bbox_reg": True},
    "softmax": {"scorer": "softmax", "bbox_reg": False},
    "softmax_bb": {"scorer": "softmax", "bbox_reg": True},
    "pool5": {"scorer": "svm", "layer": "pool5", "bbox_reg": False},
    "random": {"scorer": "random", "bbox_reg": True},
    "nodedup": {"scorer": "svm", "bbox_reg": True, "dedup": False},
    "int8": {"scorer": "svm", "bbox_reg": True, "fc_dtype": "int8"},
}


def detectors(extractor, head, reg) -> dict[str, Detector]:
    """The variants, sharing one head, one regressor and the SVMs of each layer (as
    sppdet.model.load_detectors builds them)."""
    svms = {"fc7": LinearSVM(HIDDEN, len(CLASSES)), "pool5": LinearSVM(HIDDEN, len(CLASSES))}
    dim = extractor.spec.channels * sum(n * n for n in SPP.levels)
    svms["pool5"] = LinearSVM(dim, len(CLASSES), seed=1)
    out = {}
    for name, changes in VARIANTS.items():
        cfg = DetConfig(**{"fc_dtype": "float32", "score_threshold": -1e9, **changes})
        svm = svms[cfg.layer] if cfg.scorer == "svm" else None
        out[name] = Detector(extractor, SPP, head, svm, reg, 0.5, CLASSES, cfg)
    return out


def test_the_pass_gives_each_detectors_own_detections_and_shares_fc(extractor, head, maps):
    # overlapping copies: some windows share map cells (dedup) and NMS has work to do
    props = np.concatenate([disjoint_boxes(8), disjoint_boxes(8) + 3, disjoint_boxes(8) + 9])
    reg = ShiftingRegressor(1.0, 2.0)
    alone = {
        n: d.detect_maps(maps, (H, W), props) for n, d in detectors(extractor, head, reg).items()
    }
    dets = detectors(extractor, head, reg)
    timers = {n: StageTimer() for n in dets}
    fc6_calls = []
    hook = head.fc6.register_forward_hook(lambda *_: fc6_calls.append(1))
    try:
        together = detect_variants(
            dets, (H, W), props, lambda d: d.pool_fn(SPPImage(maps, SPP)), timers
        )
    finally:
        hook.remove()
    assert together.keys() == alone.keys()
    for name in VARIANTS:
        assert len(alone[name].scores) > 0, name
        assert as_rows(together[name]) == as_rows(alone[name]), name
    # fc6 ran once for the float32 fc7 / softmax variants with dedup, once without dedup (other
    # pool5 rows); int8 runs its own compressed layers, which have no hook
    assert len(fc6_calls) == 2
    # every variant is charged the shared work it used, as if it had run alone
    for name, t in timers.items():
        assert t.seconds["spp"] > 0 and t.seconds["proposals"] > 0, name
        assert set(t.seconds) <= set(STAGES)
    assert "svm" not in timers["softmax"].seconds and timers["softmax"].seconds["fc"] > 0
    assert timers["fc7_bb"].seconds["bbox"] > 0 and "bbox" not in timers["fc7"].seconds


def test_the_pass_with_no_usable_window_gives_empty_detections(extractor, head, maps):
    dets = detectors(extractor, head, ShiftingRegressor(0.0, 0.0))
    props = np.array([[10, 10, 10, 40]], np.float32)  # degenerate
    out = detect_variants(dets, (H, W), props, lambda d: None)
    assert all(len(d.scores) == 0 and d.boxes.shape == (0, 4) for d in out.values())


class FeatureRegressor:
    """Moves each window by the mean of its own (scaled) pool5 row: wrong rows show."""

    def predict_rows(self, features: torch.Tensor, rows, boxes, labels) -> np.ndarray:
        shift = features.numpy()[rows].mean(axis=1, keepdims=True)
        return (np.asarray(boxes, np.float32) + 10 * shift).astype(np.float32)


def test_random_scorer_regresses_each_windows_own_row(extractor, head, maps):
    """Random scores are drawn per window; with dedup on, box regression must still read each
    window's own pool5 row (the distinct rows are fewer than the windows)."""
    props = np.concatenate([disjoint_boxes(6), disjoint_boxes(6) + 1])
    out = {}
    for dedup in (True, False):
        cfg = DetConfig(scorer="random", score_threshold=-1e9, fc_dtype="float32", dedup=dedup)
        det = Detector(extractor, SPP, None, None, FeatureRegressor(), 1.0, CLASSES, cfg)
        if dedup:
            pooled, _ = det.pool_fn(SPPImage(maps, SPP))(props)
            assert len(pooled) < len(props)  # shared cells
        out[dedup] = det.detect_maps(maps, (H, W), props)
    assert len(out[True].scores) > 0
    assert as_rows(out[True]) == as_rows(out[False])
