"""Tests of sppdet.datasets on hand-made VOC trees and COCO json files in tmp_path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sppdet.coco_data import load_coco
from sppdet.datasets import (
    VOC_CLASSES,
    Dataset,
    ImageRecord,
    load_classes,
    load_voc,
    voc_annotation_xml,
)
from sppdet.errors import ConfigError, DataError
from sppdet.imageio import load_image

DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def _object(name, box, difficult: int | None = 0) -> str:
    flag = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    keys = ("xmin", "ymin", "xmax", "ymax")
    coords = "".join(f"<{k}>{v}</{k}>" for k, v in zip(keys, box, strict=True))
    return f"<object><name>{name}</name>{flag}<bndbox>{coords}</bndbox></object>"


def _xml(objects: list[str], size: tuple[int, int] | None = (20, 10)) -> str:
    size_xml = "" if size is None else f"<size><width>{size[0]}</width><height>{size[1]}</height>"
    size_xml += "<depth>3</depth></size>" if size is not None else ""
    return f"<annotation><filename>x.jpg</filename>{size_xml}{''.join(objects)}</annotation>"


def make_voc(tmp_path: Path, annotations: dict[str, str | None], split: str = "train") -> Path:
    """A VOCdevkit with one 20x10 JPEG and XML per id (None: no XML); returns the devkit dir."""
    root = tmp_path / "VOCdevkit" / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, xml in annotations.items():
        Image.new("RGB", (20, 10), (90, 90, 90)).save(root / "JPEGImages" / f"{image_id}.jpg")
        if xml is not None:
            (root / "Annotations" / f"{image_id}.xml").write_text(xml)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text(
        "".join(f"{i}\n" for i in annotations)
    )
    return tmp_path / "VOCdevkit"


def test_voc_classes_file_matches_constant():
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[14] == "person"
    assert load_classes(DATA_DIR / "voc_classes.txt") == VOC_CLASSES


def test_load_voc_boxes_labels_difficult(tmp_path):
    devkit = make_voc(
        tmp_path,
        {
            "000001": _xml([_object("dog", (1, 1, 10, 10)), _object("cat", (3, 2, 20, 5), 1)]),
            "000002": _xml([_object("person", (5, 4, 6, 4), None)]),
            "000003": _xml([]),
        },
    )
    ds = load_voc(devkit, "train")
    assert ds.name == "voc2007_train" and ds.split == "train" and ds.classes == VOC_CLASSES
    assert ds.root == devkit / "VOC2007"
    assert len(ds) == 3 and ds.image_ids == ("000001", "000002", "000003")
    r = ds.record("000001")
    assert r is ds[0] and (r.width, r.height) == (20, 10)
    assert r.path == devkit / "VOC2007" / "JPEGImages" / "000001.jpg"
    # VOC 1-based inclusive (1, 1, 10, 10) covers pixels 0..9: internal [0, 10).
    np.testing.assert_array_equal(r.boxes, [[0, 0, 10, 10], [2, 1, 20, 5]])
    assert r.boxes.dtype == np.float32 and r.labels.dtype == np.int64 and r.difficult.dtype == bool
    assert r.labels.tolist() == [VOC_CLASSES.index("dog"), VOC_CLASSES.index("cat")]
    assert r.difficult.tolist() == [False, True]
    r2 = ds.record("000002")
    np.testing.assert_array_equal(r2.boxes, [[4, 3, 6, 4]])  # a one-pixel-high box survives
    assert r2.difficult.tolist() == [False]  # missing <difficult> means 0
    assert ds.record("000003").boxes.shape == (0, 4)
    with pytest.raises(ValueError):
        r.boxes[0, 0] = 5  # records are immutable
    with pytest.raises(KeyError, match="voc2007_train"):
        ds.record("999999")
    assert [rec.image_id for rec in ds] == list(ds.image_ids)


def test_written_annotation_reads_back_the_same_record(tmp_path):
    # the writer shared by make-synthetic and convert: whole and fractional VOC coordinates
    rec = ImageRecord(
        "a", tmp_path / "a.jpg", 20, 10, [[0, 0, 5, 4], [2.5, 1, 19.75, 10]], [14, 0], [0, 1]
    )
    xml = voc_annotation_xml(rec, VOC_CLASSES, folder="VOC2007", database="test")
    assert "<xmin>1</xmin>" in xml and "<xmin>3.5</xmin>" in xml and "<xmax>19.75</xmax>" in xml
    back = load_voc(make_voc(tmp_path, {"a": xml}), "train").records[0]
    np.testing.assert_array_equal(back.boxes, rec.boxes)
    np.testing.assert_array_equal(back.labels, rec.labels)
    np.testing.assert_array_equal(back.difficult, rec.difficult)


def test_devkit_may_be_the_year_directory(tmp_path):
    devkit = make_voc(tmp_path, {"a": _xml([_object("cat", (1, 1, 4, 4))])})
    a, b = load_voc(devkit, "train"), load_voc(devkit / "VOC2007", "train")
    assert a.root == b.root and a.image_ids == b.image_ids
    np.testing.assert_array_equal(a[0].boxes, b[0].boxes)
    with pytest.raises(DataError, match="VOC devkit not found"):
        load_voc(tmp_path / "elsewhere", "train")


def test_class_list_priority(tmp_path):
    devkit = make_voc(tmp_path, {"a": _xml([_object("blob", (1, 1, 4, 4))])})
    with pytest.raises(DataError):
        load_voc(devkit, "train")  # "blob" is not a VOC class
    (devkit / "VOC2007" / "classes.txt").write_text("# my classes\nthing\n\nblob\n")
    assert load_voc(devkit, "train").classes == ("thing", "blob")
    assert load_voc(devkit, "train")[0].labels.tolist() == [1]
    explicit = load_voc(devkit, "train", classes=["blob"])
    assert explicit.classes == ("blob",) and explicit[0].labels.tolist() == [0]
    other = tmp_path / "other.txt"
    other.write_text("blob\nthing\n")
    assert load_voc(devkit, "train", classes=other).classes == ("blob", "thing")
    assert load_voc(devkit, "train", classes=str(other)).classes == ("blob", "thing")


def test_load_classes_errors(tmp_path):
    dup = tmp_path / "dup.txt"
    dup.write_text("a\nb\na\n")
    with pytest.raises(ConfigError, match="twice") as info:
        load_classes(dup)
    assert str(dup) in str(info.value)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match=str(empty)):
        load_classes(empty)
    with pytest.raises(ConfigError, match="missing.txt"):
        load_classes(tmp_path / "missing.txt")


def test_out_of_image_boxes_are_clipped_with_a_warning(tmp_path, caplog):
    xml = _xml([_object("dog", (0, -3, 25, 8)), _object("cat", (22, 1, 30, 5), 1)])
    devkit = make_voc(tmp_path, {"000007": xml})
    with caplog.at_level(logging.WARNING, logger="sppdet.datasets"):
        r = load_voc(devkit, "train")[0]
    np.testing.assert_array_equal(r.boxes, [[0, 0, 20, 8]])  # the cat box left the image
    assert r.labels.tolist() == [VOC_CLASSES.index("dog")] and r.difficult.tolist() == [False]
    text = caplog.text
    assert "000007.xml" in text and "clipped 2 box" in text and "dropped 1 empty box" in text


def test_unknown_class_lists_known_classes(tmp_path):
    devkit = make_voc(tmp_path, {"a": _xml([_object("unicorn", (1, 1, 4, 4))])})
    with pytest.raises(DataError, match="unknown class 'unicorn'") as info:
        load_voc(devkit, "train")
    assert "a.xml" in str(info.value) and "aeroplane, bicycle" in str(info.value)


def test_missing_files_are_data_errors_naming_the_file(tmp_path):
    devkit = make_voc(tmp_path, {"a": _xml([]), "b": None})
    with pytest.raises(DataError, match=r"annotation not found: .*b\.xml"):
        load_voc(devkit, "train")
    assert len(load_voc(devkit, "train", limit=1)) == 1  # limit keeps split-file order
    (devkit / "VOC2007" / "JPEGImages" / "a.jpg").unlink()
    with pytest.raises(DataError, match=r"image not found: .*a\.jpg"):
        load_voc(devkit, "train", limit=1)
    with pytest.raises(ConfigError, match="limit"):
        load_voc(devkit, "train", limit=0)


def test_split_file_errors(tmp_path):
    devkit = make_voc(tmp_path, {"a": _xml([])})
    main = devkit / "VOC2007" / "ImageSets" / "Main"
    (main / "cat_train.txt").write_text("a 1\n")  # a per-class list, not a split
    with pytest.raises(DataError, match=r"split file not found: .*test\.txt") as info:
        load_voc(devkit, "test")
    assert "available splits: train)" in str(info.value)
    (main / "val.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="lists no image ids") as info:
        load_voc(devkit, "val")
    assert "val.txt" in str(info.value)
    (main / "val.txt").write_text("a\na\n")
    with pytest.raises(DataError, match="more than once"):
        load_voc(devkit, "val")


def test_malformed_xml_and_bad_box(tmp_path):
    devkit = make_voc(tmp_path, {"a": "<annotation><object></annotation>"})
    with pytest.raises(DataError, match=r"cannot parse annotation .*a\.xml"):
        load_voc(devkit, "train")
    devkit = make_voc(tmp_path, {"a": _xml([_object("cat", (1, "x", 4, 4))])})
    with pytest.raises(DataError, match=r"bad <bndbox>.*a\.xml"):
        load_voc(devkit, "train")


def test_missing_size_reads_the_image_header(tmp_path, caplog):
    devkit = make_voc(tmp_path, {"a": _xml([_object("cat", (1, 1, 4, 4))], size=None)})
    with caplog.at_level(logging.WARNING, logger="sppdet.datasets"):
        r = load_voc(devkit, "train")[0]
    assert (r.width, r.height) == (20, 10)
    assert "no valid <size>" in caplog.text and "a.xml" in caplog.text


def test_geometry_comes_from_the_image_not_a_wrong_size_with_one_warning(tmp_path, caplog):
    box = _object("cat", (1, 1, 30, 8))  # inside the 40x16 the XML claims, not the 20x10 image
    devkit = make_voc(tmp_path, {"a": _xml([box], size=(40, 16)), "b": _xml([box], (40, 16))})
    with caplog.at_level(logging.WARNING):
        ds = load_voc(devkit, "train")
    assert [(r.width, r.height) for r in ds] == [(20, 10), (20, 10)]
    assert ds[0].boxes.max(axis=0)[2] <= 20  # clipped to the real image
    lines = [r.message for r in caplog.records if "not their image's" in r.message]
    assert len(lines) == 1 and "2 annotation(s)" in lines[0] and "40x16" in lines[0]
    assert "a.xml" in lines[0] and "20x10" in lines[0]


def _tag_orientation(path: Path, orientation: int) -> None:
    """Re-save an image with an EXIF orientation tag (its stored pixels unchanged)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    with Image.open(path) as im:
        im.load()
    im.save(path, exif=exif)


