"""Window mapping (image window -> feature-map cells) and spatial pyramid pooling.

Shape shorthand: ``C`` channels, ``H x W`` feature-map cells, ``R`` windows, ``L`` levels,
``B = sum(n * n for n in levels)`` bins (50 for the detection pyramid {6, 3, 2, 1}).

Paper references: "Mapping a Window to Feature Maps" (appendix of He et al., ECCV 2014 /
TPAMI 2015) for :func:`map_windows`, section 2.3 / 4 for the pyramid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sppdet import spp_cpu

__all__ = ["map_windows", "spp_pool", "SpatialPyramidPool", "spp_dim", "MAPPING_RULES"]

#: ``paper``: cells whose receptive-field centres lie strictly inside the window
#: (left ``floor(x/S) + 1``, right ``ceil(x/S) - 1``, paper appendix).
#: ``round``: nearest cell to each edge, moved inwards by ``shrink`` pixels (the released code,
#: ``utils/spm_pool/spm_response_boxes.m``: ``floor(x'/S + 0.5)`` / ``ceil(x'/S - 0.5)``).
MAPPING_RULES = ("paper", "round")


def spp_dim(channels: int, levels: Sequence[int]) -> int:
    """Length of the pooled vector: ``channels * sum(n * n)``."""
    return channels * sum(n * n for n in levels)


def map_windows(
    boxes: Tensor,
    *,
    stride: float,
    offset: float,
    fmap_size: tuple[int, int],
    rule: str = "paper",
    shrink: float = 0.0,
) -> Tensor:
    """Map image windows to inclusive feature-map cell ranges.

    Cell ``j`` (0-based) of the map has its receptive-field centre on image pixel
    ``stride * j + offset`` (pixel indices; the backbone declares ``offset``, 0 when every layer
    pads ``floor(p/2)`` as the paper assumes).

    Args:
        boxes: ``Tensor[R, 4]`` internal 0-based continuous xyxy boxes, already in the
            coordinates of the (resized) image the map was computed from.
        stride: total stride ``S`` of the feature map.
        offset: receptive-field centre of cell 0, in pixels.
        fmap_size: ``(H, W)`` of the feature map.
        rule: one of :data:`MAPPING_RULES`.
        shrink: inward shift in pixels for the ``round`` rule (the released code's ``offset``).

    Returns:
        ``LongTensor[R, 4]`` inclusive cell indices ``x1, y1, x2, y2`` with
        ``0 <= x1 <= x2 < W`` and ``0 <= y1 <= y2 < H``. A window that maps to an empty or inverted
        range (smaller than a cell, or between two centres) gets the single cell nearest to its
        centre, so every window pools something (SPEC section 3).
    """
    if rule not in MAPPING_RULES:
        raise ValueError(f"unknown mapping rule {rule!r}; expected one of {MAPPING_RULES}")
    b = boxes.to(torch.float64).reshape(-1, 4)
    # Continuous edges -> pixel indices of the first and last covered pixel (the paper's x).
    lo = b[:, :2] - offset
    hi = b[:, 2:] - 1.0 - offset
    if rule == "paper":
        first = torch.floor(lo / stride) + 1
        last = torch.ceil(hi / stride) - 1
    else:
        first = torch.floor((lo + shrink) / stride + 0.5)
        last = torch.ceil((hi - shrink) / stride - 0.5)
    centre = torch.round((lo + hi) / (2.0 * stride))
    inverted = first > last
    first = torch.where(inverted, centre, first)
    last = torch.where(inverted, centre, last)
    h, w = fmap_size
    limit = torch.tensor([w - 1, h - 1], dtype=torch.float64, device=b.device)
    first = torch.minimum(first.clamp(min=0), limit)
    last = torch.minimum(last.clamp(min=0), limit)
    last = torch.maximum(last, first)
    return torch.cat([first, last], dim=1).to(torch.long)


def _bin_edges(lo: Tensor, hi: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Half-open cell ranges ``[start, end)`` of the ``n`` bins over inclusive spans ``lo..hi``.

    Bin ``i`` covers ``[floor(i w / n), ceil((i + 1) w / n))`` of a ``w``-cell span (SPEC
    section 4): bins may overlap and none is empty. Returns two ``LongTensor[R, n]``.
    """
    span = (hi - lo + 1).unsqueeze(1)
    i = torch.arange(n, device=lo.device).unsqueeze(0)
    start = lo.unsqueeze(1) + torch.div(i * span, n, rounding_mode="floor")
    end = lo.unsqueeze(1) - torch.div(-(i + 1) * span, n, rounding_mode="floor")
    return start, end


def _log2_floor(x: Tensor) -> Tensor:
    """``floor(log2(x))`` for positive integer tensors, exactly (no float rounding)."""
    out = torch.zeros_like(x)
    y = x.clone()
    while bool((y > 1).any()):
        step = y > 1
        out += step.long()
        y = torch.where(step, y // 2, y)
    return out


def _sparse_table(fmap: Tensor, ky_n: int, kx_n: int) -> Tensor:
    """2-D sparse table for O(1) range-max queries (4 lookups per rectangle).

    ``table[ky, kx, y, x, :]`` is the max of ``fmap[:, y : y + 2**ky, x : x + 2**kx]`` (cells past
    the border count as absent), for ``ky < ky_n`` and ``kx < kx_n``. Returned flattened as
    ``Tensor[ky_n * kx_n * H * W, C]`` (channels last, so a lookup gathers one contiguous row).
    Built in place in one preallocated tensor: each entry costs one max of two earlier ones.
    """
    c, h, w = fmap.shape
    table = fmap.new_empty((ky_n, kx_n, h, w, c))
    table[0, 0] = fmap.permute(1, 2, 0)
    for ky in range(ky_n):
        if ky:
            prev, cur, d = table[ky - 1, 0], table[ky, 0], 1 << (ky - 1)
            torch.maximum(prev[: h - d], prev[d:], out=cur[: h - d])
            cur[h - d :] = prev[h - d :]
        for kx in range(1, kx_n):
            prev, cur, d = table[ky, kx - 1], table[ky, kx], 1 << (kx - 1)
            torch.maximum(prev[:, : w - d], prev[:, d:], out=cur[:, : w - d])
            cur[:, w - d :] = prev[:, w - d :]
    return table.reshape(-1, c)


def _pyramid_bins(windows: Tensor, levels: Sequence[int]) -> tuple[Tensor, ...]:
    """Bin rectangles of every window: four ``LongTensor[R, B]`` (y0, y1, x0, x1), half-open."""
    parts: list[list[Tensor]] = [[], [], [], []]
    x1, y1, x2, y2 = windows.unbind(1)
    r = windows.shape[0]
    for n in levels:
        xs, xe = _bin_edges(x1, x2, n)
        ys, ye = _bin_edges(y1, y2, n)
        # Bin (iy, ix) in row-major order, matching a flattened [C, n, n] tensor.
        parts[0].append(ys.unsqueeze(2).expand(r, n, n).reshape(r, n * n))
        parts[1].append(ye.unsqueeze(2).expand(r, n, n).reshape(r, n * n))
        parts[2].append(xs.unsqueeze(1).expand(r, n, n).reshape(r, n * n))
        parts[3].append(xe.unsqueeze(1).expand(r, n, n).reshape(r, n * n))
    return tuple(torch.cat(p, dim=1) for p in parts)


#: Up to this many windows the per-window loop beats building the sparse table (measured on a
#: [96, 43, 57] map, 1 thread: 16 windows take 8.3 ms by loop, 7.1 ms by table).
LOOP_MAX_WINDOWS = 8


def spp_pool(
    fmap: Tensor,
    windows: Tensor,
    levels: Sequence[int] = (6, 3, 2, 1),
    *,
    chunk: int = 512,
    method: str = "auto",
) -> Tensor:
    """Spatial pyramid max pooling of many windows of one feature map (batched, no window loop).

    Args:
        fmap: ``Tensor[C, H, W]`` conv feature map of one image at one scale.
        windows: ``LongTensor[R, 4]`` inclusive cell indices ``x1, y1, x2, y2`` (from
            :func:`map_windows`), ``0 <= x1 <= x2 < W``, ``0 <= y1 <= y2 < H``.
        levels: pyramid levels ``n`` (an ``n x n`` grid each); SPP-net detection uses (6, 3, 2, 1).
        chunk: windows processed together (bounds temporary memory to about
            ``chunk * 4 * B * C`` values).
        method: ``"kernel"`` (CPU only: compiled scan of each bin, see :mod:`sppdet.spp_cpu`),
            ``"table"`` (2-D sparse table, 4 gathers per bin: all windows at once; the GPU path),
            ``"loop"`` (adaptive max pooling per cropped window: cheaper for a few windows, and
            the path used when ``fmap`` needs gradients), or ``"auto"`` (loop up to
            :data:`LOOP_MAX_WINDOWS` windows, then kernel on CPU and table elsewhere).

    Returns:
        ``Tensor[R, C * B]``: per window, the concatenation over ``levels`` (in the given order)
        of the ``[C, n, n]`` max-pooled grid, flattened. Bin ``i`` of an ``n``-level over a
        ``w``-cell span covers cells ``[floor(i w / n), ceil((i + 1) w / n))``, which is exactly
        :func:`torch.nn.functional.adaptive_max_pool2d` applied to the cropped window.

    Differentiable with respect to ``fmap`` (gradients take the loop path).
    """
    if fmap.dim() != 3:
        raise ValueError(f"fmap must be [C, H, W], got shape {tuple(fmap.shape)}")
    c, h, w = fmap.shape
    windows = windows.to(device=fmap.device, dtype=torch.long).reshape(-1, 4)
    nbins = sum(n * n for n in levels)
    if windows.shape[0] == 0:
        return fmap.new_zeros((0, c * nbins))
    _check_windows(windows, h, w)
    if method == "auto":
        method = _auto_method(fmap, windows.shape[0])
    if method == "loop":
        if fmap.requires_grad and torch.is_grad_enabled():
            return _SPPArgmax.apply(fmap, windows, tuple(levels))
        return _pool_loop(fmap, windows, levels)
    if method == "kernel":
        if fmap.requires_grad or fmap.device.type != "cpu" or not spp_cpu.available():
            raise ValueError("method 'kernel' needs a CPU map without gradients and numba")
        return spp_cpu.spp_pool_cpu(fmap, windows, levels)
    if method != "table":
        raise ValueError(f"unknown spp_pool method {method!r}")
    span = (windows[:, 2:] - windows[:, :2] + 1).max(dim=0).values  # largest bins: level 1
    kx_n, ky_n = int(span[0]).bit_length(), int(span[1]).bit_length()
    if fmap.requires_grad:
        # The in-place table build is not differentiable: the arg-max path (as "loop") is.
        return _SPPArgmax.apply(fmap, windows, tuple(levels))
    table = _sparse_table(fmap, ky_n, kx_n)
    outs = [
        _pool_chunk(table, windows[i : i + chunk], levels, h, w, kx_n)
        for i in range(0, windows.shape[0], chunk)
    ]
    return torch.cat(outs, dim=0)


def _auto_method(fmap: Tensor, num_windows: int) -> str:
    """``kernel`` on CPU (compiled, fastest), ``table`` on GPUs, ``loop`` for few windows/grads."""
    if fmap.requires_grad or num_windows <= LOOP_MAX_WINDOWS:
        return "loop"
    if fmap.device.type == "cpu" and spp_cpu.available():
        return "kernel"
    return "table"


class _SPPArgmax(torch.autograd.Function):
    """Pyramid max pooling whose backward routes each bin's gradient to its winning cell.

    Autograd through :func:`_pool_loop` is exact too, but every crop's backward materialises a
    zero gradient of the whole map (``R * L`` of them: about 1.5 GB of memory traffic for 128
    windows of a ``[320, 43, 57]`` map); here the forward keeps the argmax cell of every output
    value and the backward is one ``scatter_add`` (as RoI max pooling's backward in Fast R-CNN).
    """

    @staticmethod
    def forward(ctx, fmap: Tensor, windows: Tensor, levels: tuple[int, ...]) -> Tensor:
        c, h, w = fmap.shape
        # channel of each output column: per level a [C, n * n] block, levels concatenated
        chan = torch.cat(
            [torch.arange(c, device=fmap.device).repeat_interleave(n * n) for n in levels]
        )
        ctx.map_shape = (c, h, w)
        if fmap.device.type == "cpu" and fmap.dtype == torch.float32 and spp_cpu.available():
            # the compiled scan: the same values and winning cells as the loop (its tie rule
            # too), without R * L small pooling calls
            values, cells = spp_cpu.spp_argmax_cpu(fmap, windows.cpu(), levels)
        else:
            values, cells = _argmax_loop(fmap, windows, levels)
        ctx.save_for_backward(cells + (chan * (h * w)).unsqueeze(0))
        return values

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (flat,) = ctx.saved_tensors
        c, h, w = ctx.map_shape
        out = grad.new_zeros(c * h * w)
        out.scatter_add_(0, flat.reshape(-1), grad.reshape(-1))
        return out.reshape(c, h, w), None, None


def _argmax_loop(fmap: Tensor, windows: Tensor, levels: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Adaptive max pooling of each cropped window with its winners' cells ``y * W + x``."""
    w = fmap.shape[2]
    fmap = fmap.contiguous()  # crops of a channels-last map take a 100x slower kernel
    rows, cells = [], []
    for x1, y1, x2, y2 in windows.tolist():
        crop = fmap[:, y1 : y2 + 1, x1 : x2 + 1].unsqueeze(0)
        cw = x2 - x1 + 1
        vals, idx = [], []
        for n in levels:
            v, i = F.adaptive_max_pool2d(crop, n, return_indices=True)
            vals.append(v.reshape(-1))
            # index within the crop -> index within one channel of the whole map
            idx.append(((i // cw + y1) * w + i % cw + x1).reshape(-1))
        rows.append(torch.cat(vals))
        cells.append(torch.cat(idx))
    return torch.stack(rows), torch.stack(cells)


def _pool_loop(fmap: Tensor, windows: Tensor, levels: Sequence[int]) -> Tensor:
    """Reference-style path: adaptive max pooling of each cropped window (same bin rule)."""
    rows = []
    for x1, y1, x2, y2 in windows.tolist():
        crop = fmap[:, y1 : y2 + 1, x1 : x2 + 1].unsqueeze(0)
        rows.append(torch.cat([F.adaptive_max_pool2d(crop, n).reshape(-1) for n in levels]))
    return torch.stack(rows)


def _check_windows(windows: Tensor, h: int, w: int) -> None:
    x1, y1, x2, y2 = windows.unbind(1)
    ok = (x1 >= 0) & (y1 >= 0) & (x1 <= x2) & (y1 <= y2) & (x2 < w) & (y2 < h)
    if not bool(ok.all()):
        bad = windows[~ok][0].tolist()
        raise ValueError(f"window {bad} is not an inclusive cell range inside a {h}x{w} map")


def _pool_chunk(
    table: Tensor, windows: Tensor, levels: Sequence[int], h: int, w: int, kx_n: int
) -> Tensor:
    y0, y1, x0, x1 = _pyramid_bins(windows, levels)
    ky = _log2_floor(y1 - y0)
    kx = _log2_floor(x1 - x0)
    ya, yb = y0, y1 - (1 << ky)
    xa, xb = x0, x1 - (1 << kx)
    base = (ky * kx_n + kx) * h
    r, nb = y0.shape
    row_a, row_b = (base + ya) * w, (base + yb) * w
    out = table.index_select(0, (row_a + xa).reshape(-1))
    for idx in (row_a + xb, row_b + xa, row_b + xb):
        # In place: saves an allocation per lookup in this memory-bound op.
        torch.maximum(out, table.index_select(0, idx.reshape(-1)), out=out)
    # [R * B, C] -> [R, B, C] -> per level [R, C, n*n] flattened.
    out = out.reshape(r, nb, -1)
    pieces, start = [], 0
    for n in levels:
        pieces.append(out[:, start : start + n * n].transpose(1, 2).reshape(r, -1))
        start += n * n
    return torch.cat(pieces, dim=1)


class SpatialPyramidPool(nn.Module):
    """SPP layer for whole feature maps (the classification use: any input size -> fixed length).

    Applies the pyramid to the full map of every image in a batch; with the bin rule above this is
    a concatenation of adaptive max pools. ``forward(x: Tensor[N, C, H, W]) -> Tensor[N, C * B]``.
    """

    def __init__(self, levels: Sequence[int] = (6, 3, 2, 1)) -> None:
        super().__init__()
        self.levels = tuple(int(n) for n in levels)

    def forward(self, x: Tensor) -> Tensor:
        n_img = x.shape[0]
        return torch.cat(
            [F.adaptive_max_pool2d(x, n).reshape(n_img, -1) for n in self.levels], dim=1
        )

    def extra_repr(self) -> str:
        return f"levels={self.levels}"
