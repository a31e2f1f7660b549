"""Benchmark batched SPP pooling against a per-window Python loop.

Times :func:`sppdet.spp.spp_pool` on 2,000 windows of one ``[256, 43, 57]`` fp32 map (ZF-5 conv5
of a 688 x 917 image, the single-scale setting of SPEC 2) against the obvious implementation, a
Python loop calling ``adaptive_max_pool2d`` per window and level (timed on a subset and scaled
to all windows). Windows come from random proposal-like boxes mapped with the paper rule.

Usage::

    .venv/bin/python scripts/bench_spp.py [--threads 2] [--out benchmarks/spp_pool.json]

Prints both times and writes them, with the machine and the git commit, as JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from sppdet import spp_cpu
from sppdet.device import set_threads
from sppdet.spp import map_windows, spp_pool
from sppdet.storage import atomic_write_json, git_commit

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (6, 3, 2, 1)  # the detection pyramid (SPEC 4)
STRIDE = 16  # ZF-5 conv5


def random_windows(n: int, fmap_hw: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """``LongTensor[n, 4]`` cell windows of proposal-like boxes in the map's image.

    Box sides are log-uniform between 16 pixels and the image side (selective search gives
    boxes of every size), positions uniform; mapped with the paper rule.
    """
    h_img, w_img = fmap_hw[0] * STRIDE, fmap_hw[1] * STRIDE
    u = torch.rand(n, 4, generator=gen, dtype=torch.float64)
    side = torch.tensor([w_img, h_img], dtype=torch.float64)
    wh = torch.exp(torch.log(torch.tensor(16.0)) + u[:, :2] * torch.log(side / 16.0))
    xy = u[:, 2:] * (side - wh)
    boxes = torch.cat([xy, xy + wh], dim=1)
    return map_windows(boxes, stride=STRIDE, offset=0.0, fmap_size=fmap_hw)


def loop_pool(fmap: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """The per-window reference: crop, ``adaptive_max_pool2d`` per level, concatenate."""
    rows = []
    for x1, y1, x2, y2 in windows.tolist():
        crop = fmap[:, y1 : y2 + 1, x1 : x2 + 1].unsqueeze(0)
        rows.append(torch.cat([F.adaptive_max_pool2d(crop, n).reshape(-1) for n in LEVELS]))
    return torch.stack(rows)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), times


def cpu_model() -> str:
    """The ``model name`` line of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=2000, help="windows pooled per call")
    p.add_argument("--channels", type=int, default=256, help="C of the map (ZF-5 conv5: 256)")
    p.add_argument("--height", type=int, default=43, help="map height in cells")
    p.add_argument("--width", type=int, default=57, help="map width in cells")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--repeats", type=int, default=7, help="timed runs of spp_pool (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    p.add_argument("--loop-subset", type=int, default=200, help="windows timed in the loop")
    p.add_argument("--loop-repeats", type=int, default=3, help="timed runs of the loop (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "spp_pool.json")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    set_threads(args.threads)  # torch's and the numba kernel's
    gen = torch.Generator().manual_seed(args.seed)
    fmap = torch.rand(args.channels, args.height, args.width, generator=gen)
    windows = random_windows(args.windows, (args.height, args.width), gen)
    subset = windows[: min(args.loop_subset, args.windows)]

    with torch.inference_mode():
        # The two must agree exactly (max pooling selects values) before timing means anything.
        if not torch.equal(spp_pool(fmap, subset, LEVELS), loop_pool(fmap, subset)):
            raise SystemExit("spp_pool and the loop disagree; not timing a wrong result")
        spp_ms, spp_runs = median_ms(
            lambda: spp_pool(fmap, windows, LEVELS), args.repeats, args.warmup
        )
        table_ms, _ = median_ms(
            lambda: spp_pool(fmap, windows, LEVELS, method="table"), args.repeats, args.warmup
        )
        sub_ms, sub_runs = median_ms(lambda: loop_pool(fmap, subset), args.loop_repeats, 1)
    loop_ms = sub_ms * args.windows / len(subset)

    result = {
        "spp_pool_ms": round(spp_ms, 3),
        "spp_pool_method": "kernel" if spp_cpu.available() else "table",
        "table_ms": round(table_ms, 3),
        "loop_ms": round(loop_ms, 3),
        "ratio": round(loop_ms / spp_ms, 2),
        "windows": args.windows,
        "map_shape": [args.channels, args.height, args.width],
        "levels": list(LEVELS),
        "threads": args.threads,
        "spp_pool_runs_ms": [round(t, 3) for t in spp_runs],
        "loop_subset": len(subset),
        "loop_subset_runs_ms": [round(t, 3) for t in sub_runs],
        "machine": {
            "processor": platform.processor(),
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(),
        },
        "torch": torch.__version__,
        "git_commit": git_commit(ROOT),
    }
    print(
        f"spp_pool: {spp_ms:.1f} ms for {args.windows} windows on a "
        f"{args.channels}x{args.height}x{args.width} map ({args.threads} threads, median of "
        f"{args.repeats})"
    )
    print(f"table   : {table_ms:.1f} ms (2-D sparse table, the GPU path, on this CPU)")
    print(
        f"loop    : {loop_ms:.1f} ms (adaptive_max_pool2d per window, {len(subset)} timed, "
        f"scaled) -> {loop_ms / spp_ms:.1f}x"
    )
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
