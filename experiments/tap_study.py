"""The tap / conv fine-tuning table of issue 17 on the 300 -> 300 protocol (or any rows of
trained runs: ``--protocol`` says what they are, e.g. the SVM study on the full data).

Each row is one trained run (first 300 VOC2007 train images -> first 300 val images, 1 scale):
its ``eval --ablations`` results (``RUN/eval/val_*/eval.json``) and fine-tuning metrics. A row
whose run did not train pool5 SVMs takes its pool5 row from ``POOL5_RUN`` (the same frozen
features: pool5 SVMs never see the fine-tuned trunk). Writes one JSON with the commands'
configs, the commit and the machine, and prints a markdown table. ``--keep OLD.json`` keeps
the rows of an earlier results file that this call does not remeasure (each with the machine it
ran on) and the commands that made them (``earlier_commands``), so rows measured in different
sessions share one table.

Usage::

    .venv/bin/python -m experiments.tap_study --out results/tap_study_voc300.json \\
        --row "features[13], frozen=runs/ft_mnv2" \\
        --row "features[17] dilated, frozen=runs/ft_d17_frozen,runs/probe_mobilenet_v2_d17"
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import yaml

from experiments.voc07 import machine
from sppdet.run_paths import relative_paths
from sppdet.storage import atomic_write_json, read_json

VARIANTS = ("pool5", "fc7", "fc7_bb", "softmax", "softmax_bb", "random")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--row", action="append", required=True, help="LABEL=RUN[,POOL5_RUN]")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--split",
        default="val",
        help="Evaluated split (RUN/eval/<split>_*; train: the rows on "
        "the run's own training images, to see what generalises).",
    )
    p.add_argument(
        "--protocol",
        default="VOC2007 first 300 train -> first 300 val, 1 scale (688)",
        help="What the rows' runs trained and evaluated on, in words (recorded).",
    )
    p.add_argument("--keep", type=Path, help="Earlier results JSON whose other rows to keep.")
    return p.parse_args()


def kept_rows(path: Path | None, labels: set[str]) -> tuple[list[dict], list[str]]:
    """The rows of ``path`` not in ``labels``, each with its machine (the file's if not its own),
    and the commands that made ``path`` (its ``earlier_commands``, then its ``command``)."""
    if path is None:
        return [], []
    old = read_json(path)
    keep = [r for r in old["rows"] if r["label"] not in labels]
    rows = [{**r, "machine": r.get("machine", old["machine"])} for r in keep]
    return rows, [*old.get("earlier_commands", []), old["command"]]


def row(label: str, runs: str, split: str = "val") -> dict:
    run, _, pool5_run = runs.partition(",")
    run = Path(run)
    cfg = relative_paths(yaml.safe_load((run / "config.yaml").read_text()))  # as committed
    evals = {}
    for v in VARIANTS:
        src = Path(pool5_run) if (v == "pool5" and pool5_run) else run
        path = src / "eval" / f"{split}_{v}" / "eval.json"
        if path.exists():
            evals[v] = read_json(path)
    ft = run / "finetune" / "metrics.json"
    metrics = read_json(ft) if ft.exists() else {}
    svm = run / "svm_fc7" / "stats.json"
    return {
        "label": label,
        "run": str(run),
        "pool5_run": pool5_run or str(run),
        "backbone": cfg["features"]["backbone"],
        "top_blocks": cfg["features"].get("top_blocks", 0),
        "conv_blocks": cfg["finetune"].get("conv_blocks", 0),
        "conv_lr": cfg["finetune"].get("conv_lr"),
        "map": {v: e["map"] for v, e in evals.items()},
        "ap": {v: e["ap"] for v, e in evals.items()},
        "val_images": {v: e["images"] for v, e in evals.items()},
        "commit": {v: e.get("commit") for v, e in evals.items()},
        "finetune_seconds": metrics.get("seconds"),
        "finetune_heldout_accuracy": metrics.get("heldout_accuracy"),
        "svm_fc7_seconds": read_json(svm).get("seconds") if svm.exists() else None,
        "config": cfg,
    }


def table(rows: list[dict]) -> str:
    head = "| tap / training | " + " | ".join(VARIANTS) + " |"
    lines = [head, "|" + "---|" * (len(VARIANTS) + 1)]
    for r in rows:
        cells = [f"{100 * r['map'][v]:.1f}" if v in r["map"] else "-" for v in VARIANTS]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    args = parse_args()
    here = machine()
    new = [{**row(*spec.split("=", 1), split=args.split), "machine": here} for spec in args.row]
    kept, earlier = kept_rows(args.keep, {r["label"] for r in new})
    out = {
        "protocol": args.protocol,
        "split": args.split,
        "command": shlex.join(["python", "-m", "experiments.tap_study", *sys.argv[1:]]),
        "rows": kept + new,
        "machine": here,  # this call's; each row has the machine it was collected on
    }
    if earlier:
        out["earlier_commands"] = earlier
    atomic_write_json(args.out, out)
    print(table(out["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
