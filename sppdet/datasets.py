"""Datasets: PASCAL VOC (XML devkit layout) as an in-memory record list.

A :class:`Dataset` is a tuple of :class:`ImageRecord` s, one per image, in split-file order. Boxes
are in the internal convention of :mod:`sppdet.boxes` (0-based continuous xyxy); labels are
0-based indices into ``Dataset.classes`` (the background class of the detector is not part of
it). Only annotations and image headers (for their EXIF orientation: images are read upright,
see :func:`sppdet.imageio.check_annotated_size`) are read here; pixels are read later by
:func:`sppdet.imageio.load_image`. COCO json becomes the same records in :mod:`sppdet.coco_data`.

Shape shorthand: ``G`` ground-truth boxes of one image.
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sppdet import boxes as B
from sppdet.errors import ConfigError, DataError
from sppdet.imageio import SizeNotes, annotated_size, image_size

__all__ = [
    "VOC_CLASSES",
    "ImageRecord",
    "Dataset",
    "load_classes",
    "load_voc",
]

log = logging.getLogger(__name__)

# The 20 PASCAL VOC classes in the devkit's order (VOCinit.m); label i is VOC_CLASSES[i].
VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

# Below this many images the progress bar is noise (loading 5,000 VOC XML files takes ~1 s).
PROGRESS_MIN = 1000


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """Ground truth of one image. Arrays are read-only.

    ``eq=False``: records hold arrays, so field-wise ``==`` would be ambiguous; records compare
    (and hash) by identity.

    Attributes:
        image_id: id as in the split file (VOC) or ``str(image id)`` (COCO).
        path: the image file.
        width, height: image size in pixels, upright (EXIF orientation applied), as
            :func:`~sppdet.imageio.load_image` reads the image.
        boxes: ``Array[G, 4]`` float32, internal 0-based continuous xyxy, inside the image.
        labels: ``Array[G]`` int64, index into ``Dataset.classes``.
        difficult: ``Array[G]`` bool; VOC "difficult" or COCO "iscrowd" (ignored by evaluation).
    """

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray

    def __post_init__(self) -> None:
        arrays = {
            "boxes": np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(self.labels, dtype=np.int64).reshape(-1),
            "difficult": np.asarray(self.difficult, dtype=bool).reshape(-1),
        }
        if not len(arrays["boxes"]) == len(arrays["labels"]) == len(arrays["difficult"]):
            raise ValueError(f"record {self.image_id}: boxes, labels, difficult differ in length")
        for name, value in arrays.items():
            value = value.copy()
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "path", Path(self.path))


@dataclass(frozen=True)
class Dataset:
    """An ordered, immutable set of annotated images.

    Attributes:
        name: e.g. ``"voc2007_val"``; used in file names of results.
        classes: class names; label ``i`` is ``classes[i]``.
        records: one :class:`ImageRecord` per image, in split-file order.
        root: the VOC year directory (``.../VOC2007``) or the COCO image directory.
        split: split name (``"train"``, ``"val"``, ...).
        coco_annotation: the COCO json the dataset came from (for a COCO evaluator), else None.
        category_ids: COCO: the category id of each class (label ``i`` is category
            ``category_ids[i]``); None for VOC.
    """

    name: str
    classes: tuple[str, ...]
    records: tuple[ImageRecord, ...] = field(repr=False)
    root: Path
    split: str
    coco_annotation: Path | None = None
    category_ids: tuple[int, ...] | None = None
    _by_id: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "records", tuple(self.records))
        object.__setattr__(self, "root", Path(self.root))
        by_id = {r.image_id: i for i, r in enumerate(self.records)}
        if len(by_id) != len(self.records):
            raise ValueError(f"dataset {self.name}: duplicate image ids")
        object.__setattr__(self, "_by_id", by_id)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def __getitem__(self, index: int) -> ImageRecord:
        return self.records[index]

    @property
    def image_ids(self) -> tuple[str, ...]:
        """Image ids in dataset order."""
        return tuple(r.image_id for r in self.records)

    def record(self, image_id: str) -> ImageRecord:
        """The record of ``image_id``; ``KeyError`` naming the dataset if absent."""
        try:
            return self.records[self._by_id[image_id]]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in dataset {self.name}") from None


def voc_annotation_xml(
    rec: ImageRecord, classes: Sequence[str], *, folder: str, database: str
) -> str:
    """VOC annotation XML of one record, the format :func:`load_voc` reads back.

    Boxes go out in VOC 1-based inclusive pixels: whole numbers as integers (as the devkit's
    files have them), others as their float ``repr`` (nothing lost on a round trip).

    Args:
        rec: the image's ground truth (``boxes`` internal xyxy).
        classes: label ``i`` is written as ``classes[i]``.
        folder: the ``<folder>`` text, e.g. ``"VOC2007"``.
        database: the ``<source><database>`` text: which tool wrote the file.
    """
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = folder
    ET.SubElement(root, "filename").text = f"{rec.image_id}.jpg"
    ET.SubElement(ET.SubElement(root, "source"), "database").text = database
    size = ET.SubElement(root, "size")
    for key, value in (("width", rec.width), ("height", rec.height), ("depth", 3)):
        ET.SubElement(size, key).text = str(int(value))
    ET.SubElement(root, "segmented").text = "0"
    for box, label, difficult in zip(
        B.to_voc(rec.boxes).tolist(), rec.labels.tolist(), rec.difficult.tolist(), strict=True
    ):
        node = ET.SubElement(root, "object")
        ET.SubElement(node, "name").text = classes[label]
        ET.SubElement(node, "pose").text = "Unspecified"
        ET.SubElement(node, "truncated").text = "0"
        ET.SubElement(node, "difficult").text = str(int(difficult))
        bndbox = ET.SubElement(node, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
            ET.SubElement(bndbox, key).text = str(int(value)) if value.is_integer() else repr(value)
    ET.indent(root, space="\t")
    return ET.tostring(root, encoding="unicode") + "\n"


def load_classes(path: str | os.PathLike) -> tuple[str, ...]:
    """Read a class list: one name per line; blank lines and ``#`` comments are ignored.

    Raises:
        ConfigError: file missing, no names, or a duplicate name (the message names the file).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read class list {path}: {exc.strerror or exc}") from exc
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = [n for n in names if n]
    if not names:
        raise ConfigError(f"class list {path} has no class names")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"class list {path} names class {name!r} twice")
        seen.add(name)
    return tuple(names)


