"""SPP-net against R-CNN mode on the same images, proposals and settings: their VOC07 mAP.

The accuracy half of issue 7's goal ("mAP within 0.5 points of each other"; the speed half is
``sppdet bench``). Two runs of one config, ``RUN/spp`` and ``RUN/rcnn`` (``extract --mode
rcnn``), each trained on the first ``--limit-train`` train images and evaluated on the first
``--limit-val`` val images, with the paper's table-9 rows:

- phase ``pool5`` (the default): pool5 SVMs without fine-tuning; R-CNN mode's window vectors of
  both splits are extracted first (its cost: ~13 s per image on 2 CPU cores at float32), and
- phase ``all``: also ``sppdet train`` (fine-tune -> fc7 SVMs -> box regression) and every
  ablation row (``eval --ablations``, exact float32 fc path).

Every stage is resumable: ``sppdet`` stages skip finished work and an eval whose output exists is
not rerun, so an interrupted comparison is finished by running the same command again (stage
times add up over attempts in ``RUN/<mode>/stages.json``). After each eval the result file is
rewritten with every row evaluated so far: ``--out`` (JSON: per-row mAP of both modes, their
difference, per-class APs, commits, config, stage times, machine) and a per-class AP PNG beside it.

Usage::

    .venv/bin/python scripts/mode_compare.py --config configs/voc07_mnv2_300.yaml \\
        --run runs/cmp300 --limit-train 300 --limit-val 300 \\
        --out results/mode_compare_voc300.json [--phase all]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from sppdet.bench import machine
from sppdet.storage import atomic_write_json, git_commit, read_json
from sppdet.viz import plot_ap_comparison

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODES = ("rcnn", "spp")  # R-CNN first: its extraction is the long pole


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="YAML deltas (configs/).")
    p.add_argument("--run", type=Path, required=True, help="Parent of the two run directories.")
    p.add_argument("--devkit", default="../shared/data/VOCdevkit")
    p.add_argument("--limit-train", type=int, required=True, help="First N train images.")
    p.add_argument("--limit-val", type=int, required=True, help="First N val images.")
    p.add_argument("--phase", choices=("pool5", "all"), default="pool5")
    p.add_argument("--out", type=Path, required=True, help="Result JSON (PNG written beside).")
    return p.parse_args()


def run_stage(name: str, argv: list[str], run: Path) -> None:
    """Run one sppdet command; add its wall seconds and peak RSS to ``run/stages.json``."""
    print(f"\n== {run.name}/{name}: {shlex.join(argv)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=dict(os.environ))
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"stage {run.name}/{name} failed with exit code {code}")
    path = run / "stages.json"
    stages = read_json(path) if path.exists() else {}
    prev = stages.get(name, {"seconds": 0.0, "peak_rss_gb": 0.0})
    stages[name] = {
        "seconds": prev["seconds"] + time.perf_counter() - t0,
        "peak_rss_gb": max(prev["peak_rss_gb"], usage.ru_maxrss / 2**20),  # KiB on Linux
        "command": shlex.join(argv),
    }
    atomic_write_json(path, stages)


def plan(args: argparse.Namespace) -> list[tuple[str, str, list[str], Path | None]]:
    """``(mode, stage, argv, output)`` in order; a stage whose ``output`` exists is skipped."""
    sppdet = str(BIN / "sppdet")
    steps = []
    for split, limit in (("train", args.limit_train), ("val", args.limit_val)):
        for mode in MODES:
            argv = [sppdet, "extract", "--devkit", args.devkit, "--split", split,
                    "--limit", str(limit), "--out", str(args.run / mode),
                    "--config", str(args.config), "--mode", mode]  # fmt: skip
            steps.append((mode, f"extract_{split}", argv, None))
    ev = ["--voc2007", "--devkit", args.devkit, "--split", "val", "--limit", str(args.limit_val),
          "--fc-dtype", "float32"]  # fmt: skip
    for mode in MODES:
        argv = [sppdet, "train-svm", str(args.run / mode), "--layer", "pool5", "--quiet"]
        steps.append((mode, "train_svm_pool5", argv, None))
    for mode in MODES:
        run = args.run / mode
        out = run / "eval_pool5.json"
        argv = [sppdet, "eval", "--run", str(run), *ev, "--layer", "pool5", "--no-bbox-reg",
                "--name", "val_pool5", "--json", str(out)]  # fmt: skip
        steps.append((mode, "eval_pool5", argv, out))
    if args.phase == "all":
        for mode in MODES:
            steps.append((mode, "train", [sppdet, "train", str(args.run / mode), "--quiet"], None))
        for mode in MODES:
            run = args.run / mode
            out = run / "ablations.json"
            argv = [sppdet, "eval", "--run", str(run), *ev, "--ablations", "--json", str(out)]
            steps.append((mode, "eval_ablations", argv, out))
    return steps


def write_results(args: argparse.Namespace) -> None:
    """``--out``: every row evaluated in both modes so far (rows from RUN/<mode>/eval/)."""
    evals = {
        mode: {
            p.parent.name.removeprefix("val_"): read_json(p)
            for p in sorted((args.run / mode / "eval").glob("val_*/eval.json"))
        }
        for mode in MODES
    }
    config = yaml.safe_load((args.run / "spp" / "config.yaml").read_text())
    n_scales = len(config["features"]["scales"])
    spp_label = f"SPP {n_scales}-scale"
    rows = {}
    for variant in sorted(set(evals["spp"]) & set(evals["rcnn"])):
        if variant == "random":
            continue
        s, r = evals["spp"][variant], evals["rcnn"][variant]
        rows[variant] = {
            "map_spp": s["map"],
            "map_rcnn": r["map"],
            "rcnn_minus_spp_points": round(100 * (r["map"] - s["map"]), 2),
            "ap_spp": s["ap"],
            "ap_rcnn": r["ap"],
            "val_images": [s["images"], r["images"]],
            "eval_commits": [s["commit"], r["commit"]],
            "test_seconds_per_image": {
                "spp": s["seconds_per_image"],
                "rcnn": r["seconds_per_image"],
            },
        }
        plot_ap_comparison(
            {spp_label: s["ap"], "R-CNN mode": r["ap"]},
            args.out.with_name(f"{args.out.stem}_{variant}.png"),
            title=f"{variant}: {args.limit_train} train -> {args.limit_val} val images",
        )
    stages = {m: read_json(p) for m in MODES if (p := args.run / m / "stages.json").exists()}
    out = {
        "what": "SPP-net vs R-CNN mode, same config, images and proposals (VOC07 11-point mAP)",
        "train_images": args.limit_train,
        "val_images": args.limit_val,
        "rows": rows,
        "config": config,
        "stage_seconds": {
            m: {k: round(v["seconds"], 1) for k, v in s.items()} for m, s in stages.items()
        },
        "peak_rss_gb": {
            m: round(max(v["peak_rss_gb"] for v in s.values()), 2) for m, s in stages.items()
        },
        "extract_log": {
            m: {
                sp: read_json(p)
                for sp in ("train", "val")
                if (p := args.run / m / "features" / sp / "extract_log.json").exists()
            }
            for m in MODES
        },  # fmt: skip
        "command": shlex.join(["python", "scripts/mode_compare.py", *sys.argv[1:]]),
        "commit_of_results_script": git_commit(ROOT),
        "machine": machine(),
    }
    atomic_write_json(args.out, out)
    for variant, row in rows.items():
        print(f"{variant}: SPP {100 * row['map_spp']:.2f}, R-CNN {100 * row['map_rcnn']:.2f} "
              f"({row['rcnn_minus_spp_points']:+.2f} points)")  # fmt: skip
    print(f"-> {args.out}")


def main() -> int:
    args = parse_args()
    for mode in MODES:
        (args.run / mode).mkdir(parents=True, exist_ok=True)
    for mode, name, argv, output in plan(args):
        if output is not None and output.exists():
            print(f"== {mode}/{name}: done ({output})")
            continue
        run_stage(name, argv, args.run / mode)
        if name.startswith("eval"):
            write_results(args)
    write_results(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
