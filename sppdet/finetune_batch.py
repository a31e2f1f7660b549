"""Mini-batches of fine-tuning (paper section 4.1; Fast R-CNN section 2.3): each image's
foreground / background candidate windows, and the pooling of a step's sampled windows from the
cached maps (or, with trained conv blocks, from the blocks run on them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from sppdet.bbox_reg import encode
from sppdet.distributed import SINGLE, Dist
from sppdet.features import SPPConfig
from sppdet.head import ConvTop
from sppdet.imageio import load_image
from sppdet.window_features import WindowFeatures
from sppdet.windows import label_windows

if TYPE_CHECKING:  # finetune imports this module
    from sppdet.finetune import FinetuneConfig


@dataclass(frozen=True)
class ImageWindows:
    """One training image's candidate windows, foreground first."""

    index: int  # position in the record list
    boxes: np.ndarray  # [M, 4] fg then bg candidates
    labels: np.ndarray  # [M] 0 = background, k + 1 = class k
    num_fg: int
    targets: np.ndarray  # [M, 4] float32 R-CNN deltas to the matched GT box (foreground rows;
    # background rows 0), for the box layer of the head


def candidates(record, proposals: np.ndarray, index: int, cfg: FinetuneConfig) -> ImageWindows:
    """The windows of ``record`` that fine-tuning samples: foreground IoU >= ``cfg.fg_iou``,
    background in ``[cfg.bg_iou_low, cfg.fg_iou)``."""
    keep = ~record.difficult
    gt_boxes, gt_labels = record.boxes[keep], record.labels[keep]
    lw = label_windows(proposals, gt_boxes, gt_labels, int(gt_labels.max(initial=0)) + 1)
    fg = lw.max_iou >= cfg.fg_iou
    bg = (lw.max_iou >= cfg.bg_iou_low) & (lw.max_iou < cfg.fg_iou)
    labels = np.zeros(len(lw.boxes), dtype=np.int64)
    targets = np.zeros((len(lw.boxes), 4), dtype=np.float32)
    if len(gt_labels):
        labels[fg] = gt_labels[lw.gt_index[fg]] + 1
        targets[fg] = encode(lw.boxes[fg], gt_boxes[lw.gt_index[fg]])
    order = np.concatenate([np.flatnonzero(fg), np.flatnonzero(bg)])
    return ImageWindows(index, lw.boxes[order], labels[order], int(fg.sum()), targets[order])


def sample_windows(rng: np.random.Generator, w: ImageWindows, n: int, n_fg: int) -> np.ndarray:
    """Indices of ``n`` windows with up to ``n_fg`` foreground ones (rest background)."""
    fg = min(n_fg, w.num_fg)
    n_bg_avail = len(w.boxes) - w.num_fg
    fg_idx = rng.choice(w.num_fg, fg, replace=False) if fg else np.zeros(0, np.int64)
    bg_n = min(n - fg, n_bg_avail)
    bg_idx = w.num_fg + rng.choice(n_bg_avail, bg_n, replace=False) if bg_n else fg_idx[:0]
    return np.concatenate([fg_idx, bg_idx]).astype(np.int64)


class Batcher:
    """Pools sampled windows of a few images into an ``(X [B, D], y [B])`` mini-batch.

    With a :class:`ConvTop` the windows are pooled from ``top(cached map)``, differentiably:
    gradients reach the trained blocks through the SPP layer's max pooling (each bin's winning
    cell), as in Fast R-CNN's RoI pooling.
    """

    def __init__(
        self,
        records,
        windows,
        provider: WindowFeatures,
        spp: SPPConfig,
        cfg: FinetuneConfig,
        top: ConvTop | None = None,
    ) -> None:
        self.records, self.windows, self.provider = records, windows, provider
        self.spp, self.cfg, self.top = spp, cfg, top

    def batch(self, rng: np.random.Generator, pool: Sequence[int]) -> tuple[Tensor, Tensor]:
        """``(X [B, D], y [B])``: a mini-batch of windows of a few images of ``pool``."""
        x, y, _, _, _ = self._batch(rng, pool, SINGLE)
        return x, y

    def batch_targets(
        self, rng: np.random.Generator, pool: Sequence[int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`batch` (the same draws) and ``t [B, 4]``, each window's R-CNN deltas to its
        ground truth as the pooled (possibly flipped) window sees it (0 for background)."""
        x, y, t, _, _ = self._batch(rng, pool, SINGLE)
        return x, y, t

    def batch_rows(
        self, rng: np.random.Generator, pool: Sequence[int], dist: Dist
    ) -> tuple[Tensor, Tensor, Tensor, int]:
        """This rank's part of :meth:`batch`: ``(X, y, rows, B)``, the windows of the batch's
        images ``k`` with ``k % world == rank`` (every rank draws every image's windows, flip
        and scale, so the draws stay those of one process), ``rows`` their positions among the
        ``B`` rows of the whole batch."""
        x, y, _, rows, total = self._batch(rng, pool, dist)
        return x, y, rows, total

    def _batch(self, rng: np.random.Generator, pool: Sequence[int], dist: Dist) -> tuple:
        cfg = self.cfg
        chosen = rng.choice(len(pool), min(cfg.images_per_batch, len(pool)), replace=False)
        per_img = math.ceil(cfg.batch_size / len(chosen))
        fg_img = math.ceil(cfg.batch_size * cfg.fg_fraction / len(chosen))
        scales = self.provider.extractor.config.scales
        xs, ys, ts, rows, start = [], [], [], [], 0
        for k, j in enumerate(chosen):
            w = self.windows[pool[j]]
            idx = sample_windows(rng, w, per_img, fg_img)
            flip = bool(cfg.flip and rng.random() < 0.5)
            scale = scales[int(rng.integers(len(scales)))]  # random scale (paper 4.1)
            idx = idx[: max(0, cfg.batch_size - start)]  # the batch keeps its first rows
            if len(idx) and k % dist.world == dist.rank:
                xs.append(self._pool(w, idx, flip, scale))
                ys.append(torch.from_numpy(w.labels[idx]))
                ts.append(torch.from_numpy(_flipped(w.targets[idx], flip)))
                rows.append(torch.arange(start, start + len(idx)))
            start += len(idx)
        if not xs:  # more ranks than images this step: no rows, same collective calls
            dim = self.provider.extractor.spec.channels * sum(n * n for n in self.spp.levels)
            device = self.provider.extractor.device
            empty = torch.zeros(0, dtype=torch.long)
            x0, t0 = torch.zeros(0, dim, device=device), torch.zeros(0, 4, device=device)
            return x0, empty.to(device), t0, empty, start
        x = torch.cat(xs)
        dev = x.device
        return x, torch.cat(ys).to(dev), torch.cat(ts).to(dev), torch.cat(rows).to(dev), start

    def _pool(self, w: ImageWindows, idx: np.ndarray, flip: bool, scale: int) -> Tensor:
        rec = self.records[w.index]
        return self.provider.pool5(
            rec.image_id,
            (rec.height, rec.width),
            lambda: load_image(rec.path),
            w.boxes[idx],
            flip=flip,
            scales=(scale,),
            top=self.top,  # the trained blocks (with gradients) instead of the extractor's
        )


def _flipped(t: np.ndarray, flip: bool) -> np.ndarray:
    """Deltas ``Array[M, 4]`` of mirrored windows: a mirror negates the centre offset ``tx``
    (``x -> W - x`` maps both centres; widths, heights and ``ty`` are unchanged)."""
    if not flip:
        return t
    out = t.copy()
    out[:, 0] = -out[:, 0]
    return out
