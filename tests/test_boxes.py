"""Tests of sppdet.boxes: round trips of every convention, IoU against the VOC "+1" rule."""

from __future__ import annotations

import numpy as np
import pytest

from sppdet.boxes import (
    box_area,
    box_iou,
    clip_boxes,
    from_inclusive0,
    from_voc,
    from_xywh,
    to_inclusive0,
    to_voc,
    to_xywh,
    unique_boxes,
    valid_boxes_mask,
)


def random_voc_boxes(rng: np.random.Generator, n: int, size: int = 60) -> np.ndarray:
    """``Array[n, 4]`` VOC 1-based inclusive integer boxes with ``x1 <= x2``, ``y1 <= y2``."""
    p = rng.integers(1, size + 1, size=(n, 2, 2))
    lo, hi = p.min(axis=1), p.max(axis=1)
    return np.concatenate([lo, hi], axis=1).astype(np.float64)


def naive_voc_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The VOC devkit IoU ("+1" widths) of 1-based inclusive boxes, by a float64 double loop."""
    out = np.zeros((len(a), len(b)), dtype=np.float64)
    for i, (ax1, ay1, ax2, ay2) in enumerate(a):
        for j, (bx1, by1, bx2, by2) in enumerate(b):
            iw = min(ax2, bx2) - max(ax1, bx1) + 1.0
            ih = min(ay2, by2) - max(ay1, by1) + 1.0
            if iw <= 0 or ih <= 0:
                continue
            inter = iw * ih
            area_a = (ax2 - ax1 + 1.0) * (ay2 - ay1 + 1.0)
            area_b = (bx2 - bx1 + 1.0) * (by2 - by1 + 1.0)
            out[i, j] = inter / (area_a + area_b - inter)
    return out


# ---------------------------------------------------------------- conversions


def test_hand_worked_conversions():
    # VOC pixels 1..10 (ten pixels) -> continuous [0, 10): width 10 = 10 - 1 + 1.
    np.testing.assert_array_equal(from_voc([[1, 1, 10, 20]]), [[0, 0, 10, 20]])
    # 0-based inclusive pixels 0..9 -> continuous [0, 10).
    np.testing.assert_array_equal(from_inclusive0([[0, 5, 9, 14]]), [[0, 5, 10, 15]])
    # x, y, w, h -> x1, y1, x1 + w, y1 + h.
    np.testing.assert_array_equal(from_xywh([[3, 4, 10, 20]]), [[3, 4, 13, 24]])
    np.testing.assert_array_equal(to_voc([[0, 0, 10, 20]]), [[1, 1, 10, 20]])
    np.testing.assert_array_equal(to_inclusive0([[0, 5, 10, 15]]), [[0, 5, 9, 14]])
    np.testing.assert_array_equal(to_xywh([[3, 4, 13, 24]]), [[3, 4, 10, 20]])


def test_output_dtypes_and_shapes():
    assert from_voc([1, 2, 3, 4]).shape == (1, 4)
    assert from_voc([[1, 2, 3, 4]]).dtype == np.float32
    assert from_inclusive0([[1, 2, 3, 4]]).dtype == np.float32
    assert from_xywh([[1, 2, 3, 4]]).dtype == np.float32
    assert to_inclusive0([[1, 2, 3, 4]]).dtype == np.int64


def test_conversions_do_not_modify_their_input():
    b = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
    for fn in (from_voc, to_voc, from_inclusive0, to_inclusive0, from_xywh, to_xywh):
        fn(b)
    np.testing.assert_array_equal(b, [[1, 2, 3, 4]])


def test_voc_round_trip():
    voc = random_voc_boxes(np.random.default_rng(0), 200, size=1000)
    np.testing.assert_array_equal(to_voc(from_voc(voc)), voc)
    internal = from_voc(voc)
    np.testing.assert_array_equal(from_voc(to_voc(internal)), internal)


def test_voc_width_is_internal_width():
    voc = random_voc_boxes(np.random.default_rng(1), 50)
    b = from_voc(voc)
    np.testing.assert_array_equal(b[:, 2] - b[:, 0], voc[:, 2] - voc[:, 0] + 1)
    np.testing.assert_array_equal(b[:, 3] - b[:, 1], voc[:, 3] - voc[:, 1] + 1)


def test_inclusive0_round_trip():
    inc = random_voc_boxes(np.random.default_rng(2), 200, size=1000).astype(np.int64) - 1
    np.testing.assert_array_equal(to_inclusive0(from_inclusive0(inc)), inc)
    internal = from_inclusive0(inc)
    np.testing.assert_array_equal(from_inclusive0(to_inclusive0(internal)), internal)


def test_inclusive0_and_voc_agree():
    # The same pixels written 0-based and 1-based give the same internal box.
    inc = random_voc_boxes(np.random.default_rng(3), 50).astype(np.int64) - 1
    np.testing.assert_array_equal(from_inclusive0(inc), from_voc(inc + 1))


def test_xywh_round_trip():
    rng = np.random.default_rng(4)
    xywh = np.concatenate([rng.integers(0, 500, (100, 2)), rng.integers(1, 300, (100, 2))], 1)
    xywh = xywh.astype(np.float64)
    np.testing.assert_array_equal(to_xywh(from_xywh(xywh)), xywh)
    internal = from_xywh(xywh)
    np.testing.assert_allclose(from_xywh(to_xywh(internal)), internal)


def test_empty_conversions():
    empty = np.zeros((0, 4))
    for fn in (from_voc, to_voc, from_inclusive0, to_inclusive0, from_xywh, to_xywh):
        assert fn(empty).shape == (0, 4)
        assert fn([]).shape == (0, 4)


# ---------------------------------------------------------------- IoU and area


def test_box_iou_equals_voc_plus_one_iou():
    rng = np.random.default_rng(5)
    a, b = random_voc_boxes(rng, 40), random_voc_boxes(rng, 30)
    expected = naive_voc_iou(a, b)
    got = box_iou(from_voc(a), from_voc(b))
    assert got.shape == (40, 30)
    assert got.dtype == np.float64
    assert (expected > 0).sum() > 100  # the random boxes overlap often enough to mean something
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_box_iou_hand_cases():
    # VOC (1,1,10,10) vs (6,1,15,10): intersection 5 x 10 = 50, union 100 + 100 - 50 = 150.
    a = from_voc([[1, 1, 10, 10]])
    b = from_voc([[6, 1, 15, 10], [1, 1, 10, 10], [11, 1, 20, 10], [1, 1, 1, 1]])
    np.testing.assert_allclose(box_iou(a, b), [[1 / 3, 1.0, 0.0, 0.01]], atol=1e-7)


def test_box_iou_empty():
    b = from_voc([[1, 1, 10, 10]])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 1)
    assert box_iou(b, np.zeros((0, 4))).shape == (1, 0)
    out = box_iou(np.zeros((0, 4)), np.zeros((0, 4)))
    assert out.shape == (0, 0)
    assert out.dtype == np.float64


def test_box_area():
    np.testing.assert_array_equal(
        box_area([[0, 0, 10, 20], [5, 5, 5, 9], [10, 10, 0, 0]]), [200, 0, 0]
    )
    assert box_area(np.zeros((0, 4))).shape == (0,)


# ---------------------------------------------------------------- clip / valid / unique


def test_clip_boxes():
    b = np.array([[-5, -3, 50, 40], [10, 10, 20, 20], [120, 5, 130, 10]], dtype=np.float32)
    out = clip_boxes(b, width=100, height=30)
    np.testing.assert_array_equal(out, [[0, 0, 50, 30], [10, 10, 20, 20], [100, 5, 100, 10]])
    assert b[0, 0] == -5  # input untouched
    # A box wholly outside collapses to zero width and is then invalid.
    assert not valid_boxes_mask(out)[2]
    assert clip_boxes(np.zeros((0, 4)), 10, 10).shape == (0, 4)


def test_clip_boxes_keeps_boxes_touching_the_border():
    b = np.array([[0, 0, 100, 30]], dtype=np.float32)
    np.testing.assert_array_equal(clip_boxes(b, 100, 30), b)


def test_valid_boxes_mask():
    b = np.array(
        [
            [0, 0, 10, 10],  # valid
            [0, 0, 0, 10],  # zero width
            [0, 0, 10, 0],  # zero height
            [5, 5, 2, 10],  # negative width
            [0, 0, 4, 10],  # width 4: below min_size 5
            [0, 0, 5, 5],  # exactly min_size: kept (R-CNN "ws >= min_size")
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(valid_boxes_mask(b), [1, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(valid_boxes_mask(b, min_size=5), [1, 0, 0, 0, 0, 1])
    # A negative min_size acts as 0: degenerate boxes are never valid.
    np.testing.assert_array_equal(valid_boxes_mask(b, min_size=-3), valid_boxes_mask(b))
    assert valid_boxes_mask(np.zeros((0, 4))).shape == (0,)
    assert valid_boxes_mask(np.zeros((0, 4))).dtype == bool


def test_unique_boxes_keeps_first_occurrence_in_order():
    b = np.array([[3, 3, 4, 4], [1, 1, 2, 2], [3, 3, 4, 4], [0, 0, 1, 1], [1, 1, 2, 2]])
    idx = unique_boxes(b)
    np.testing.assert_array_equal(idx, [0, 1, 3])
    assert idx.dtype == np.int64


def test_unique_boxes_edge_cases():
    np.testing.assert_array_equal(unique_boxes(np.ones((5, 4), np.float32)), [0])
    np.testing.assert_array_equal(unique_boxes(np.arange(12.0).reshape(3, 4)), [0, 1, 2])
    # Rows that share some coordinates are still distinct.
    np.testing.assert_array_equal(unique_boxes([[0, 0, 1, 1], [0, 0, 1, 2]]), [0, 1])
    out = unique_boxes(np.zeros((0, 4)))
    assert out.shape == (0,)
    assert out.dtype == np.int64


def test_unique_boxes_matches_a_naive_loop():
    rng = np.random.default_rng(6)
    b = rng.integers(0, 3, size=(300, 4)).astype(np.float32)
    seen, expected = set(), []
    for i, row in enumerate(map(tuple, b)):
        if row not in seen:
            seen.add(row)
            expected.append(i)
    np.testing.assert_array_equal(unique_boxes(b), expected)


@pytest.mark.parametrize("fn", [from_voc, from_inclusive0, from_xywh])
def test_from_accepts_lists_and_ints(fn):
    np.testing.assert_array_equal(fn([[1, 2, 3, 4]]), fn(np.array([[1.0, 2.0, 3.0, 4.0]])))


def test_box_iou_is_exact_at_thresholds():
    # 70 / 100 exactly: float32 would give 0.69999999 and miss recall@0.7 / a 0.3 rule
    iou = box_iou(np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([[0.0, 0.0, 7.0, 10.0]]))
    assert iou.dtype == np.float64 and iou[0, 0] >= 0.7
    iou = box_iou(np.array([[0.0, 0.0, 10.0, 10.0]]), np.array([[0.0, 0.0, 3.0, 10.0]]))
    assert not iou[0, 0] < 0.3
