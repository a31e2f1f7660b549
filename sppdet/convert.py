"""Conversion between the two dataset layouts sppdet reads: a VOC devkit split and a COCO json.

Both directions go through a :class:`~sppdet.datasets.Dataset`, so what one loader reads the
other writer reproduces: ``load_coco(write_coco(load_voc(...)))`` and
``load_voc(write_voc(load_coco(...)))`` give the same sizes, labels, difficult flags and boxes.

Box round trips: the COCO ``bbox`` is :func:`sppdet.boxes.to_xywh` of the internal box, written
as a full-precision float. VOC coordinates are :func:`sppdet.boxes.to_voc`, written as integers
when integral (always, for boxes that came from VOC) and as exact decimals otherwise (COCO boxes
may be fractional; :func:`~sppdet.datasets.load_voc` reads decimals, strict VOC tools may not).
Both loaders parse into float32 and add or subtract in float32, so a box comes back bit-exact
when its coordinates and sizes are float32-exact after the ``+1`` / ``x + w`` (integers, halves,
quarters, ...); other fractions may move by one float32 rounding step.

Image ids: COCO needs integers (see :func:`to_coco_json`); VOC uses the id as the file stem
(``JPEGImages/<id>.jpg``), so a COCO dataset written as VOC keeps ``str(coco id)`` as its ids.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from sppdet import boxes as B
from sppdet.datasets import VOC_CLASSES, Dataset, ImageRecord, load_classes, voc_annotation_xml
from sppdet.errors import ConfigError, DataError
from sppdet.storage import atomic_write_bytes, atomic_write_text

__all__ = ["subset", "default_image_root", "to_coco_json", "write_coco", "write_voc"]

_DECIMAL = re.compile(r"[0-9]+")
_SAFE_NAME = re.compile(r"[^\s/\\]+")  # usable as a file stem and as a split-file token
_JPEG_MAGIC = b"\xff\xd8\xff"
_REENCODE_QUALITY = 95  # non-JPEG images become JPEG (VOC reads JPEGImages/<id>.jpg only)


def subset(
    dataset: Dataset,
    classes: Sequence[str] | None,
    limit: int | None,
    *,
    keep_empty: bool = False,
) -> Dataset:
    """Select classes and images of a dataset.

    Args:
        dataset: the dataset to select from.
        classes: class names to keep, relabelled in this order (label ``i`` is ``classes[i]``);
            objects of other classes are dropped. None keeps all classes and every image.
        limit: keep only the first ``limit`` images (after the class selection).
        keep_empty: with ``classes``, keep images left without a non-difficult object (by
            default they are dropped).

    Returns:
        The selection (``dataset`` itself when nothing is selected). ``coco_annotation`` is
        cleared when the classes changed (the original json's categories no longer match);
        ``category_ids`` follow the selected classes.

    Raises:
        ConfigError: unknown, duplicate or no class names (the message lists the known ones);
            ``limit`` below 1. DataError: no image is left.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    if classes is None and (limit is None or limit >= len(dataset)):
        return dataset
    names, records = dataset.classes, list(dataset.records)
    if classes is not None:
        names = tuple(str(c) for c in classes)
        known = ", ".join(dataset.classes)
        unknown = [c for c in names if c not in dataset.classes]
        if unknown:
            raise ConfigError(
                f"unknown class(es) {', '.join(unknown)} for {dataset.name} "
                f"(known classes: {known})"
            )
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"class names must be distinct and at least one, got {list(names)}")
        new_label = np.full(len(dataset.classes), -1, dtype=np.int64)
        new_label[[dataset.classes.index(c) for c in names]] = np.arange(len(names))
        records = [_relabel(r, new_label) for r in records]
        if not keep_empty:
            records = [r for r in records if (~r.difficult).any()]
    records = records[:limit]
    if not records:
        raise DataError(f"no image of {dataset.name} has a non-difficult {' or '.join(names)}")
    if names == dataset.classes:
        return replace(dataset, records=tuple(records))
    cat_ids = dataset.category_ids
    if cat_ids is not None:
        cat_ids = tuple(cat_ids[dataset.classes.index(c)] for c in names)
    return replace(
        dataset, classes=names, records=tuple(records), coco_annotation=None, category_ids=cat_ids
    )


