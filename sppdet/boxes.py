"""The one box convention of sppdet, and every conversion to and from it.

Internal convention (used by every module): **0-based continuous xyxy**, ``x1, y1, x2, y2`` in
pixels, where the image spans ``[0, W] x [0, H]`` and pixel ``i`` covers ``[i, i + 1)``.
Width is ``x2 - x1`` (no "+1").

External conventions handled here and nowhere else:

* VOC / R-CNN annotation and comp4 files: 1-based **inclusive** pixel indices; a box covering
  pixels ``a..b`` (1-based) has width ``b - a + 1``. Internal ``x1 = a - 1``, ``x2 = b``.
* 0-based inclusive pixel indices (the shared selective-search ``.npz``): ``x1 = a``,
  ``x2 = b + 1``.
* COCO: ``x, y, w, h`` with ``x, y`` the continuous top-left corner.
* selective search (``selectivesearch`` package / OpenCV): ``x, y, w, h`` in integer pixels, the
  box covering pixels ``x .. x + w - 1``, i.e. continuous ``[x, x + w)``.

Shape shorthand: ``N``, ``M`` numbers of boxes.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_iou as _tv_box_iou

__all__ = [
    "from_voc",
    "to_voc",
    "from_inclusive0",
    "to_inclusive0",
    "from_xywh",
    "to_xywh",
    "box_iou",
    "box_area",
    "clip_boxes",
    "valid_boxes_mask",
    "unique_boxes",
]


def from_voc(boxes: np.ndarray) -> np.ndarray:
    """VOC 1-based inclusive ``Array[N, 4]`` -> internal 0-based continuous xyxy (float32)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, :2] -= 1.0
    return b


def to_voc(boxes: np.ndarray) -> np.ndarray:
    """Internal xyxy ``Array[N, 4]`` -> VOC 1-based inclusive pixel coordinates (float)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    b[:, :2] += 1.0
    return b


def from_inclusive0(boxes: np.ndarray) -> np.ndarray:
    """0-based inclusive pixel ``Array[N, 4]`` (shared proposals) -> internal xyxy (float32)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, 2:] += 1.0
    return b


def to_inclusive0(boxes: np.ndarray) -> np.ndarray:
    """Internal xyxy ``Array[N, 4]`` -> 0-based inclusive pixel indices (rounded, int64)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    out = np.empty_like(b)
    out[:, :2] = np.round(b[:, :2])
    out[:, 2:] = np.round(b[:, 2:]) - 1.0
    return out.astype(np.int64)


def from_xywh(boxes: np.ndarray) -> np.ndarray:
    """``x, y, w, h`` (COCO, selective search) ``Array[N, 4]`` -> internal xyxy (float32)."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, 2:] += b[:, :2]
    return b


def to_xywh(boxes: np.ndarray) -> np.ndarray:
    """Internal xyxy ``Array[N, 4]`` -> ``x, y, w, h`` (float64)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    b[:, 2:] -= b[:, :2]
    return b


def box_area(boxes: np.ndarray) -> np.ndarray:
    """Areas ``Array[N]`` of internal xyxy boxes (zero for degenerate boxes)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``Array[N, M]`` (float64) of internal xyxy boxes, via ``torchvision.ops``.

    In the internal continuous convention this equals the VOC "+1" IoU of the corresponding
    1-based inclusive boxes, because ``to_voc`` widths are ``x2 - x1`` here. Computed in float64
    so thresholds hold exactly: a 7x10 box inside a 10x10 one has IoU 0.7, which float32 rounds
    to 0.69999999 (it cost one box of recall@0.7 on VOC07 val).
    """
    ta = torch.as_tensor(np.asarray(a, dtype=np.float64).reshape(-1, 4))
    tb = torch.as_tensor(np.asarray(b, dtype=np.float64).reshape(-1, 4))
    if len(ta) == 0 or len(tb) == 0:
        return np.zeros((len(ta), len(tb)), dtype=np.float64)
    return _tv_box_iou(ta, tb).numpy()


def clip_boxes(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Clip internal xyxy ``Array[N, 4]`` to the image ``[0, width] x [0, height]``."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, 0::2] = np.clip(b[:, 0::2], 0, width)
    b[:, 1::2] = np.clip(b[:, 1::2], 0, height)
    return b


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror internal xyxy ``Array[N, 4]`` boxes in an image of ``width`` pixels."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, [0, 2]] = width - b[:, [2, 0]]
    return b


def valid_boxes_mask(boxes: np.ndarray, min_size: float = 0.0) -> np.ndarray:
    """``Array[N]`` bool: boxes whose width and height both exceed ``max(min_size, 0)``."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    return (w > 0) & (h > 0) & (w >= min_size) & (h >= min_size)


def unique_boxes(boxes: np.ndarray) -> np.ndarray:
    """Indices (sorted, first occurrence kept) of the distinct rows of ``Array[N, 4]``."""
    b = np.ascontiguousarray(np.asarray(boxes).reshape(-1, 4))
    if len(b) == 0:
        return np.zeros(0, dtype=np.int64)
    _, idx = np.unique(b, axis=0, return_index=True)
    return np.sort(idx).astype(np.int64)


def vote_boxes(
    kept: np.ndarray,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    iou: float,
) -> np.ndarray:
    """Box voting (Gidaris and Komodakis 2015, section 5): each kept detection's box becomes
    the score-weighted mean of the candidates of its class that overlap it by ``>= iou``.

    Args:
        kept: ``Array[k]`` indices (into ``boxes``) of the detections NMS kept.
        boxes: ``Array[M, 4]`` every candidate before NMS; ``scores`` ``Array[M]``;
            ``labels`` ``Array[M]``.
        iou: the voting overlap (Gidaris: 0.5).

    Returns:
        ``Array[k, 4]`` float32. The weights are the scores clipped at 0 (Gidaris' class
        probabilities; an SVM's positive margins): a box without a positive voter stays as it
        is.
    """
    kept = np.asarray(kept, np.int64)
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if len(kept) == 0:
        return b[kept].astype(np.float32)
    same = np.asarray(labels)[kept][:, None] == np.asarray(labels)[None, :]
    w = (box_iou(b[kept], b) >= iou) & same
    w = w * np.clip(np.asarray(scores, np.float64), 0, None)[None, :]
    total = w.sum(1, keepdims=True)
    voted = (w @ b) / np.where(total > 0, total, 1.0)
    return np.where(total > 0, voted, b[kept]).astype(np.float32)