def test_exif_turned_image_needs_the_upright_size(tmp_path):
    """Images are read upright: a turned image's annotation must give its upright size (its
    boxes were drawn on that view); the stored size is refused, naming image and XML."""
    box = [_object("cat", (1, 1, 8, 18))]
    devkit = make_voc(tmp_path / "up", {"a": _xml(box, size=(10, 20)), "b": _xml(box, None)})
    for image_id in ("a", "b"):
        _tag_orientation(devkit / "VOC2007" / "JPEGImages" / f"{image_id}.jpg", 6)
    ds = load_voc(devkit, "train")
    for r in ds:  # <size> given upright, or read from the header (upright too)
        assert (r.width, r.height) == (10, 20)
        assert load_image(r.path).shape == (20, 10, 3)
        np.testing.assert_array_equal(r.boxes, [[0, 0, 8, 18]])  # not clipped to 20x10
    devkit = make_voc(tmp_path / "stored", {"a": _xml(box, size=(20, 10))})
    _tag_orientation(devkit / "VOC2007" / "JPEGImages" / "a.jpg", 8)
    with pytest.raises(DataError, match=r"a\.xml gives .*a\.jpg the size 20x10") as info:
        load_voc(devkit, "train")
    assert "EXIF orientation 8" in str(info.value) and "\n" not in str(info.value)


