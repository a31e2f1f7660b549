"""Independent check of ``sppdet proposals --import ... --recall`` on precomputed boxes.

Reads the shared ``.npz`` (ids / offsets / uint16 0-based inclusive boxes) and the VOC XML files
directly (numpy + ElementTree, nothing from sppdet), computes recall at IoU 0.5 / 0.7 and the
average best overlap over the non-difficult ground truth with VOC "+1" areas, and compares them
with the JSON that ``sppdet proposals --recall --json`` wrote. Exits 1 on a difference > 1e-9.

Usage::

    .venv/bin/python scripts/check_proposal_recall.py --devkit ../shared/data/VOCdevkit \\
        --split val --proposals ../shared/data/proposals/voc2007_trainval_ss_fast.npz \\
        --report runs/prop_import/val_recall.json [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np


def gt_boxes(xml: Path) -> list[list[float]]:
    """Non-difficult boxes as 0-based inclusive pixels (VOC's are 1-based inclusive)."""
    out = []
    for obj in ET.parse(xml).getroot().iter("object"):
        diff = obj.find("difficult")
        if diff is not None and int(diff.text) == 1:
            continue
        bb = obj.find("bndbox")
        out.append([float(bb.find(k).text) - 1 for k in ("xmin", "ymin", "xmax", "ymax")])
    return out


def best_overlaps(gt: np.ndarray, props: np.ndarray) -> np.ndarray:
    """Best "+1" IoU of each GT box over the proposals (both 0-based inclusive)."""
    if len(props) == 0:
        return np.zeros(len(gt))
    best = np.zeros(len(gt))
    for i, g in enumerate(gt):
        iw = np.minimum(g[2], props[:, 2]) - np.maximum(g[0], props[:, 0]) + 1
        ih = np.minimum(g[3], props[:, 3]) - np.maximum(g[1], props[:, 1]) + 1
        inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
        area_g = (g[2] - g[0] + 1) * (g[3] - g[1] + 1)
        area_p = (props[:, 2] - props[:, 0] + 1) * (props[:, 3] - props[:, 1] + 1)
        best[i] = (inter / (area_g + area_p - inter)).max()
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devkit", type=Path, required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--proposals", type=Path, required=True)
    p.add_argument("--report", type=Path, required=True, help="sppdet's recall JSON")
    p.add_argument("--limit", type=int)
    args = p.parse_args()
    root = args.devkit / "VOC2007"
    ids = (root / "ImageSets" / "Main" / f"{args.split}.txt").read_text().split()
    ids = ids[: args.limit] if args.limit else ids
    with np.load(args.proposals) as data:
        index = {str(k): i for i, k in enumerate(data["ids"])}
        offsets, boxes = data["offsets"], data["boxes"].astype(np.float64)
    best = []
    for image_id in ids:
        i = index[image_id]
        gt = np.array(gt_boxes(root / "Annotations" / f"{image_id}.xml")).reshape(-1, 4)
        best.append(best_overlaps(gt, boxes[offsets[i] : offsets[i + 1]]))
    best = np.concatenate(best)
    ours = {
        "recall_0.5": float((best >= 0.5).mean()),
        "recall_0.7": float((best >= 0.7).mean()),
        "abo_all": float(best.mean()),
    }
    theirs = json.loads(args.report.read_text())
    worst = 0.0
    for key, value in ours.items():
        diff = abs(value - theirs[key])
        worst = max(worst, diff)
        print(f"{key:<11} independent {value:.6f}  sppdet {theirs[key]:.6f}  |diff| {diff:.1e}")
    print(f"{len(ids)} images, {len(best)} non-difficult ground-truth boxes")
    print("OK" if worst <= 1e-9 else "FAIL")
    return 0 if worst <= 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
