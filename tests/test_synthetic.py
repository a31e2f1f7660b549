"""Tests of sppdet.synthetic and the ``make-synthetic`` command."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
from click.testing import CliRunner

from sppdet.datasets import load_voc
from sppdet.errors import DataError
from sppdet.imageio import load_image
from sppdet.synthetic import (
    SYNTHETIC_CLASSES,
    SyntheticConfig,
    draw_object,
    make_synthetic_voc,
    render_background,
    render_scene,
)
from sppdet_cli.data_cmd import command


def _files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    summary = make_synthetic_voc(out, images=24, seed=3)
    return out, summary


def test_same_seed_same_bytes_other_seed_differs(tmp_path, tree):
    out, _ = tree
    make_synthetic_voc(tmp_path / "a", images=24, seed=3)
    assert _files(tmp_path / "a" / "VOC2007") == _files(out / "VOC2007")
    make_synthetic_voc(tmp_path / "b", images=3, seed=4)
    jpg = "JPEGImages/000001.jpg"
    assert (tmp_path / "b/VOC2007" / jpg).read_bytes() != (out / "VOC2007" / jpg).read_bytes()


def test_image_i_does_not_depend_on_the_image_count(tmp_path, tree):
    out, _ = tree
    make_synthetic_voc(tmp_path, images=3, seed=3)
    for i in (1, 2, 3):
        name = f"JPEGImages/{i:06d}.jpg"
        assert (tmp_path / "VOC2007" / name).read_bytes() == (out / "VOC2007" / name).read_bytes()


def test_tree_loads_as_voc(tree):
    out, summary = tree
    train, val = load_voc(out, "train"), load_voc(out, "val")
    trainval, test = load_voc(out, "trainval"), load_voc(out, "test")
    assert train.classes == SYNTHETIC_CLASSES  # from VOC2007/classes.txt
    assert len(train) == summary.train == 12 and len(val) == summary.val == 12
    assert set(train.image_ids).isdisjoint(val.image_ids)
    assert set(train.image_ids) | set(val.image_ids) == set(trainval.image_ids)
    assert test.image_ids == val.image_ids
    labels = np.concatenate([r.labels for r in trainval])
    difficult = np.concatenate([r.difficult for r in trainval])
    assert {SYNTHETIC_CLASSES[k]: int((labels == k).sum()) for k in range(4)} == summary.objects
    assert all(v > 0 for v in summary.objects.values())  # every class present
    assert 0 < difficult.sum() == summary.difficult < len(labels) / 2
    for r in trainval:
        assert (r.width, r.height) == (320, 240) == load_image(r.path).shape[1::-1]
        assert 1 <= len(r.boxes) <= 4
        assert np.all(r.boxes[:, :2] >= 0) and np.all(r.boxes[:, 2] <= 320)
        assert np.all(r.boxes[:, 3] <= 240) and np.all(r.boxes[:, 2:] > r.boxes[:, :2])


def test_draw_object_paints_exactly_its_mask(tmp_path):
    rng = np.random.default_rng(0)
    background = render_background(rng, 96, 64)
    for label in range(len(SYNTHETIC_CLASSES)):
        rect = (10 + label, 5, 60 + label, 50)
        image, mask = draw_object(background, label, rect, rng)
        changed = np.any(image != background, axis=2)
        assert not np.any(changed & ~mask)  # nothing outside the mask is touched
        assert _bbox(changed) == _bbox(mask)  # so the tight box of the mask bounds the object
        x0, y0, x1, y1 = _bbox(mask)
        assert rect[0] <= x0 < x1 <= rect[2] and rect[1] <= y0 < y1 <= rect[3]
        assert mask.sum() > 0.3 * (rect[2] - rect[0]) * (rect[3] - rect[1])


def test_scene_boxes_are_tight_around_visible_masks():
    config = SyntheticConfig(width=160, height=120)
    for seed in range(10):
        image, objects = render_scene(np.random.default_rng(seed), config)
        assert image.shape == (120, 160, 3) and image.dtype == np.uint8
        assert 1 <= len(objects) <= 4
        union = np.zeros((120, 160), dtype=int)
        for obj in objects:
            assert obj.box.tolist() == _bbox(obj.mask)
            union += obj.mask
        assert union.max() == 1  # visible masks do not overlap


def test_class_colours_survive_jpeg(tree):
    """Each class keeps its hue family in the written JPEG, so colour alone separates classes."""
    out, _ = tree
    expected = {"disc": 0.0, "square": 0.61, "triangle": 0.33, "star": 0.14}
    config = SyntheticConfig()
    for i in range(6):
        _, objects = render_scene(np.random.default_rng([3, i]), config)
        pixels = load_image(out / "VOC2007" / "JPEGImages" / f"{i + 1:06d}.jpg")
        for obj in objects:
            if obj.difficult:
                continue
            r, g, b = np.median(pixels[obj.mask], axis=0) / 255.0
            hue = colorsys.rgb_to_hsv(r, g, b)[0]
            target = expected[SYNTHETIC_CLASSES[obj.label]]
            assert min(abs(hue - target), 1 - abs(hue - target)) < 0.08


def test_refuses_to_overwrite_a_real_voc_tree(tmp_path, tree):
    (tmp_path / "VOC2007" / "Annotations").mkdir(parents=True)
    with pytest.raises(DataError, match="not made by make-synthetic"):
        make_synthetic_voc(tmp_path, images=2)
    out, _ = tree
    make_synthetic_voc(out, images=24, seed=3)  # its own tree is rewritten in place


def test_cli_command(tmp_path):
    result = CliRunner().invoke(
        command, [str(tmp_path), "--images", "4", "--seed", "1", "--size", "96x64"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.startswith("wrote 4 images (2 train / 2 val)")
    assert "difficult" in result.output and result.output.count("\n") == 1
    assert load_voc(tmp_path, "trainval")[0].width == 96
    bad = CliRunner().invoke(command, [str(tmp_path), "--images", "4", "--size", "96"])
    assert bad.exit_code == 2 and "WIDTHxHEIGHT" in bad.output


def test_smallest_images_the_cli_accepts(tmp_path):
    """32x32 (the CLI's minimum) once crashed drawing clutter: ``uniform(2, 1.28)``."""
    out = CliRunner().invoke(command, [str(tmp_path / "d"), "--images", "4", "--size", "32x32"])
    assert out.exit_code == 0, out.output
    assert len(list((tmp_path / "d/VOC2007/JPEGImages").glob("*.jpg"))) == 4
