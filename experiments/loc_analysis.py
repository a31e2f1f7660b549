"""How much of the mAP is lost to localization, and how much to scoring (issue 17).

Scores the same comp4 detections at several IoU thresholds (the devkit's rule, another
``minoverlap``): at IoU 0.1 a detection counts if it touches an object of its class, so
``mAP@0.1 - mAP@0.5`` bounds what perfect box placement of the same scored detections could
add (Hoiem et al. 2012, "Diagnosing error in object detectors": localization errors), while
``mAP@0.1`` itself measures the scoring (classification and ranking). Reads
``RUN/eval/<split>_<variant>/`` of finished evaluations; runs nothing else (seconds). Usage::

    python -m experiments.loc_analysis --devkit ../shared/data/VOCdevkit --split val \\
        --row 'fc7 SVM + bb=runs/voc07_lite0_dedup_1s/eval/val_fc7_bb' ... [--out results/F.json]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from sppdet.comp4 import read_comp4
from sppdet.datasets import load_voc
from sppdet.storage import atomic_write_json, git_commit
from sppdet.voc_eval import evaluate_detections

THRESHOLDS = (0.1, 0.3, 0.5, 0.7)


def analyse(dataset, folder: Path, thresholds=THRESHOLDS) -> dict:
    """``{"map": {thr: mAP}, "ap": {thr: {class: AP}}}`` of one comp4 directory."""
    dets = read_comp4(folder, dataset.split, dataset.classes, image_ids=dataset.image_ids)
    out: dict = {"map": {}, "ap": {}}
    for thr in thresholds:
        res = evaluate_detections(dataset, dets, iou_threshold=thr)
        out["map"][str(thr)], out["ap"][str(thr)] = res.map, res.ap
    return out


def table(rows: dict[str, dict], thresholds=THRESHOLDS) -> str:
    """Markdown: mAP per threshold, and the localization bound ``mAP@0.1 - mAP@0.5``."""
    head = [f"mAP@{t}" for t in thresholds]
    lines = [
        "| detections | " + " | ".join(head) + " | @0.1 - @0.5 |",
        "|---" * (len(head) + 2) + "|",
    ]
    for label, r in rows.items():
        m = r["map"]
        cells = [f"{100 * m[str(t)]:.1f}" for t in thresholds]
        gap = 100 * (m["0.1"] - m["0.5"]) if "0.1" in m and "0.5" in m else float("nan")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {gap:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devkit", default="../shared/data/VOCdevkit")
    p.add_argument("--split", default="val")
    p.add_argument("--row", action="append", required=True, help="LABEL=COMP4_DIRECTORY")
    p.add_argument("--out", type=Path, help="Write the figures (and the command) here.")
    args = p.parse_args()
    dataset = load_voc(args.devkit, args.split)
    rows = {}
    for spec in args.row:
        label, _, folder = spec.partition("=")
        rows[label] = {"dir": folder, **analyse(dataset, Path(folder))}
    print(table(rows))
    if args.out:
        command = shlex.join(["python", "-m", "experiments.loc_analysis", *sys.argv[1:]])
        atomic_write_json(
            args.out,
            {
                "protocol": f"VOC2007 {args.split}: devkit AP at IoU thresholds {THRESHOLDS}",
                "command": command,
                "commit": git_commit(),
                "rows": rows,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
