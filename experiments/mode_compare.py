"""SPP-net against R-CNN mode on the same images, proposals and settings: their VOC07 mAP.

The accuracy half of issue 7's goal ("mAP within 0.5 points of each other"; the speed half is
``sppdet bench``). Runs of one config, ``RUN/<mode>`` for each of ``--modes``: ``rcnn``
(``extract --mode rcnn``), ``spp`` (the config's scales) and ``spp5`` (the same config at the
paper's five scales), each trained on the first ``--limit-train`` train images and evaluated on
the first ``--limit-val`` val images, with the paper's table-9 rows:

- phase ``pool5`` (the default): pool5 SVMs without fine-tuning; R-CNN mode's window vectors of
  both splits are extracted first (its cost: ~13 s per image on 2 CPU cores at float32), and
- phase ``all``: also ``sppdet train`` (fine-tune -> fc7 SVMs -> box regression) and every
  ablation row (``eval --ablations``, exact float32 fc path).

With ``--lanes 2`` (the default) the train and val extractions run side by side, one thread
each, and then the modes' train/eval chains the same way. ``--rcnn-from`` takes R-CNN mode's rows
from an earlier result file of the same images and config (R-CNN's vectors do not depend on
``features.scales``), so that SPP variants can be added without re-extracting R-CNN mode.

Every stage is resumable: ``sppdet`` stages skip finished work and an eval whose output exists is
not rerun, so an interrupted comparison is finished by running the same command again (stage
times add up over attempts in ``RUN/<mode>/stages.json``). After each eval the result file is
rewritten with every row evaluated so far: ``--out`` (JSON: per-row mAP of every mode, R-CNN
minus each SPP column, per-class APs, commits, config, stage times, machine) and a per-class AP
PNG beside it.

Usage::

    .venv/bin/python -m experiments.mode_compare --config configs/voc07_mnv2_300.yaml \\
        --run runs/cmp300 --limit-train 300 --limit-val 300 \\
        --out results/mode_compare_voc300.json [--phase all] [--modes rcnn,spp,spp5]
"""

from __future__ import annotations

import argparse
import functools
import shlex
import sys
import threading
from pathlib import Path

from experiments.stages import Stage, read_record, run_lanes
from sppdet.bench import machine
from sppdet.run import CONFIG_FILE, load_yaml
from sppdet.run_paths import relative_paths
from sppdet.storage import atomic_write_json, git_commit, read_json
from sppdet.viz import plot_ap_comparison

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODES = ("rcnn", "spp", "spp5")  # R-CNN first: its extraction is the long pole
EXTRA = {"rcnn": ["--mode", "rcnn"], "spp": ["--mode", "spp"], "spp5": ["--scales", "5"]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, required=True, help="YAML deltas (configs/).")
    p.add_argument("--run", type=Path, required=True, help="Parent of the mode run directories.")
    p.add_argument("--devkit", default="../shared/data/VOCdevkit")
    p.add_argument("--limit-train", type=int, required=True, help="First N train images.")
    p.add_argument("--limit-val", type=int, required=True, help="First N val images.")
    p.add_argument("--phase", choices=("pool5", "all"), default="pool5")
    p.add_argument("--modes", default="rcnn,spp", help=f"Comma list of {', '.join(MODES)}.")
    p.add_argument("--lanes", type=int, choices=(1, 2), default=2, help="Side-by-side lanes.")
    p.add_argument("--rcnn-from", type=Path, help="Earlier --out whose R-CNN rows to reuse.")
    p.add_argument("--out", type=Path, required=True, help="Result JSON (PNG written beside).")
    args = p.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes: a comma list of {', '.join(MODES)}, got {args.modes!r}")
    args.modes = [m for m in MODES if m in modes]  # R-CNN first, whatever the order given
    if "rcnn" in args.modes and args.rcnn_from is not None:
        p.error("--rcnn-from replaces mode rcnn: drop one of them")
    return args


def plan(args: argparse.Namespace) -> tuple[list[list[Stage]], list[list[Stage]]]:
    """``(extraction lanes, train/eval lanes)``; an eval whose output exists is left out."""
    sppdet = str(BIN / "sppdet")
    rec = {m: args.run / m / "stages.json" for m in args.modes}
    done = functools.partial(write_results, args)  # after each eval, whichever lane ran it
    extract = []
    for split, limit in (("train", args.limit_train), ("val", args.limit_val)):
        extract.append([
            Stage(f"extract_{split}",
                  [sppdet, "extract", "--devkit", args.devkit, "--split", split,
                   "--limit", str(limit), "--out", str(args.run / m),
                   "--config", str(args.config), *EXTRA[m]], rec[m])
            for m in args.modes
        ])  # fmt: skip
    ev = ["--voc2007", "--devkit", args.devkit, "--split", "val", "--limit", str(args.limit_val),
          "--fc-dtype", "float32"]  # fmt: skip
    chains = []
    for m in args.modes:
        run = str(args.run / m)
        chain = [Stage("train_svm_pool5", [sppdet, "train-svm", run, "--layer", "pool5", "--quiet"],
                       rec[m])]  # fmt: skip
        out = args.run / m / "eval_pool5.json"
        if not out.exists():
            chain.append(Stage("eval_pool5",
                               [sppdet, "eval", "--run", run, *ev, "--layer", "pool5",
                                "--no-bbox-reg", "--name", "val_pool5", "--json", str(out)],
                               rec[m], then=done))  # fmt: skip
        if args.phase == "all":
            chain.append(Stage("train", [sppdet, "train", run, "--quiet"], rec[m]))
            out = args.run / m / "ablations.json"
            if not out.exists():
                chain.append(Stage("eval_ablations",
                                   [sppdet, "eval", "--run", run, *ev, "--ablations",
                                    "--json", str(out)], rec[m], then=done))  # fmt: skip
        chains.append(chain)
    if args.lanes == 1:
        return [sum(extract, [])], [sum(chains, [])]
    # the R-CNN chain is the longest (its evals read ~15 MB of vectors per image): alone in a lane
    return extract, [chains[0], sum(chains[1:], [])]


