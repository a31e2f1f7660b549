"""Stripe tiling on real images: are the maps the same, and how much faster is the conv pass?

For the first N images of a VOC split, computes the conv maps at every scale with stripe tiling
off and on (``FeatureConfig.stripe_pixels`` 0 vs the CPU default), alternating the two per image
so machine noise hits both alike, and records per scale the largest absolute difference of the
maps and the seconds per image of each. Writes ``benchmarks/<name>.json``.

Usage: ``.venv/bin/python scripts/check_tiling.py --devkit ../shared/data/VOCdevkit --split val
--limit 20 --weights ../shared/weights/mobilenet_v2_features_imagenet.pth [--conv-dtype bfloat16]``
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from sppdet.bench import describe_device, provenance
from sppdet.datasets import load_voc
from sppdet.device import set_threads
from sppdet.features import FeatureConfig, FeatureExtractor
from sppdet.imageio import load_image
from sppdet.scales import FIVE_SCALES
from sppdet.storage import atomic_write_json
from sppdet.tiling import DEFAULT_STRIPE_PIXELS

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devkit", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default=None, help="state_dict path (default: random init)")
    p.add_argument("--conv-dtype", default="float32", help="float32 | bfloat16")
    p.add_argument("--stripe-pixels", type=int, default=DEFAULT_STRIPE_PIXELS)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="tiling_check")
    p.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    set_threads(args.threads)  # torch's and the numba kernel's
    ds = load_voc(args.devkit, args.split, limit=args.limit)
    base = dict(
        backbone=args.backbone,
        weights=args.weights,
        scales=FIVE_SCALES,
        conv_dtype=args.conv_dtype,
    )
    runs = {
        "plain": FeatureExtractor(FeatureConfig(**base, stripe_pixels=0)),
        "striped": FeatureExtractor(FeatureConfig(**base, stripe_pixels=args.stripe_pixels)),
    }
    seconds = {k: defaultdict(float) for k in runs}
    diff = defaultdict(float)
    for i, rec in enumerate(tqdm(ds, desc="tiling check", unit="img")):
        image = load_image(rec.path)
        maps = {}
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]  # alternate who goes first
        for k in order:
            maps[k] = []
            for s in FIVE_SCALES:
                t = time.perf_counter()
                maps[k] += runs[k].compute(image, scales=(s,))
                seconds[k][s] += time.perf_counter() - t
        for s, a, b in zip(FIVE_SCALES, maps["plain"], maps["striped"], strict=True):
            diff[s] = max(diff[s], float((a.fmap - b.fmap).abs().max()))
    n = len(ds)
    per_scale = {
        str(s): {
            "max_abs_diff": diff[s],
            "plain_seconds_per_image": seconds["plain"][s] / n,
            "striped_seconds_per_image": seconds["striped"][s] / n,
        }
        for s in FIVE_SCALES
    }
    plain = sum(seconds["plain"].values()) / n
    striped = sum(seconds["striped"].values()) / n
    result = {
        "split": args.split,
        "images": n,
        "backbone": args.backbone,
        "weights": args.weights,
        "conv_dtype": args.conv_dtype,
        "stripe_pixels": args.stripe_pixels,
        "scales": per_scale,
        "plain_5scale_seconds_per_image": plain,
        "striped_5scale_seconds_per_image": striped,
        "speedup_5scale": plain / striped,
        "max_abs_diff": max(diff.values()),
        "device": describe_device(torch.device("cpu")),
        **provenance(["python", "scripts/check_tiling.py"]),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / f"{args.name}.json"
    atomic_write_json(out, result)
    for s, r in per_scale.items():
        print(
            f"scale {s:>4}: plain {r['plain_seconds_per_image']:.3f} s, striped "
            f"{r['striped_seconds_per_image']:.3f} s, max |diff| {r['max_abs_diff']:.3g}"
        )
    print(f"5 scales: {plain:.3f} -> {striped:.3f} s/img ({plain / striped:.2f}x) -> {out}")


if __name__ == "__main__":
    main()
