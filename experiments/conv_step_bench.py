"""The parts of a conv fine-tuning step that sppdet computes its own way, against the plain torch
path, on one CPU thread, side by side in one process (alternating, best of ``--repeats``), for one
VOC-sized stride-16 map (688 x 917 image: 43 x 57 cells)::

    python -m experiments.conv_step_bench --json benchmarks/conv_step_epyc_avx2.json

Rows (forward + backward seconds):

* ``*_dw``: the depthwise conv of EfficientNet-Lite0's dilated block 14 (1,152 ch, 5 x 5,
  dilation 2) and of MobileNetV2's features[16] (960 ch, 3 x 3, dilation 2): ``nn.Conv2d``
  (oneDNN's backward) against :class:`sppdet.depthwise.DepthwiseConv2d`;
* ``lite0_top2_conv_top``: the two lite0 blocks that ``configs/tap_lite0_conv2_lr4_300.yaml``
  trains, whole (:class:`sppdet.head.ConvTop`: expansion, depthwise and projection convs, frozen
  batch norms), the same two ways;
* ``spp_64_windows``: SPP with gradients of one step's 64 windows of an image on a 320-channel
  map: the loop of ``adaptive_max_pool2d`` calls (the path before the compiled scan existed)
  against the compiled arg-max scan, each with its ``scatter_add`` backward.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn

from experiments.voc07 import machine
from sppdet import spp_cpu
from sppdet.backbones import build_backbone
from sppdet.depthwise import DepthwiseConv2d
from sppdet.features import split_top
from sppdet.head import ConvTop
from sppdet.spp import spp_pool
from sppdet.storage import atomic_write_json, git_commit

CELLS = (43, 57)  # stride-16 map of a 688 x 917 image (VOC's common 375 x 500 at scale 688)


def _slow(module: nn.Module) -> nn.Module:
    """A copy of ``module`` with its fast depthwise convs back to ``nn.Conv2d``."""
    slow = copy.deepcopy(module)
    for m in slow.modules():
        if type(m) is DepthwiseConv2d:
            m.__class__ = nn.Conv2d
    return slow


def _time(module: nn.Module, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    module(x).square().mean().backward()
    return time.perf_counter() - t0


def compare(fast: nn.Module, x: torch.Tensor, repeats: int) -> dict:
    """Best-of seconds of forward + backward for ``fast`` and its ``nn.Conv2d`` copy."""
    slow = _slow(fast)
    times: dict[str, list[float]] = {"conv2d_s": [], "fast_s": []}
    for _ in range(repeats + 1):  # the first round warms up, alternating keeps the noise fair
        times["conv2d_s"].append(_time(slow, x))
        times["fast_s"].append(_time(fast, x))
    best = {k: min(v[1:]) for k, v in times.items()}
    return {**best, "speedup": best["conv2d_s"] / best["fast_s"]}


def _spp_step(fmap: torch.Tensor, windows: torch.Tensor) -> float:
    f = fmap.clone().requires_grad_(True)
    t0 = time.perf_counter()
    spp_pool(f, windows, (6, 3, 2, 1)).square().mean().backward()
    return time.perf_counter() - t0


def compare_spp(repeats: int) -> dict:
    """SPP with gradients of a float32 map: the loop path against the compiled scan."""
    gen = torch.Generator().manual_seed(0)
    fmap = torch.randn(320, *CELLS, generator=gen)
    h, w = CELLS
    xs = torch.randint(0, w, (64, 2), generator=gen).sort(dim=1).values
    ys = torch.randint(0, h, (64, 2), generator=gen).sort(dim=1).values
    windows = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)
    times: dict[str, list[float]] = {"loop_s": [], "fast_s": []}
    for _ in range(repeats + 1):
        with mock.patch.object(spp_cpu, "available", return_value=False):  # the loop path
            times["loop_s"].append(_spp_step(fmap, windows))
        times["fast_s"].append(_spp_step(fmap, windows))
    best = {k: min(v[1:]) for k, v in times.items()}
    return {**best, "speedup": best["loop_s"] / best["fast_s"]}


def _dw(channels: int, k: int) -> DepthwiseConv2d:
    conv = nn.Conv2d(channels, channels, k, 1, 2 * (k // 2), dilation=2, groups=channels)
    conv.__class__ = DepthwiseConv2d
    return conv


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(1)  # a measurement script, not library code
    torch.manual_seed(0)
    load = os.getloadavg()[0]
    rows = {}
    for name, channels, k in (("lite0_block14_dw", 1152, 5), ("mnv2_features16_dw", 960, 3)):
        x = torch.randn(1, channels, *CELLS, requires_grad=True)
        rows[name] = compare(_dw(channels, k), x, args.repeats)
    _, top = split_top(build_backbone("efficientnet_lite0_d"), 2)
    conv_top = ConvTop(top, conv_blocks=2).train()
    x = torch.randn(1, 192, *CELLS)  # the cached map below the trained blocks
    rows["lite0_top2_conv_top"] = compare(conv_top, x, args.repeats)
    rows["spp_64_windows"] = compare_spp(args.repeats)
    result = {
        "cells": list(CELLS),
        "threads": 1,
        "loadavg_1min_before": load,  # other jobs on the machine (2 = both cores busy)
        "rows": rows,
        "command": " ".join(["python", "-m", "experiments.conv_step_bench", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine(),
    }
    atomic_write_json(args.json, result)
    print(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
