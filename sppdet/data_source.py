"""Where a split's images and boxes come from: a VOC devkit, or a COCO json and its images.

A VOC devkit holds every split (``ImageSets/Main/<split>.txt``); COCO users have one json per
split (``instances_train.json``, ``instances_val.json``), each with its image directory. A run
stores the source of its training split (``data.devkit``, or ``data.coco`` and ``data.images``)
and the commands that read another split are given its source (``--devkit`` or ``--coco FILE
--images DIR``). The classes of a COCO run are its training file's categories, sorted by id; the
mapping between COCO category ids and labels is kept in the run (``RUN/categories.json``), and a
split whose file has other categories is refused (:func:`check_categories`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from sppdet import storage as S
from sppdet.coco_data import load_coco
from sppdet.datasets import Dataset, load_voc
from sppdet.errors import ConfigError, DataError

__all__ = ["DataSource", "check_categories", "CATEGORIES_FILE"]

CATEGORIES_FILE = "categories.json"


@dataclass(frozen=True)
class DataSource:
    """One dataset source: ``devkit`` (VOC layout), or ``coco`` (a COCO json) with ``images``
    (the directory its ``file_name`` entries are relative to; default: the json's directory)."""

    devkit: str | None = None
    coco: str | None = None
    images: str | None = None

    def __post_init__(self) -> None:
        if (self.devkit is None) == (self.coco is None):
            raise ConfigError(
                "give one dataset: a VOC devkit (--devkit DIR) or a COCO json (--coco FILE "
                f"--images DIR), not {'both' if self.devkit else 'neither'}"
            )
        if self.images is not None and self.coco is None:
            raise ConfigError("--images goes with --coco (a VOC devkit has its JPEGImages/)")
        for what, path in (("devkit", self.devkit), ("coco", self.coco), ("images", self.images)):
            if path is not None and not os.path.exists(path):
                raise ConfigError(f"{what} {path} does not exist")

    @property
    def is_coco(self) -> bool:
        return self.coco is not None

    @property
    def image_dir(self) -> str | None:
        """COCO: the image directory (the json's own directory unless ``images`` says)."""
        if self.coco is None:
            return None
        return self.images if self.images is not None else str(Path(self.coco).parent)

    def load(
        self,
        split: str,
        *,
        year: str = "2007",
        classes: str | None = None,
        limit: int | None = None,
    ) -> Dataset:
        """The dataset of ``split``: ``ImageSets/Main/<split>.txt`` of the devkit, or the whole
        COCO json named ``split`` (``classes``: a VOC class-list file; a COCO json's categories
        are its classes).

        Raises:
            ConfigError: a class-list file with a COCO json. DataError: unreadable data.
        """
        if self.coco is None:
            return load_voc(self.devkit, split, year=year, classes=classes, limit=limit)
        if classes is not None:
            raise ConfigError(
                f"data.classes ({classes}) is for VOC devkits: the classes of a COCO dataset "
                f"are its categories ({self.coco})"
            )
        return load_coco(self.coco, self.image_dir, limit=limit, split=split)

    def describe(self) -> str:
        return f"devkit {self.devkit}" if self.coco is None else f"COCO {self.coco}"


def check_categories(run_root: str | os.PathLike, dataset: Dataset) -> None:
    """Record a COCO dataset's categories in the run (first dataset read), or check them.

    Labels are positions in the category list, so a split whose file lists other categories
    (other ids, names or order) would silently score one class as another.

    Raises:
        DataError: the categories differ from those the run recorded, naming both.
    """
    if dataset.category_ids is None:
        return
    path = Path(run_root) / CATEGORIES_FILE
    pairs = zip(dataset.category_ids, dataset.classes, strict=True)
    mine = [{"id": i, "name": n} for i, n in pairs]
    if not path.is_file():
        source = os.path.abspath(dataset.coco_annotation)
        S.atomic_write_json(path, {"categories": mine, "source": source})
        return
    stored = S.read_json(path)
    if stored["categories"] != mine:
        raise DataError(
            f"{dataset.coco_annotation} has categories {_names(mine)}, but the run was made "
            f"with {_names(stored['categories'])} (from {stored['source']}, kept in {path}): "
            "the splits of one dataset must share their categories"
        )


def _names(categories: list[dict]) -> str:
    return ", ".join(f"{c['id']}:{c['name']}" for c in categories)
