"""Bounding-box regression (SPEC section 7): R-CNN box deltas and per-class ridge regressors.

Parametrisation (R-CNN appendix C, ``rcnn_train_bbox_regressor.m``), on box centres and sizes in
the internal convention of :mod:`sppdet.boxes` (width ``x2 - x1``, no "+1")::

    tx = (Gx - Px) / Pw    ty = (Gy - Py) / Ph    tw = log(Gw / Pw)    th = log(Gh / Ph)

Invariant (detectron2 ``Box2BoxTransform`` style, tested): ``decode(P, encode(P, G)) == G`` up to
rounding, for proposals ``P`` with positive sizes and ``|tw|, |th| <= DELTA_CLIP``.

Training (:mod:`sppdet.bbox_train`) follows ``spp_train_bbox_regressor.m`` (SPP-net) /
``rcnn_train_bbox_regressor.m``: one ridge regressor per class on ``[features, 1]`` (the bias is
penalised like the weights), targets centred by their class mean. R-CNN also whitens the targets
with ``T = cov^-1/2`` and predicts ``Y T^-1 + mu``; ridge is linear in the targets, so that
whitening does not change a single prediction. We store a per-coordinate ``std = sqrt(var + 0.001)``
(R-CNN's ``D + 0.001``) only to keep the solved weights of order one; it is a no-op for the
predictions, too.

Shape shorthand: ``N`` boxes, ``K`` classes, ``D`` feature dims, ``R`` rows kept for one class.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from sppdet.boxes import box_iou
from sppdet.errors import DataError
from sppdet.storage import atomic_save_npz

#: Upper clamp of ``tw, th`` before ``exp`` in :func:`decode` (Detectron ``BBOX_XFORM_CLIP``,
#: detectron2 ``_DEFAULT_SCALE_CLAMP``): a box can grow at most 1000/16 times per side.
DELTA_CLIP = math.log(1000.0 / 16)

VAR_EPS = 0.001  # R-CNN adds 0.001 to the target covariance eigenvalues before whitening


def _parts(boxes):
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(proposals, gt):
    """R-CNN regression targets that map ``proposals`` onto ``gt``.

    Args:
        proposals: ``Array[..., 4]`` internal xyxy (numpy float32/float64 or torch tensor), with
            positive widths and heights.
        gt: ``Array[..., 4]`` matched ground-truth boxes, same shape.

    Returns:
        ``Array[..., 4]`` deltas ``(tx, ty, tw, th)``, the dtype/library of the inputs.
    """
    is_torch = isinstance(proposals, torch.Tensor)
    if not is_torch:
        dtype = np.result_type(np.asarray(proposals).dtype, np.asarray(gt).dtype, np.float32)
        proposals, gt = np.asarray(proposals, dtype), np.asarray(gt, dtype)
    px, py, pw, ph = _parts(proposals)
    gx, gy, gw, gh = _parts(gt)
    if bool((pw <= 0).any()) or bool((ph <= 0).any()):
        raise ValueError("encode: proposals need positive width and height")
    log_ = torch.log if is_torch else np.log
    stack = torch.stack if is_torch else np.stack
    return stack([(gx - px) / pw, (gy - py) / ph, log_(gw / pw), log_(gh / ph)], -1)


def decode(proposals, deltas):
    """Apply R-CNN ``deltas`` to ``proposals`` (inverse of :func:`encode`).

    Args:
        proposals: ``Array[..., 4]`` internal xyxy; broadcast against ``deltas`` (e.g. ``[N, 1, 4]``
            with ``[N, K, 4]``).
        deltas: ``Array[..., 4]`` ``(tx, ty, tw, th)``; ``tw, th`` are clamped at
            :data:`DELTA_CLIP` so ``exp`` cannot overflow.

    Returns:
        ``Array[..., 4]`` boxes, internal xyxy.
    """
    is_torch = isinstance(deltas, torch.Tensor)
    if is_torch:
        proposals = torch.as_tensor(proposals, dtype=deltas.dtype, device=deltas.device)
        dw = deltas[..., 2].clamp(max=DELTA_CLIP)
        dh = deltas[..., 3].clamp(max=DELTA_CLIP)
        exp, stack = torch.exp, torch.stack
    else:
        dtype = np.result_type(np.asarray(proposals).dtype, np.asarray(deltas).dtype, np.float32)
        proposals, deltas = np.asarray(proposals, dtype), np.asarray(deltas, dtype)
        dw = np.minimum(deltas[..., 2], DELTA_CLIP)
        dh = np.minimum(deltas[..., 3], DELTA_CLIP)
        exp, stack = np.exp, np.stack
    px, py, pw, ph = _parts(proposals)
    cx, cy = deltas[..., 0] * pw + px, deltas[..., 1] * ph + py
    w, h = exp(dw) * pw, exp(dh) * ph
    return stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], -1)


def match_training_rows(
    proposals: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, min_iou: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pick the regression examples of one image (R-CNN ``get_examples``).

    Each proposal goes to its highest-IoU ground truth (first on ties); it is kept when that IoU
    is ``>= min_iou`` and takes that ground truth's class. R-CNN's proposal list also holds the
    ground-truth boxes themselves (IoU 1, zero targets): pass them in ``proposals`` to do the same.

    Returns:
        ``rows`` ``Array[R]`` int64 indices into ``proposals``, ``matched`` ``Array[R, 4]`` their
        ground-truth boxes, ``labels`` ``Array[R]`` int64 classes.
    """
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
    if len(gt_boxes) == 0:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    iou = box_iou(proposals, gt_boxes)
    best = iou.argmax(axis=1)
    rows = np.flatnonzero(iou[np.arange(len(iou)), best] >= min_iou).astype(np.int64)
    return rows, gt_boxes[best[rows]], gt_labels[best[rows]]


