"""``sppdet bench``: SPP 1-scale / 5-scale vs R-CNN mode, timed side by side."""

from __future__ import annotations

from pathlib import Path

import click

from sppdet_cli.data_options import data_options, data_source
from sppdet_cli.fast_options import bench_options, fast_test

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command("bench")
@data_options
@click.option(
    "--split",
    default="val",
    show_default=True,
    help="Split whose images are timed (with --coco: a name for the file's images).",
)
@click.option("--limit", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--run", "run_dir", type=_DIR, help="A trained run.")
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A model file (`sppdet export`) instead of --run.",
)
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --model: directory for its proposals (default runs/<model stem>-<sha256[:8]>).",
)
@click.option(
    "--methods",
    default="spp_1scale,spp_5scale,rcnn",
    show_default=True,
    help="Comma-separated subset of spp_1scale, spp_5scale, rcnn.",
)
@click.option(
    "--rcnn-batch",
    type=click.IntRange(min=1),
    help="R-CNN mode: windows per conv pass (default: the fastest measured, FeatureConfig's).",
)
@click.option("--name", help="Output name: benchmarks/<name>.json (default bench_<device>).")
@click.option(
    "--out-dir", type=click.Path(path_type=Path), default=Path("benchmarks"), show_default=True
)
@click.option("--device", help="auto | cpu | cuda[:N] (default: the run's).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@bench_options
def command(
    devkit,
    coco,
    images,
    split,
    limit,
    run_dir,
    model,
    model_dir,
    methods,
    rcnn_batch,
    name,
    out_dir,
    device,
    quiet,
    **speed,
):
    """Seconds per image of every stage for SPP-net and R-CNN on the same images and proposals."""
    import dataclasses

    from sppdet.bench import METHODS, bench, format_bench, write_bench
    from sppdet.model_file import with_test
    from sppdet.run import Run
    from sppdet_cli.eval_cmd import open_run_or_model

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown or not chosen:
        raise click.BadParameter(f"unknown methods {unknown}; choose from {list(METHODS)}")
    if (run_dir is None) == (model is None):
        raise click.UsageError("give exactly one of --run RUN and --model MODEL")
    # with --run the data may be the run's own (its devkit); a model file has none
    data = data_source(devkit, coco, images, required=model is not None)
    run, source = open_run_or_model(run_dir, model, model_dir, data, device or "auto")
    if device is not None and source is None:  # first: --conv-dtype auto resolves for it
        run = Run(run.root, dataclasses.replace(run.config, device=device))
    run, source = with_test(run, source, fast_test(speed, conv_default="auto"))
    result = bench(
        run,
        split,
        data=data,
        limit=limit,
        methods=chosen,
        progress=not quiet,
        rcnn_batch=rcnn_batch,
        source=source,
    )
    name = name or f"bench_{run.device.type}"
    json_path, png_path = write_bench(result, out_dir, name)
    click.echo(format_bench(result))
    click.echo(f"-> {json_path}, {png_path}")
