"""Rewrite the README's VOC2007 results table from ``results/*.json`` (written by scripts/voc07.py).

The table sits between the markers ``<!-- results:start -->`` and ``<!-- results:end -->``; each
row is one results file, next to the paper's number for the same row (VOC07 *test*, ZF-5,
trained on trainval: not a like-for-like comparison, as the table's caption says).

Usage: ``.venv/bin/python scripts/results_table.py [--readme README.md] [--results results]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"

#: Paper table 10 (VOC07 test, ZF-5, trained on VOC07 trainval): variant -> {scales: mAP}.
PAPER = {
    "pool5": {1: 43.0, 5: 44.9},
    "fc7": {1: 54.5, 5: 55.2},
    "fc7_bb": {1: 58.0, 5: 59.2},
}
LABELS = {
    "pool5": "SVM on pool5 (SPP vector), no fine-tuning",
    "fc7": "SVM on fine-tuned fc7",
    "fc7_bb": "SVM on fine-tuned fc7 + bbox regression",
    "softmax": "fine-tuned softmax (no SVM)",
    "softmax_bb": "fine-tuned softmax + bbox regression",
    "random": "random scores, same proposals (chance)",
}
ORDER = list(LABELS)


def table(results: list[dict]) -> str:
    """Markdown table of the results, sorted by scales then variant order."""
    rows = [
        "| scales | variant | mAP (VOC07 val, ours) | paper (VOC07 test, ZF-5) | test s/img "
        "| commit |",
        "|---|---|---|---|---|---|",
    ]
    key = lambda r: (len(r["scales"]), ORDER.index(r["variant"]) if r["variant"] in ORDER else 99)  # noqa: E731
    for r in sorted(results, key=key):
        n = len(r["scales"])
        paper = PAPER.get(r["variant"], {}).get(n)
        secs = sum(r["test_seconds_per_image"].values())
        rows.append(
            f"| {n} | {LABELS.get(r['variant'], r['variant'])} | {100 * r['map']:.1f} | "
            f"{'' if paper is None else f'{paper:.1f}'} | {secs:.2f} | `{r['commit'][:10]}` |"
        )
    return "\n".join(rows)


def caption(results: list[dict]) -> str:
    r = results[0]
    stages = {}
    for res in results:
        stages[len(res["scales"])] = (res["stage_seconds"], res["peak_rss_gb"])
    lines = [
        f"Protocol: **{r['protocol']}** ({r['train_images']} train images, {r['val_images']} val "
        f"images, VOC07 11-point AP, difficult ignored); backbone **{r['backbone']}** "
        f"(`{r['weights']}`, sha256 `{(r['weights_sha256'] or '')[:12]}...`), conv layers frozen; "
        f"proposals imported from `{r['config']['data']['proposals']}`; machine: "
        f"{r['machine']['cpu_model']}, {r['machine']['cpu_count']} cores, "
        f"device {r['machine']['device']}. The paper trains on VOC07 trainval (twice our "
        "images) and tests on VOC07 test with ZF-5: its column is the anchor, not a like-for-like "
        "number. Reproduce with `make voc07` (command in each results file).",
        "",
    ]
    for n, (st, rss) in sorted(stages.items()):
        parts = ", ".join(f"{k} {v / 60:.0f} min" for k, v in st.items())
        lines.append(f"- {n}-scale stage wall times (2 CPU cores): {parts}; peak RSS {rss} GiB.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--results", type=Path, default=ROOT / "results")
    args = p.parse_args()
    results = [json.loads(f.read_text()) for f in sorted(args.results.glob("voc07_*.json"))]
    if not results:
        raise SystemExit(f"no results/voc07_*.json in {args.results}")
    text = args.readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{args.readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    body = f"{START}\n{caption(results)}\n\n{table(results)}\n{END}"
    args.readme.write_text(head + body + tail)
    print(f"updated {args.readme} from {len(results)} results files")


if __name__ == "__main__":
    main()