def test_exif_flipped_images_are_read_upright_with_one_warning(tmp_path, caplog):
    """A flip or 180-degree turn keeps the size, so which view was annotated cannot be told:
    one warning for the dataset, naming the first image."""
    devkit = make_voc(tmp_path, {i: _xml([_object("cat", (1, 1, 4, 4))]) for i in "abc"})
    for image_id, orientation in (("b", 3), ("c", 2)):
        _tag_orientation(devkit / "VOC2007" / "JPEGImages" / f"{image_id}.jpg", orientation)
    with caplog.at_level(logging.WARNING, logger="sppdet"):
        ds = load_voc(devkit, "train")
    assert [(r.width, r.height) for r in ds] == [(20, 10)] * 3
    warnings = [r for r in caplog.records if "EXIF orientation" in r.getMessage()]
    assert len(warnings) == 1 and "2 image(s)" in warnings[0].getMessage()
    assert "b.jpg" in warnings[0].getMessage()


def test_dataset_and_record_invariants(tmp_path):
    with pytest.raises(ValueError):
        ImageRecord("x", tmp_path, 5, 5, np.zeros((2, 4)), np.zeros(1), np.zeros(2))
    rec = ImageRecord("x", tmp_path, 5, 5, np.zeros((0, 4)), [], [])
    with pytest.raises(ValueError, match="duplicate"):
        Dataset("d", ("a",), (rec, rec), tmp_path, "train")