# ----------------------------------------------------------------------------------------- VOC


def load_voc(
    devkit: str | os.PathLike,
    split: str,
    *,
    year: str = "2007",
    classes: Sequence[str] | str | os.PathLike | None = None,
    limit: int | None = None,
) -> Dataset:
    """Load a PASCAL VOC split from the devkit layout.

    Reads ``VOC<year>/ImageSets/Main/<split>.txt``, ``Annotations/<id>.xml`` and checks that
    ``JPEGImages/<id>.jpg`` exists. VOC boxes (1-based inclusive) become internal xyxy; boxes
    reaching outside the image are clipped, and boxes left empty are dropped, each with a warning.

    Args:
        devkit: the ``VOCdevkit`` directory or the ``VOC<year>`` directory itself.
        split: split name, e.g. ``"train"``, ``"val"``, ``"trainval"``, ``"test"``.
        year: VOC year, selects ``VOC<year>`` under ``devkit``.
        classes: class names, or a path to a class-list file. Default: ``VOC<year>/classes.txt``
            if it exists, else :data:`VOC_CLASSES`.
        limit: keep only the first ``limit`` ids of the split file.

    Raises:
        DataError: missing devkit, split file, annotation or image; malformed XML; a class name
            not in the class list. ConfigError: a bad class list or ``limit``.
    """
    root = _voc_root(Path(devkit), year)
    class_names = _resolve_classes(classes, root / "classes.txt")
    ids = _read_split(root, split, class_names)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be at least 1, got {limit}")
        ids = ids[:limit]
    index = {name: i for i, name in enumerate(class_names)}
    name = f"voc{year}_{split}"
    notes = SizeNotes()
    records = [
        _voc_record(root, image_id, index, notes)
        for image_id in tqdm(ids, desc=f"load {name}", unit="img", disable=len(ids) < PROGRESS_MIN)
    ]
    notes.warn(name)
    return Dataset(name=name, classes=class_names, records=tuple(records), root=root, split=split)


def _voc_root(devkit: Path, year: str) -> Path:
    """The ``VOC<year>`` directory, given it or its parent ``VOCdevkit``."""
    for candidate in (devkit / f"VOC{year}", devkit):
        if (candidate / "Annotations").is_dir() and (candidate / "ImageSets").is_dir():
            return candidate
    raise DataError(
        f"VOC devkit not found: {devkit} (expected {devkit}/VOC{year}/ or a VOC{year} directory "
        "with Annotations/, ImageSets/Main/ and JPEGImages/)"
    )


