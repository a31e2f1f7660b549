"""Tests of sppdet.convert (VOC devkit <-> COCO json) and the ``convert`` command."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from sppdet.coco_data import load_coco
from sppdet.convert import default_image_root, subset, to_coco_json, write_coco, write_voc
from sppdet.datasets import Dataset, ImageRecord, load_voc
from sppdet.errors import ConfigError, DataError
from sppdet.synthetic import SYNTHETIC_CLASSES, make_synthetic_voc
from sppdet_cli.convert_cmd import command

# ------------------------------------------------------------------------------------ fixtures


def _image(path: Path, size: tuple[int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(path)
    return path


def _hand_dataset(tmp_path: Path) -> Dataset:
    """Three images (JPEG, PNG, JPEG in a subdirectory): fractional boxes, a difficult object,
    an image without objects; non-decimal ids."""
    src = tmp_path / "src"
    records = (
        ImageRecord("a", _image(src / "a.jpg", (30, 20)), 30, 20,
                    [[1.5, 2, 11.5, 7], [0, 0, 30, 20]], [1, 0], [False, True]),
        ImageRecord("b", _image(src / "b.png", (24, 16)), 24, 16,
                    [[3, 4, 10.25, 16]], [2], [False]),
        ImageRecord("c", _image(src / "sub" / "c.jpg", (20, 20)), 20, 20, [], [], []),
    )  # fmt: skip
    return Dataset("hand", ("apple", "zebra", "cat"), records, src, "train")


def _coco_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A COCO json with unsorted ids 42, 7, categories ids 5 and 2, a crowd box, a box reaching
    out of its image (the loader clips it)."""
    images = tmp_path / "coco_images"
    _image(images / "x.jpg", (30, 20))
    _image(images / "y.jpg", (30, 20))
    doc = {
        "images": [
            {"id": 42, "file_name": "y.jpg", "width": 30, "height": 20},
            {"id": 7, "file_name": "x.jpg", "width": 30, "height": 20},
        ],
        "categories": [{"id": 5, "name": "zebra"}, {"id": 2, "name": "apple"}],
        "annotations": [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [1.5, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0, 0, 30, 20], "iscrowd": 1},
            {"id": 3, "image_id": 42, "category_id": 2, "bbox": [25, 15, 10, 10], "iscrowd": 0},
        ],
    }
    ann = tmp_path / "instances_tiny.json"
    ann.write_text(json.dumps(doc))
    return ann, images


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    make_synthetic_voc(
        out, images=4, seed=1, size=(80, 64)
    )  # min side 50: smaller crashes synthetic.render_background
    return out


def _assert_same(got: Dataset, want: Dataset, ids: tuple[str, ...] | None = None) -> None:
    """Same classes and, record by record, the same size, boxes (exactly), labels, flags."""
    assert got.classes == want.classes
    assert got.image_ids == (ids if ids is not None else want.image_ids)
    for g, w in zip(got, want, strict=True):
        assert (g.width, g.height) == (w.width, w.height)
        assert g.boxes.dtype == np.float32 and np.array_equal(g.boxes, w.boxes), g.image_id
        assert g.labels.tolist() == w.labels.tolist()
        assert g.difficult.tolist() == w.difficult.tolist()


def _bndboxes(xml_path: Path) -> list[list[str]]:
    tree = ET.parse(xml_path).getroot()
    keys = ("xmin", "ymin", "xmax", "ymax")
    return [[o.find("bndbox").findtext(k) for k in keys] for o in tree.findall("object")]


# ---------------------------------------------------------------------------------------- COCO


def test_to_coco_json_fields(tmp_path):
    ds = _hand_dataset(tmp_path)
    doc = to_coco_json(ds)
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in doc["images"]] == [
        (1, "a.jpg", 30, 20), (2, "b.png", 24, 16), (3, "sub/c.jpg", 20, 20),
    ]  # fmt: skip
    assert doc["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 2, "bbox": [1.5, 2, 10, 5], "area": 50,
         "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [0, 0, 30, 20], "area": 600,
         "iscrowd": 1},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [3, 4, 7.25, 12], "area": 87,
         "iscrowd": 0},
    ]  # fmt: skip
    assert doc["categories"] == [
        {"id": 1, "name": "apple"}, {"id": 2, "name": "zebra"}, {"id": 3, "name": "cat"},
    ]  # fmt: skip
    assert default_image_root(ds) == (tmp_path / "src").absolute()
    names = [i["file_name"] for i in to_coco_json(ds, image_root=tmp_path)["images"]]
    assert names == ["src/a.jpg", "src/b.png", "src/sub/c.jpg"]
    with pytest.raises(DataError, match=r"a\.jpg is not under the image root .*sub"):
        to_coco_json(ds, image_root=tmp_path / "src" / "sub")


