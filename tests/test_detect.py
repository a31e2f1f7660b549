"""Tests of sppdet.detect: scoring, per-class NMS, caps, thresholds and clipping of a Detector.

The Detector is built from tiny parts: a randomly initialised ZF-5 extractor (only its geometry
is used by ``detect_maps``), a small fine-tuned-head stand-in (:class:`FCHead` with 8 hidden
units), a fake SVM whose scores the test chooses, and no box regressor unless a test needs one.
Conv maps are random tensors fed straight to :meth:`Detector.detect_maps`. The evaluation pass
that shares values between detectors is tested in tests/test_evaluate.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sppdet.boxes import box_iou
from sppdet.detect import SCORERS, STAGES, Detections, Detector
from sppdet.detect import TestConfig as DetConfig  # not "Test*": pytest would collect it
from sppdet.fastpath import CompressedHead
from sppdet.features import FeatureConfig, FeatureExtractor, ScaleMap, SPPConfig
from sppdet.head import FCHead
from sppdet.timing import StageTimer
from sppdet.window_pool import pool_windows

H, W = 96, 128  # image size (non-square, so a swapped width/height would show)
CLASSES = ("a", "b", "c")
HIDDEN = 8
SPP = SPPConfig()


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    cfg = FeatureConfig(backbone="zf5", weights="random", scales=(64,), max_size=128, cache=False)
    return FeatureExtractor(cfg, "cpu")


@pytest.fixture(scope="module")
def head(extractor) -> FCHead:
    torch.manual_seed(0)
    dim = extractor.spec.channels * sum(n * n for n in SPP.levels)
    return FCHead(dim, HIDDEN, len(CLASSES)).eval()


@pytest.fixture(scope="module")
def maps(extractor) -> list[ScaleMap]:
    """A random conv map of an ``H x W`` image at factor 1 (stride 16: 6 x 8 cells)."""
    g = torch.Generator().manual_seed(0)
    return [ScaleMap(torch.rand(extractor.spec.channels, H // 16, W // 16, generator=g), 1.0)]


class FixedSVM:
    """Returns a fixed ``[N, K]`` score table (rows in proposal order) and records its input."""

    def __init__(self, table) -> None:
        self.table = np.asarray(table, dtype=np.float32)
        self.inputs: list[np.ndarray] = []

    def scores_tensor(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.numpy().copy())
        assert len(x) == len(self.table), "fake SVM got a different number of windows"
        return torch.from_numpy(self.table)


class LinearSVM:
    """Scores computed from the features (``x @ w``), so chunking of the input can be checked."""

    def __init__(self, dim: int, k: int, seed: int = 0) -> None:
        self.w = np.random.default_rng(seed).normal(size=(dim, k)).astype(np.float32)

    def scores_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.from_numpy(self.w)


class ShiftingRegressor:
    """Box regressor stand-in: every class's box is the window shifted by ``(dx, dy)``."""

    def __init__(self, dx: float, dy: float) -> None:
        self.dx, self.dy = dx, dy
        self.features: list[np.ndarray] = []

    def predict_rows(self, features: torch.Tensor, rows, boxes, labels) -> np.ndarray:
        self.features.append(features.numpy().copy())
        assert len(rows) == len(boxes) == len(labels) and rows.max() < len(features)
        out = np.asarray(boxes, np.float32) + np.array([self.dx, self.dy, self.dx, self.dy])
        return out.astype(np.float32)


def make_detector(extractor, head, svms=None, bbox=None, bbox_scale=1.0, **test) -> Detector:
    # FixedSVM tables have one row per window: windows sharing map cells stay separate rows
    # unless a test asks for dedup (tested on its own below). The fc stage is the exact float32
    # one, so fc features can be checked against the head (int8: tests/test_fastpath.py).
    cfg = DetConfig(**{"dedup": False, "fc_dtype": "float32", **test})
    return Detector(extractor, SPP, head, svms, bbox, bbox_scale, CLASSES, cfg)


