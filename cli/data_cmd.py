"""``sppdet make-synthetic``: write a small synthetic VOC-format dataset for offline demos."""

from __future__ import annotations

from pathlib import Path

import click

from sppdet.synthetic import make_synthetic_voc


def _parse_size(_ctx: click.Context, _param: click.Parameter, value: str) -> tuple[int, int]:
    """``"320x240"`` -> ``(320, 240)``."""
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT such as 320x240, got {value!r}") from None
    if width < 32 or height < 32:
        raise click.BadParameter(f"images must be at least 32x32, got {value!r}")
    return width, height


@click.command("make-synthetic")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", "-n", type=click.IntRange(min=1), required=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed.")
@click.option(
    "--val-fraction",
    type=click.FloatRange(0.0, 1.0),
    default=0.5,
    show_default=True,
    help="Share of images in val (the rest is train; test.txt repeats val).",
)
@click.option(
    "--size", default="320x240", show_default=True, callback=_parse_size, help="WIDTHxHEIGHT."
)
def command(out: Path, images: int, seed: int, val_fraction: float, size: tuple[int, int]) -> None:
    """Write a synthetic VOC2007-layout dataset (4 shape classes) under OUT/VOC2007."""
    summary = make_synthetic_voc(
        out, images=images, seed=seed, val_fraction=val_fraction, size=size
    )
    click.echo(summary.line())
