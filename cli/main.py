"""The ``sppdet`` command: a click group whose commands are thin shells over library functions."""

from __future__ import annotations

import logging
import os
import sys

import click

from sppdet.errors import SppdetError


class _Group(click.Group):
    """Turns :class:`SppdetError` into a one-line ``error:`` message and exit code 2."""

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except SppdetError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """sppdet: SPP-net object detection (one conv pass per image, spatial pyramid pooling)."""
    # oneDNN keeps compiled conv primitives per input shape (1,024 by default); VOC images come
    # in many sizes, so extraction grew to ~4 GB RSS over 400 images. 16 kept 80 images at
    # 1.5 GB instead of 2.0 GB for the same speed. Read by oneDNN at its first conv.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
    # Thread counts are the caller's, set once before any work: the library never changes them
    # (numba's SPP kernel then runs as many threads as torch; --threads changes both).
    from sppdet.device import set_threads

    set_threads()
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


def _register() -> None:
    # Imported here (not at module top) so each command module stays independent.
    from sppdet_cli import commands

    for command in commands.ALL:
        cli.add_command(command)


_register()


if __name__ == "__main__":  # `python -m sppdet_cli.main` (what torchrun launches)
    cli()
