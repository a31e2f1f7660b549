"""1 against N processes (``torchrun``, one thread each) on the first images of VOC07 train / val:
seconds per image of proposals, extraction and evaluation, and fine-tuning steps per second.

Each stage runs once per process count, side by side in one invocation (so both see the same
machine), into fresh directories under ``--out``; the figures come from the stages' own
records (``extract_log.json``, ``eval.json``'s wall seconds, ``finetune/metrics.json``) or, for
proposals, the command's wall time. Writes one JSON (``benchmarks/distributed_voc07.json``)::

    .venv/bin/python -m experiments.bench_distributed --images 40 --procs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from experiments.voc07 import machine
from sppdet.proposal_store import read_stats, store_path
from sppdet.storage import atomic_write_json, git_commit

ROOT = Path(__file__).resolve().parents[1]


def sppdet(procs: int, *args) -> float:
    """Run ``sppdet ARGS`` on ``procs`` processes (one thread each); its wall seconds."""
    cmd = [sys.executable, "-m", "sppdet_cli.main"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(procs), "-m", "sppdet_cli.main", "--"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    subprocess.run([*cmd, *map(str, args)], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - t0


def measure(procs: int, args: argparse.Namespace) -> dict:
    out = args.out / f"p{procs}"
    shutil.rmtree(out, ignore_errors=True)
    n, dk = args.images, args.devkit
    cfg = out / "cfg.yaml"
    out.mkdir(parents=True)
    cfg.write_text(
        f"base: {ROOT / 'configs/voc07_d17_1scale.yaml'}\n"
        f"finetune:\n  iterations: {args.steps}\n  eval_every: {args.steps}\n"
        "  standardize_batches: 2\n"
    )
    row = {}
    # selective search computed (not imported): about 1 s per image and core
    wall = sppdet(procs, "proposals", "--devkit", dk, "--split", "val", "--limit", n,
                  "--out", out / "ss")  # fmt: skip
    stats = read_stats(store_path(out / "ss", "val")) or {}
    # the stage's own wall time (torchrun's start-up, ~2-5 s, is not per-image work) and the
    # command's, process start-ups included
    row["proposals_s_per_image"] = stats["wall_seconds"] / n
    row["proposals_command_s_per_image"] = wall / n
    run = out / "run"
    sppdet(procs, "extract", "--devkit", dk, "--split", "train", "--limit", n, "--out", run,
           "--config", cfg)  # fmt: skip
    log = json.loads((run / "features/train/extract_log.json").read_text())
    row["extract_s_per_image"] = log["seconds"] / log["images"]
    sppdet(procs, "finetune", run, "--quiet")
    metrics = json.loads((run / "finetune/metrics.json").read_text())
    row["finetune_steps_per_s"] = metrics["iterations"] / metrics["seconds"]
    # the shipped model: conv maps from the pixels, proposals imported
    sppdet(procs, "eval", "--voc2007", "--model", args.model, "--model-dir", out / "model",
           "--devkit", dk, "--split", "val", "--limit", n)  # fmt: skip
    summary = json.loads((out / "model/eval/val/eval.json").read_text())
    row["eval_s_per_image"] = summary["wall_seconds"] / summary["images"]
    row["eval_map"] = summary["map"]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devkit", default="../shared/data/VOCdevkit")
    p.add_argument("--model", default=str(ROOT / "models/sppdet_voc07.pt"))
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--steps", type=int, default=40, help="Fine-tuning steps timed.")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs/bench_distributed")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks/distributed_voc07.json")
    args = p.parse_args()
    rows = {str(n): measure(n, args) for n in (1, args.procs)}
    one, many = rows["1"], rows[str(args.procs)]
    speedup = {
        k: (one[k] / many[k] if k.endswith("per_image") else many[k] / one[k])
        for k in one
        if k != "eval_map"
    }
    result = {
        "images": args.images,
        "finetune_steps": args.steps,
        "threads_per_process": 1,
        "rows": rows,
        "speedup": speedup,
        "command": " ".join(["python", "-m", "experiments.bench_distributed", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine(),
    }
    atomic_write_json(args.json, result)
    print(json.dumps({"rows": rows, "speedup": speedup}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
