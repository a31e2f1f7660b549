"""Recall of a proposal set against the ground truth (selective search paper section 5.1).

Shape shorthand: ``N`` boxes of one image, ``G`` ground truth of one image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sppdet import boxes as B
from sppdet import storage as S
from sppdet.proposal_store import ProposalSet

__all__ = ["proposal_recall", "write_recall_report"]


def proposal_recall(
    dataset,
    pset: ProposalSet,
    *,
    thresholds: Sequence[float] = (0.5, 0.7),
    grid: Sequence[int] | None = None,
    seconds_per_image: float | None = None,
) -> dict[str, Any]:
    """Recall and average best overlap of proposals over the non-difficult ground truth.

    Each ground-truth box gets its best IoU (VOC "+1" overlap, through
    :func:`sppdet.boxes.box_iou`) over its image's proposals. ``recall_<t>``: share with best IoU
    ``>= t``; ``mabo``: mean over classes of the class's mean best IoU (ABO and MABO of Uijlings
    et al. section 5.1); ``abo_all``: mean over all boxes. ``curve``: recall with only the first
    ``k`` proposals of each image (stored order) for ``k`` on ``grid`` (default 1, 2, 5, 10, ...
    and the largest count).

    Returns:
        JSON-ready dict with ``recall_<t>``, ``mabo``, ``abo_all``, ``boxes_per_image``,
        ``seconds_per_image``, ``images``, ``gt_boxes``, ``abo_per_class`` and ``curve``.
    """
    counts = np.array([len(pset.boxes_for(i)) for i in dataset.image_ids], dtype=np.int64)
    most = int(counts.max(initial=1))
    default = [m * 10**e for e in range(7) for m in (1, 2, 5)]
    ks = np.array(sorted({k for k in (grid or default) if k < most} | {most}))
    best_k, labels = [np.zeros((0, len(ks)))], [np.zeros(0, np.int64)]
    for r in dataset:
        gt, props = r.boxes[~r.difficult], pset.boxes_for(r.image_id)
        best = np.zeros((len(gt), len(ks)))
        if len(gt) and len(props):
            running = np.maximum.accumulate(B.box_iou(gt, props), axis=1)  # best of first k
            best = running[:, np.minimum(ks, len(props)) - 1]
        best_k.append(best)
        labels.append(r.labels[~r.difficult])
    best_k, labels = np.concatenate(best_k), np.concatenate(labels)
    best = best_k[:, -1]
    abo = {dataset.classes[c]: float(best[labels == c].mean()) for c in np.unique(labels)}
    report: dict[str, Any] = {f"recall_{t}": _mean(best >= t) for t in thresholds}
    report.update(mabo=_mean(np.array(list(abo.values()))), abo_all=_mean(best))
    report.update(boxes_per_image=float(counts.mean()) if len(counts) else 0.0)
    report.update(seconds_per_image=seconds_per_image, images=len(dataset), gt_boxes=len(best))
    curve = {f"recall_{t}": (best_k >= t).mean(0).tolist() if len(best) else [] for t in thresholds}
    report.update(abo_per_class=abo, curve={"num_boxes": ks.tolist(), **curve})
    return report


def _mean(x: np.ndarray) -> float | None:
    return float(np.mean(x)) if len(x) else None


def write_recall_report(
    report: dict[str, Any], json_path: str | os.PathLike, *, title: str
) -> Path:
    """Write ``report`` as JSON and its recall-vs-boxes curve as a PNG beside it; return the PNG."""
    from sppdet.viz import plot_recall_curve

    json_path = Path(json_path)
    S.atomic_write_json(json_path, report)
    curve = report["curve"]
    lines = {f"IoU {k[7:]}": np.asarray(v) for k, v in curve.items() if k != "num_boxes" and v}
    png = json_path.with_suffix(".png")
    plot_recall_curve(np.asarray(curve["num_boxes"]), lines, png, title=title)
    return png
