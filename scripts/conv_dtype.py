"""Measure the mAP cost and the speed of running the conv trunk in bf16 / fp16 (issue 7).

For each ``--dtypes`` value the run's ``fc7_bb`` row (SVM on fine-tuned fc7 + box regression,
dedup, no SVD, float32 fc unless ``--fc-dtype``: :data:`sppdet.evaluate.EXACT`) is evaluated on
the same images with conv maps computed from pixels in that dtype (never read from the run's
cache, so every dtype's conv seconds are measured the same way, and float32 is the reference).
Only the conv trunk differs between the rows: the fc, SVM and box stages are the run's own.

Writes ``benchmarks/<name>.json`` with, per dtype, mAP, its difference to float32 in points and
the conv seconds per image (image load + resize + conv, over all the run's scales).

Usage::

    .venv/bin/python scripts/conv_dtype.py --run runs/voc07_5s --split val --limit 500 \\
        --name conv_dtype_voc07_5s_val500
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from sppdet.bench import describe_device, provenance
from sppdet.evaluate import EXACT, ablation_variants, evaluate_run
from sppdet.fastpath import CONV_DTYPES, FC_DTYPES
from sppdet.run import Run
from sppdet.storage import atomic_write_json, git_commit


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--devkit", default="../shared/data/VOCdevkit")
    p.add_argument("--split", default="val")
    p.add_argument("--limit", type=int, help="First N images only.")
    p.add_argument("--name", default="conv_dtype_voc07_val")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks"))
    p.add_argument("--dtypes", default="float32,bfloat16", help="Comma-separated conv dtypes.")
    p.add_argument("--device", help="auto | cpu | cuda[:N] (default: the run's).")
    p.add_argument(
        "--fc-dtype",
        choices=FC_DTYPES,
        default="float32",
        help="fc stage dtype of every row (default float32, the exact path).",
    )
    args = p.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    bad = sorted(set(dtypes) - set(CONV_DTYPES))
    if bad or "float32" not in dtypes:
        p.error(f"--dtypes must include float32 and only {CONV_DTYPES}; got {dtypes}")

    commit = git_commit()  # at the start: the code that runs, even if HEAD moves meanwhile
    run = Run.open(args.run)
    if args.device:
        run = Run(run.root, dataclasses.replace(run.config, device=args.device))
    base = ablation_variants(run).get("fc7_bb")
    if base is None:
        p.error(f"{args.run} has no fc7 SVMs + box regressors to evaluate")
    test = dataclasses.replace(base, **{**EXACT, "fc_dtype": args.fc_dtype})
    rows = {}
    for dtype in dtypes:
        features = dataclasses.replace(run.config.features, conv_dtype=dtype, cache=False)
        variant = Run(run.root, dataclasses.replace(run.config, features=features, test=test))
        _, summary = evaluate_run(
            variant, args.split, devkit=args.devkit, limit=args.limit,
            out_name=f"convdtype_{args.split}_{dtype}",
        )  # fmt: skip
        rows[dtype] = {
            "map": summary["map"],
            "conv_seconds_per_image": summary["seconds_per_image"]["conv"],
            "seconds_per_image": summary["seconds_per_image"],
            "images": summary["images"],
        }
    for r in rows.values():
        r["map_delta_points"] = 100 * (r["map"] - rows["float32"]["map"])
        r["conv_speedup"] = rows["float32"]["conv_seconds_per_image"] / r["conv_seconds_per_image"]
    out = {
        "run": str(args.run),
        "split": args.split,
        "images": rows["float32"]["images"],
        "scales": list(run.config.features.scales),
        "test": {k: getattr(test, k) for k in ("scorer", "layer", "bbox_reg", *EXACT)},
        "dtypes": rows,
        "device": describe_device(run.device),
        **provenance(["python", "scripts/conv_dtype.py"], commit),
    }
    path = args.out_dir / f"{args.name}.json"
    atomic_write_json(path, out)
    print(f"{'conv dtype':<10s} {'mAP':>6s} {'delta':>6s} {'conv s/img':>11s} {'speed-up':>9s}")
    for k, r in rows.items():
        print(
            f"{k:<10s} {100 * r['map']:6.2f} {r['map_delta_points']:+6.2f} "
            f"{r['conv_seconds_per_image']:11.3f} {r['conv_speedup']:8.2f}x"
        )
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
