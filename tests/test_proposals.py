"""Selective-search backends: box convention, filtering, determinism, bad input."""

from __future__ import annotations

import dataclasses
import logging

import cv2
import numpy as np
import pytest

from sppdet import boxes as B
from sppdet.errors import ConfigError
from sppdet.proposals import ProposalConfig, diversification, propose

FAST = ProposalConfig(mode="fast", min_size=0)


def blocks(width: int = 64, height: int = 48, seed: int = 0, cell: int = 8) -> np.ndarray:
    """``Array[H, W, 3]`` uint8 of random flat-coloured ``cell`` x ``cell`` blocks."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // cell + 1, width // cell + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(small, cell, 0), cell, 1)[:height, :width])


def square_scene(width: int = 64, height: int = 48, box=(10, 5, 30, 25)) -> np.ndarray:
    """Dark image with one bright square covering pixels ``x1 .. x2 - 1``, ``y1 .. y2 - 1``."""
    image = np.full((height, width, 3), 20, np.uint8)
    x1, y1, x2, y2 = box
    image[y1:y2, x1:x2] = (230, 200, 40)
    return image


def check_valid(boxes: np.ndarray, width: int, height: int, min_size: int = 0) -> None:
    assert boxes.dtype == np.float32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(boxes) >= 1
    np.testing.assert_array_equal(boxes, np.round(boxes))  # integer pixel edges
    assert (
        (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
    )
    sides = boxes[:, 2:] - boxes[:, :2]
    assert (sides > 0).all() and (sides >= min_size).all()
    assert len(np.unique(boxes, axis=0)) == len(boxes)


@pytest.mark.parametrize("backend", ["opencv", "selectivesearch"])
def test_exact_object_box_in_internal_convention(backend):
    # The square covers pixels 10..29 x 5..24: internal xyxy [10, 5, 30, 25] in both backends
    # (the selectivesearch package reports inclusive maxima, OpenCV a pixel count).
    config = dataclasses.replace(FAST, backend=backend, ks=(50,))
    boxes = propose(square_scene(), config)
    check_valid(boxes, 64, 48)
    assert [10, 5, 30, 25] in boxes.tolist()
    assert [0, 0, 64, 48] in boxes.tolist()


@pytest.mark.parametrize("backend", ["opencv", "selectivesearch"])
def test_blocks_valid_and_deterministic(backend):
    config = dataclasses.replace(FAST, backend=backend)
    first = propose(blocks(), config)
    propose(blocks(seed=1), config)  # other work in between must not change the order
    again = propose(blocks(), config)
    check_valid(first, 64, 48)
    np.testing.assert_array_equal(first, again)


def test_min_size_and_max_boxes():
    image = blocks(seed=2)
    everything = propose(image, FAST)
    big = propose(image, dataclasses.replace(FAST, min_size=16))
    check_valid(big, 64, 48, min_size=16)
    sides = everything[:, 2:] - everything[:, :2]
    np.testing.assert_array_equal(big, everything[(sides >= 16).all(1)])  # order kept
    capped = propose(image, dataclasses.replace(FAST, max_boxes=5))
    np.testing.assert_array_equal(capped, everything[:5])


def test_downscaled_boxes_are_mapped_back():
    # Segmentation runs at max_side 100; boxes come back in the 400x300 image's pixels.
    image = cv2.resize(square_scene(), (256, 192), interpolation=cv2.INTER_NEAREST)
    image = np.pad(image, ((0, 108), (0, 144), (0, 0)), constant_values=20)  # 400 x 300
    boxes = propose(image, dataclasses.replace(FAST, max_side=100))
    check_valid(boxes, 400, 300)
    best = B.box_iou(np.array([[40, 20, 120, 100]]), boxes).max()
    assert best > 0.95
    assert boxes.max() > 200  # coordinates are in the original image


@pytest.mark.parametrize("backend", ["opencv", "selectivesearch"])
@pytest.mark.parametrize("shape", [(1, 1), (3, 2), (48, 64)])
def test_degenerate_images_give_whole_image_box(backend, shape, caplog):
    height, width = shape
    uniform = np.full((height, width, 3), 128, np.uint8)
    config = dataclasses.replace(FAST, backend=backend, min_size=20)
    with caplog.at_level(logging.WARNING, logger="sppdet.proposals"):
        boxes = propose(uniform, config)
    assert boxes.tolist() == [[0, 0, width, height]]
    if min(shape) < 20:  # everything filtered (or segmentation failed): warned
        assert "whole image" in caplog.text


def test_huge_image_is_downscaled_not_slow():
    image = cv2.resize(blocks(), (4000, 3000), interpolation=cv2.INTER_NEAREST)
    boxes = propose(image, dataclasses.replace(FAST, max_side=200))
    check_valid(boxes, 4000, 3000)


def test_backend_failure_falls_back(monkeypatch, caplog):
    import sppdet.proposals as P

    def broken(*_):
        raise cv2.error("boom")

    monkeypatch.setitem(P._BACKEND_FNS, "opencv", broken)
    with caplog.at_level(logging.WARNING, logger="sppdet.proposals"):
        boxes = propose(blocks(), FAST)
    assert boxes.tolist() == [[0, 0, 64, 48]]
    assert "failed" in caplog.text


def test_bad_arrays_raise():
    with pytest.raises(ValueError):
        propose(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError):
        propose(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError):
        propose(np.zeros((0, 10, 3), np.uint8))


def test_opencv_fast_mode_is_opencvs_preset():
    image = blocks(seed=3)
    rgb_boxes = propose(image, ProposalConfig(mode="opencv_fast", min_size=0, max_side=0))
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    ss.switchToSelectiveSearchFast()
    ref = B.clip_boxes(B.from_xywh(ss.process()), 64, 48)
    assert {tuple(b) for b in rgb_boxes.tolist()} == {tuple(b) for b in ref.tolist()}


def test_presets_and_config_validation():
    assert diversification(ProposalConfig(mode="fast")) == (
        ("hsv", "lab"),
        (50, 100),
        ("CTSF", "TSF"),
    )
    assert len(diversification(ProposalConfig(mode="quality"))[0]) == 5
    for bad in (
        {"backend": "nope"},
        {"mode": "slow"},
        {"color_spaces": ("xyz",)},
        {"strategies": ("CX",)},
        {"ks": ()},
        {"min_size": -1},
        {"backend": "selectivesearch", "mode": "opencv_fast"},
    ):
        with pytest.raises(ConfigError):
            ProposalConfig(**bad)
