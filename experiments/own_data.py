"""Bring-your-own-data timing (issue 22, ``docs/own_data.md``): the documented commands, from an
empty directory to ``eval`` and ``detect``, each run as its own ``sppdet`` process and timed.

The data is a two-class set the tests never use: the first 200 VOC2007 train images with a cat or
a dog, and the first 200 such val images, written as COCO jsons (``sppdet convert``), or as a
VOC-style devkit with its own ``classes.txt`` (``--layout voc``). Writes one JSON with each
command, its wall seconds, the COCO metrics and VOC07 AP, the config, commit and machine::

    .venv/bin/python -m experiments.own_data --out runs/own_coco --layout coco \\
        --json results/own_data_catdog_coco.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from experiments.voc07 import machine
from sppdet.storage import atomic_write_json, git_commit

ROOT = Path(__file__).resolve().parents[1]
DEVKIT = "../shared/data/VOCdevkit"
IMAGES = f"{DEVKIT}/VOC2007/JPEGImages"
WEIGHTS = "../shared/weights/mobilenet_v2_features_imagenet.pth"


def commands(out: Path, layout: str, config: str, workers: int) -> list[tuple[str, list[str]]]:
    """``(name, argv)`` of each step, as docs/own_data.md shows them."""
    pick = ["--classes", "cat,dog", "--limit", "200"]
    run, dev, steps = str(out / "run"), f"{out}/devkit", []
    for split in ("train", "val"):
        src = ["convert", "--devkit", DEVKIT, "--split", split, *pick]
        target = ["--to-coco", f"{out}/{split}.json"] if layout == "coco" else ["--to-voc", dev]
        steps.append((f"convert_{split}", [*src, *target]))
    for split in ("train", "val"):
        data = ["--coco", f"{out}/{split}.json", "--images", IMAGES]
        data = data if layout == "coco" else ["--devkit", dev]
        setup = ["--config", config, "--weights", WEIGHTS, "--workers", str(workers)]
        steps.append(
            (f"extract_{split}", ["extract", *data, "--split", split, "--out", run, *setup])
        )
    steps.append(("train", ["train", run, "--quiet"]))
    data = (["--coco", f"{out}/val.json", "--images", IMAGES] if layout == "coco"
            else ["--voc2007", "--devkit", f"{out}/devkit"])  # fmt: skip
    steps.append(("eval", ["eval", *data, "--split", "val", "--run", run]))
    image = f"{IMAGES}/000019.jpg"  # a val image with a cat
    steps.append(("detect", ["detect", image, "--run", run, "--out-image", f"{out}/det.png"]))
    return steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs/own_coco")
    p.add_argument("--layout", choices=("coco", "voc"), default="coco")
    p.add_argument("--config", default="configs/small_data.yaml")
    p.add_argument("--workers", type=int, default=2, help="Proposal processes.")
    p.add_argument("--json", type=Path, default=ROOT / "results/own_data_catdog_coco.json")
    p.add_argument("--no-ablations", action="store_true", help="Skip the untimed SVM rows.")
    args = p.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)  # from an empty directory, every time
    args.out.mkdir(parents=True)
    sppdet = [sys.executable, "-m", "sppdet_cli.main"]
    steps, total = [], 0.0
    for name, argv in commands(args.out, args.layout, args.config, args.workers):
        t0 = time.perf_counter()
        done = subprocess.run([*sppdet, *argv], cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            print(done.stdout, done.stderr, file=sys.stderr)
            raise SystemExit(f"{name} failed ({done.returncode}): sppdet {' '.join(argv)}")
        total += seconds
        tail = done.stdout.strip().splitlines()[-3:]
        steps.append({"step": name, "command": "sppdet " + " ".join(argv), "seconds": seconds,
                      "output_tail": tail})  # fmt: skip
        print(f"{name:<14s} {seconds:7.1f} s  {tail[-1] if tail else ''}", flush=True)
    summary = json.loads((args.out / "run/eval/val/eval.json").read_text())
    # not a user's step (untimed): the fc7 SVMs, which a softmax-scored run does not train, and
    # every trained scorer on the same images, for the preset's choice of scorer (docs/own_data.md)
    run = str(args.out / "run")
    if not args.no_ablations:
        subprocess.run(
            [*sppdet, "train-svm", run, "--layer", "fc7", "--quiet"], cwd=ROOT, check=True
        )
        last = steps[-2]["command"].split()[1:]  # the eval command
        subprocess.run([*sppdet, *last, "--ablations"], cwd=ROOT, check=True, capture_output=True)
    ablations = {}
    for variant in sorted((args.out / "run/eval").glob("val_*/eval.json")):
        row = json.loads(variant.read_text())
        ablations[row["variant"]] = {"voc07_map": row["map"], "coco": row.get("coco")}
    result = {
        "layout": args.layout,
        "data": "VOC2007 train / val, first 200 images with a cat or a dog each (classes cat, dog)",
        "steps": steps,
        "total_seconds": total,
        "voc07_map": summary["map"],
        "voc07_ap": summary["ap"],
        "coco": summary.get("coco"),
        "ablations": ablations,
        "finetune": json.loads((args.out / "run/finetune/metrics.json").read_text()),
        "preset": (ROOT / args.config).read_text(),  # the config file the commands name
        "config": yaml.safe_load((args.out / "run/config.yaml").read_text()),  # as resolved
        "command": " ".join(["python", "-m", "experiments.own_data", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine(),
    }
    result["finetune"].pop("config", None)
    atomic_write_json(args.json, result)
    print(f"total {total / 60:.1f} min, VOC07 mAP {100 * summary['map']:.1f} -> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
