"""sppdet.windows.label_windows against a naive float64 loop over windows and ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from sppdet.windows import label_windows

K = 4  # classes


def naive_iou(a, b) -> float:
    """IoU of two internal xyxy boxes (continuous pixels: width = x2 - x1)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def naive_label(proposals, gt, labels, include_gt=True):
    """Windows (GT first, then each distinct proposal at its first occurrence) and their labels."""
    distinct = []
    for p in proposals.tolist():
        if p not in distinct:
            distinct.append(p)
    boxes = (gt.tolist() if include_gt else []) + distinct
    max_iou, gt_index, class_iou = [], [], []
    for w in boxes:
        best, arg = 0.0, -1
        per_class = [0.0] * K
        for j, (g, k) in enumerate(zip(gt.tolist(), labels.tolist(), strict=True)):
            iou = naive_iou(w, g)
            if arg < 0 or iou > best:  # the first GT box wins a tie
                best, arg = iou, j
            per_class[k] = max(per_class[k], iou)
        max_iou.append(best)
        gt_index.append(arg)
        class_iou.append(per_class)
    is_gt = [include_gt and i < len(gt) for i in range(len(boxes))]
    return boxes, is_gt, max_iou, gt_index, class_iou


def random_image(seed: int, n_props: int = 60, n_gt: int = 5):
    """Proposals with exact duplicates and near-copies of GT boxes; GT of a few classes."""
    rng = np.random.default_rng(seed)
    xy = rng.integers(0, 80, (n_gt, 2))
    gt = np.concatenate([xy, xy + rng.integers(5, 40, (n_gt, 2))], axis=1).astype(np.float32)
    labels = rng.integers(0, K - 1, n_gt)  # class K - 1 never occurs
    xy = rng.integers(0, 100, (n_props, 2))
    props = np.concatenate([xy, xy + rng.integers(2, 50, (n_props, 2))], axis=1)
    props = props.astype(np.float32)
    props[: n_gt // 2] = gt[: n_gt // 2] + rng.integers(-2, 3, (n_gt // 2, 4))
    props[-10:] = props[rng.integers(0, n_props - 10, 10)]  # duplicates
    return props, gt, labels


def check(out, ref) -> None:
    boxes, is_gt, max_iou, gt_index, class_iou = ref
    np.testing.assert_array_equal(out.boxes, np.array(boxes, np.float32).reshape(-1, 4))
    np.testing.assert_array_equal(out.is_gt, np.array(is_gt, bool))
    np.testing.assert_allclose(out.max_iou, max_iou, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(out.gt_index, gt_index)
    np.testing.assert_allclose(out.class_iou, np.array(class_iou).reshape(-1, K), atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("include_gt", [True, False])
def test_label_windows_equals_the_naive_loop(seed, include_gt):
    props, gt, labels = random_image(seed)
    out = label_windows(props, gt, labels, K, include_gt=include_gt)
    check(out, naive_label(props, gt, labels, include_gt))
    assert len(out.boxes) == len(np.unique(props, axis=0)) + (len(gt) if include_gt else 0)
    assert not out.class_iou[:, K - 1].any()  # an absent class has IoU 0 everywhere


def test_gt_windows_overlap_themselves_fully():
    props, gt, labels = random_image(7)
    out = label_windows(props, gt, labels, K)
    n = len(gt)
    np.testing.assert_allclose(out.max_iou[:n], 1.0)
    np.testing.assert_allclose(out.class_iou[np.arange(n), labels], 1.0)


def test_tied_ground_truth_goes_to_the_first_box():
    gt = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    labels = np.array([2, 1, 0])
    props = np.array([[0, 0, 10, 5], [25, 20, 35, 30]], np.float32)
    out = label_windows(props, gt, labels, K, include_gt=False)
    assert out.gt_index.tolist() == [0, 2]
    np.testing.assert_allclose(out.max_iou, [0.5, 50 / 150])
    np.testing.assert_allclose(out.class_iou[0], [0.0, 0.5, 0.5, 0.0])
    check(out, naive_label(props, gt, labels, include_gt=False))


def test_image_without_ground_truth_or_without_proposals():
    props, gt, labels = random_image(3)
    none = label_windows(props, np.zeros((0, 4)), np.zeros(0, int), K)
    assert (none.gt_index == -1).all() and not none.max_iou.any() and not none.class_iou.any()
    assert not none.is_gt.any() and len(none.boxes) == len(np.unique(props, axis=0))
    only_gt = label_windows(np.zeros((0, 4)), gt, labels, K)
    check(only_gt, naive_label(np.zeros((0, 4)), gt, labels))
    assert only_gt.is_gt.all() and only_gt.gt_index.tolist() == list(range(len(gt)))
