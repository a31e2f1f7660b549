"""COCO-format detection json (via ``pycocotools``) as a :class:`sppdet.datasets.Dataset`.

Same record conventions as the VOC loader (:mod:`sppdet.datasets`): internal xyxy boxes, 0-based
labels; ``iscrowd`` boxes are marked difficult so that evaluation ignores them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sppdet import boxes as B
from sppdet.datasets import PROGRESS_MIN, Dataset, ImageRecord, clean_boxes
from sppdet.errors import ConfigError, DataError
from sppdet.imageio import SizeNotes, annotated_size


def load_coco(
    annotation_json: str | os.PathLike,
    image_dir: str | os.PathLike,
    *,
    limit: int | None = None,
    split: str | None = None,
) -> Dataset:
    """Load a COCO-format detection json (via ``pycocotools``).

    Classes are the categories sorted by category id; ``iscrowd`` boxes become ``difficult`` so
    evaluation ignores them, as VOC does with its difficult boxes. Image ids are
    ``str(coco_image_id)`` (so ``int(record.image_id)`` recovers the COCO id); images are in
    increasing id order.

    Args:
        annotation_json: e.g. ``instances_val2017.json``.
        image_dir: directory holding the ``file_name`` of each image.
        limit: keep only the first ``limit`` images.
        split: split name for the dataset (default: the json's file stem).

    Raises:
        DataError: missing or malformed json, missing image file. ConfigError: bad ``limit``.
    """
    ann_path, image_dir = Path(annotation_json), Path(image_dir)
    coco = _open_coco(ann_path)
    cat_ids = sorted(coco.cats)
    classes = tuple(str(coco.cats[c]["name"]) for c in cat_ids)
    label_of = {c: i for i, c in enumerate(cat_ids)}
    image_ids = sorted(coco.imgs)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be at least 1, got {limit}")
        image_ids = image_ids[:limit]
    split = split or ann_path.stem
    notes = SizeNotes()
    records = [
        _coco_record(coco, i, image_dir, label_of, ann_path, notes)
        for i in tqdm(image_ids, desc=f"load coco_{split}", disable=len(image_ids) < PROGRESS_MIN)
    ]
    notes.warn(f"coco_{split}")
    return Dataset(
        f"coco_{split}", classes, tuple(records), image_dir, split, ann_path, tuple(cat_ids)
    )


def _open_coco(path: Path):
    """``pycocotools.coco.COCO`` of ``path``, its progress prints silenced."""
    from pycocotools.coco import COCO

    if not path.is_file():
        raise DataError(f"COCO annotation file not found: {path}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot parse COCO annotations {path}: {exc}") from exc
    except (KeyError, TypeError, AssertionError) as exc:
        raise DataError(f"cannot parse COCO annotations {path}: bad structure ({exc!r})") from exc


def _coco_record(
    coco, coco_id: int, image_dir: Path, label_of: dict[int, int], source: Path, notes: SizeNotes
):
    """One :class:`ImageRecord` from the COCO index (``notes``: as in the VOC loader)."""
    info = coco.imgs[coco_id]
    image_path = image_dir / info["file_name"]
    if not os.path.exists(image_path):
        raise DataError(f"image not found: {image_path} (image id {coco_id} in {source})")
    size = (int(info["width"]), int(info["height"]))
    width, height = annotated_size(image_path, size, source, notes)
    anns = coco.imgToAnns.get(coco_id, [])
    raw = B.from_xywh(np.asarray([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4))
    labels = np.asarray([label_of[a["category_id"]] for a in anns], dtype=np.int64)
    crowd = np.asarray([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    boxes, keep = clean_boxes(raw, width, height, source)
    return ImageRecord(str(coco_id), image_path, width, height, boxes, labels[keep], crowd[keep])
