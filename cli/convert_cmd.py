"""``sppdet convert``: a VOC devkit split to a COCO json, or a COCO json to a VOC devkit split."""

from __future__ import annotations

from pathlib import Path

import click

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command("convert")
@click.option("--devkit", type=_DIR, help="Source: VOCdevkit (or VOC<year>) directory.")
@click.option("--split", help="With --devkit: the split to convert, e.g. trainval.")
@click.option(
    "--year", default="2007", show_default=True, help="VOC year of --devkit and of --to-voc."
)
@click.option(
    "--coco",
    "coco_json",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Source: a COCO detection json.",
)
@click.option("--images", type=_DIR, help="With --coco: the directory of its file_names.")
@click.option(
    "--to-coco",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Target: write this COCO json (file_names relative to the images' common directory).",
)
@click.option(
    "--to-voc",
    type=click.Path(file_okay=False, path_type=Path),
    help="Target: write a VOC<year> tree (JPEGs hard-linked) under this devkit directory.",
)
@click.option("--out-split", help="With --to-voc: split name to write (default: the source's).")
@click.option(
    "--classes",
    help="Comma-separated classes to keep, relabelled in this order; images left without a "
    "non-difficult object are dropped.",
)
@click.option("--keep-empty", is_flag=True, help="With --classes: keep images left empty.")
@click.option("--limit", type=click.IntRange(min=1), help="Only the first N images.")
@click.option("--copy-images", is_flag=True, help="With --to-voc: copy JPEGs, never hard-link.")
def command(
    devkit: Path | None,
    split: str | None,
    year: str,
    coco_json: Path | None,
    images: Path | None,
    to_coco: Path | None,
    to_voc: Path | None,
    out_split: str | None,
    classes: str | None,
    keep_empty: bool,
    limit: int | None,
    copy_images: bool,
) -> None:
    """Convert a dataset between the VOC devkit and COCO json layouts.

    \b
    sppdet convert (--devkit DIR --split S [--year Y] | --coco ANN.json --images DIR)
                   (--to-coco OUT.json | --to-voc OUT_DEVKIT [--out-split S])
                   [--classes a,b] [--limit N]
    """
    from sppdet.coco_data import load_coco
    from sppdet.convert import default_image_root, subset, write_coco, write_voc
    from sppdet.datasets import load_voc

    _check_options(devkit, split, coco_json, images, to_coco, to_voc)
    if to_coco is not None and (out_split or copy_images):
        raise click.UsageError("--out-split and --copy-images go with --to-voc")
    if keep_empty and classes is None:
        raise click.UsageError("--keep-empty goes with --classes")
    names = _parse_classes(classes)
    load_limit = limit if names is None else None  # select classes first, then limit
    if devkit is not None:
        dataset = load_voc(devkit, split, year=year, limit=load_limit)
    else:
        dataset = load_coco(coco_json, images, limit=load_limit)
    dataset = subset(dataset, names, limit, keep_empty=keep_empty)
    if to_coco is not None:
        written = write_coco(dataset, to_coco)
        where = f"{written} (file_names relative to {default_image_root(dataset)})"
    else:
        out_split = out_split or dataset.split
        root = write_voc(dataset, to_voc, split=out_split, year=year, link_images=not copy_images)
        where = f"{root} split {out_split}"
    counts = dict.fromkeys(dataset.classes, 0)
    difficult = 0
    for record in dataset:
        for label in record.labels.tolist():
            counts[dataset.classes[label]] += 1
        difficult += int(record.difficult.sum())
    per_class = ", ".join(f"{name} {n}" for name, n in counts.items())
    click.echo(
        f"wrote {len(dataset)} images, {sum(counts.values())} objects ({per_class}; "
        f"{difficult} difficult) to {where}"
    )


def _check_options(devkit, split, coco_json, images, to_coco, to_voc) -> None:
    """One source and one target, each with its companion option."""
    if (devkit is None) == (coco_json is None):
        raise click.UsageError(
            "give one source: --devkit DIR --split S, or --coco JSON --images DIR"
        )
    if devkit is not None and (split is None or images is not None):
        raise click.UsageError("--devkit needs --split (and takes no --images)")
    if coco_json is not None and (images is None or split is not None):
        raise click.UsageError("--coco needs --images (and takes no --split: use --out-split)")
    if (to_coco is None) == (to_voc is None):
        raise click.UsageError("give one target: --to-coco OUT.json or --to-voc OUT_DEVKIT")


def _parse_classes(value: str | None) -> list[str] | None:
    """``"cat, dog"`` -> ``["cat", "dog"]``; UsageError for an empty name."""
    if value is None:
        return None
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise click.UsageError(f"--classes: empty class name in {value!r}")
    return names