def disjoint_boxes(n: int) -> np.ndarray:
    """``n`` non-overlapping 20 x 20 boxes inside the ``H x W`` image (up to 15)."""
    out = [[x, y, x + 20, y + 20] for y in (2, 36, 70) for x in (2, 27, 52, 77, 102)]
    assert n <= len(out)
    return np.array(out[:n], dtype=np.float32)


def table(n: int, fill: float = -10.0) -> np.ndarray:
    return np.full((n, len(CLASSES)), fill, dtype=np.float32)


def as_rows(dets: Detections) -> list[tuple]:
    return [
        (int(c), float(s), tuple(np.round(b, 3)))
        for b, s, c in zip(dets.boxes, dets.scores, dets.labels, strict=True)
    ]


# ------------------------------------------------------------------------------------- NMS


def test_overlapping_boxes_of_one_class_keep_only_the_best(extractor, head, maps):
    props = np.array([[10, 10, 60, 60], [12, 12, 62, 62]], np.float32)
    assert box_iou(props[:1], props[1:])[0, 0] > 0.8
    scores = table(2)
    scores[:, 0] = [1.0, 2.0]  # the second box wins class 0
    det = make_detector(extractor, head, FixedSVM(scores)).detect_maps(maps, (H, W), props)
    assert det.labels.tolist() == [0]
    assert det.scores.tolist() == [2.0]
    np.testing.assert_array_equal(det.boxes, props[1:])


def test_overlapping_boxes_of_different_classes_are_both_kept(extractor, head, maps):
    props = np.array([[10, 10, 60, 60], [12, 12, 62, 62]], np.float32)
    scores = table(2)
    scores[0, 0], scores[1, 1] = 2.0, 1.0
    # the same box in two classes: per-class NMS must not suppress across classes
    scores[0, 2] = 0.5
    det = make_detector(extractor, head, FixedSVM(scores)).detect_maps(maps, (H, W), props)
    assert as_rows(det) == [
        (0, 2.0, (10.0, 10.0, 60.0, 60.0)),
        (1, 1.0, (12.0, 12.0, 62.0, 62.0)),
        (2, 0.5, (10.0, 10.0, 60.0, 60.0)),
    ]


def test_nms_uses_the_configured_iou(extractor, head, maps):
    props = np.array([[0, 0, 40, 40], [20, 0, 60, 40]], np.float32)
    iou = box_iou(props[:1], props[1:])[0, 0]
    assert 0.3 < iou < 0.5  # 1/3
    scores = table(2)
    scores[:, 0] = [2.0, 1.0]
    strict = make_detector(extractor, head, FixedSVM(scores), nms_iou=0.3)
    loose = make_detector(extractor, head, FixedSVM(scores), nms_iou=0.5)
    assert strict.detect_maps(maps, (H, W), props).scores.tolist() == [2.0]
    assert loose.detect_maps(maps, (H, W), props).scores.tolist() == [2.0, 1.0]


def test_default_config_is_the_papers():
    cfg = DetConfig()
    assert (cfg.scorer, cfg.layer, cfg.nms_iou, cfg.max_per_image) == ("svm", "fc7", 0.3, 100)


# --------------------------------------------------------------------- caps and thresholds


def test_max_per_image_keeps_the_best_over_all_classes(extractor, head, maps):
    props = disjoint_boxes(6)
    scores = table(6)
    scores[:, 0] = [0.1, 0.9, 0.3, 0.7, 0.5, 0.2]
    scores[:, 1] = [0.8, 0.0, 0.0, 0.0, 0.0, 0.0]
    det = make_detector(extractor, head, FixedSVM(scores), max_per_image=3)
    out = det.detect_maps(maps, (H, W), props)
    assert as_rows(out) == [
        (0, pytest.approx(0.9), tuple(props[1])),
        (1, pytest.approx(0.8), tuple(props[0])),
        (0, pytest.approx(0.7), tuple(props[3])),
    ]