def _ids_dataset(ids: list[str]) -> Dataset:
    records = [ImageRecord(i, Path(f"/x/{n}.jpg"), 8, 8, [], [], []) for n, i in enumerate(ids)]
    return Dataset("ids", ("a",), records, Path("/x"), "s")


def test_coco_image_ids_are_the_integer_ids_only_when_distinct():
    def coco_ids(ids):
        return [i["id"] for i in to_coco_json(_ids_dataset(ids))["images"]]

    assert coco_ids(["000012", "5", "0"]) == [12, 5, 0]
    assert coco_ids(["1", "001"]) == [1, 2]  # both would be 1
    assert coco_ids(["2008_000001", "7"]) == [1, 2]
    assert coco_ids(["-3", "7"]) == [1, 2]


def test_hand_dataset_round_trips_through_coco(tmp_path):
    ds = _hand_dataset(tmp_path)
    out = write_coco(ds, tmp_path / "out" / "hand.json")
    assert out == tmp_path / "out" / "hand.json" and json.loads(out.read_text())["images"]
    back = load_coco(out, tmp_path / "src")
    _assert_same(back, ds, ids=("1", "2", "3"))
    assert [r.path for r in back] == [r.path for r in ds]
    assert back[0].difficult.tolist() == [False, True]  # difficult -> iscrowd -> difficult


def test_synthetic_voc_to_coco_and_back_to_voc(synthetic, tmp_path):
    voc = load_voc(synthetic, "trainval")
    assert voc.classes == SYNTHETIC_CLASSES and len(voc) == 4
    out = write_coco(voc, tmp_path / "syn.json")
    coco = load_coco(out, voc.root / "JPEGImages")
    _assert_same(coco, voc, ids=("1", "2", "3", "4"))  # 000001 -> 1, ...
    assert [r.path for r in coco] == [r.path for r in voc]
    assert sum(len(r.boxes) for r in coco) == sum(len(r.boxes) for r in voc) > 0

    root = write_voc(coco, tmp_path / "back", split="val")
    back = load_voc(tmp_path / "back", "val")
    _assert_same(back, voc, ids=("1", "2", "3", "4"))
    for n, rec in enumerate(voc, start=1):  # the same integer VOC coordinates as the source
        assert _bndboxes(root / "Annotations" / f"{n}.xml") == _bndboxes(
            voc.root / "Annotations" / f"{rec.image_id}.xml"
        )


# ----------------------------------------------------------------------------------------- VOC


def test_hand_dataset_round_trips_through_voc(tmp_path):
    ds = _hand_dataset(tmp_path)
    root = write_voc(ds, tmp_path / "devkit", split="train")
    assert root == tmp_path / "devkit" / "VOC2007"
    assert (root / "classes.txt").read_text() == "apple\nzebra\ncat\n"
    assert (root / "ImageSets" / "Main" / "train.txt").read_text() == "a\nb\nc\n"
    back = load_voc(tmp_path / "devkit", "train")  # custom classes come from classes.txt
    _assert_same(back, ds)
    assert _bndboxes(root / "Annotations" / "a.xml") == [
        ["2.5", "3", "11.5", "7"], ["1", "1", "30", "20"],
    ]  # fmt: skip
    jpeg = root / "JPEGImages"
    assert os.stat(jpeg / "a.jpg").st_ino == os.stat(tmp_path / "src" / "a.jpg").st_ino  # linked
    with Image.open(jpeg / "b.jpg") as im:  # the PNG, re-encoded
        assert im.format == "JPEG" and im.size == (24, 16)


