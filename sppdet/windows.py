"""Labelling of candidate windows against ground truth, shared by the training stages.

Shape shorthand: ``N`` windows, ``G`` ground-truth boxes, ``K`` classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sppdet.boxes import box_iou, unique_boxes


@dataclass(frozen=True)
class LabelledWindows:
    """Windows of one image with their best ground-truth match.

    ``boxes`` ``Array[N, 4]`` internal xyxy (ground-truth boxes first, then proposals),
    ``is_gt`` ``Array[N]`` bool, ``max_iou`` ``Array[N]`` best IoU with any used GT box,
    ``gt_index`` ``Array[N]`` index of that GT box (-1 when the image has none),
    ``class_iou`` ``Array[N, K]`` best IoU with the GT boxes of each class (0 if absent).
    """

    boxes: np.ndarray
    is_gt: np.ndarray
    max_iou: np.ndarray
    gt_index: np.ndarray
    class_iou: np.ndarray


def label_windows(
    proposals: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    num_classes: int,
    *,
    include_gt: bool = True,
) -> LabelledWindows:
    """Concatenate GT boxes (R-CNN uses them as positives) and proposals, and label them.

    Callers pass only the GT boxes they train on (py-faster-rcnn drops "difficult" ones).
    Duplicate proposals are removed; an image without proposals still yields its GT windows.
    """
    gt = np.asarray(gt_boxes, dtype=np.float32).reshape(-1, 4)
    props = np.asarray(proposals, dtype=np.float32).reshape(-1, 4)
    props = props[unique_boxes(props)]
    boxes = np.concatenate([gt, props]) if include_gt else props
    is_gt = np.zeros(len(boxes), dtype=bool)
    if include_gt:
        is_gt[: len(gt)] = True
    iou = box_iou(boxes, gt)  # [N, G]
    class_iou = np.zeros((len(boxes), num_classes), dtype=np.float64)
    labels = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    for k in np.unique(labels):
        class_iou[:, k] = iou[:, labels == k].max(axis=1)
    if iou.shape[1]:
        gt_index = iou.argmax(axis=1).astype(np.int64)
        max_iou = iou.max(axis=1)
    else:
        gt_index = np.full(len(boxes), -1, dtype=np.int64)
        max_iou = np.zeros(len(boxes), dtype=np.float64)
    return LabelledWindows(boxes, is_gt, max_iou, gt_index, class_iou)
