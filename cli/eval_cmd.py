"""``sppdet eval``: VOC2007 AP of detections (comp4 files), devkit-exact; on a COCO json, the
COCO metrics (pycocotools) and a COCO results file too."""

from __future__ import annotations

from pathlib import Path

import click

from sppdet.detect import SCORERS
from sppdet_cli.data_options import data_options, data_source
from sppdet_cli.fast_options import fast_options, fast_test

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command("eval")
@click.option(
    "--voc2007",
    is_flag=True,
    help="Evaluate a PASCAL VOC2007 split of --devkit with the devkit's rules (11-point AP).",
)
@data_options
@click.option(
    "--split", help="Split to evaluate, e.g. val (with --coco: a name for its images; default val)."
)
@click.option(
    "--detections",
    type=_DIR,
    help="Directory of comp4_det_<split>_<class>.txt files. A class without its file has no "
    "detections (as in the devkit; warned); no file of the split for any class is an error.",
)
@click.option("--run", "run_dir", type=_DIR, help="A trained run: detect over the split first.")
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A model file (`sppdet export`): detect over the split first, as with --run.",
)
@click.option(
    "--model-dir",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --model: directory for its proposals and eval outputs (default "
    "runs/<model stem>-<sha256[:8]>).",
)
@click.option("--scorer", type=click.Choice(SCORERS), help="With --run: scores used.")
@click.option("--layer", type=click.Choice(["fc7", "fc6", "pool5"]), help="With --run: SVM layer.")
@click.option("--no-bbox-reg", is_flag=True, help="With --run: skip box regression.")
@click.option(
    "--ablations",
    is_flag=True,
    help="With --run: every trained variant (pool5, fc7, fc7_bb, softmax, softmax_bb, random) "
    "in one pass, each to RUN/eval/<split>_<variant>/.",
)
@click.option(
    "--fast-path",
    is_flag=True,
    help="With --ablations: also the speed settings (SVD ranks, bf16, no dedup) over fc7_bb.",
)
@click.option(
    "--box-vote",
    type=click.FloatRange(min=0, max=1, min_open=True),
    help="With --ablations: also each fine-tuned row with box voting after NMS at this IoU "
    "(Gidaris & Komodakis: 0.5), as <variant>_vote, in the same pass.",
)
@click.option("--name", help="With --run: output name under RUN/eval/ (default: the split).")
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write {map, ap} here.")
@click.option("--use-2010-metric", is_flag=True, help="All-point AP (VOC2010+), not 11-point.")
@click.option("--classes", type=click.Path(exists=True, dir_okay=False), help="Class list file.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N images of the split.")
@click.option("--plots", type=click.Path(path_type=Path), help="Write pr_curves.png here.")
@click.option(
    "--no-cache",
    "no_cache",
    is_flag=True,
    help="With --run / --model: compute the split's conv maps from the pixels, reading and "
    "storing none (for a disk that cannot hold them; the timings then include conv).",
)
@fast_options
def command(
    voc2007,
    devkit,
    coco,
    images,
    split,
    detections,
    run_dir,
    model,
    out_dir,
    scorer,
    layer,
    no_bbox_reg,
    ablations,
    fast_path,
    box_vote,
    name,
    json_out,
    use_2010_metric,
    classes,
    limit,
    plots,
    no_cache,
    **speed,
):
    """Evaluate detections with the VOC devkit rules (IoU >= 0.5, difficult ignored); with
    --coco also with pycocotools (AP, AP50, AP75, AP small / medium / large, AR), writing the
    detections as a COCO results json beside the comp4 files."""
    from sppdet.comp4 import evaluate_comp4_dir
    from sppdet.storage import atomic_write_json
    from sppdet.viz import plot_pr_curves
    from sppdet.voc_eval import format_ap_table

    data, split = _benchmark(voc2007, devkit, coco, images, split)
    if sum(x is not None for x in (detections, run_dir, model)) != 1:
        raise click.UsageError("give exactly one of --detections DIR, --run RUN_DIR, --model FILE")
    if fast_path and not (detections is None and ablations):
        raise click.UsageError("--fast-path needs --run (or --model) and --ablations")
    if box_vote and not (detections is None and ablations):
        raise click.UsageError("--box-vote needs --run (or --model) and --ablations")
    if no_cache and detections is not None:
        raise click.UsageError("--no-cache needs --run or --model (comp4 files have no maps)")
    if detections is None:
        from sppdet_cli.distributed import init_from_env, main_first

        dist = init_from_env()  # torchrun: the images are sharded over the processes
        run, source = main_first(dist, lambda: open_run_or_model(run_dir, model, out_dir, data))
        test = fast_test(speed)
        opts = {"data": data, "limit": limit, "cache_maps": not no_cache, "dist": dist}
        if ablations:
            _eval_ablations(run, source, split, test, fast_path, box_vote, json_out, opts)
            return
        test.update(scorer=scorer, layer=layer, bbox_reg=False if no_bbox_reg else None)
        _eval_run(run, source, split, test, name, json_out, opts)
        return
    dataset = data.load(split, classes=classes, limit=limit)
    # With --limit the comp4 files may cover the whole split: drop the rest instead of failing.
    result = evaluate_comp4_dir(
        dataset, detections, use_07_metric=not use_2010_metric, strict=limit is None
    )
    click.echo(format_ap_table(result))
    out = result.to_json()
    if dataset.coco_annotation is not None:
        out["coco"] = _coco_of_comp4(dataset, detections, limit, json_out)
    if json_out is not None:
        atomic_write_json(json_out, out)
    if plots is not None:
        plot_pr_curves(result.per_class, plots / "pr_curves.png")


def _benchmark(voc2007, devkit, coco, images, split):
    """``(data, split)``: the data to evaluate on and its split name, checked."""
    data = data_source(devkit, coco, images, required=False)
    if data is not None and data.is_coco:
        if voc2007:
            raise click.UsageError(
                "--voc2007 evaluates a VOC devkit (--devkit); on --coco data eval reports the "
                "COCO metrics and the VOC07 AP together"
            )
        return data, split or "val"
    if not voc2007:  # the flag keeps room for other VOC benchmarks
        raise click.UsageError("give the benchmark: --voc2007 --devkit DIR, or --coco FILE")
    if data is None:
        raise click.UsageError("--voc2007 needs the devkit: --devkit DIR")
    if split is None:
        raise click.UsageError("give the split: --split, e.g. val")
    return data, split


def _coco_of_comp4(dataset, directory, limit, json_out) -> dict:
    """COCO metrics of a comp4 directory on a COCO dataset; its COCO results json is written
    beside ``json_out`` (when given: the detections' directory is the user's input)."""
    from sppdet.coco_eval import COCO_RESULTS, evaluate_coco, write_coco_results
    from sppdet.comp4 import read_comp4

    dets = read_comp4(
        directory, dataset.split, dataset.classes, image_ids=dataset.image_ids, strict=limit is None
    )
    if json_out is None:
        stats = evaluate_coco(dataset, dets)
    else:
        stats = write_coco_results(dataset, dets, Path(json_out).with_name(COCO_RESULTS))
    _echo_coco(stats)
    return stats


def _echo_coco(stats: dict | None, prefix: str = "COCO") -> None:
    """One line of the 12 COCO numbers (percent), when there are any."""
    if stats:  # -1: no ground truth in that size range (pycocotools' convention)
        cells = (f"{k} {100 * v:.1f}" if v >= 0 else f"{k} n/a" for k, v in stats.items())
        click.echo(f"{prefix}: " + ", ".join(cells))


def open_run_or_model(run_dir, model, out_dir, data, device: str = "auto"):
    """``(run, source)``: the run directory and where its trained parts come from (None: the
    run itself; with ``--model``: the model file, its run a directory for proposals and
    outputs)."""
    from sppdet.run import Run

    if run_dir is not None:
        return Run.open(run_dir), None
    from sppdet.model_file import model_run, read_model

    source = read_model(model, device)
    root = out_dir if out_dir is not None else default_model_dir(model)
    return model_run(source, root, data=data), source


def default_model_dir(model: Path) -> Path:
    """``runs/<stem>-<first 8 hex of the file's sha256>``: a re-exported model of the same name
    gets its own directory instead of one made with the old file's settings (refused)."""
    from sppdet.storage import file_sha256

    return Path("runs") / f"{model.stem}-{file_sha256(model)[:8]}"


def _eval_run(run, source, split, test, name, json_out, opts):
    from sppdet.evaluate import evaluate_run
    from sppdet.model_file import with_test
    from sppdet.storage import atomic_write_json
    from sppdet.voc_eval import format_ap_table

    run, source = with_test(run, source, test)
    out = evaluate_run(run, split, out_name=name, source=source, **opts)
    if out is None:  # another rank than 0 (torchrun): rank 0 reports
        return
    result, summary = out
    click.echo(format_ap_table(result))
    _echo_coco(summary.get("coco"))
    t = summary["seconds_per_image"]
    click.echo("seconds/image: " + ", ".join(f"{k} {v:.4f}" for k, v in t.items()))
    if json_out is not None:
        atomic_write_json(json_out, result.to_json())


def _eval_ablations(run, source, split, test, fast_path, box_vote, json_out, opts):
    from sppdet.evaluate import ablation_variants, evaluate_variants, fast_variants, vote_variants
    from sppdet.model_file import with_test
    from sppdet.storage import atomic_write_json
    from sppdet.voc_eval import format_ap_table

    run, source = with_test(run, source, test)
    parts = run if source is None else source
    found = {**ablation_variants(parts), **(fast_variants(parts) if fast_path else {})}
    found |= vote_variants(parts, box_vote) if box_vote else {}
    variants = {f"{split}_{k}": v for k, v in found.items()}
    results = evaluate_variants(run, split, variants, source=source, **opts)
    if not results:  # another rank than 0 (torchrun): rank 0 reports
        return
    rows = []
    for name, (result, summary) in results.items():
        click.echo(f"\n== {name}\n" + format_ap_table(result))
        _echo_coco(summary.get("coco"))
        t = sum(summary["seconds_per_image"].values())
        rows.append(f"{name:<24s} {100 * result.map:6.1f}  {t:7.3f}")
    click.echo(f"\n{'variant':<24s} {'mAP':>6s}  {'s/img':>7s}\n" + "\n".join(rows))
    if json_out is not None:
        atomic_write_json(json_out, {k: r.to_json() for k, (r, _) in results.items()})