def _run_config(args: argparse.Namespace, mode: str) -> dict:
    """The resolved config a mode's run directory stores (written by its first extract), its
    paths relative to the working directory as committed results name them."""
    return relative_paths(load_yaml(args.run / mode / CONFIG_FILE))


def _spp_label(args: argparse.Namespace, mode: str) -> str:
    config = _run_config(args, mode)
    return f"SPP {len(config['features']['scales'])}-scale"


def _evals(args: argparse.Namespace) -> dict[str, dict[str, dict]]:
    """mode -> variant -> eval.json of every evaluated row (R-CNN's from ``--rcnn-from``)."""
    evals = {
        m: {
            p.parent.name.removeprefix("val_"): read_json(p)
            for p in sorted((args.run / m / "eval").glob("val_*/eval.json"))
        }
        for m in args.modes
    }
    if args.rcnn_from is not None:
        evals["rcnn"] = _reused_rcnn(args)
    return evals


def _reused_rcnn(args: argparse.Namespace) -> dict[str, dict]:
    """R-CNN rows of an earlier comparison of the same images and config, scales aside."""
    old = read_json(args.rcnn_from)
    mode = args.modes[0]
    config = _run_config(args, mode)
    same = _without_scales(config) == _without_scales(old["config"])
    if not same or (old["train_images"], old["val_images"]) != (args.limit_train, args.limit_val):
        raise SystemExit(f"--rcnn-from {args.rcnn_from}: other images or config than this run")
    rows = {}
    for variant, row in old["rows"].items():
        commits, images = row["eval_commits"], row["val_images"]
        rows[variant] = {
            "map": row["map_rcnn"],
            "ap": row["ap_rcnn"],
            # files of the first version hold [spp, rcnn] lists
            "images": images["rcnn"] if isinstance(images, dict) else images[1],
            "commit": commits["rcnn"] if isinstance(commits, dict) else commits[1],
            "seconds_per_image": row["test_seconds_per_image"]["rcnn"],
        }
    return rows


def _without_scales(config: dict) -> dict:
    return {**config, "features": {k: v for k, v in config["features"].items() if k != "scales"}}


_WRITE_LOCK = threading.Lock()  # lanes finish evals concurrently


def write_results(args: argparse.Namespace) -> None:
    """``--out``: every row evaluated so far in every mode (rows from RUN/<mode>/eval/)."""
    with _WRITE_LOCK:
        _write_results(args)


def _write_results(args: argparse.Namespace) -> None:
    evals = _evals(args)
    modes = [m for m in MODES if m in evals]
    labels = {m: "R-CNN mode" if m == "rcnn" else _spp_label(args, m) for m in modes}
    rows = {}
    for variant in sorted(set.intersection(*(set(evals[m]) for m in modes))):
        if variant == "random":
            continue
        e = {m: evals[m][variant] for m in modes}
        row = {f"map_{m}": e[m]["map"] for m in modes}
        if "rcnn" in e:
            for m in modes[1:]:
                row[f"rcnn_minus_{m}_points"] = round(100 * (e["rcnn"]["map"] - e[m]["map"]), 2)
        row |= {f"ap_{m}": e[m]["ap"] for m in modes}
        row |= {
            "labels": labels,
            "val_images": {m: e[m]["images"] for m in modes},
            "eval_commits": {m: e[m]["commit"] for m in modes},
            "test_seconds_per_image": {m: e[m]["seconds_per_image"] for m in modes},
        }
        rows[variant] = row
        plot_ap_comparison(
            {labels[m]: e[m]["ap"] for m in modes},
            args.out.with_name(f"{args.out.stem}_{variant}.png"),
            title=f"{variant}: {args.limit_train} train -> {args.limit_val} val images",
        )
    stages = {m: read_record(args.run / m / "stages.json") for m in args.modes}
    stages = {m: s for m, s in stages.items() if s}
    out = {
        "what": "SPP-net vs R-CNN mode, same config, images and proposals (VOC07 11-point mAP)",
        "train_images": args.limit_train,
        "val_images": args.limit_val,
        "rows": rows,
        "rcnn_rows_from": str(args.rcnn_from) if args.rcnn_from else None,
        "config": _run_config(args, args.modes[0]),
        "stage_seconds": {
            m: {k: round(v["seconds"], 1) for k, v in s.items()} for m, s in stages.items()
        },
        "stage_threads": {
            m: {k: v.get("threads") for k, v in s.items()} for m, s in stages.items()
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
            for m in args.modes
        },  # fmt: skip
        "command": shlex.join(["python", "-m", "experiments.mode_compare", *sys.argv[1:]]),
        "commit_of_results_script": git_commit(ROOT),
        "machine": machine(),
    }
    atomic_write_json(args.out, out)
    for variant, row in rows.items():
        maps = ", ".join(f"{labels[m]} {100 * row[f'map_{m}']:.2f}" for m in modes)
        print(f"{variant}: {maps}")
    print(f"-> {args.out}")


def main() -> int:
    args = parse_args()
    for mode in args.modes:
        (args.run / mode).mkdir(parents=True, exist_ok=True)
    extract, chains = plan(args)
    run_lanes(extract)
    run_lanes(chains)
    write_results(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
