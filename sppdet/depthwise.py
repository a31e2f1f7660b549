"""Depthwise convolution with a fast CPU backward, for conv fine-tuning through SPP (issue 17).

On a CPU, oneDNN computes the backward of a (dilated) depthwise convolution with an im2col GEMM:
for one 1,152-channel 43 x 57 map of EfficientNet-Lite0's dilated block 14 (5 x 5, dilation 2,
one thread, AMD EPYC with AVX2) forward + backward took 0.70 s against 0.094 s here
(``python -m experiments.conv_step_bench``), and the dilated blocks' backward was the largest part
of a conv fine-tuning step. Both gradients of a stride-1 depthwise convolution are themselves
cheap depthwise convolutions:

* the input's: the output gradient convolved with the kernel flipped in both axes, at the same
  dilation, padded by ``dilation * (k - 1) - padding``;
* the kernel's: for each image, the padded input convolved with that image's output gradient as
  a per-channel ``h x w`` kernel, at a stride equal to the dilation (so its ``k x k`` outputs
  are the ``k x k`` taps).

:class:`DepthwiseConv2d` is an ``nn.Conv2d`` (same parameters and state_dict keys) that uses them
on a CPU while gradients are recorded, and ``nn.Conv2d``'s own path everywhere else (CUDA, no
grad). :func:`use_fast_depthwise` swaps it into a module tree in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _DepthwiseFn(torch.autograd.Function):
    """``conv2d(x, weight, bias, 1, padding, dilation, groups=C)`` with the backward above."""

    @staticmethod
    def forward(ctx, x, weight, bias, padding, dilation):  # noqa: D102 - see the class
        ctx.save_for_backward(x, weight)
        ctx.padding, ctx.dilation, ctx.has_bias = padding, dilation, bias is not None
        return F.conv2d(x, weight, bias, 1, padding, dilation, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102 - see the module docstring
        x, weight = ctx.saved_tensors
        (ph, pw), (dh, dw) = ctx.padding, ctx.dilation
        kh, kw = weight.shape[-2:]
        channels = weight.shape[0]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            flipped = weight.flip(-1, -2)
            pad = (dh * (kh - 1) - ph, dw * (kw - 1) - pw)
            gx = F.conv2d(grad, flipped, None, 1, pad, ctx.dilation, groups=channels)
        if ctx.needs_input_grad[1]:
            xp = F.pad(x, (pw, pw, ph, ph))
            # one image at a time: the output gradient is the kernel, so the batch cannot stack
            gw = sum(
                F.conv2d(xp[n : n + 1], grad[n].unsqueeze(1), None, (dh, dw), groups=channels)[0]
                for n in range(x.shape[0])
            ).unsqueeze(1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = grad.sum((0, 2, 3))
        return gx, gw, gb, None, None


def depthwise_conv2d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
) -> Tensor:
    """Stride-1 depthwise convolution with the fast backward.

    Args:
        x: ``Tensor[N, C, H, W]``.
        weight: ``Tensor[C, 1, kh, kw]`` (one filter per channel).
        bias: ``Tensor[C]`` or None.
        padding: zero padding ``(ph, pw)``, at most ``dilation * (k - 1)`` per axis.
        dilation: ``(dh, dw)``.

    Returns:
        ``Tensor[N, C, H + 2 ph - dh (kh - 1), W + 2 pw - dw (kw - 1)]``, as ``F.conv2d``.
    """
    return _DepthwiseFn.apply(x, weight, bias, tuple(padding), tuple(dilation))


class DepthwiseConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` with ``groups == in == out channels`` and stride 1 whose CPU backward is
    :func:`depthwise_conv2d`'s. ``forward(Tensor[N, C, H, W]) -> Tensor[N, C, H', W']``."""

    def forward(self, x: Tensor) -> Tensor:
        grads = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if not (grads and x.device.type == "cpu"):
            return super().forward(x)
        return depthwise_conv2d(x, self.weight, self.bias, self.padding, self.dilation)


def _eligible(m: nn.Module) -> bool:
    if not (type(m) is nn.Conv2d and isinstance(m.padding, tuple)):  # not "same" / "valid"
        return False
    taps = zip(m.padding, m.dilation, m.kernel_size, strict=True)
    return (
        m.groups == m.in_channels == m.out_channels
        and m.stride == (1, 1)
        and m.padding_mode == "zeros"
        and all(p <= d * (k - 1) for p, d, k in taps)
    )


def use_fast_depthwise(module: nn.Module) -> int:
    """Make every stride-1 depthwise ``nn.Conv2d`` in ``module`` a :class:`DepthwiseConv2d`.

    In place, keeping each conv's parameters (the same ``Parameter`` objects), buffers and
    state_dict keys. Returns how many convs were swapped.
    """
    swapped = 0
    for m in module.modules():
        if _eligible(m):
            m.__class__ = DepthwiseConv2d  # same attributes; only forward differs
            swapped += 1
    return swapped
