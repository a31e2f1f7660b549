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
#: Results files without a ``recipe`` key are the first recipe's.
BASELINE_RECIPE = "mnv2_frozen"
#: recipe -> its column heading (``experiments.voc07 --recipe``).
RECIPES = {
    "mnv2_frozen": "MobileNetV2 `features[13]` (96 ch), frozen",
    "mnv2_d17_frozen": "MobileNetV2 to `features[17]` (320 ch, dilated), frozen",
    "lite0_d_frozen": "EfficientNet-Lite0 to block 15 (320 ch, dilated), frozen",
    "lite0_d_dedup": "the same, SVM negatives deduplicated (paper 4.1)",
}


def recipe_of(r: dict) -> str:
    return r.get("recipe") or BASELINE_RECIPE


def recipes_in(results: list[dict]) -> list[str]:
    """The recipes of ``results``: the known ones in :data:`RECIPES` order, then the others."""
    have = {recipe_of(r) for r in results}
    return [k for k in RECIPES if k in have] + sorted(have - set(RECIPES))


def table(results: list[dict]) -> str:
    """Markdown table, one row per (scales, variant), one mAP column per recipe side by side,
    the last recipe's gain over the first, and the paper's number."""
    recipes = recipes_in(results)
    cells: dict[tuple[int, str], dict[str, float]] = {}
    for r in results:
        cells.setdefault((len(r["scales"]), r["variant"]), {})[recipe_of(r)] = 100 * r["map"]
    gain = len(recipes) > 1
    rows = [
        "| scales | variant | "
        + " | ".join(RECIPES.get(k, k) for k in recipes)
        + (" | gain, last over first |" if gain else " |")
        + " paper (VOC07 test, ZF-5) |",
        "|---|---|" + "---|" * (len(recipes) + gain + 1),
    ]
    order = lambda k: (k[0], ORDER.index(k[1]) if k[1] in ORDER else 99)  # noqa: E731
    for n, variant in sorted(cells, key=order):
        row = cells[(n, variant)]
        maps = [f"{row[k]:.1f}" if k in row else "" for k in recipes]
        first, last = row.get(recipes[0]), row.get(recipes[-1])
        diff = f"{last - first:+.1f}" if first is not None and last is not None else ""
        paper = PAPER.get(variant, {}).get(n)
        rows.append(
            f"| {n} | {LABELS.get(variant, variant)} | {' | '.join(maps)} |"
            + (f" {diff} |" if gain else "")
            + f" {'' if paper is None else f'{paper:.1f}'} |"
        )
    return "\n".join(rows)


def details(results: list[dict]) -> str:
    """Markdown table of every results file: its recipe, mAP, test time and commit."""
    rows = [
        "| recipe | scales | variant | mAP | test s/img | commit |",
        "|---|---|---|---|---|---|",
    ]
    recipes = recipes_in(results)
    key = lambda r: (  # noqa: E731
        recipes.index(recipe_of(r)),
        len(r["scales"]),
        ORDER.index(r["variant"]) if r["variant"] in ORDER else 99,
    )
    for r in sorted(results, key=key):
        secs = sum(r["test_seconds_per_image"].values())
        rows.append(
            f"| {recipe_of(r)} | {len(r['scales'])} | {r['variant']} | {100 * r['map']:.1f} | "
            f"{secs:.2f} | `{r['commit'][:10]}` |"
        )
    return "\n".join(rows)


def caption(results: list[dict]) -> str:
    r = results[0]
    runs = {}
    for res in results:
        runs[(recipe_of(res), len(res["scales"]))] = res
    lines = [
        f"Protocol: **{r['protocol']}** ({r['train_images']} train images, {r['val_images']} val "
        "images, VOC07 11-point AP, difficult ignored); ImageNet weights and selective-search "
        f"proposals from `../shared` (proposals `{r['config']['data']['proposals']}`). The paper "
        "trains on VOC07 trainval (twice our images) and tests on VOC07 test with ZF-5: its "
        "column is the anchor, not a like-for-like number. Reproduce with the command in each "
        "results file (`make voc07`, `make voc07-d17-1scale`, `make voc07-lite0-1scale`, "
        "`make voc07-lite0-5scale`); "
        "`make repro-1scale` reruns the "
        "baseline's 1-scale run on a clean clone and compares (`experiments/repro.sh`).",
        "",
    ]
    recipes = recipes_in(results)
    for rec, n in sorted(runs, key=lambda k: (recipes.index(k[0]), k[1])):
        res = runs[(rec, n)]
        st, threads, m = res["stage_seconds"], res.get("stage_threads", {}), res["machine"]
        # a 1-thread stage ran beside another one (experiments.voc07 --lanes 2)
        parts = ", ".join(
            f"{k} {v / 60:.0f} min{' (1 thread, in a lane)' if threads.get(k) == 1 else ''}"
            for k, v in st.items()
        )
        # a variant run (experiments.voc07 --stages-from): the times are the shared run's
        shared = res.get("stages_from")
        whose = f" of `{shared}` (this run shares its stages before the SVMs)" if shared else ""
        lines.append(
            f"- {rec}, {n} scale{'s' if n > 1 else ''}: backbone {res['backbone']} "
            f"(sha256 `{(res['weights_sha256'] or '')[:12]}...`); stage wall times{whose} "
            f"({m['cpu_model']}, {m['cpu_count']} cores, device {m['device']}): {parts}; peak "
            f"RSS of one stage {res['peak_rss_gb']} GiB."
        )
    return "\n".join(lines)


def reproductions(folder: Path) -> list[str]:
    """One line per ``results/reproductions/*.json`` written by experiments.repro_check (the
    folder also holds other checks' files, e.g. the 300 -> 300 seed study: not reproductions of
    a full run, and described in the docs where they are cited)."""
    lines = []
    for path in sorted(folder.glob("*.json")):
        r = json.loads(path.read_text())
        if "reproduced" not in r:
            continue
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
        body = "\n".join([caption(results), *repro])
        body += f"\n\n{table(results)}\n\nEvery results file:\n\n{details(results)}"
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
