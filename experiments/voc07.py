"""The VOC2007 train -> val experiment (``make voc07``): every stage, timed, then ``results/``.

Runs, each as its own ``sppdet`` process (so its wall time and peak RSS are measured alone):

1. ``extract`` of ``train`` (proposals imported, conv maps cached),
2. ``train`` (fine-tune -> fc7 SVMs -> box regressors), and beside it ``extract`` of ``val``
   then ``train-svm --layer pool5``,
3. ``eval --voc2007 --ablations`` on ``val``: pool5 SVM without fine-tuning, ft fc7 SVM,
   ft fc7 SVM + bbox regression, ft softmax (+ bbox), and random scores on the same proposals,

With ``--lanes 2`` (the default) the two lanes of step 2 run at the same time, one torch thread
each, so a stage that is mostly single-threaded Python or I/O does not leave a core idle; the
5-scale VOC07 run took 130 min this way (not yet timed against ``--lanes 1`` side by side). The
lanes' memory adds up: 8.5 GiB at the peak of that run against 5.5 GiB for its largest stage.
``--lanes 1`` runs every stage in sequence with all threads. ``RUN/stages.json`` records each
stage's threads.

then writes ``results/<name>_<variant>.json`` per variant. Every stage is resumable (each sppdet
stage skips finished work), and the stage timings of earlier invocations are kept in
``RUN/stages.json``, so an interrupted experiment is finished by running the same command again.

Usage::

    .venv/bin/python -m experiments.voc07 --config configs/voc07_mnv2_1scale.yaml \\
        --run runs/voc07_1s --name voc07_mnv2_1scale [--limit-train N] [--limit-val N]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from experiments.stages import Stage, pending, read_record, run_lanes, run_stage
from sppdet.configutil import to_dict
from sppdet.run_paths import relative_paths
from sppdet.storage import atomic_write_json, file_sha256, git_commit, read_json

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROTOCOL = "VOC2007 train->val"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="YAML deltas (configs/).")
    p.add_argument("--run", type=Path, required=True, help="Run directory.")
    p.add_argument("--name", required=True, help="Prefix of the results/*.json files.")
    p.add_argument("--devkit", default="../shared/data/VOCdevkit")
    p.add_argument("--limit-train", type=int, help="First N train images only (quick runs).")
    p.add_argument("--limit-val", type=int, help="First N val images only (quick runs).")
    p.add_argument("--results", type=Path, default=ROOT / "results")
    p.add_argument(
        "--write-results",
        action="store_true",
        help="Run no stage: write results/*.json from the evaluations already in RUN/eval "
        "(e.g. after an `eval --ablations` run by hand). The files record the full command.",
    )
    p.add_argument(
        "--stages-from",
        type=Path,
        help="With --write-results, for a run whose stages up to the SVMs are hard links of "
        "another run made with the same settings (experiments/variant.py): that run's "
        "stages.json gives the stage times, and the files name it (stages_from).",
    )
    p.add_argument(
        "--recipe",
        help="Short name of the recipe in the results files (default: the config's file name).",
    )
    p.add_argument(
        "--lanes",
        type=int,
        choices=(1, 2),
        default=2,
        help="2: train beside (extract val -> pool5 SVMs), one thread each; 1: all in sequence.",
    )
    p.add_argument(
        "--pool5-retrain-growth",
        type=float,
        default=None,
        help="train-svm --retrain-growth for the pool5 SVMs (default: the config's).",
    )
    p.add_argument(
        "--val-maps",
        choices=("cache", "compute"),
        default="cache",
        help="cache: `extract` the val maps beside training; compute: `eval --no-cache` "
        "computes them from the pixels and stores none (5-scale maps of a 320-channel tap take "
        "~28 GB per split).",
    )
    p.add_argument(
        "--no-pool5",
        action="store_true",
        help="Skip the pool5 SVMs (hours for 16,000-d vectors; the pool5 row is then absent).",
    )
    return p.parse_args()


def main() -> int:
    args = parse_args()
    sppdet = str(BIN / "sppdet")
    run, devkit = str(args.run), args.devkit
    lim_t = ["--limit", str(args.limit_train)] if args.limit_train else []
    lim_v = ["--limit", str(args.limit_val)] if args.limit_val else []
    rec = args.run / "stages.json"
    growth = (
        ["--retrain-growth", str(args.pool5_retrain_growth)] if args.pool5_retrain_growth else []
    )
    ext = ["--devkit", devkit, "--out", run, "--config", str(args.config)]
    extract_train = Stage(
        "extract_train", [sppdet, "extract", "--split", "train", *ext, *lim_t], rec
    )
    train = [Stage("train", [sppdet, "train", run, "--quiet"], rec)]
    beside = []
    if args.val_maps == "cache":
        beside.append(
            Stage("extract_val", [sppdet, "extract", "--split", "val", *ext, *lim_v], rec)
        )
    if not args.no_pool5:
        pool5 = [sppdet, "train-svm", run, "--layer", "pool5", "--quiet", *growth]
        beside.append(Stage("train_svm_pool5", pool5, rec))
    no_cache = ["--no-cache"] if args.val_maps == "compute" else []
    evaluate = Stage(
        "eval",
        [sppdet, "eval", "--voc2007", "--run", run, "--devkit", devkit, "--split", "val",
         "--ablations", "--json", str(args.run / "ablations.json"), *lim_v,
         # the results rows are the exact float32 fc path (the CPU default is int8, whose mAP
         # cost is measured apart: docs/fast_path.md); the run itself keeps the default, so
         # `sppdet bench --run RUN` times what users get
         "--fc-dtype", "float32", *no_cache],
        rec,
    )  # fmt: skip
    if args.write_results:
        write_results(
            args, read_record(args.stages_from / "stages.json" if args.stages_from else rec)
        )
        return 0
    if args.stages_from:
        raise SystemExit("--stages-from goes with --write-results")
    args.run.mkdir(parents=True, exist_ok=True)
    run_stage(extract_train)
    # A resumed run skips the side stages that already succeeded (they are on record only
    # then), so that the train lane gets every thread instead of one beside an empty lane.
    beside = pending(beside)
    run_lanes([train, beside] if args.lanes == 2 else [train + beside])
    run_stage(evaluate)
    write_results(args, read_record(rec))
    return 0


def write_results(args: argparse.Namespace, stages: dict) -> None:
    """``results/<name>_<variant>.json`` for each evaluated variant."""
    # paths relative to the working directory (the repository root), as committed results and
    # configs/*.yaml name them: a run made since stores them absolute
    cfg = relative_paths(yaml.safe_load((args.run / "config.yaml").read_text()))
    check_recipe(args.config, cfg, args.run)
    feats = cfg["features"]
    weights = feats["weights"]
    sha = file_sha256(weights) if weights and Path(weights).is_file() else None
    argv = _rerun_argv(sys.argv[1:])  # the command that reruns it all
    command = shlex.join(["python", "-m", "experiments.voc07", *argv])
    peak = max(s["peak_rss_gb"] for s in stages.values())
    args.results.mkdir(parents=True, exist_ok=True)
    for eval_dir in sorted((args.run / "eval").glob("val_*")):
        summary = read_json(eval_dir / "eval.json")
        variant = summary["variant"].removeprefix("val_")
        out = {
            "protocol": PROTOCOL,
            "recipe": args.recipe or args.config.stem,
            "variant": variant,
            "backbone": feats["backbone"],
            "weights": weights,
            "weights_sha256": sha,
            "scales": feats["scales"],
            "map": summary["map"],
            "ap": summary["ap"],
            "train_images": _count(args.run / "proposals" / "train.npz"),
            "val_images": summary["images"],
            "commit": summary["commit"],
            "command": command,
            "config": cfg,
            # a variant run: its stages' figures are those of the run it shares them with
            **(
                {"stages_from": str(shared)}
                if (shared := getattr(args, "stages_from", None))
                else {}
            ),
            "stage_seconds": {k: round(v["seconds"], 1) for k, v in stages.items()},
            # 1 = ran in a lane beside another stage (--lanes 2); "all" = alone, every core
            "stage_threads": {k: v.get("threads", "all") for k, v in stages.items()},
            # conv extraction time summed over every attempt, interrupted ones included
            "extract_log": {
                split: read_json(p)
                for split in ("train", "val")
                if (p := args.run / "features" / split / "extract_log.json").exists()
            },
            "test_seconds_per_image": summary["seconds_per_image"],
            "peak_rss_gb": round(peak, 2),
            "machine": machine(),
        }
        path = args.results / f"{args.name}_{variant}.json"
        atomic_write_json(path, out)
        print(f"{path}: mAP {100 * summary['map']:.1f}")


def _rerun_argv(argv: list[str]) -> list[str]:
    """``argv`` without ``--write-results`` and ``--stages-from X``: the full experiment."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--stages-from":
            skip = True
        elif a != "--write-results" and not a.startswith("--stages-from="):
            out.append(a)
    return out


def check_recipe(config: Path, stored: dict, run: Path) -> None:
    """Refuse to write results under ``config``'s name for a run made with other settings
    (e.g. a variant run with one more change): every key of every section must match."""
    from sppdet.run_config import build_config, stored_run_config

    want = relative_paths(to_dict(build_config(config)))
    have = relative_paths(to_dict(stored_run_config(stored, str(run))))
    diffs = [
        f"{section}.{key}: {have[section].get(key)!r} (run) vs {value!r} ({config})"
        for section, values in want.items()
        if isinstance(values, dict)
        for key, value in values.items()
        if have.get(section, {}).get(key) != value
    ]
    if diffs:
        raise SystemExit(f"{run} was not made with {config}: " + "; ".join(diffs))


def _count(path: Path) -> int | None:
    import numpy as np

    if not path.exists():
        return None
    with np.load(path) as data:
        return int(len(data["ids"]))


def machine() -> dict:
    """The machine description of ``sppdet bench``, plus this run's device and script commit."""
    import torch

    from sppdet.bench import machine as bench_machine

    return {
        **bench_machine(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "commit_of_results_script": git_commit(ROOT),
    }


if __name__ == "__main__":
    sys.exit(main())
