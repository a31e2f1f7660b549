"""PASCAL VOC detection evaluation, exact to the official devkit (``VOCevaldet.m`` + ``VOCap.m``).

The matching rule (SPEC section 9, devkit ``VOCevaldet.m``):

* Detections of one class are processed in decreasing score order. The devkit sorts with MATLAB
  ``sort(-confidence)``, which is **stable**: equal scores keep their input (file) order. We use
  ``np.argsort(-scores, kind="stable")``; py-faster-rcnn's unstable ``np.argsort`` does not.
* Each detection goes to the ground truth of its class in its image with the highest VOC "+1" IoU
  (``w = x2 - x1 + 1`` on 1-based inclusive boxes); on equal IoU the first ground truth wins.
  Boxes whose "+1" intersection is empty are never candidates.
* ``ovmax >= 0.5`` (the devkit uses ``>=``; py-faster-rcnn and detectron2 use ``>``): a difficult
  ground truth makes the detection "don't care" (neither TP nor FP); else the first detection of
  that ground truth is a TP and later ones are FPs (duplicates). Otherwise FP.
* ``npos`` counts non-difficult ground truth; ``rec = cumsum(tp) / npos``,
  ``prec = cumsum(tp) / (cumsum(tp) + cumsum(fp))``.

The IoU is computed in float64 in the devkit's own coordinates and operation order (internal
boxes are mapped with :func:`sppdet.boxes.to_voc`, which adds 1 to ``x1, y1`` exactly), so a
detection read from a comp4 file gets bit-for-bit the devkit's overlap, and ties at exactly 0.5
go the same way.

Deliberate departures from the devkit, all for degenerate classes:

* ``npos == 0``: AP is ``nan`` (the devkit divides by zero and reports 0); such classes are left
  out of the mAP with a warning.
* every detection of a class matched a difficult object: AP is 0 (the devkit's MATLAB ``max`` of
  an all-NaN precision vector makes it NaN).

Shape shorthand: ``D`` detections of one class, ``G`` ground-truth boxes, ``P`` (detection,
ground truth) pairs in the same image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from sppdet.boxes import to_voc
from sppdet.errors import DataError

log = logging.getLogger(__name__)

# VOCevaldet.m's ``for t=0:0.1:1``. MATLAB's colon builds the first half as ``0 + k*0.1`` and the
# second half as ``1 - k*0.1`` (symmetric algorithm), so t_3 = 0.30000000000000004 but
# t_6 = 0.6 and t_7 = 0.7 exactly as doubles. ``np.arange(0, 1.1, 0.1)`` (py-faster-rcnn) gives
# 0.6000000000000001 and 0.7000000000000001, which wrongly skips recall 3/5 or 7/10.
VOC07_RECALL_THRESHOLDS: tuple[float, ...] = tuple(
    [k * 0.1 for k in range(6)] + [1.0 - k * 0.1 for k in range(4, -1, -1)]
)


@dataclass(frozen=True)
class Detections:
    """Detections of one class over many images (the content of one comp4 file).

    Attributes:
        image_ids: ``Array[D]`` str, the image of each detection.
        scores: ``Array[D]`` float64, higher is more confident.
        boxes: ``Array[D, 4]`` internal 0-based continuous xyxy. Stored as float64: a detector's
            float32 boxes upcast losslessly, and comp4 values stay exactly as the devkit reads them.
    """

    image_ids: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray

    def __post_init__(self) -> None:
        ids = np.asarray(self.image_ids).astype(str).reshape(-1)
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        boxes = np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)
        if not len(ids) == len(scores) == len(boxes):
            raise ValueError(
                f"Detections: {len(ids)} image ids, {len(scores)} scores, {len(boxes)} boxes"
            )
        object.__setattr__(self, "image_ids", ids)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "boxes", boxes)

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        """No detections."""
        return cls(np.zeros(0, dtype=str), np.zeros(0), np.zeros((0, 4)))

    @classmethod
    def concat(cls, parts: Sequence[Detections]) -> Detections:
        """Concatenate in order (order matters: it breaks score ties, as in the devkit)."""
        parts = list(parts)
        if not parts:
            return cls.empty()
        return cls(
            np.concatenate([p.image_ids for p in parts]),
            np.concatenate([p.scores for p in parts]),
            np.concatenate([p.boxes for p in parts]),
        )


@dataclass(frozen=True)
class ClassResult:
    """Evaluation of one class; per-detection arrays are in processing (sorted) order.

    Attributes:
        ap: average precision in [0, 1]; ``nan`` if ``npos == 0``.
        precision: ``Array[D]`` devkit ``prec`` (NaN while only "don't care" detections are seen).
        recall: ``Array[D]`` devkit ``rec``.
        npos: number of non-difficult ground-truth boxes.
        tp: ``Array[D]`` bool, true positives.
        fp: ``Array[D]`` bool, false positives (a detection may be neither: difficult match).
        order: ``Array[D]`` int64, input index of each sorted detection.
    """

    ap: float
    precision: np.ndarray
    recall: np.ndarray
    npos: int
    tp: np.ndarray
    fp: np.ndarray
    order: np.ndarray


@dataclass(frozen=True)
class EvalResult:
    """Per-class results and their mean over classes with ground truth."""

    map: float
    ap: dict[str, float]
    per_class: dict[str, ClassResult] = field(repr=False)
    use_07_metric: bool = True

    def to_json(self) -> dict:
        """``{"map": float, "ap": {class: float}}`` (a ``nan`` AP becomes ``null``)."""
        clean = {c: (None if math.isnan(v) else float(v)) for c, v in self.ap.items()}
        return {"map": None if math.isnan(self.map) else float(self.map), "ap": clean}


GroundTruth = Mapping[str, tuple[np.ndarray, np.ndarray]]


def _voc_overlaps(bb: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Devkit "+1" IoU of paired VOC 1-based boxes ``Array[P, 4]`` (float64), ``-inf`` if disjoint.

    Same expressions and operation order as VOCevaldet.m, so results are bit-identical to it.
    """
    iw = np.minimum(bb[:, 2], gt[:, 2]) - np.maximum(bb[:, 0], gt[:, 0]) + 1
    ih = np.minimum(bb[:, 3], gt[:, 3]) - np.maximum(bb[:, 1], gt[:, 1]) + 1
    ua = (
        (bb[:, 2] - bb[:, 0] + 1) * (bb[:, 3] - bb[:, 1] + 1)
        + (gt[:, 2] - gt[:, 0] + 1) * (gt[:, 3] - gt[:, 1] + 1)
        - iw * ih
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        ov = iw * ih / ua
    ov[~((iw > 0) & (ih > 0)) | np.isnan(ov)] = -np.inf
    return ov


def _best_overlaps(
    det_boxes: np.ndarray, det_img: np.ndarray, gt_boxes: np.ndarray, offsets: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Devkit ``ovmax, jmax`` per detection: best overlap in its image, first index on ties.

    Args:
        det_boxes: ``Array[D, 4]`` VOC coordinates. det_img: ``Array[D]`` image index.
        gt_boxes: ``Array[G, 4]`` VOC coordinates, grouped by image.
        offsets: ``Array[I + 1]``; image ``i`` owns ``gt_boxes[offsets[i]:offsets[i + 1]]``.

    Returns:
        ``ovmax`` ``Array[D]`` (``-inf`` without a candidate) and ``jmax`` ``Array[D]`` (global
        ground-truth index, -1 without a candidate).
    """
    counts = (offsets[1:] - offsets[:-1])[det_img]
    pair_det = np.repeat(np.arange(len(det_img)), counts)
    within = np.arange(len(pair_det)) - np.repeat(np.cumsum(counts) - counts, counts)
    pair_gt = np.repeat(offsets[:-1][det_img], counts) + within
    ov = _voc_overlaps(det_boxes[pair_det], gt_boxes[pair_gt])
    # Sort pairs by detection, then overlap descending, then ground-truth index: the first pair
    # of each detection is the devkit's ``ov > ovmax`` winner (earliest j among equal overlaps).
    srt = np.lexsort((pair_gt, -ov, pair_det))
    dets, first = np.unique(pair_det[srt], return_index=True)
    ovmax = np.full(len(det_img), -np.inf)
    jmax = np.full(len(det_img), -1, dtype=np.int64)
    ovmax[dets] = ov[srt][first]
    jmax[dets] = np.where(np.isfinite(ovmax[dets]), pair_gt[srt][first], -1)
    return ovmax, jmax


def _assign(
    ovmax: np.ndarray, jmax: np.ndarray, gt_difficult: np.ndarray, thr: float
) -> tuple[np.ndarray, np.ndarray]:
    """TP / FP flags of sorted detections ``Array[D]`` (the devkit's sequential loop, vectorised).

    A detection is a TP iff it hits (``>= thr``) a non-difficult ground truth that no earlier
    detection hit: the devkit sets ``det(jmax)`` exactly on those, so "first hit in sorted order".
    """
    hit = ovmax >= thr
    difficult = np.zeros(len(ovmax), dtype=bool)
    difficult[hit] = gt_difficult[jmax[hit]]
    cand = np.flatnonzero(hit & ~difficult)
    tp = np.zeros(len(ovmax), dtype=bool)
    _, first = np.unique(jmax[cand], return_index=True)
    tp[cand[first]] = True
    fp = ~hit
    fp[cand] = ~tp[cand]
    return tp, fp


def voc_ap(recall: np.ndarray, precision: np.ndarray, *, use_07_metric: bool = True) -> float:
    """Average precision from the devkit's ``rec, prec`` ``Array[D]``.

    ``use_07_metric``: VOC2007 11-point rule, ``sum_t max(prec[rec >= t]) / 11`` (0 where none).
    Else VOC2010+ ``VOCap.m``: area under the monotone (right-to-left max) precision envelope.
    MATLAB's ``max`` skips NaN precisions (leading "don't care" detections); so do we (``fmax``).
    """
    rec = np.asarray(recall, dtype=np.float64)
    prec = np.asarray(precision, dtype=np.float64)
    if use_07_metric:
        ap = 0.0
        for t in VOC07_RECALL_THRESHOLDS:
            sel = prec[rec >= t]
            p = float(np.fmax.reduce(sel)) if len(sel) else 0.0
            ap += (0.0 if math.isnan(p) else p) / 11
        # Summing eleven 1/11 gives 1.0000000000000002 (the devkit's own result); keep AP <= 1.
        return min(ap, 1.0)
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.fmax.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1]) + 1
    return float(np.sum((mrec[i] - mrec[i - 1]) * mpre[i]))


def _flatten_gt(gt: GroundTruth) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ground truth of all images as VOC boxes ``Array[G, 4]``, difficult ``Array[G]`` and
    per-image ``offsets`` ``Array[I + 1]`` (in the mapping's image order)."""
    boxes = [np.asarray(b, dtype=np.float64).reshape(-1, 4) for b, _ in gt.values()]
    diff = [np.asarray(d, dtype=bool).reshape(-1) for _, d in gt.values()]
    offsets = np.concatenate([[0], np.cumsum([len(b) for b in boxes])]).astype(np.int64)
    if not boxes:
        return np.zeros((0, 4)), np.zeros(0, dtype=bool), offsets
    return to_voc(np.concatenate(boxes)), np.concatenate(diff), offsets


def evaluate_class(
    det_image_ids: np.ndarray,
    det_scores: np.ndarray,
    det_boxes: np.ndarray,
    gt: GroundTruth,
    *,
    iou_threshold: float = 0.5,
    use_07_metric: bool = True,
) -> ClassResult:
    """Evaluate the detections of one class against its ground truth (VOCevaldet.m).

    Args:
        det_image_ids: ``Array[D]`` str. det_scores: ``Array[D]``.
        det_boxes: ``Array[D, 4]`` internal 0-based continuous xyxy.
        gt: image id -> (``Array[G, 4]`` internal xyxy boxes of this class, ``Array[G]`` bool
            difficult), for **every** image of the split (images without this class map to
            empty arrays; a detection on an image not in ``gt`` is a :class:`DataError`, as in
            the devkit).
        iou_threshold: devkit ``VOCopts.minoverlap`` (0.5), compared with ``>=``.
        use_07_metric: 11-point AP (VOC2007) if true, else the VOC2010+ area rule.
    """
    dets = Detections(det_image_ids, det_scores, det_boxes)
    index = {image_id: i for i, image_id in enumerate(gt)}
    det_img = np.array([index.get(i, -1) for i in dets.image_ids.tolist()], dtype=np.int64)
    if (det_img < 0).any():
        bad = dets.image_ids[np.flatnonzero(det_img < 0)[0]]
        raise DataError(f"detection on image {bad!r}, which is not in the evaluated image set")
    gt_boxes, gt_diff, offsets = _flatten_gt(gt)
    npos = int((~gt_diff).sum())

    order = np.argsort(-dets.scores, kind="stable")  # MATLAB sort(-confidence) is stable
    ovmax, jmax = _best_overlaps(to_voc(dets.boxes)[order], det_img[order], gt_boxes, offsets)
    tp, fp = _assign(ovmax, jmax, gt_diff, iou_threshold)
    ctp, cfp = np.cumsum(tp, dtype=np.float64), np.cumsum(fp, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rec = ctp / npos
        prec = ctp / (cfp + ctp)
    ap = voc_ap(rec, prec, use_07_metric=use_07_metric) if npos > 0 else math.nan
    return ClassResult(ap, prec, rec, npos, tp, fp, order.astype(np.int64))


def class_ground_truth(dataset, class_name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Image id -> (boxes ``Array[G, 4]``, difficult ``Array[G]``) of one class, every image."""
    k = dataset.classes.index(class_name)
    out = {}
    for rec in dataset.records:
        sel = np.asarray(rec.labels) == k
        out[rec.image_id] = (np.asarray(rec.boxes)[sel], np.asarray(rec.difficult, dtype=bool)[sel])
    return out


def evaluate_detections(
    dataset,
    detections: Mapping[str, Detections],
    *,
    use_07_metric: bool = True,
    iou_threshold: float = 0.5,
) -> EvalResult:
    """Evaluate every class of ``dataset`` (a :class:`sppdet.datasets.Dataset`).

    A class missing from ``detections`` has none (AP 0). Classes without non-difficult ground
    truth get AP ``nan`` and are left out of the mAP, with a warning.
    """
    unknown = sorted(set(detections) - set(dataset.classes))
    if unknown:
        raise DataError(f"detections for classes not in dataset {dataset.name!r}: {unknown}")
    per_class = {}
    for name in dataset.classes:
        dets = detections.get(name, Detections.empty())
        per_class[name] = evaluate_class(
            dets.image_ids,
            dets.scores,
            dets.boxes,
            class_ground_truth(dataset, name),
            iou_threshold=iou_threshold,
            use_07_metric=use_07_metric,
        )
    ap = {name: r.ap for name, r in per_class.items()}
    valid = [v for v in ap.values() if not math.isnan(v)]
    empty = [name for name, v in ap.items() if math.isnan(v)]
    if empty:
        log.warning("no non-difficult ground truth for %s: AP nan, left out of the mAP", empty)
    mean = float(np.mean(valid)) if valid else math.nan
    return EvalResult(mean, ap, per_class, use_07_metric)


def format_ap_table(result: EvalResult) -> str:
    """Per-class AP and mAP as percentages with one decimal (as in the paper's tables)."""
    rule = "VOC2007 11-point" if result.use_07_metric else "VOC2010+ all-point"
    width = max([len(c) for c in result.ap] + [5])
    lines = [f"{'class':<{width}}  {'AP':>5}  {'npos':>5}", "-" * (width + 14)]
    for name, ap in result.ap.items():
        lines.append(f"{name:<{width}}  {100 * ap:5.1f}  {result.per_class[name].npos:5d}")
    lines.append("-" * (width + 14))
    lines.append(f"{'mAP':<{width}}  {100 * result.map:5.1f}  ({rule})")
    return "\n".join(lines)