def test_coco_json_round_trips_through_voc_and_back(tmp_path):
    ann, images = _coco_tree(tmp_path)
    coco = load_coco(ann, images)
    assert coco.image_ids == ("7", "42") and coco.classes == ("apple", "zebra")
    write_voc(coco, tmp_path / "devkit", split="val", year="2012", link_images=False)
    voc = load_voc(tmp_path / "devkit", "val", year="2012")
    _assert_same(voc, coco)
    np.testing.assert_array_equal(voc.record("7").boxes, [[1.5, 2, 11.5, 7], [0, 0, 30, 20]])
    assert voc.record("7").difficult.tolist() == [False, True]
    np.testing.assert_array_equal(voc.record("42").boxes, [[25, 15, 30, 20]])  # as clipped
    copied = tmp_path / "devkit" / "VOC2012" / "JPEGImages" / "7.jpg"
    assert copied.read_bytes() == (images / "x.jpg").read_bytes()
    assert os.stat(copied).st_ino != os.stat(images / "x.jpg").st_ino  # copied, not linked

    again = load_coco(write_coco(voc, tmp_path / "again.json"), voc.root / "JPEGImages")
    _assert_same(again, coco)  # decimal ids survive: 7 and 42
    assert voc.category_ids is None and again.category_ids == (1, 2)  # VOC has no category ids


def test_coco_category_ids_are_kept_where_they_can_be(tmp_path):
    ann, images = _coco_tree(tmp_path)
    coco = load_coco(ann, images)
    doc = to_coco_json(coco)
    assert doc["categories"] == [{"id": 2, "name": "apple"}, {"id": 5, "name": "zebra"}]
    assert [a["category_id"] for a in doc["annotations"]] == [5, 2, 2]
    assert [(i["id"], i["file_name"]) for i in doc["images"]] == [(7, "x.jpg"), (42, "y.jpg")]
    swapped = subset(coco, ["zebra", "apple"], None)
    assert swapped.category_ids == (5, 2)  # follow the classes
    doc = to_coco_json(swapped)  # decreasing ids would reorder the classes: renumbered
    assert doc["categories"] == [{"id": 1, "name": "zebra"}, {"id": 2, "name": "apple"}]
    assert [a["category_id"] for a in doc["annotations"]] == [1, 2, 2]
    assert subset(coco, ["zebra"], None).category_ids == (5,)


def test_write_voc_refuses_conflicting_split_or_classes(tmp_path):
    ds = _hand_dataset(tmp_path)
    devkit = tmp_path / "devkit"
    root = write_voc(ds, devkit, split="train")
    assert write_voc(ds, devkit, split="train") == root  # identical split: rewritten in place
    with pytest.raises(DataError, match=r"train\.txt exists and lists other images"):
        write_voc(subset(ds, None, 2), devkit, split="train")
    write_voc(subset(ds, None, 2), devkit, split="small")  # another split, same classes
    assert load_voc(devkit, "small").image_ids == ("a", "b")
    with pytest.raises(DataError, match="read with the classes apple, zebra, cat, not the"):
        write_voc(subset(ds, ["cat", "apple"], None), devkit, split="cats")
    (root / "classes.txt").unlink()  # splits read with the 20 VOC classes now
    with pytest.raises(DataError, match="read with the classes aeroplane, bicycle"):
        write_voc(ds, devkit, split="other")
    with pytest.raises(DataError, match="cannot be a VOC image id"):
        write_voc(_ids_dataset(["a/b"]), tmp_path / "bad", split="x")
    hashed = Dataset("h", ("no#1",), ds.records[2:], ds.root, "s")
    with pytest.raises(DataError, match="'no#1' cannot be written to a VOC classes.txt"):
        write_voc(hashed, tmp_path / "bad", split="x")
    assert not (tmp_path / "bad").exists()


# -------------------------------------------------------------------------------------- subset


