"""CPU kernel for :func:`sppdet.spp.spp_pool`: one pass over each bin's cells, in parallel.

Why hand-written: the batched torch path (a 2-D sparse table and four row gathers per bin) moves
about 1 GB through memory for 2,000 windows on a ``[256, 43, 57]`` map, and
``torchvision.ops.roi_pool`` walks channels-first and uses its own float bin edges. Here each
window's bins are scanned directly on a channels-last copy of the map (so the inner loop is a
contiguous max over channels that the compiler vectorises), windows run in parallel with numba,
and the coarser levels of the pyramid are reduced from the finest one where they nest: with the
bin rule ``[floor(i w / n), ceil((i + 1) w / n))``, bin ``i`` of level ``n`` is exactly the union
of bins ``k i .. k i + k - 1`` of level ``k n`` (the unions are contiguous because neighbouring
bins touch or overlap), so {3x3, 2x2, 1x1} come from the 6x6 grid at almost no cost.

Shape shorthand as in :mod:`sppdet.spp`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

try:  # numba is a dependency; the import guard keeps sppdet importable if a build lacks it
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

__all__ = ["available", "spp_argmax_cpu", "spp_pool_cpu"]


def available() -> bool:
    """Whether the compiled kernel can run here."""
    return numba is not None


def _kernel(
    fmap: np.ndarray, windows: np.ndarray, n: int, nested: np.ndarray, starts: np.ndarray, out
) -> None:
    """Level ``n`` and the levels ``nested`` (each divides ``n``) of every window.

    Writes level ``nested[k]`` (``nested[0] == n``) at ``out[r, starts[k] + c * m * m + j * m +
    i]``. ``fmap`` is ``float32[H, W, C]`` (channels last), ``windows`` ``int64[R, 4]``
    inclusive cells. Each window's ``n x n`` bins are kept in a small ``[n * n, C]`` buffer
    (scanned with ``C`` innermost, which vectorises) and the coarser levels are reduced from it
    before anything is written, so ``out`` is touched once per value.
    """
    r_total, c_total = windows.shape[0], fmap.shape[2]
    nn = n * n
    for r in numba.prange(r_total):  # noqa: B020 - numba's parallel range
        x1, y1, x2, y2 = windows[r, 0], windows[r, 1], windows[r, 2], windows[r, 3]
        w, h = x2 - x1 + 1, y2 - y1 + 1
        acc = np.empty((nn, c_total), dtype=fmap.dtype)
        for j in range(n):
            ys, ye = y1 + (j * h) // n, y1 - ((-(j + 1) * h) // n)
            for i in range(n):
                xs, xe = x1 + (i * w) // n, x1 - ((-(i + 1) * w) // n)
                b = j * n + i
                for c in range(c_total):
                    acc[b, c] = fmap[ys, xs, c]
                for y in range(ys, ye):
                    for x in range(xs, xe):
                        for c in range(c_total):
                            v = fmap[y, x, c]
                            if v > acc[b, c]:
                                acc[b, c] = v
        best = np.empty(c_total, dtype=fmap.dtype)
        for k in range(nested.shape[0]):
            m = nested[k]
            f = n // m
            for j in range(m):
                for i in range(m):
                    for c in range(c_total):
                        best[c] = acc[(j * f) * n + i * f, c]
                    for dj in range(f):
                        for di in range(f):
                            b = (j * f + dj) * n + i * f + di
                            for c in range(c_total):
                                best[c] = max(best[c], acc[b, c])
                    col = starts[k] + j * m + i
                    for c in range(c_total):
                        out[r, col + c * m * m] = best[c]


def _argmax_kernel(fmap: np.ndarray, windows: np.ndarray, n: int, start: int, out, cells) -> None:
    """Level ``n`` of every window with its arg-max cells (the gradient path of fine-tuning).

    As :func:`_kernel` for one level, without the nesting shortcut: each bin is scanned in
    row-major order and keeps its first maximum, the cell that ``F.adaptive_max_pool2d`` picks,
    so ties route gradients as the loop path does. ``cells[r, col]`` is the winner's ``y * W +
    x`` on the whole map.
    """
    r_total, c_total, width = windows.shape[0], fmap.shape[2], fmap.shape[1]
    for r in numba.prange(r_total):  # noqa: B020 - numba's parallel range
        x1, y1, x2, y2 = windows[r, 0], windows[r, 1], windows[r, 2], windows[r, 3]
        w, h = x2 - x1 + 1, y2 - y1 + 1
        best = np.empty(c_total, dtype=fmap.dtype)
        arg = np.empty(c_total, dtype=np.int64)
        for j in range(n):
            ys, ye = y1 + (j * h) // n, y1 - ((-(j + 1) * h) // n)
            for i in range(n):
                xs, xe = x1 + (i * w) // n, x1 - ((-(i + 1) * w) // n)
                for c in range(c_total):
                    best[c] = fmap[ys, xs, c]
                    arg[c] = ys * width + xs
                for y in range(ys, ye):
                    for x in range(xs, xe):
                        for c in range(c_total):
                            v = fmap[y, x, c]
                            if v > best[c]:
                                best[c] = v
                                arg[c] = y * width + x
                col = start + j * n + i
                for c in range(c_total):
                    out[r, col + c * n * n] = best[c]
                    cells[r, col + c * n * n] = arg[c]


_compiled: dict = {}


def _get(fn):
    if fn.__name__ not in _compiled:  # compiled on first use, cached on disk (cache=True)
        _compiled[fn.__name__] = numba.njit(parallel=True, cache=True, nogil=True, fastmath=True)(
            fn
        )
    return _compiled[fn.__name__]


def _inputs(fmap: Tensor, windows: Tensor, levels: Sequence[int]):
    """The kernels' arrays: ``float32[H, W, C]`` map, ``int64[R, 4]`` windows, each level's
    first output column (and the total at the end), and the ``float32[R, C * B]`` output."""
    c = fmap.shape[0]
    hwc = np.ascontiguousarray(fmap.detach().float().permute(1, 2, 0).numpy())
    win = np.ascontiguousarray(windows.numpy().astype(np.int64))
    starts = np.cumsum([0] + [c * n * n for n in levels])
    return hwc, win, starts, np.empty((len(win), int(starts[-1])), dtype=np.float32)


def spp_pool_cpu(fmap: Tensor, windows: Tensor, levels: Sequence[int]) -> Tensor:
    """Same contract as :func:`sppdet.spp.spp_pool` for a CPU ``fmap`` without gradients.

    Returns ``Tensor[R, C * B]`` in ``fmap``'s dtype (computed in float32: max selects values,
    so the result is exact for fp16/bf16 maps too).
    """
    hwc, win, starts, out = _inputs(fmap, windows, levels)
    # numba's thread count is the caller's to set, once (sppdet.device.set_threads)
    kernel = _get(_kernel)
    todo = sorted(range(len(levels)), key=lambda k: -levels[k])  # finest first
    while todo:
        # the finest level left, with every level left that nests in it (bins of level m are
        # unions of bins of level n when m divides n: module docstring)
        n = levels[todo[0]]
        group = [k for k in todo if n % levels[k] == 0]
        todo = [k for k in todo if k not in group]
        nested = np.array([levels[k] for k in group], dtype=np.int64)
        kernel(hwc, win, n, nested, starts[group].astype(np.int64), out)
    return torch.from_numpy(out).to(fmap.dtype)


def spp_argmax_cpu(fmap: Tensor, windows: Tensor, levels: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Pyramid max pooling of a float32 CPU ``fmap`` and where each maximum lies.

    Returns:
        (values ``Tensor[R, C * B]`` as :func:`spp_pool_cpu`, cells ``LongTensor[R, C * B]``:
        each value's cell ``y * W + x`` within its channel of ``fmap``).
    """
    hwc, win, starts, out = _inputs(fmap, windows, levels)
    cells = np.empty(out.shape, dtype=np.int64)
    kernel = _get(_argmax_kernel)
    for n, start in zip(levels, starts[:-1], strict=True):
        kernel(hwc, win, int(n), int(start), out, cells)
    return torch.from_numpy(out), torch.from_numpy(cells)