def _relabel(record: ImageRecord, new_label: np.ndarray) -> ImageRecord:
    """``record`` with labels mapped through ``new_label`` and objects mapped to -1 dropped."""
    labels = new_label[record.labels]
    keep = labels >= 0
    return ImageRecord(
        record.image_id, record.path, record.width, record.height,
        record.boxes[keep], labels[keep], record.difficult[keep],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------- COCO


def default_image_root(dataset: Dataset) -> Path:
    """The deepest directory holding every image of ``dataset`` (absolute); its root if empty."""
    if not dataset.records:
        return Path(os.path.abspath(dataset.root))
    return Path(os.path.commonpath([os.path.abspath(r.path.parent) for r in dataset.records]))


def to_coco_json(dataset: Dataset, *, image_root: str | os.PathLike | None = None) -> dict:
    """A COCO detection document of ``dataset``.

    Image ids are ``int(image_id)`` when every id is a decimal integer and no two give the same
    integer (VOC ``000005`` becomes 5), else 1..N in dataset order. The original id stays
    readable as the stem of ``file_name`` for VOC images (``000005.jpg``). Categories keep the
    dataset's ``category_ids`` (a COCO source) where they increase in class order (``load_coco``
    orders classes by category id), else they are 1..K in class order. Difficult objects are
    written ``iscrowd: 1`` (which ``load_coco`` reads back as difficult); ``area`` is the box
    area.

    Args:
        dataset: the dataset to describe.
        image_root: directory the ``file_name`` s are relative to (the ``image_dir`` for
            :func:`~sppdet.coco_data.load_coco`). Default: :func:`default_image_root`.

    Raises:
        DataError: an image is not under ``image_root``.
    """
    root = Path(os.path.abspath(image_root or default_image_root(dataset)))
    cat_ids = dataset.category_ids
    if cat_ids is None or list(cat_ids) != sorted(set(cat_ids)):
        cat_ids = tuple(range(1, len(dataset.classes) + 1))
    coco_ids = _coco_image_ids(dataset.image_ids)
    images, annotations = [], []
    for coco_id, rec in zip(coco_ids, dataset.records, strict=True):
        images.append(
            {"id": coco_id, "file_name": _relative(rec.path, root),
             "width": int(rec.width), "height": int(rec.height)}
        )  # fmt: skip
        objects = zip(
            B.to_xywh(rec.boxes).tolist(), rec.labels.tolist(), rec.difficult.tolist(), strict=True
        )
        for bbox, label, difficult in objects:
            annotations.append(
                {"id": len(annotations) + 1, "image_id": coco_id, "category_id": cat_ids[label],
                 "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": int(difficult)}
            )  # fmt: skip
    categories = [{"id": c, "name": name} for c, name in zip(cat_ids, dataset.classes, strict=True)]
    info = {"description": f"{dataset.name} (sppdet convert)"}
    return {
        "info": info, "licenses": [], "images": images, "annotations": annotations,
        "categories": categories,
    }  # fmt: skip


def write_coco(
    dataset: Dataset, out_json: str | os.PathLike, *, image_root: str | os.PathLike | None = None
) -> Path:
    """Write :func:`to_coco_json` of ``dataset`` to ``out_json`` (atomically, compact json).

    Returns:
        The written path.
    """
    out = Path(out_json)
    atomic_write_text(out, json.dumps(to_coco_json(dataset, image_root=image_root)) + "\n")
    return out


def _coco_image_ids(ids: Sequence[str]) -> list[int]:
    """Integer ids if all are decimal and stay distinct as integers, else 1..N."""
    if all(_DECIMAL.fullmatch(i) for i in ids):
        ints = [int(i) for i in ids]
        if len(set(ints)) == len(ints):
            return ints
    return list(range(1, len(ids) + 1))


def _relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` in posix form; DataError if it is not under it."""
    try:
        return Path(os.path.abspath(path)).relative_to(root).as_posix()
    except ValueError:
        raise DataError(f"image {path} is not under the image root {root}") from None


# ----------------------------------------------------------------------------------------- VOC


def write_voc(
    dataset: Dataset,
    out_devkit: str | os.PathLike,
    *,
    split: str,
    year: str = "2007",
    link_images: bool = True,
) -> Path:
    """Write ``dataset`` as split ``split`` of a VOC devkit tree that ``load_voc`` reads back.

    Writes ``out_devkit/VOC<year>/`` with ``JPEGImages/<id>.jpg``, ``Annotations/<id>.xml``,
    ``classes.txt`` (the dataset's classes, which ``load_voc`` uses by default) and, last,
    ``ImageSets/Main/<split>.txt``. JPEG images are hard-linked (``link_images``; copied where
    linking fails) or copied, keeping their bytes and EXIF orientation; other formats are
    re-encoded as JPEG (quality 95) from their upright pixels. XML sizes are the upright sizes.
    Existing images and annotations of the same ids are replaced atomically.

    Returns:
        The ``VOC<year>`` directory.

    Raises:
        DataError: no images; an id or split unusable as a file name, or a class name as a
            line of ``classes.txt`` (``#``, surrounding blanks); ``<split>.txt`` exists
            with other ids; the tree's class list (``classes.txt``, or the 20 VOC classes of a
            tree with splits but no ``classes.txt``) differs from the dataset's.
    """
    if not dataset.records:
        raise DataError(f"{dataset.name} has no images; a VOC split needs at least one")
    for name in (split, *dataset.image_ids):
        if not _SAFE_NAME.fullmatch(name) or name in (".", ".."):
            raise DataError(f"{name!r} cannot be a VOC image id or split name (a file name)")
    bad = [c for c in dataset.classes if "#" in c or "\n" in c or c != c.strip()]
    if bad:
        raise DataError(f"class name {bad[0]!r} cannot be written to a VOC classes.txt")
    root = Path(out_devkit) / f"VOC{year}"
    main = root / "ImageSets" / "Main"
    split_path = main / f"{split}.txt"
    ids = list(dataset.image_ids)
    same_split = split_path.is_file() and _split_ids(split_path) == ids
    if split_path.is_file() and not same_split:
        raise DataError(f"{split_path} exists and lists other images; remove it or pick another")
    _check_class_list(root, dataset.classes)
    for sub in ("JPEGImages", "Annotations"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    main.mkdir(parents=True, exist_ok=True)
    if not (root / "classes.txt").is_file():
        atomic_write_text(root / "classes.txt", "".join(f"{c}\n" for c in dataset.classes))
    for rec in dataset.records:
        _place_image(rec.path, root / "JPEGImages" / f"{rec.image_id}.jpg", link_images)
        xml = voc_annotation_xml(
            rec, dataset.classes, folder=f"VOC{year}", database="sppdet convert"
        )
        atomic_write_text(root / "Annotations" / f"{rec.image_id}.xml", xml)
    if not same_split:
        atomic_write_text(split_path, "".join(f"{i}\n" for i in ids))
    return root


def _split_ids(path: Path) -> list[str]:
    """First token of each non-blank line of a split file (as ``load_voc`` reads it)."""
    return [
        line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _check_class_list(root: Path, classes: tuple[str, ...]) -> None:
    """Refuse a tree whose other splits ``load_voc`` would read with another class list."""
    path = root / "classes.txt"
    if path.is_file():
        existing = load_classes(path)
    elif any((root / "ImageSets" / "Main").glob("*.txt")):
        existing = VOC_CLASSES
    else:
        return
    if existing != tuple(classes):
        raise DataError(
            f"{root} is read with the classes {', '.join(existing)}, not the dataset's "
            f"{', '.join(classes)}; write to another devkit directory"
        )


def _place_image(src: Path, dst: Path, link: bool) -> None:
    """Put image ``src`` at ``dst`` (a JPEG name): link or copy a JPEG, re-encode others."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # already there (rewriting a tree onto itself)
    try:
        with open(src, "rb") as f:
            is_jpeg = f.read(3) == _JPEG_MAGIC
    except OSError as exc:
        raise DataError(f"cannot read image {src}: {exc.strerror or exc}") from exc
    if not is_jpeg:
        from PIL import Image

        from sppdet.imageio import load_image

        buf = io.BytesIO()
        Image.fromarray(load_image(src)).save(buf, format="JPEG", quality=_REENCODE_QUALITY)
        atomic_write_bytes(dst, buf.getvalue())
        return
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            if not link:
                raise OSError("copy asked for")
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