def test_subset_selects_relabels_and_limits(tmp_path):
    ds = _hand_dataset(tmp_path)
    ds = Dataset(ds.name, ds.classes, ds.records, ds.root, ds.split, tmp_path / "orig.json")
    assert subset(ds, None, None) is ds and subset(ds, None, 3) is ds

    cats = subset(ds, ["cat", "apple"], None)  # a: only a difficult apple; c: empty
    assert cats.classes == ("cat", "apple") and cats.image_ids == ("b",)
    assert cats[0].labels.tolist() == [0] and cats.coco_annotation is None

    kept = subset(ds, ["cat", "apple"], None, keep_empty=True)
    assert kept.image_ids == ("a", "b", "c")
    np.testing.assert_array_equal(kept[0].boxes, [[0, 0, 30, 20]])
    assert kept[0].labels.tolist() == [1] and kept[0].difficult.tolist() == [True]

    zebra = subset(ds, ["zebra", "apple"], 1)
    assert zebra.image_ids == ("a",) and zebra[0].labels.tolist() == [0, 1]
    first = subset(ds, None, 2)
    assert first.image_ids == ("a", "b") and first.classes == ds.classes
    assert first.coco_annotation == tmp_path / "orig.json"  # same categories: still valid

    with pytest.raises(ConfigError, match=r"unknown class\(es\) dog, cow .*apple, zebra, cat"):
        subset(ds, ["dog", "apple", "cow"], None)
    with pytest.raises(ConfigError, match="distinct"):
        subset(ds, ["cat", "cat"], None)
    with pytest.raises(ConfigError, match="limit must be at least 1"):
        subset(ds, None, 0)
    with pytest.raises(DataError, match="no image of hand has a non-difficult apple"):
        subset(ds, ["apple"], None)


# ----------------------------------------------------------------------------------------- CLI


def test_cli_voc_to_coco(synthetic, tmp_path):
    out = tmp_path / "val.json"
    result = CliRunner().invoke(
        command, ["--devkit", str(synthetic), "--split", "trainval", "--to-coco", str(out)]
    )
    assert result.exit_code == 0, result.output
    voc = load_voc(synthetic, "trainval")
    n_objects = sum(len(r.boxes) for r in voc)
    assert result.output.startswith(f"wrote 4 images, {n_objects} objects (disc ")
    assert f"to {out} (file_names relative to {voc.root / 'JPEGImages'})" in result.output
    _assert_same(load_coco(out, voc.root / "JPEGImages"), voc, ids=("1", "2", "3", "4"))


def test_cli_coco_to_voc_with_classes_and_limit(tmp_path):
    ann, images = _coco_tree(tmp_path)
    args = ["--coco", str(ann), "--images", str(images), "--to-voc", str(tmp_path / "dk")]
    args += ["--out-split", "val", "--classes", "zebra, apple", "--limit", "1"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    root = tmp_path / "dk" / "VOC2007"
    assert result.output == (
        f"wrote 1 images, 2 objects (zebra 1, apple 1; 1 difficult) to {root} split val\n"
    )
    voc = load_voc(tmp_path / "dk", "val")
    assert voc.classes == ("zebra", "apple") and voc.image_ids == ("7",)
    assert voc[0].labels.tolist() == [0, 1] and voc[0].difficult.tolist() == [False, True]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--to-coco", "o.json"], "give one source"),
        (["--devkit", "{dk}", "--coco", "{ann}", "--to-coco", "o.json"], "give one source"),
        (["--devkit", "{dk}", "--to-coco", "o.json"], "--devkit needs --split"),
        (["--coco", "{ann}", "--to-coco", "o.json"], "--coco needs --images"),
        (["--devkit", "{dk}", "--split", "val"], "give one target"),
        (["--devkit", "{dk}", "--split", "val", "--to-coco", "o.json", "--to-voc", "d"],
         "give one target"),
        (["--devkit", "{dk}", "--split", "val", "--to-coco", "o.json", "--out-split", "x"],
         "--out-split and --copy-images go with --to-voc"),
        (["--devkit", "{dk}", "--split", "val", "--to-coco", "o.json", "--classes", "disc,"],
         "empty class name"),
    ],
)  # fmt: skip
def test_cli_usage_errors(synthetic, tmp_path, monkeypatch, args, message):
    ann, _ = _coco_tree(tmp_path)
    args = [a.format(dk=synthetic, ann=ann) for a in args]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the relative outputs would land here
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert os.listdir(cwd) == []  # nothing written


def test_cli_unknown_class_is_a_config_error_naming_the_known_ones(synthetic, tmp_path):
    out = tmp_path / "o.json"
    args = ["--devkit", str(synthetic), "--split", "val", "--to-coco", str(out)]
    result = CliRunner().invoke(command, [*args, "--classes", "disc,dog"])
    assert isinstance(result.exception, ConfigError)  # the sppdet group prints it as one line
    assert "unknown class(es) dog" in str(result.exception)
    assert "known classes: disc, square, triangle, star" in str(result.exception)
    assert not out.exists()
