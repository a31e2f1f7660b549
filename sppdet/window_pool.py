"""Windows on conv feature maps: which scale and cells each window pools, and the pooling.

SPP-net's per-window step (paper section 4.1 and appendix): each window is pooled at the one
scale where its area is closest to 224², from the cells the paper's rule maps it to, into a
fixed-length spatial-pyramid vector. The maps come from :mod:`sppdet.features`.

Shape shorthand: ``C`` channels, ``N`` windows, ``U`` distinct windows, ``D = C * B`` SPP dims.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from sppdet.backbones import BackboneSpec
from sppdet.features import ScaleMap, SPPConfig
from sppdet.scales import select_scales
from sppdet.spp import map_windows, spp_dim, spp_pool


def window_cells(
    maps: Sequence[ScaleMap], boxes: np.ndarray, spec: BackboneSpec
) -> tuple[np.ndarray, Tensor]:
    """Where each window is pooled: its scale and its cells on that scale's map.

    Each window uses ONE scale, the one where its area is closest to 224² (SPEC 2;
    ``spm_expected_scale.m``), and is mapped to map cells by the paper's rule (SPEC 3).

    Args:
        maps: the image's maps, one per scale.
        boxes: ``Array[N, 4]`` internal xyxy in original image pixels.

    Returns:
        ``(which, cells)``: ``Array[N]`` scale index and ``LongTensor[N, 4]`` inclusive cell
        windows ``x1, y1, x2, y2`` (on the CPU).
    """
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    which = select_scales(b, [m.factor for m in maps]) if len(maps) > 1 else np.zeros(len(b), int)
    cells = torch.zeros((len(b), 4), dtype=torch.long)
    for k, m in enumerate(maps):
        idx = np.flatnonzero(which == k)
        if len(idx) == 0:
            continue
        cells[torch.from_numpy(idx)] = map_windows(
            torch.from_numpy(b[idx] * m.factor),
            stride=spec.stride,
            offset=spec.offset,
            fmap_size=tuple(m.fmap.shape[1:]),
        ).cpu()
    return which, cells


def unique_windows(
    maps: Sequence[ScaleMap], boxes: np.ndarray, spec: BackboneSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Windows that pool the same cells at the same scale have identical SPP vectors.

    Returns:
        ``(first, inverse)``: ``Array[U]`` index of one window per distinct (scale, cells) and
        ``Array[N]`` the position in ``first`` of each window's group, so that
        ``pool_windows(maps, boxes)[i] == pool_windows(maps, boxes[first])[inverse[i]]``.
    """
    return _distinct(*window_cells(maps, boxes, spec))


def _distinct(which: np.ndarray, cells: Tensor) -> tuple[np.ndarray, np.ndarray]:
    keys = np.concatenate([which[:, None], cells.numpy()], axis=1)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return first.astype(np.int64), inverse.reshape(-1).astype(np.int64)


def pool_distinct_windows(
    maps: Sequence[ScaleMap], boxes: np.ndarray, spec: BackboneSpec, spp: SPPConfig
) -> tuple[Tensor, np.ndarray]:
    """SPP vectors of the distinct windows only: ``(Tensor[U, D], inverse Array[N])`` with
    ``pool_windows(maps, boxes) == out[inverse]`` (see :func:`unique_windows`); the windows are
    mapped to cells once for both the grouping and the pooling."""
    which, cells = window_cells(maps, boxes, spec)
    first, inverse = _distinct(which, cells)
    sel = torch.from_numpy(first)
    return _pool_cells(maps, which[first], cells[sel], spp), inverse


def pool_windows(
    maps: Sequence[ScaleMap], boxes: np.ndarray, spec: BackboneSpec, spp: SPPConfig
) -> Tensor:
    """SPP vectors of windows given in original-image pixels.

    Each window is pooled at one scale (:func:`window_cells`); windows are grouped per scale,
    pooled in one batched call each and written back by index (detectron2 ``ROIPooler`` style).

    Args:
        maps: the image's maps, one per scale.
        boxes: ``Array[N, 4]`` internal xyxy in original image pixels.

    Returns:
        ``Tensor[N, C * B]`` float32 on the maps' device (``N = 0`` gives ``[0, D]``).
    """
    return _pool_cells(maps, *window_cells(maps, boxes, spec), spp)


def _pool_cells(
    maps: Sequence[ScaleMap], which: np.ndarray, cells: Tensor, spp: SPPConfig
) -> Tensor:
    """Pool each window's cells on its scale's map, one batched call per scale."""
    dev = maps[0].fmap.device
    if len(which) and (which == which[0]).all():
        # one scale (always so at 1 scale): its call's rows are the output, in order; no
        # [N, D] buffer to fill and copy (~35 MB per VOC image)
        return spp_pool(maps[int(which[0])].fmap, cells.to(dev), spp.levels).float()
    # every window is assigned to exactly one scale, so every row is written below
    out = torch.empty((len(which), spp_dim(maps[0].fmap.shape[0], spp.levels)), device=dev)
    for k, m in enumerate(maps):
        idx = np.flatnonzero(which == k)
        if len(idx) == 0:
            continue
        sel = torch.from_numpy(idx)
        out[sel.to(dev)] = spp_pool(m.fmap, cells[sel].to(dev), spp.levels)
    return out
