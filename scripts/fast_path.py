"""Measure the mAP cost and the speed of each test-time speed setting in one pass (issue 7).

Evaluates the run's ``fc7_bb`` row (SVM on fine-tuned fc7 + box regression) and every
:data:`sppdet.evaluate.FAST_VARIANTS` setting over it on the same images, sharing the cached conv
maps and SPP vectors, so each variant's fc / SVM / bbox / NMS seconds are measured side by side.
Writes ``benchmarks/<name>.json`` with, per setting, mAP, its difference to the exact path in
points and the seconds per image after the conv stage, and names the fastest setting whose mAP
loss is at most ``--max-loss`` points (the default the test path should use).

Usage::

    .venv/bin/python scripts/fast_path.py --run runs/voc07_1s --devkit ../shared/data/VOCdevkit \\
        --split val --name fast_path_voc07_val
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sppdet.bench import provenance
from sppdet.device import set_threads
from sppdet.evaluate import evaluate_variants, fast_variants
from sppdet.run import Run
from sppdet.storage import atomic_write_json, git_commit

#: Stages after the conv pass (conv maps come from the cache here and are the same for all).
AFTER_CONV = ("spp", "fc", "svm", "bbox", "nms")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--devkit", default="../shared/data/VOCdevkit")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, help="First N images only.")
    p.add_argument("--name", default="fast_path_voc07_val")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks"))
    p.add_argument("--max-loss", type=float, default=0.3, help="mAP points a setting may lose.")
    p.add_argument(
        "--variants",
        help="Comma-separated FAST_VARIANTS names to measure (default: all of them).",
    )
    args = p.parse_args()
    set_threads()  # numba's SPP kernel runs as many threads as torch

    commit = git_commit()  # at the start: the code that runs, even if HEAD moves meanwhile
    run = Run.open(args.run)
    variants = fast_variants(run)  # fc7_bb_exact, then one speed setting each
    if args.variants:
        wanted = args.variants.split(",")
        unknown = sorted(set(wanted) - set(variants))
        if unknown:
            p.error(f"unknown --variants {unknown}; expected some of {sorted(variants)}")
        variants = {k: variants[k] for k in ["fc7_bb_exact", *wanted]}
    # RUN/eval/fastpath_<split>_<variant>/: apart from the ablation rows (<split>_<variant>)
    # that experiments.voc07 turns into results files.
    prefix = f"fastpath_{args.split}_"
    names = {prefix + k: v for k, v in variants.items()}
    results = evaluate_variants(run, args.split, names, devkit=args.devkit, limit=args.limit)
    rows = {}
    for name, (_, summary) in results.items():
        t = summary["seconds_per_image"]
        rows[name.removeprefix(prefix)] = {
            "settings": {
                k: getattr(names[name], k) for k in ("dedup", "svd_fc6", "svd_fc7", "fc_dtype")
            },
            "map": summary["map"],
            "seconds_per_image": {s: t.get(s, 0.0) for s in AFTER_CONV},
            "after_conv_seconds_per_image": sum(t.get(s, 0.0) for s in AFTER_CONV),
        }
    base = rows["fc7_bb_exact"]
    for r in rows.values():
        r["map_delta_points"] = 100 * (r["map"] - base["map"])
    ok = [k for k, r in rows.items() if r["map_delta_points"] >= -args.max_loss]
    best = min(ok, key=lambda k: rows[k]["after_conv_seconds_per_image"])
    out = {
        "run": str(args.run),
        "split": args.split,
        "images": next(iter(results.values()))[1]["images"],
        "max_loss_points": args.max_loss,
        "fastest_within_loss": best,
        "variants": rows,
        **provenance(["python", "scripts/fast_path.py"], commit),
    }
    path = args.out_dir / f"{args.name}.json"
    atomic_write_json(path, out)
    print(f"{'setting':<26s} {'mAP':>6s} {'delta':>6s} {'s/img after conv':>17s}")
    for k, r in rows.items():
        print(
            f"{k:<26s} {100 * r['map']:6.2f} {r['map_delta_points']:+6.2f} "
            f"{r['after_conv_seconds_per_image']:17.3f}"
        )
    print(f"fastest within {args.max_loss} points: {best} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
