"""Stripe tiling of a conv trunk's high-resolution layers: same maps, less memory traffic.

Why: on a CPU the first blocks of a trunk run at stride 2-8 on wide activations (MobileNetV2's
96- and 144-channel expansions at stride 2 and 4). At the paper's larger scales (864, 1200) these
no longer fit the caches and the pass becomes memory-bound: in a per-block profile (not
committed) a 1200-px MobileNetV2 pass cost 2-3x more per pixel in those blocks than a 688-px
one (bf16, 2 cores). Running those blocks over horizontal stripes of the image, each with a
halo of rows that covers their receptive field, keeps each stripe's activations in cache; the
rest of the trunk runs on the reassembled map.

Exactness: a stripe starts at a multiple of the head's stride, so every layer's sampling grid is
the full image's grid; the rows a stripe computes wrongly (its zero padding stands where the
image has pixels) lie within the head's reach of the cut and are dropped with the halo. At the
image's own top and bottom the padding is the same as in the full pass. So the maps equal the
untiled ones up to float rounding (bit-identical in our measurements; tests/test_tiling.py).

Shape shorthand: ``N`` batch, ``C`` channels, ``H, W`` input height and width.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_STRIPE_PIXELS",
    "StripedTrunk",
    "head_reach",
    "stripe_pixels",
    "stripe_trunk",
]

log = logging.getLogger(__name__)

#: Input pixels (batch x rows x width) per stripe on a CPU: about what keeps MobileNetV2's
#: stride-2/4 activations of one stripe within a few MB (16-24 rows at stride 8 for a 1200-px
#: scale). Its effect: benchmarks/tiling_check_*.json (scripts/check_tiling.py).
DEFAULT_STRIPE_PIXELS = 1 << 18
#: The head is the leading children of the trunk up to this total stride: beyond it the maps are
#: small enough that tiling only adds halo work.
HEAD_MAX_STRIDE = 8


def _layers(module: nn.Module):
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            yield m


def _pair0(v) -> int:
    return int(v[0] if isinstance(v, (tuple, list)) else v)


def head_reach(head: nn.Module) -> tuple[int, int]:
    """``(stride, reach)`` of a chain of layers, walked in module order: the product of the
    strides, and how many input rows (up or down) an output row depends on beyond its own.

    Branches (residual shortcuts) are walked as if chained, which can only overestimate both; the
    stride is checked against a real forward pass by :func:`stripe_trunk`.
    """
    stride, reach = 1, 0
    for m in _layers(head):
        k, s, p = _pair0(m.kernel_size), _pair0(m.stride), _pair0(m.padding)
        d = _pair0(getattr(m, "dilation", 1))
        reach += max(p, (k - 1) * d - p) * stride
        stride *= s
    return stride, reach


class StripedTrunk(nn.Module):
    """``tail(head(x))`` with ``head`` run over horizontal stripes of ``x``.

    Args:
        head: leading layers of total ``stride`` whose output row depends on at most ``reach``
            input rows above or below its own.
        tail: the rest of the trunk.
        stripe_pixels: input pixels (``N * rows * W``) per stripe; inputs that fit in one
            stripe run untiled.
    """

    def __init__(
        self, head: nn.Module, tail: nn.Module, stride: int, reach: int, stripe_pixels: int
    ) -> None:
        super().__init__()
        self.head, self.tail = head, tail
        self.stride, self.halo = stride, math.ceil(reach / stride)  # halo in head-output rows
        self.stripe_pixels = stripe_pixels

    def forward(self, x: Tensor) -> Tensor:
        """``Tensor[N, 3, H, W]`` -> the trunk's map."""
        return self.tail(self.stripes(x))

    def stripes(self, x: Tensor) -> Tensor:
        """The head's output ``Tensor[N, C, H', W']``, computed stripe by stripe."""
        n, _, h, w = x.shape
        if n > 1 and n * h * w > self.stripe_pixels:
            # a batch (R-CNN mode's warped windows): chunks of whole images first, which needs
            # no halo; an image larger than the budget is then striped on its own
            k = max(1, self.stripe_pixels // (h * w))
            return torch.cat([self.stripes(c) for c in x.split(k)], dim=0)
        s = self.stride
        # head-output rows per stripe; at least 4 halos, so recomputed rows stay <= 50 %
        rows = max(self.stripe_pixels // (n * w * s), 4 * self.halo, 1)
        if (rows + 2 * self.halo) * s >= h:
            return self.head(x)
        out, a = [], 0
        while True:
            lo = max(0, (a - self.halo) * s)
            hi = min(h, (a + rows + self.halo) * s)
            y = self.head(x[:, :, lo:hi])
            top = a - lo // s
            if hi == h:  # the last stripe keeps every row it has below its halo
                out.append(y[:, :, top:])
                break
            out.append(y[:, :, top : top + rows])
            a += rows
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else None
        y = torch.cat(out, dim=2)
        return y.contiguous(memory_format=fmt) if fmt is not None else y


def stripe_pixels(setting: int, device: torch.device) -> int:
    """The stripe size a ``FeatureConfig.stripe_pixels`` setting means on ``device``.

    ``-1`` (auto): :data:`DEFAULT_STRIPE_PIXELS` on a CPU; off (0) on CUDA, whose memory
    bandwidth leaves little to gain and where each stripe adds kernel launches.
    """
    if setting < -1:
        raise ValueError(f"stripe_pixels must be -1 (auto), 0 (off) or positive, not {setting}")
    if setting == -1:
        return DEFAULT_STRIPE_PIXELS if torch.device(device).type == "cpu" else 0
    return setting


def _split(children: list[nn.Module]) -> int:
    """Number of leading children in the head: up to the first that brings the walked stride to
    :data:`HEAD_MAX_STRIDE` (the stride-1 blocks after it would only widen the halo), or all
    that stay below it."""
    k = 0
    while k < len(children):
        stride = head_reach(nn.Sequential(*children[: k + 1]))[0]
        if stride > HEAD_MAX_STRIDE:
            break
        k += 1
        if stride == HEAD_MAX_STRIDE:
            break
    return k


@torch.no_grad()
def stripe_trunk(
    trunk: nn.Module, stripe_pixels: int, optimize: Callable[[nn.Module], nn.Module]
) -> nn.Module:
    """``optimize(trunk)``, or a :class:`StripedTrunk` of its optimized head and tail.

    Falls back to the plain trunk (``stripe_pixels <= 0``, a trunk that is not an
    ``nn.Sequential``, no head with stride > 1, or a head whose geometry the layer walk gets
    wrong: its stride is checked with a forward pass and the tiled head against the plain one
    on a small random input).
    """
    children = list(trunk.children()) if isinstance(trunk, nn.Sequential) else []
    k = _split(children)
    if stripe_pixels <= 0 or k == 0 or k == len(children):
        return optimize(trunk)
    head, tail = nn.Sequential(*children[:k]), nn.Sequential(*children[k:])
    stride, reach = head_reach(head)
    if stride <= 1:
        return optimize(trunk)
    head, tail = optimize(head), optimize(tail)
    fmt = torch.channels_last if _is_channels_last(head) else torch.contiguous_format
    side = stride * max(16, 8 * math.ceil(reach / stride) + 4)  # at least two stripes below
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    p = next(head.parameters(), None)
    if p is not None:
        x = x.to(p.device, p.dtype)
    x = x.contiguous(memory_format=fmt)
    plain = head(x)
    striped = StripedTrunk(head, tail, stride, reach, stripe_pixels=side * stride)
    # one stride fewer input rows must give exactly one output row fewer
    ok = plain.shape[2] - head(x[:, :, : side - stride]).shape[2] == 1
    ok = ok and torch.allclose(striped.stripes(x), plain, rtol=1e-4, atol=1e-4)
    if not ok:
        log.info("stripe tiling off: the head's stride or reach check failed")
        return nn.Sequential(head, tail)
    return StripedTrunk(head, tail, stride, reach, stripe_pixels)


def _is_channels_last(module: nn.Module) -> bool:
    w = next((m.weight for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    return w is not None and w.is_contiguous(memory_format=torch.channels_last)