def test_pre_nms_top_k_is_per_class(extractor, head, maps):
    props = disjoint_boxes(6)
    scores = table(6)
    scores[:, 0] = [1, 6, 3, 5, 2, 4]
    scores[:, 2] = [6, 1, 2, 3, 4, 5]
    det = make_detector(extractor, head, FixedSVM(scores), pre_nms_top_k=2)
    out = det.detect_maps(maps, (H, W), props)
    got = sorted((c, s) for c, s, _ in as_rows(out))
    assert got == [(0, 5.0), (0, 6.0), (2, 5.0), (2, 6.0)]
    # the winners are the right boxes, not just the right scores
    rows = {(c, s): b for c, s, b in as_rows(out)}
    assert rows[(0, 6.0)] == tuple(props[1]) and rows[(2, 5.0)] == tuple(props[5])


def test_score_threshold_is_inclusive_and_drops_lower_scores(extractor, head, maps):
    props = disjoint_boxes(4)
    scores = table(4)
    scores[:, 1] = [-2.0, -1.5, -1.0, 0.5]
    det = make_detector(extractor, head, FixedSVM(scores), score_threshold=-1.5)
    out = det.detect_maps(maps, (H, W), props)
    assert sorted(out.scores.tolist()) == [-1.5, -1.0, 0.5]
    assert set(out.labels.tolist()) == {1}
    keep_all = make_detector(extractor, head, FixedSVM(scores), score_threshold=float("-inf"))
    assert len(keep_all.detect_maps(maps, (H, W), props).scores) == 4 * len(CLASSES)


def test_nothing_above_threshold_gives_empty_detections(extractor, head, maps):
    props = disjoint_boxes(3)
    out = make_detector(extractor, head, FixedSVM(table(3))).detect_maps(maps, (H, W), props)
    assert_empty(out)


# -------------------------------------------------------------------------------- clipping


def test_proposals_are_clipped_to_the_image_and_outside_ones_dropped(extractor, head, maps):
    props = np.array(
        [
            [-20, -10, 50, 40],  # sticks out top-left
            [100, 70, 300, 200],  # sticks out bottom-right (beyond W and H)
            [200, 10, 260, 50],  # entirely right of the image: degenerate once clipped
            [-30, -30, 50, 40],  # same as the first once clipped: a duplicate
        ],
        np.float32,
    )
    scores = table(2)  # only 2 windows survive
    scores[0, 0], scores[1, 1] = 3.0, 3.0
    svm = FixedSVM(scores)
    det = make_detector(extractor, head, svm).detect_maps(maps, (H, W), props)
    assert as_rows(det) == [(0, 3.0, (0.0, 0.0, 50.0, 40.0)), (1, 3.0, (100.0, 70.0, 128.0, 96.0))]


def test_regressed_boxes_are_clipped_to_the_image(extractor, head, maps):
    props = np.array([[10, 10, 50, 50], [80, 50, 120, 90]], np.float32)
    scores = table(2)
    scores[:, 0] = [2.0, 1.0]
    reg = ShiftingRegressor(dx=20.0, dy=-15.0)  # second box moves past the right edge
    det = make_detector(extractor, head, FixedSVM(scores), bbox=reg, bbox_scale=0.5)
    out = det.detect_maps(maps, (H, W), props)
    assert as_rows(out) == [(0, 2.0, (30.0, 0.0, 70.0, 35.0)), (0, 1.0, (100.0, 35.0, 128.0, 75.0))]
    assert (out.boxes[:, [0, 2]] <= W).all() and (out.boxes[:, [1, 3]] <= H).all()
    # the regressor sees pool5 vectors times bbox_scale, of the scored candidates only
    pool5 = pool_windows(maps, props, extractor.spec, SPP).numpy()
    np.testing.assert_allclose(reg.features[0], pool5 * 0.5, rtol=1e-6)
    reg2 = ShiftingRegressor(dx=0.0, dy=0.0)
    low = scores.copy()
    low[1, 0] = -5.0  # below the score threshold: never regressed
    make_detector(extractor, head, FixedSVM(low), bbox=reg2).detect_maps(maps, (H, W), props)
    np.testing.assert_allclose(reg2.features[0], pool5[:1], rtol=1e-6)


