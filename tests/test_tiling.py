"""Stripe tiling (sppdet.tiling): the striped trunk must give the plain trunk's maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from sppdet.features import FeatureConfig, FeatureExtractor
from sppdet.tiling import (
    DEFAULT_STRIPE_PIXELS,
    StripedTrunk,
    head_reach,
    stripe_pixels,
    stripe_trunk,
)


def small_trunk(seed: int = 0) -> nn.Sequential:
    """Stride-2 convs, a depthwise conv, an unpadded max pool (reach 2 below, 0 above), then a
    tail; float64 so the comparison is not about rounding."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),
        nn.MaxPool2d(3, stride=2),
        nn.Conv2d(8, 16, 5, stride=2, padding=2),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
    ).double()


def test_head_reach_walks_strides_and_paddings():
    # conv k3 p1 at stride 1: 1; dw k3 p1 at stride 2: 2; pool k3 p0 at stride 2: max(0, 2) * 2
    head = small_trunk()[:4]
    assert head_reach(head) == (4, 1 + 2 + 4)
    assert head_reach(nn.Sequential(nn.Conv2d(3, 3, 5, dilation=2, padding=4))) == (1, 4)


@pytest.mark.parametrize("height", [64, 71, 97, 130])
@pytest.mark.parametrize("channels_last", [False, True])
def test_striped_trunk_equals_the_plain_trunk(height, channels_last):
    trunk = small_trunk()
    head, tail = trunk[:4], trunk[4:]
    stride, reach = head_reach(head)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, 3, height, 45, dtype=torch.float64).contiguous(memory_format=fmt)
    for budget in (1, 8 * 45 * stride, 10**9):  # smallest stripes, several rows, untiled
        striped = StripedTrunk(head, tail, stride, reach, stripe_pixels=budget)
        with torch.no_grad():
            torch.testing.assert_close(striped.stripes(x), head(x))
            torch.testing.assert_close(striped(x), trunk(x))


def test_striped_trunk_splits_a_batch_into_whole_images():
    trunk = small_trunk(1)
    head, tail = trunk[:4], trunk[4:]
    stride, reach = head_reach(head)
    x = torch.randn(7, 3, 40, 40, dtype=torch.float64)
    calls = []
    head.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    striped = StripedTrunk(head, tail, stride, reach, stripe_pixels=3 * 40 * 40)
    with torch.no_grad():
        torch.testing.assert_close(striped(x), trunk(x))
    assert calls == [3, 3, 1]  # chunks of whole images, no row stripes needed


def test_extractor_maps_do_not_depend_on_striping():
    image = np.random.default_rng(0).integers(0, 255, (150, 203, 3), dtype=np.uint8)
    cfg = dict(backbone="mobilenet_v2", scales=(200, 330), conv_dtype="float32")
    plain = FeatureExtractor(FeatureConfig(**cfg, stripe_pixels=0))
    striped = FeatureExtractor(FeatureConfig(**cfg, stripe_pixels=4096))
    assert isinstance(striped.net, StripedTrunk) and not isinstance(plain.net, StripedTrunk)
    for a, b in zip(plain.compute(image), striped.compute(image), strict=True):
        assert a.factor == b.factor
        torch.testing.assert_close(b.fmap, a.fmap, rtol=1e-4, atol=1e-5)


class TwoBranches(nn.Module):
    """Two stride-2 convs side by side: the walk multiplies them (stride 4), the truth is 2."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.a(x) + self.b(x)


def test_stripe_trunk_falls_back_when_the_walk_is_wrong_or_off():
    trunk = nn.Sequential(TwoBranches(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU())
    trunk.eval()
    out = stripe_trunk(trunk, 1024, lambda m: m)
    assert not isinstance(out, StripedTrunk)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(out(x), trunk(x))
    # tiling off: the optimized plain trunk itself, optimized once as a whole
    plain, optimized = small_trunk(), []
    assert stripe_trunk(plain, 0, lambda m: optimized.append(m) or m) is plain
    assert optimized == [plain]
    # on: its head and tail optimized apart, giving the plain trunk's maps
    striped = stripe_trunk(small_trunk(), 1024, lambda m: m)
    assert isinstance(striped, StripedTrunk)
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(striped(x), plain(x))


def test_stripe_pixels_setting():
    assert stripe_pixels(-1, torch.device("cpu")) == DEFAULT_STRIPE_PIXELS
    assert stripe_pixels(-1, torch.device("cuda")) == 0
    assert stripe_pixels(0, torch.device("cpu")) == 0
    assert stripe_pixels(5000, torch.device("cuda")) == 5000
    with pytest.raises(ValueError, match="stripe_pixels"):
        stripe_pixels(-2, torch.device("cpu"))
