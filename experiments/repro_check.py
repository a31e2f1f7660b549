"""Compare a rerun of a committed experiment with its committed results (issue 6's check).

Rerun the committed command on a clean checkout (a separate clone, so the recorded commit is
clean), then point this script at the rerun's ``results/`` directory::

    git clone -q . /tmp/repro && (cd /tmp/repro && make venv && make voc07-1scale)
    .venv/bin/python -m experiments.repro_check --name voc07_mnv2_1scale \\
        --rerun /tmp/repro/results --out results/reproductions/voc07_mnv2_1scale.json

Prints one row per variant (committed mAP, rerun mAP, difference) and writes the comparison,
with both runs' commits and machines, to ``--out``. Exits 1 when a variant differs by more than
``--tol`` points, 2 when the rerun is not the same experiment (command, config or weights).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments.repro import NotAReproductionError, compare_results
from sppdet.bench import provenance
from sppdet.storage import atomic_write_json, read_json

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="Result prefix, e.g. voc07_mnv2_1scale.")
    p.add_argument("--committed", type=Path, default=ROOT / "results")
    p.add_argument("--rerun", type=Path, required=True, help="The rerun's results/ directory.")
    p.add_argument("--tol", type=float, default=0.5, help="Largest |mAP diff| in points.")
    p.add_argument("--out", type=Path, help="Write the comparison here (JSON).")
    args = p.parse_args()

    def load(d: Path) -> list[dict]:
        files = sorted(d.glob(f"{args.name}_*.json"))
        if not files:
            raise SystemExit(f"no {args.name}_*.json in {d}")
        return [_read(f) for f in files]

    try:
        out = compare_results(load(args.committed), load(args.rerun), args.tol)
    except NotAReproductionError as e:
        print(f"not a reproduction: {e}", file=sys.stderr)
        return 2
    print(f"{'variant':<12} {'committed':>9} {'rerun':>7} {'diff':>6} {'max class':>9}")
    for name, v in out["variants"].items():
        print(
            f"{name:<12} {v['committed_map']:>9.2f} {v['rerun_map']:>7.2f} "
            f"{v['diff_points']:>+6.2f} {v['max_class_ap_diff_points']:>9.2f}"
        )
    print(f"reproduced within {args.tol} points: {out['reproduced']}")
    if args.out:
        record = {
            "name": args.name,
            **out,
            **provenance(["python", "-m", "experiments.repro_check"]),
        }
        atomic_write_json(args.out, record)
        print(f"wrote {args.out}")
    return 0 if out["reproduced"] else 1


def _read(path: Path) -> dict:
    try:
        return read_json(path)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: not a readable results JSON ({e})") from e


if __name__ == "__main__":
    sys.exit(main())