def test_bbox_reg_off_ignores_the_regressor(extractor, head, maps):
    props = np.array([[10, 10, 50, 50]], np.float32)
    reg = ShiftingRegressor(dx=5.0, dy=5.0)
    scores = np.array([[1.0, -9.0, -9.0]], np.float32)
    det = make_detector(extractor, head, FixedSVM(scores), bbox=reg, bbox_reg=False)
    out = det.detect_maps(maps, (H, W), props)
    np.testing.assert_array_equal(out.boxes, props)
    assert reg.features == []


# ----------------------------------------------------------------------------- empty input


def assert_empty(d: Detections) -> None:
    assert d.boxes.shape == (0, 4) and d.boxes.dtype == np.float32
    assert d.scores.shape == (0,) and d.scores.dtype == np.float32
    assert d.labels.shape == (0,) and d.labels.dtype == np.int64


@pytest.mark.parametrize(
    "props",
    [np.zeros((0, 4), np.float32), np.array([[10, 10, 10, 40], [300, 0, 400, 50]], np.float32)],
    ids=["none", "all-degenerate"],
)
def test_no_usable_proposal_gives_empty_detections(extractor, head, maps, props):
    svm = FixedSVM(table(0))
    out = make_detector(extractor, head, svm).detect_maps(maps, (H, W), props)
    assert_empty(out)
    assert svm.inputs == []  # nothing was scored


# ------------------------------------------------------------------------------- scorers