# ---------------------------------------------------------------------------------------- COCO


def _coco_tree(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("x.jpg", "y.jpg"):
        Image.new("RGB", (30, 20)).save(images / name)
    doc = {
        "images": [
            {"id": 42, "file_name": "y.jpg", "width": 30, "height": 20},
            {"id": 7, "file_name": "x.jpg", "width": 30, "height": 20},
        ],
        "categories": [{"id": 5, "name": "zebra"}, {"id": 2, "name": "apple"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [1.5, 2, 10, 5], "iscrowd": 0,
             "area": 50},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 30, 20], "iscrowd": 1,
             "area": 600},
            {"id": 3, "image_id": 42, "category_id": 2, "bbox": [25, 15, 10, 10], "iscrowd": 0,
             "area": 100},
        ],
    }  # fmt: skip
    ann = tmp_path / "instances_tiny.json"
    ann.write_text(json.dumps(doc))
    return ann, images


def test_load_coco(tmp_path, capsys):
    ann, images = _coco_tree(tmp_path)
    ds = load_coco(ann, images)
    assert capsys.readouterr().out == ""  # pycocotools' prints are silenced
    assert ds.classes == ("apple", "zebra")  # sorted by category id (2, 5)
    assert ds.name == "coco_instances_tiny" and ds.coco_annotation == ann and ds.root == images
    assert ds.image_ids == ("7", "42") and int(ds[1].image_id) == 42
    r = ds.record("7")
    assert r.path == images / "x.jpg" and (r.width, r.height) == (30, 20)
    np.testing.assert_allclose(r.boxes, [[1.5, 2, 11.5, 7], [0, 0, 30, 20]])
    assert r.labels.tolist() == [1, 0] and r.difficult.tolist() == [False, True]  # iscrowd
    np.testing.assert_allclose(ds.record("42").boxes, [[25, 15, 30, 20]])  # clipped
    limited = load_coco(ann, images, limit=1, split="val")
    assert limited.name == "coco_val" and limited.image_ids == ("7",)


def test_load_coco_refuses_the_stored_size_of_a_turned_image(tmp_path):
    ann, images = _coco_tree(tmp_path)
    _tag_orientation(images / "y.jpg", 6)  # stored 30x20, upright 20x30; the json says 30x20
    with pytest.raises(DataError, match=r"instances_tiny\.json gives .*y\.jpg the size 30x20"):
        load_coco(ann, images)


def test_load_coco_errors(tmp_path):
    ann, images = _coco_tree(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_coco(tmp_path / "none.json", images)
    (images / "y.jpg").unlink()
    with pytest.raises(DataError, match=r"image not found: .*y\.jpg"):
        load_coco(ann, images)
    ann.write_text("{ not json")
    with pytest.raises(DataError, match=r"cannot parse COCO annotations .*instances_tiny\.json"):
        load_coco(ann, images)
