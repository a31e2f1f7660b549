"""Recall, box count and time of proposal settings on the first N images of a VOC split.

Each setting is a set of :class:`sppdet.proposals.ProposalConfig` changes; every image is
proposed in this process on one OpenCV thread, timed in CPU seconds (``time.process_time``) and
wall seconds, and its non-difficult ground truth is matched with VOC "+1" IoU. One JSON line per
setting goes to stdout (and to ``--out``). This is the measurement behind the README's proposal
table and the default in ``ProposalConfig``.

Usage::

    .venv/bin/python scripts/proposal_sweep.py --devkit ../shared/data/VOCdevkit --split val \\
        --limit 40 [--only default fast] [--out benchmarks/proposal_sweep.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from sppdet import boxes as B
from sppdet.datasets import load_voc
from sppdet.imageio import load_image
from sppdet.proposals import ProposalConfig, propose
from sppdet.storage import git_commit

SETTINGS: dict[str, dict] = {
    "default": {},
    "fast": {"mode": "fast"},
    "hsv_lab_rgi_k50_100": {"color_spaces": ("hsv", "lab", "rgi"), "ks": (50, 100)},
    "hsv_lab_rgi_k100": {"color_spaces": ("hsv", "lab", "rgi"), "ks": (100,)},
    "hsv_lab_rgi_k50_100_ctsf": {
        "color_spaces": ("hsv", "lab", "rgi"),
        "ks": (50, 100),
        "strategies": ("CTSF",),
    },
    "selectivesearch_default": {"backend": "selectivesearch"},
    "default_ctsf_only": {"strategies": ("CTSF",)},
    "default_max_side_500": {"max_side": 500},
    "hsv_lab_k50_100_150": {"ks": (50, 100, 150)},
}


def measure(name: str, changes: dict, images: list) -> dict:
    """Recall@0.5/0.7, ABO over all boxes, mean boxes, CPU and wall seconds per image."""
    cfg = replace(ProposalConfig(), **changes)
    best, counts, cpu, wall = [], [], 0.0, 0.0
    for rec, image in images:
        c0, w0 = time.process_time(), time.perf_counter()
        props = propose(image, cfg)
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        counts.append(len(props))
        gt = rec.boxes[~rec.difficult]
        if len(gt):
            best.append(B.box_iou(gt, props).max(axis=1))
    b = np.concatenate(best) if best else np.zeros(0)
    n = max(len(images), 1)
    return {
        "name": name,
        "changes": {k: list(v) if isinstance(v, tuple) else v for k, v in changes.items()},
        "images": len(images),
        "gt_boxes": len(b),
        "recall_0.5": float((b >= 0.5).mean()) if len(b) else None,
        "recall_0.7": float((b >= 0.7).mean()) if len(b) else None,
        "abo_all": float(b.mean()) if len(b) else None,
        "boxes_per_image": float(np.mean(counts)) if counts else 0.0,
        "cpu_seconds_per_image": cpu / n,
        "seconds_per_image": wall / n,
        "loadavg_1": round(os.getloadavg()[0], 2),  # other load while measuring
        "commit": git_commit(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devkit", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--only", nargs="*", choices=sorted(SETTINGS), help="Settings to run.")
    p.add_argument("--out", type=Path, help="Append the JSON lines here too.")
    args = p.parse_args()
    cv2.setNumThreads(1)  # one core, as sppdet's proposal workers run
    ds = load_voc(args.devkit, args.split, limit=args.limit)
    images = [(rec, load_image(rec.path)) for rec in ds]
    for name in args.only or list(SETTINGS):
        line = json.dumps(measure(name, SETTINGS[name], images))
        print(line, flush=True)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a", encoding="utf-8") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