@dataclass(frozen=True)
class BBoxRegConfig:
    """Box-regression training knobs (SPEC section 7)."""

    min_iou: float = 0.5  # proposal-GT overlap to train on (SPP-net released code; R-CNN 0.6)
    ridge_lambda: float = 4000.0  # ridge penalty (SPP-net released code; R-CNN 1000), on
    # features scaled to mean L2 norm 20 as both codes do (``spp_scale_features``)
    max_samples_per_class: int = 20000  # reservoir size per class, bounds memory at
    # K * this * D * bytes (ours; R-CNN/SPP-net keep every sample in memory)
    storage_dtype: Literal["float32", "float16"] = (
        "float32"  # "float16" halves the reservoir's memory (ours)
    )
    layer: Literal["pool5", "fc6", "fc7"] = "pool5"  # features regressed from: pool5 as R-CNN
    # and SPP-net (a frozen conv layer); fc6 / fc7 of the fine-tuned head (ours: Fast R-CNN
    # regresses from its fine-tuned fc7, section 2.2)
    method: Literal["ridge", "finetuned"] = "ridge"  # ridge: fitted after fine-tuning on
    # ``layer`` (R-CNN, SPP-net); finetuned: the head's own box layer, trained with the
    # classifier (finetune.bbox_loss_weight > 0; Fast R-CNN), on fc7 (``layer`` unused)