def test_svm_scorer_feeds_the_chosen_layer(extractor, head, maps):
    props = disjoint_boxes(3)
    pool5 = pool_windows(maps, props, extractor.spec, SPP)
    for layer, expect in [
        ("fc7", head.embed(pool5, "fc7")),
        ("fc6", head.embed(pool5, "fc6")),
        ("pool5", pool5),
    ]:
        svm = FixedSVM(table(3, 0.0))
        make_detector(extractor, head, svm, layer=layer).detect_maps(maps, (H, W), props)
        np.testing.assert_allclose(svm.inputs[0], expect.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_fc_batch_chunking_does_not_change_results(extractor, head, maps):
    props = np.concatenate([disjoint_boxes(7), disjoint_boxes(7) + 3])
    svm = LinearSVM(HIDDEN, len(CLASSES))
    kw = {"score_threshold": float("-inf"), "nms_iou": 0.5}
    whole = make_detector(extractor, head, svm, **kw).detect_maps(maps, (H, W), props)
    chunked = make_detector(extractor, head, svm, fc_batch=3, **kw).detect_maps(maps, (H, W), props)
    assert len(whole.scores) > len(CLASSES)
    np.testing.assert_array_equal(whole.labels, chunked.labels)
    np.testing.assert_allclose(whole.scores, chunked.scores, rtol=1e-5)
    np.testing.assert_array_equal(whole.boxes, chunked.boxes)


def test_softmax_scorer_uses_the_heads_object_probabilities(extractor, head, maps):
    props = np.array([[10, 10, 60, 60]], np.float32)
    det = make_detector(extractor, head, None, scorer="softmax", score_threshold=0.0)
    out = det.detect_maps(maps, (H, W), props)
    pool5 = pool_windows(maps, props, extractor.spec, SPP)
    probs = torch.softmax(head(pool5), dim=1)[0, 1:].detach().numpy()
    assert sorted(out.labels.tolist()) == [0, 1, 2]
    np.testing.assert_allclose(out.scores[np.argsort(out.labels)], probs, rtol=1e-5)


def test_random_scorer_needs_no_svm_and_is_seeded(extractor, maps):
    props = disjoint_boxes(10)
    kw = {"scorer": "random", "score_threshold": float("-inf"), "max_per_image": 1000}
    a = make_detector(extractor, None, None, seed=3, **kw).detect_maps(maps, (H, W), props)
    b = make_detector(extractor, None, None, seed=3, **kw).detect_maps(maps, (H, W), props)
    c = make_detector(extractor, None, None, seed=4, **kw).detect_maps(maps, (H, W), props)
    # disjoint boxes: every window survives NMS in every class
    assert len(a.scores) == 10 * len(CLASSES)
    assert ((a.scores >= 0) & (a.scores < 1)).all()
    assert len(np.unique(a.scores)) > 20  # not a constant
    assert as_rows(a) == as_rows(b)
    assert as_rows(a) != as_rows(c)


def test_scorer_validation(extractor, head):
    with pytest.raises(ValueError, match="svm"):
        make_detector(extractor, head, None, scorer="svm")
    with pytest.raises(ValueError, match="softmax"):
        make_detector(extractor, None, None, scorer="softmax")
    with pytest.raises(ValueError, match="unknown scorer"):
        make_detector(extractor, head, FixedSVM(table(1)), scorer="bogus")
    assert set(SCORERS) == {"svm", "softmax", "random"}


# ------------------------------------------------------------------------------ detect()


def test_detect_on_an_image_uses_the_proposal_function(extractor, head):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    props = disjoint_boxes(4)
    calls = []

    def propose(img):
        calls.append(img.shape)
        return props

    scores = table(4)
    scores[:, 2] = [0.0, 1.0, 2.0, 3.0]
    det_args = (extractor, SPP, head, FixedSVM(scores), None, 1.0, CLASSES, DetConfig())
    det = Detector(*det_args, propose)
    timer = StageTimer()
    out = det.detect(image, hook=timer)
    assert calls == [(H, W, 3)]
    assert out.scores.tolist() == [3.0, 2.0, 1.0, 0.0]
    np.testing.assert_array_equal(out.boxes, props[::-1])
    # no box regressor: every other stage goes through the hook (warp: R-CNN mode only)
    assert set(timer.seconds) == set(STAGES) - {"bbox", "warp"}
    assert all(v >= 0 for v in timer.seconds.values())
    # the default hook only labels the stages: same detections
    assert as_rows(Detector(*det_args).detect(image, props)) == as_rows(out)
    # explicit proposals bypass the proposal function
    det.svms = FixedSVM(scores[:2])
    out2 = det.detect(image, proposals=props[:2])
    assert len(calls) == 1 and out2.scores.tolist() == [1.0, 0.0]


def test_detect_without_proposals_or_proposer_raises(extractor, head):
    det = make_detector(extractor, head, FixedSVM(table(1)))
    with pytest.raises(ValueError, match="no proposals"):
        det.detect(np.zeros((H, W, 3), np.uint8))


def test_test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DetConfig().nms_iou = 0.5  # type: ignore[misc]


def test_default_fc_dtype_is_int8_on_a_cpu_with_int8_dot_products(extractor, head, monkeypatch):
    import sppdet.fastpath as fp

    monkeypatch.setattr(fp, "cpu_flags", lambda: frozenset({"avx512_vnni"}))
    det = Detector(extractor, SPP, head, None, None, 1.0, CLASSES, DetConfig(scorer="softmax"))
    assert det.config.fc_dtype == "int8"  # "auto" resolved for the device
    assert isinstance(det.head, CompressedHead) and det.trained_head is head
    monkeypatch.setattr(fp, "cpu_flags", lambda: frozenset({"avx2"}))  # no fast int8 kernel
    det = Detector(extractor, SPP, head, None, None, 1.0, CLASSES, DetConfig(scorer="softmax"))
    assert det.config.fc_dtype == "float32" and det.head is head
    exact = make_detector(extractor, head, None, scorer="softmax")
    assert exact.config.fc_dtype == "float32" and exact.head is head
