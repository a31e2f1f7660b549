"""Rewrite the generated tables of ``docs/`` from ``results/*.json`` and ``sppdet bench`` files.

The VOC2007 table (``results/*.json``, written by ``experiments.voc07``) sits in
``docs/results.md`` between the markers ``<!-- results:start -->`` and ``<!-- results:end -->``;
each row is one results file, next to the paper's number for the same row (VOC07 *test*, ZF-5,
trained on trainval: not a like-for-like comparison, as the table's caption says). The speed
tables (``--bench FILE``, repeatable) go between ``<!-- bench:start -->`` and
``<!-- bench:end -->`` of ``docs/speed.md``.

Usage: ``.venv/bin/python -m experiments.results_table [--results-doc docs/results.md]
[--results results] [--bench benchmarks/NAME.json ...] [--speed-doc docs/speed.md]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
BENCH_START, BENCH_END = "<!-- bench:start -->", "<!-- bench:end -->"
#: Stages of a bench row, in pipeline order (proposals are excluded from the ratios).
BENCH_STAGES = ("warp", "conv", "spp", "fc", "svm", "bbox", "nms")

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
        stages[len(res["scales"])] = (
            res["stage_seconds"],
            res.get("stage_threads", {}),
            res["peak_rss_gb"],
            res["machine"],
        )
    lines = [
        f"Protocol: **{r['protocol']}** ({r['train_images']} train images, {r['val_images']} val "
        f"images, VOC07 11-point AP, difficult ignored); backbone **{r['backbone']}** "
        f"(`{r['weights']}`, sha256 `{(r['weights_sha256'] or '')[:12]}...`), conv layers frozen; "
        f"proposals imported from `{r['config']['data']['proposals']}`; machines below. "
        "The paper trains on VOC07 trainval (twice our "
        "images) and tests on VOC07 test with ZF-5: its column is the anchor, not a like-for-like "
        "number. Reproduce with `make voc07` (command in each results file); `make repro-1scale` "
        "reruns the 1-scale one on a clean clone and compares (`experiments/repro.sh`).",
        "",
    ]
    for n, (st, threads, rss, m) in sorted(stages.items()):
        # a 1-thread stage ran beside another one (experiments.voc07 --lanes 2)
        parts = ", ".join(
            f"{k} {v / 60:.0f} min{' (1 thread, in a lane)' if threads.get(k) == 1 else ''}"
            for k, v in st.items()
        )
        lines.append(
            f"- {n}-scale stage wall times ({m['cpu_model']}, {m['cpu_count']} cores, device "
            f"{m['device']}): {parts}; peak RSS of one stage {rss} GiB."
        )
    return "\n".join(lines)


def reproductions(folder: Path) -> list[str]:
    """One line per ``results/reproductions/*.json`` (experiments.repro_check)."""
    lines = []
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        v = r["variants"]
        first = next(iter(v.values()))
        diffs = ", ".join(f"{k} {x['diff_points']:+.2f}" for k, x in v.items())
        worst = max(x["max_class_ap_diff_points"] for x in v.values())
        same = all(x.get("identical") for x in v.values())
        lines.append(
            f"- Reproduction of {r['name']}: a rerun on a clean clone "
            f"({first['rerun_machine']}) against the committed results "
            f"({first['committed_machine']}; both commits in the file), mAP difference "
            f"in points: {diffs}; largest per-class AP difference {worst:.2f}; within "
            f"{r['tol_points']} points: {'yes' if r['reproduced'] else 'no'}"
            f"{' (every mAP and AP the same float)' if same else ''} "
            f"(`results/reproductions/{path.name}`)."
        )
    return lines


def bench_table(path: Path) -> str:
    """Markdown table of one ``sppdet bench`` file: seconds per image by stage and the ratios."""
    b = json.loads(path.read_text())
    stages = list(BENCH_STAGES)
    rows = [
        "| method | " + " | ".join(stages) + " | total s/img | R-CNN / this |",
        "|---|" + "---|" * (len(stages) + 2),
    ]
    rcnn = b["methods"].get("rcnn", {}).get("seconds_per_image")
    for m, r in b["methods"].items():
        cells = " | ".join(f"{r['stages'].get(s, 0.0):.3f}" for s in stages)
        ratio = f"{rcnn / r['seconds_per_image']:.1f}x" if rcnn else ""
        rows.append(f"| {m} | {cells} | **{r['seconds_per_image']:.3f}** | {ratio} |")
    t = b["test_config"]
    m = b["machine"]
    rows += [
        "",
        f"`{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}`: {b['images']} "
        f"{b['split']} images, {b['proposals_per_image']:.0f} proposals/image, device "
        f"{b['device']}, {m['cpu_model']}, {m['threads']} threads, torch {m['torch']}; "
        f"test path: dedup {t['dedup']}, fc6/fc7 SVD ranks {t['svd_fc6']}/{t['svd_fc7']}, fc "
        f"{t['fc_dtype']}, conv {b.get('conv_dtype', 'float32')}; peak RSS "
        f"{b['peak_rss_gb']:.2f} GB; command `{b['command']}`.",
    ]
    return "\n".join(rows)


def _replace(text: str, start: str, end: str, body: str, readme: Path) -> str:
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return head + f"{start}\n{body}\n{end}" + tail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=ROOT / "results")
    p.add_argument("--results-doc", type=Path, default=ROOT / "docs" / "results.md")
    p.add_argument(
        "--bench",
        type=Path,
        action="append",
        help="A sppdet bench JSON for the speed tables (repeat for several, in order).",
    )
    p.add_argument("--speed-doc", type=Path, default=ROOT / "docs" / "speed.md")
    args = p.parse_args()
    results = [json.loads(f.read_text()) for f in sorted(args.results.glob("voc07_*.json"))]
    if not results and args.bench is None:
        raise SystemExit(f"no results/voc07_*.json in {args.results} and no --bench file")
    if results:
        repro = reproductions(args.results / "reproductions")
        body = "\n".join([caption(results), *repro]) + f"\n\n{table(results)}"
        _rewrite(args.results_doc, START, END, body)
        print(f"updated {args.results_doc} from {len(results)} results files")
    if args.bench is not None:
        body = "\n\n".join(bench_table(b) for b in args.bench)
        _rewrite(args.speed_doc, BENCH_START, BENCH_END, body)
        print(f"updated {args.speed_doc} from {len(args.bench)} bench files")


def _rewrite(doc: Path, start: str, end: str, body: str) -> None:
    doc.write_text(_replace(doc.read_text(), start, end, body, doc))


if __name__ == "__main__":
    main()
