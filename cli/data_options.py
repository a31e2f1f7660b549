"""The dataset options of the commands that read data: ``--devkit DIR`` (a VOC devkit) or
``--coco FILE --images DIR`` (a COCO json of one split and its image directory)."""

from __future__ import annotations

from pathlib import Path

import click

_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def data_options(f):
    """Add ``--devkit``, ``--coco`` and ``--images`` to a command (as ``devkit``, ``coco``,
    ``images``); :func:`data_source` turns them into one source."""
    f = click.option(
        "--images",
        type=_DIR,
        help="With --coco: the directory its file_name entries are in (default: the json's).",
    )(f)
    f = click.option(
        "--coco",
        type=_FILE,
        help="A COCO json of one split (e.g. instances_val.json): its categories are the classes "
        "and iscrowd objects are ignored, as VOC's difficult ones.",
    )(f)
    return click.option("--devkit", type=_DIR, help="VOCdevkit (or VOC2007) directory.")(f)


def data_source(devkit, coco, images, *, required: bool = True):
    """The :class:`~sppdet.data_source.DataSource` the options name (None when none is given
    and ``required`` is false).

    Raises:
        click.UsageError: none given (when required), both, or ``--images`` without ``--coco``.
    """
    from sppdet.data_source import DataSource
    from sppdet.errors import ConfigError

    if devkit is None and coco is None and images is None:
        if required:
            raise click.UsageError("give the data: --devkit DIR (VOC) or --coco FILE --images DIR")
        return None
    try:
        return DataSource(
            devkit=None if devkit is None else str(devkit),
            coco=None if coco is None else str(coco),
            images=None if images is None else str(images),
        )
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from exc