@dataclass(frozen=True)
class BBoxRegressor:
    """Trained per-class box regressors.

    Attributes:
        weights: ``Array[K, D, 4]`` float32, on whitened targets.
        bias: ``Array[K, 4]`` float32.
        target_mean: ``Array[K, 4]`` float32, per-class mean of the training deltas.
        target_std: ``Array[K, 4]`` float32, per-class ``sqrt(var + 0.001)`` of the deltas.
        num_samples: ``Array[K]`` int64, rows each class was fitted on.
        feature_scale: the factor the training features (pool5 vectors) were multiplied by;
            callers apply it to test features. ``None``: not stored (files written before it
            was; ``sppdet.model`` then reads it from the run's ``bbox/stats.json``).
        layer: the features' layer (``pool5``, ``fc6`` or ``fc7``; files written before it was
            stored are pool5).
    """

    weights: np.ndarray
    bias: np.ndarray
    target_mean: np.ndarray
    target_std: np.ndarray
    num_samples: np.ndarray
    feature_scale: float | None = None
    layer: str = "pool5"

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[0])

    def deltas_all(self, features: np.ndarray) -> np.ndarray:
        """Predicted deltas ``Array[N, K, 4]`` (float32) of every row for every class:
        :meth:`deltas_all_tensor` on the CPU."""
        x = torch.from_numpy(np.asarray(features, np.float32).reshape(-1, self.weights.shape[1]))
        return self.deltas_all_tensor(x).numpy()

    def deltas_all_tensor(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted deltas ``Tensor[N, K, 4]`` (float32) of ``Tensor[N, D]`` features, on
        their device.

        In torch, not numpy: a numpy matmul would wake OpenBLAS's thread pool, whose spinning
        workers slow the next image's conv pass (see ``LinearSVMs.scores_tensor``).
        """
        k, d, _ = self.weights.shape

        def t(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(features.device, torch.float32)

        w = t(self.weights.transpose(1, 0, 2).reshape(d, k * 4))
        z = (features.float().reshape(-1, d) @ w).reshape(-1, k, 4) + t(self.bias)
        return z * t(self.target_std) + t(self.target_mean)

    def predict_all(self, features: np.ndarray, proposals: np.ndarray) -> np.ndarray:
        """Boxes ``Array[N, K, 4]`` (float32): each proposal regressed by each class."""
        p = np.asarray(proposals, np.float32).reshape(-1, 1, 4)
        return decode(p, self.deltas_all(features)).astype(np.float32)

    def predict_rows(
        self,
        features: np.ndarray | torch.Tensor,
        rows: np.ndarray,
        proposals: np.ndarray,
        labels: np.ndarray,
    ) -> np.ndarray:
        """Boxes ``Array[M, 4]`` (float32): proposal ``i`` regressed by class ``labels[i]`` from
        feature row ``rows[i]`` of ``features`` ``Array[U, D]`` or ``Tensor[U, D]`` (computed in
        torch on its device, :meth:`deltas_all_tensor`).

        Detection regresses a window for each class it is a candidate of; computing every
        class's deltas once per distinct row (one ``[U, D] x [D, 4K]`` product) avoids gathering
        a ``D``-dim row per (window, class) pair, which cost ~0.1 s per VOC image.
        """
        x = features
        if not isinstance(x, torch.Tensor):
            x = torch.from_numpy(np.asarray(x, np.float32))
        rows_t = torch.as_tensor(np.asarray(rows), device=x.device)
        labels_t = torch.as_tensor(np.asarray(labels), device=x.device)
        deltas = self.deltas_all_tensor(x)[rows_t, labels_t].cpu().numpy()
        return decode(np.asarray(proposals, np.float32), deltas).astype(np.float32)

    def predict(
        self, features: np.ndarray, proposals: np.ndarray, labels: np.ndarray
    ) -> np.ndarray:
        """Boxes ``Array[N, 4]`` (float32): row ``i`` regressed by class ``labels[i]``.

        Rows with ``labels < 0`` keep their proposal.
        """
        x = np.asarray(features, np.float32).reshape(len(labels), -1)
        out = np.asarray(proposals, np.float32).reshape(-1, 4).copy()
        labels = np.asarray(labels, np.int64)
        for c in np.unique(labels[labels >= 0]):
            rows = np.flatnonzero(labels == c)
            z = (x[rows] @ self.weights[c] + self.bias[c]) * self.target_std[c]
            out[rows] = decode(out[rows], z + self.target_mean[c])
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically (the feature scale inside, when known)."""
        scale = (
            {} if self.feature_scale is None else {"feature_scale": np.float64(self.feature_scale)}
        )
        arrays = {f: getattr(self, f) for f in ARRAY_FIELDS}
        atomic_save_npz(path, **arrays, **scale, layer=np.str_(self.layer))

    @classmethod
    def load(cls, path: str | os.PathLike) -> BBoxRegressor:
        """Read what :meth:`save` wrote; a missing file or key is a :class:`DataError`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                scale = float(z["feature_scale"]) if "feature_scale" in z.files else None
                layer = str(z["layer"]) if "layer" in z.files else "pool5"
                return cls(**{f: z[f] for f in ARRAY_FIELDS}, feature_scale=scale, layer=layer)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read box regressors {path}: {exc}") from exc


#: The arrays of a :class:`BBoxRegressor` (its ``.npz`` keys; :mod:`sppdet.packing` stores them).
ARRAY_FIELDS = ("weights", "bias", "target_mean", "target_std", "num_samples")
