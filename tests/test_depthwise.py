"""sppdet.depthwise: the fast CPU backward of stride-1 depthwise convs, against autograd."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sppdet.depthwise import DepthwiseConv2d, depthwise_conv2d, use_fast_depthwise
from sppdet.efficientnet_lite import efficientnet_lite0_trunk
from sppdet.head import ConvTop

CASES = [  # (kernel, padding, dilation, batch, bias)
    ((3, 3), (1, 1), (1, 1), 1, False),
    ((5, 5), (4, 4), (2, 2), 2, False),  # EfficientNet-Lite0's dilated blocks
    ((3, 3), (2, 2), (2, 2), 2, True),  # MobileNetV2's dilated blocks (+ a bias)
    ((5, 3), (0, 1), (1, 3), 1, True),  # uneven kernel, padding and dilation
]


def _inputs(seed: int, shape: tuple[int, ...], kernel, bias: bool):
    """Float64 ``x Tensor[shape]``, depthwise kernel and optional bias, all with gradients."""
    torch.manual_seed(seed)
    c = shape[1]
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, 1, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if bias else None
    return x, w, b


@pytest.mark.parametrize(("kernel", "padding", "dilation", "batch", "bias"), CASES)
def test_gradcheck(kernel, padding, dilation, batch, bias):
    x, w, b = _inputs(0, (batch, 3, 9, 11), kernel, bias)
    inputs = (x, w) if b is None else (x, w, b)
    assert torch.autograd.gradcheck(
        lambda *t: depthwise_conv2d(*t[:2], t[2] if len(t) > 2 else None, padding, dilation),
        inputs,
    )


@pytest.mark.parametrize(("kernel", "padding", "dilation", "batch", "bias"), CASES)
def test_equals_conv2d_autograd(kernel, padding, dilation, batch, bias):
    # The naive reference: F.conv2d and its autograd backward, in float64.
    x, w, b = _inputs(1, (batch, 4, 12, 10), kernel, bias)
    up = torch.randn_like(F.conv2d(x, w, b, 1, padding, dilation, groups=4))
    ref = torch.autograd.grad(
        (F.conv2d(x, w, b, 1, padding, dilation, groups=4) * up).sum(),
        [t for t in (x, w, b) if t is not None],
    )
    y = depthwise_conv2d(x, w, b, padding, dilation)
    torch.testing.assert_close(y, F.conv2d(x, w, b, 1, padding, dilation, groups=4))
    ours = torch.autograd.grad((y * up).sum(), [t for t in (x, w, b) if t is not None])
    for a, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, r)


def test_swaps_only_stride1_depthwise_convs_and_keeps_parameters():
    net = nn.Sequential(
        nn.Conv2d(4, 4, 3, 1, 1, groups=4, bias=False),  # swapped
        nn.Conv2d(4, 4, 3, 2, 1, groups=4, bias=False),  # stride 2: kept
        nn.Conv2d(4, 8, 1),  # pointwise: kept
        nn.Conv2d(8, 8, 3, 1, 2, dilation=2, groups=4),  # grouped, not depthwise: kept
        nn.Conv2d(8, 8, 5, 1, 4, dilation=2, groups=8),  # swapped
    )
    before = copy.deepcopy(net)
    weights = [m.weight for m in net]
    assert use_fast_depthwise(net) == 2
    assert [type(m) is DepthwiseConv2d for m in net] == [True, False, False, False, True]
    assert [m.weight for m in net] == weights  # the same Parameter objects
    assert net.state_dict().keys() == before.state_dict().keys()
    x = torch.randn(2, 4, 13, 9)
    with torch.no_grad():  # no grad: nn.Conv2d's own path, bit for bit
        assert torch.equal(net(x), before(x))
    torch.testing.assert_close(net(x), before(x))


def test_conv_top_trains_lite0_blocks_with_the_same_gradients():
    # The lite0 trunk's last 2 blocks as conv fine-tuning trains them: their dilated depthwise
    # convs use the fast backward, and the gradients equal autograd's (float64).
    torch.manual_seed(2)
    blocks = list(efficientnet_lite0_trunk().children())[15:17]  # blocks 14, 15
    top = nn.Sequential(*blocks).double().eval()
    for m in top.modules():
        if isinstance(m, nn.Conv2d) and m.groups > 1:  # dilate as the backbone does
            m.dilation, m.padding = (2, 2), (m.kernel_size[0] - 1,) * 2
    fast = ConvTop(top, conv_blocks=2)
    assert sum(type(m) is DepthwiseConv2d for m in fast.modules()) == 2
    ref = copy.deepcopy(fast)
    for m in ref.modules():
        if type(m) is DepthwiseConv2d:
            m.__class__ = nn.Conv2d
    x = torch.randn(1, blocks[0]._expand_conv.in_channels, 7, 9, dtype=torch.float64)
    for net in (fast, ref):
        net.train()
        net(x).square().sum().backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, msg=name)
