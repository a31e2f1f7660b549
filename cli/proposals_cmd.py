"""``sppdet proposals``: compute (or import) a split's selective-search boxes; report recall."""

from __future__ import annotations

from pathlib import Path

import click

from sppdet.proposals import BACKENDS, MODES
from sppdet_cli.data_options import data_options, data_source


@click.command("proposals")
@data_options
@click.option(
    "--split", required=True, help="Split, e.g. train, val (with --coco: a name for its images)."
)
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N images of the split.")
@click.option("--backend", type=click.Choice(BACKENDS), help="Default: ProposalConfig's.")
@click.option(
    "--mode", type=click.Choice(MODES), help="Diversification; default: ProposalConfig's."
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker processes (one core each).",
)
@click.option(
    "--out",
    "run_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/proposals"),
    show_default=True,
    help="Run directory; boxes go to RUN_DIR/proposals/<split>.npz.",
)
@click.option(
    "--import",
    "import_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Import precomputed boxes (.npz as in shared/, R-CNN .mat).",
)
@click.option("--recall", is_flag=True, help="Report recall@0.5/0.7, MABO, boxes and time.")
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Recall JSON path (implies --recall); the PNG curve goes beside it.",
)
def command(
    devkit,
    coco,
    images,
    split,
    limit,
    backend,
    mode,
    workers,
    run_dir,
    import_path,
    recall,
    json_out,
):
    """Selective-search proposals of a split (a VOC devkit's or a COCO json's), stored in
    RUN_DIR (resumable; reused if done)."""
    import dataclasses
    import json

    from sppdet.proposal_sources import ensure_proposals
    from sppdet.proposal_store import read_stats, store_path
    from sppdet.proposals import ProposalConfig
    from sppdet.recall import proposal_recall, write_recall_report
    from sppdet.storage import git_commit

    changes = {k: v for k, v in {"backend": backend, "mode": mode}.items() if v is not None}
    config = dataclasses.replace(ProposalConfig(), **changes)
    from sppdet_cli.distributed import init_from_env

    dist = init_from_env()  # torchrun: the images are sharded over the processes
    dataset = data_source(devkit, coco, images).load(split, limit=limit)
    pset = ensure_proposals(
        dataset, config, run_dir, workers=workers, import_path=import_path, dist=dist
    )
    if not dist.main:
        return
    path = store_path(run_dir, dataset.split)
    click.echo(f"{path}: {len(dataset)} images, {pset.num_boxes().mean():.0f} boxes/image")
    if not (recall or json_out):
        return
    stats = read_stats(path) or {}
    report = proposal_recall(dataset, pset, seconds_per_image=stats.get("seconds_per_image"))
    report.update(source=pset.config.get("source", pset.config.get("proposals")), store=str(path))
    report.update(config=dataclasses.asdict(config), commit=git_commit())
    json_out = json_out or path.with_name(f"{dataset.split}_recall.json")
    png = write_recall_report(report, json_out, title=f"{dataset.name} proposals")
    keys = ("recall_0.5", "recall_0.7", "mabo", "abo_all", "boxes_per_image", "seconds_per_image")
    click.echo(json.dumps({k: report[k] for k in keys + ("images",)}))
    click.echo(f"wrote {json_out} and {png}")
