"""Tests of sppdet.scales: resize factors, resized sizes and the per-window scale choice."""

from __future__ import annotations

import numpy as np
import pytest

from sppdet.scales import (
    FIVE_SCALES,
    SINGLE_SCALE,
    resized_size,
    scale_factor,
    select_scales,
)


def test_presets_match_the_paper():
    assert SINGLE_SCALE == (688,)
    assert FIVE_SCALES == (480, 576, 688, 864, 1200)


def test_scale_factor_hand_cases():
    # VOC-like 375 x 500 at 688: the short side (height) becomes 688, the long 917.
    f = scale_factor(375, 500, 688, 2000)
    assert f == pytest.approx(688 / 375)
    assert resized_size(375, 500, f) == (688, 917)
    # Portrait: the short side is the width.
    f = scale_factor(500, 375, 688, 2000)
    assert resized_size(500, 375, f) == (917, 688)
    # 100 x 1000 at 688 would be 6880 long: capped so the long side is 2000.
    f = scale_factor(100, 1000, 688, 2000)
    assert f == pytest.approx(2.0)
    assert resized_size(100, 1000, f) == (200, 2000)
    # Exactly at the cap is not capped (round(f * long) > max_size triggers the cap).
    assert scale_factor(500, 1000, 1000, 2000) == pytest.approx(2.0)
    # Downscaling works the same way.
    assert resized_size(1000, 1500, scale_factor(1000, 1500, 480, 2000)) == (480, 720)


def test_scale_factor_property_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(500):
        h, w = (int(v) for v in rng.integers(1, 3000, size=2))
        short = int(rng.choice(FIVE_SCALES + (64, 224)))
        max_size = int(rng.integers(short, 3 * short))
        f = scale_factor(h, w, short, max_size)
        rh, rw = resized_size(h, w, f)
        uncapped_long = round(max(h, w) * (short / min(h, w)))
        if uncapped_long <= max_size:
            assert min(rh, rw) == short, (h, w, short, max_size)
            assert max(rh, rw) == uncapped_long
        else:
            assert max(rh, rw) == max_size, (h, w, short, max_size)
            assert min(rh, rw) <= short


def test_scale_factor_rejects_empty_images():
    with pytest.raises(ValueError, match="positive"):
        scale_factor(0, 10, 688, 2000)
    with pytest.raises(ValueError):
        scale_factor(10, -1, 688, 2000)


def test_resized_size_is_at_least_one_pixel():
    assert resized_size(1, 1000, 0.0001) == (1, 1)
    assert resized_size(10, 20, 1.0) == (10, 20)
    assert resized_size(10, 20, 0.5) == (5, 10)


def _brute_select(boxes: np.ndarray, factors) -> np.ndarray:
    out = []
    for x1, y1, x2, y2 in boxes:
        area = max(x2 - x1, 0.0) * max(y2 - y1, 0.0)
        best, best_d = 0, float("inf")
        for k, f in enumerate(factors):
            d = abs(area * f * f - 224.0 * 224.0)
            if d < best_d:  # first minimum wins, as argmin
                best, best_d = k, d
        out.append(best)
    return np.array(out, dtype=np.int64)


def test_select_scales_equals_brute_force_loop():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 400, size=(2000, 2))
    wh = np.exp(rng.uniform(np.log(2), np.log(500), size=(2000, 2)))
    boxes = np.concatenate([xy, xy + wh], axis=1)
    factors = [scale_factor(375, 500, s, 2000) for s in FIVE_SCALES]
    got = select_scales(boxes, factors)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, _brute_select(boxes, factors))
    assert set(got.tolist()) == set(range(5))  # every scale is chosen for some window


def test_select_scales_hand_cases():
    factors = [0.5, 1.0, 2.0]
    boxes = np.array(
        [
            [0, 0, 224, 224],  # already 224^2 at factor 1
            [10, 10, 122, 122],  # 112^2: doubled is 224^2
            [0, 0, 448, 448],  # 448^2: halved is 224^2
            [0, 0, 1000, 1000],  # huge: the smallest factor
            [5, 5, 5, 5],  # zero area: every scale is equally far; the first wins
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(select_scales(boxes, factors), [1, 2, 0, 0, 0])


def test_select_scales_single_scale_and_empty():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 900, 900]], dtype=np.float32)
    np.testing.assert_array_equal(select_scales(boxes, [1.7]), [0, 0])
    out = select_scales(np.zeros((0, 4)), [0.5, 1.0])
    assert out.shape == (0,)
    assert out.dtype == np.int64
