"""Plots and drawings: precision/recall curves, proposal recall curves, detections on an image.

Figures are built on :class:`matplotlib.figure.Figure` with an explicit Agg canvas, never through
``pyplot`` (no global figure state, no GUI backend); images are drawn with PIL. Every file is
rendered to bytes and written with :func:`sppdet.storage.atomic_write_bytes`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from sppdet.storage import atomic_write_bytes

# matplotlib's "tab10" colours: distinct, readable on photos; class k gets _PALETTE[k % 10].
_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


class PRCurve(Protocol):
    """Anything with ``precision``, ``recall`` ``Array[D]`` and ``ap`` (e.g. ``ClassResult``)."""

    precision: np.ndarray
    recall: np.ndarray
    ap: float


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path: str | os.PathLike, dpi: int = 100) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())


def plot_pr_curves(
    per_class: Mapping[str, PRCurve], path: str | os.PathLike, *, ncols: int = 5
) -> None:
    """A grid of per-class precision/recall curves, AP (percent) in each title.

    Args:
        per_class: class name -> result with ``precision``, ``recall`` ``Array[D]`` and ``ap``.
        path: output PNG.
        ncols: grid columns (5 fits the 20 VOC classes in 4 rows).
    """
    if not per_class:
        raise ValueError("plot_pr_curves: no classes to plot")
    ncols = min(ncols, len(per_class))
    nrows = math.ceil(len(per_class) / ncols)
    fig = _figure(2.6 * ncols, 2.4 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, res) in zip(axes, per_class.items(), strict=False):
        ax.plot(np.asarray(res.recall), np.asarray(res.precision), lw=1.2)
        ap = "n/a" if math.isnan(res.ap) else f"{100 * res.ap:.1f}"
        ax.set_title(f"{name}: AP {ap}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes[len(per_class) :]:
        ax.set_visible(False)
    fig.supxlabel("recall")
    fig.supylabel("precision")
    _save_figure(fig, path)


def plot_recall_curve(
    num_boxes: np.ndarray,
    recalls: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    *,
    title: str = "recall vs number of proposals",
) -> None:
    """Recall against the number of proposals per image, one line per label (log x axis).

    Args:
        num_boxes: ``Array[K]`` proposal counts (x axis).
        recalls: label (e.g. ``"IoU 0.5"``) -> ``Array[K]`` recall in [0, 1].
        path: output PNG.
    """
    x = np.asarray(num_boxes, dtype=np.float64).reshape(-1)
    fig = _figure(5.0, 3.6)
    ax = fig.subplots()
    for label, rec in recalls.items():
        rec = np.asarray(rec, dtype=np.float64).reshape(-1)
        if len(rec) != len(x):
            raise ValueError(f"plot_recall_curve: {label!r} has {len(rec)} values, {len(x)} x")
        ax.plot(x, rec, marker="o", ms=3, label=str(label))
    if len(x) and x.min() > 0:
        ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("number of proposals per image")
    ax.set_ylabel("recall")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if recalls:
        ax.legend(fontsize=8)
    _save_figure(fig, path)


def draw_detections(
    image: np.ndarray,
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    classes: Sequence[str],
    path: str | os.PathLike,
    *,
    gt_boxes: np.ndarray | None = None,
) -> None:
    """Draw detections (one colour per class, "class score" captions) and optional ground truth.

    Args:
        image: ``Array[H, W, 3]`` uint8 RGB.
        boxes: ``Array[N, 4]`` internal 0-based continuous xyxy.
        labels: ``Array[N]`` int, index into ``classes``. scores: ``Array[N]``.
        classes: class names.
        path: output PNG.
        gt_boxes: ``Array[G, 4]`` internal xyxy, drawn as thin white boxes underneath.
    """
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    if gt_boxes is not None:
        for b in np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4):
            draw.rectangle(_pil_rect(b), outline=(255, 255, 255), width=1)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError("draw_detections: boxes, labels and scores differ in length")
    for b, k, s in zip(boxes, labels.tolist(), scores.tolist(), strict=True):
        colour = _PALETTE[int(k) % len(_PALETTE)]
        draw.rectangle(_pil_rect(b), outline=colour, width=2)
        caption = f"{classes[int(k)]} {s:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        x, y = float(b[0]), max(float(b[1]) - (bottom - top) - 4, 0.0)
        draw.rectangle((x, y, x + right - left + 4, y + bottom - top + 4), fill=colour)
        draw.text((x + 2, y + 2 - top), caption, fill=(255, 255, 255), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def _pil_rect(box: np.ndarray) -> tuple[float, float, float, float]:
    """PIL rectangles include both corner pixels: continuous ``[x1, x2)`` is pixels x1..x2-1."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (x1, y1, max(x2 - 1, x1), max(y2 - 1, y1))


def plot_stage_times(
    stages: Mapping[str, Mapping[str, float]],
    order: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str = "seconds per image by stage",
) -> None:
    """Stacked horizontal bars: one bar per method, one segment per stage (log-free seconds).

    Args:
        stages: method -> stage -> seconds per image.
        order: the stages to stack, in order (others are ignored).
        path: output PNG.
    """
    if not stages:
        raise ValueError("plot_stage_times: no methods to plot")
    names = list(stages)
    fig = _figure(7.0, 1.2 + 0.5 * len(names))
    ax = fig.subplots()
    left = np.zeros(len(names))
    for stage in order:
        width = np.array([float(stages[m].get(stage, 0.0)) for m in names])
        if width.sum() > 0:
            ax.barh(names, width, left=left, label=stage)
            left += width
    for y, total in enumerate(left):
        ax.text(total, y, f" {total:.3f} s", va="center", fontsize=8)
    ax.set_xlim(0, left.max() * 1.2 if left.max() > 0 else 1)
    ax.set_xlabel("seconds per image")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncols=4, loc="upper right")  # the short SPP bars leave it free
    ax.invert_yaxis()
    _save_figure(fig, path)


def plot_ap_comparison(
    aps: Mapping[str, Mapping[str, float]], path: str | os.PathLike, *, title: str = ""
) -> None:
    """Grouped bars of per-class AP (percent), one bar per method in each class.

    Args:
        aps: method -> class name -> AP in [0, 1] (NaN: no positives, drawn as nothing); every
            method must cover the same classes.
        path: output PNG.
        title: figure title (the methods' mAPs are added to the legend).
    """
    if not aps:
        raise ValueError("plot_ap_comparison: no methods to plot")
    classes = list(next(iter(aps.values())))
    if any(list(a) != classes for a in aps.values()):
        raise ValueError("plot_ap_comparison: the methods cover different classes")
    fig = _figure(max(6.0, 0.5 * len(classes)), 3.6)
    ax = fig.subplots()
    x = np.arange(len(classes))
    width = 0.8 / len(aps)
    for k, (name, ap) in enumerate(aps.items()):
        vals = 100 * np.array([ap[c] for c in classes], dtype=np.float64)
        label = f"{name} (mAP {np.nanmean(vals):.1f})"
        ax.bar(x + (k - (len(aps) - 1) / 2) * width, vals, width, label=label)
    ax.set_xticks(x, classes, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("AP (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    _save_figure(fig, path)