def _resolve_classes(
    classes: Sequence[str] | str | os.PathLike | None, default_file: Path
) -> tuple[str, ...]:
    """Explicit names > explicit class-list file > ``classes.txt`` in the tree > VOC_CLASSES."""
    if isinstance(classes, str | os.PathLike):
        return load_classes(classes)
    if classes is not None:
        names = tuple(str(c) for c in classes)
        if not names or len(set(names)) != len(names) or not all(names):
            raise ConfigError(f"class names must be distinct and non-empty, got {list(names)}")
        return names
    return load_classes(default_file) if default_file.is_file() else VOC_CLASSES


def _read_split(root: Path, split: str, classes: tuple[str, ...]) -> list[str]:
    """Image ids listed in ``ImageSets/Main/<split>.txt`` (first token of each line)."""
    path = root / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        per_class = tuple(f"{c}_" for c in classes)  # skip VOC's per-class lists (cat_train.txt)
        found = sorted(
            p.stem for p in path.parent.glob("*.txt") if not p.stem.startswith(per_class)
        )
        raise DataError(
            f"split file not found: {path} (available splits: {', '.join(found) or 'none'})"
        )
    ids = [
        line.split()[0] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    if not ids:
        raise DataError(f"split file {path} lists no image ids")
    if len(set(ids)) != len(ids):
        dup = next(i for n, i in enumerate(ids) if i in ids[:n])
        raise DataError(f"split file {path} lists image id {dup} more than once")
    return ids


def _voc_record(root: Path, image_id: str, index: dict[str, int], notes: SizeNotes) -> ImageRecord:
    """Parse ``Annotations/<image_id>.xml`` into a record (image existence and orientation
    checked too; ``notes`` collects sizes the annotation gets wrong or cannot tell)."""
    xml_path = root / "Annotations" / f"{image_id}.xml"
    image_path = root / "JPEGImages" / f"{image_id}.jpg"
    if not os.path.exists(xml_path):
        raise DataError(f"annotation not found: {xml_path}")
    if not os.path.exists(image_path):
        raise DataError(f"image not found: {image_path}")
    try:
        tree = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise DataError(f"cannot parse annotation {xml_path}: {exc}") from exc
    width, height = annotated_size(
        image_path, _voc_size(tree, xml_path, image_path), xml_path, notes
    )
    raw, labels, difficult = _voc_objects(tree, xml_path, index)
    boxes, keep = clean_boxes(B.from_voc(raw), width, height, xml_path)
    return ImageRecord(image_id, image_path, width, height, boxes, labels[keep], difficult[keep])


def _voc_size(tree: ET.Element, xml_path: Path, image_path: Path) -> tuple[int, int]:
    """``(width, height)`` from ``<size>``, or from the image header (with a warning)."""
    size = tree.find("size")
    if size is not None:
        try:
            width, height = int(size.findtext("width", "")), int(size.findtext("height", ""))
        except ValueError:
            width = height = 0
        if width > 0 and height > 0:
            return width, height
    log.warning("%s has no valid <size>; reading the size from %s", xml_path, image_path)
    return image_size(image_path)


def _voc_objects(
    tree: ET.Element, xml_path: Path, index: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """VOC boxes ``Array[G, 4]`` (1-based inclusive), labels and difficult flags ``Array[G]``."""
    boxes, labels, difficult = [], [], []
    for obj in tree.findall("object"):  # direct children only: <part> boxes are not objects
        name = (obj.findtext("name") or "").strip()
        if name not in index:
            known = ", ".join(index)
            raise DataError(f"unknown class {name!r} in {xml_path} (known classes: {known})")
        bndbox = obj.find("bndbox")
        try:
            coords = [float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
            flag = int(float((obj.findtext("difficult") or "0").strip() or 0))
        except (AttributeError, TypeError, ValueError) as exc:
            raise DataError(f"bad <bndbox> or <difficult> of a {name!r} in {xml_path}") from exc
        boxes.append(coords)
        labels.append(index[name])
        difficult.append(flag != 0)
    return (
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
        np.asarray(difficult, dtype=bool),
    )


def clean_boxes(boxes: np.ndarray, width: int, height: int, source: Path):
    """Clip internal boxes to the image and drop empty ones, warning about each change.

    Returns:
        (clipped boxes ``Array[K, 4]``, keep mask ``Array[G]`` over the input boxes).
    """
    clipped = B.clip_boxes(boxes, width, height)
    n_clipped = int(np.any(clipped != boxes, axis=1).sum())
    if n_clipped:
        log.warning("%s: clipped %d box(es) to the image %dx%d", source, n_clipped, width, height)
    keep = B.valid_boxes_mask(clipped)
    if not keep.all():
        log.warning("%s: dropped %d empty box(es) after clipping", source, int((~keep).sum()))
    return clipped[keep], keep
