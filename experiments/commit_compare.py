"""Compare the ``eval --ablations --json`` files of one experiment run at several commits
(``experiments/commit_compare.sh``): per variant, each run's mAP and its largest per-class AP
difference from the first run, in points::

    python -m experiments.commit_compare --out results/reproductions/X.json \\
        --note "..." runs/cc/old.ablations.json runs/cc/new.ablations.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sppdet.bench import provenance
from sppdet.storage import atomic_write_json, read_json


def compare(runs: dict[str, dict]) -> dict:
    """``{variant: {run: {map, max_class_ap_diff_points, same_floats}}}`` against the first run."""
    (ref_name, ref), *_ = runs.items()
    out: dict[str, dict] = {}
    for variant, base in ref.items():
        row = {}
        for name, run in runs.items():
            got = run[variant]
            diffs = [abs(got["ap"][c] - base["ap"][c]) * 100 for c in base["ap"]]
            row[name] = {
                "map": got["map"],
                "diff_points": (got["map"] - base["map"]) * 100,
                "max_class_ap_diff_points": max(diffs),
                "same_floats": got["ap"] == base["ap"],
            }
        out[variant.removeprefix("val_")] = row
    return {"reference": ref_name, "variants": out}


def _eval_commits(ablations: Path) -> list[str]:
    """The commits of the run's own evaluations (``RUN/eval/val_*/eval.json``; ``-dirty``: a
    tree with uncommitted changes, such as a reverted commit)."""
    run = ablations.with_name(ablations.name.removesuffix(".ablations.json"))
    return sorted({read_json(e).get("commit") for e in run.glob("eval/val_*/eval.json")})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="NAME.ablations.json files, first = ref")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--note", default="", help="What the runs are (commits, reverts, threads).")
    args = p.parse_args()
    runs = {f.name.removesuffix(".ablations.json"): read_json(f) for f in args.files}
    result = compare(runs)
    result["eval_commits"] = {
        f.name.removesuffix(".ablations.json"): _eval_commits(f) for f in args.files
    }
    print(f"{'variant':<12}" + "".join(f"{n:>14}" for n in runs))
    for variant, row in result["variants"].items():
        cells = "".join(
            f"{100 * r['map']:>8.2f} {'=' if r['same_floats'] else '~'}"
            f"{r['max_class_ap_diff_points']:>4.1f}"
            for r in row.values()
        )
        print(f"{variant:<12}{cells}")
    record = {
        "note": args.note,
        **result,
        **provenance(["python", "-m", "experiments.commit_compare"]),
    }
    atomic_write_json(args.out, record)


if __name__ == "__main__":
    main()
