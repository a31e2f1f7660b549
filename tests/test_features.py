"""Tests of sppdet.features: pooling windows across scales, flips, the fp16 map cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sppdet.backbones import BackboneSpec
from sppdet.boxes import flip_boxes
from sppdet.errors import CacheMismatchError
from sppdet.features import FeatureCache, FeatureConfig, FeatureExtractor, ScaleMap, SPPConfig
from sppdet.spp import map_windows, spp_dim, spp_pool
from sppdet.window_features import MapProvider
from sppdet.window_pool import pool_windows

#: A made-up trunk geometry with a nonzero offset, so the offset is seen to be used.
SPEC = BackboneSpec("test", stride=16, channels=4, offset=15.0, tap="test", torchvision_model=None)


def random_boxes(rng: np.random.Generator, n: int, width: int, height: int) -> np.ndarray:
    """``Array[n, 4]`` internal xyxy integer boxes inside a ``width x height`` image."""
    x = np.sort(rng.integers(0, width + 1, size=(n, 2)), axis=1)
    y = np.sort(rng.integers(0, height + 1, size=(n, 2)), axis=1)
    return np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1).astype(np.float32)


def reference_pool(m: ScaleMap, box: np.ndarray, spp: SPPConfig) -> torch.Tensor:
    """One window pooled at one scale, spelled out: scale the box, map it, pool it."""
    win = map_windows(
        torch.from_numpy(box.reshape(1, 4) * np.float32(m.factor)),
        stride=SPEC.stride,
        offset=SPEC.offset,
        fmap_size=tuple(m.fmap.shape[1:]),
    )
    return spp_pool(m.fmap, win, spp.levels)[0]


# ---------------------------------------------------------------- pool_windows


@pytest.mark.parametrize("spp", [SPPConfig(), SPPConfig(levels=(4, 3, 2, 1))])
def test_pool_windows_one_scale_equals_spp_of_mapped_windows(spp):
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    m = ScaleMap(torch.randn(4, 10, 14, generator=gen), 0.5)  # a 320 x 448 image at 0.5
    boxes = random_boxes(rng, 300, 448, 320)
    got = pool_windows([m], boxes, SPEC, spp)
    assert got.shape == (300, spp_dim(4, spp.levels))
    assert got.dtype == torch.float32
    win = map_windows(
        torch.from_numpy(boxes * np.float32(0.5)),
        stride=16,
        offset=15.0,
        fmap_size=(10, 14),
    )
    torch.testing.assert_close(got, spp_pool(m.fmap, win, spp.levels), rtol=0, atol=0)


def _brute_scale(box: np.ndarray, factors: list[float]) -> int:
    area = float(box[2] - box[0]) * float(box[3] - box[1])
    d = [abs(area * f * f - 224.0**2) for f in factors]
    return int(np.argmin(d))


def test_pool_windows_uses_the_selected_scale_per_window():
    rng = np.random.default_rng(1)
    gen = torch.Generator().manual_seed(1)
    # A 400 x 600 image at factors 0.5, 1, 2 (maps of about h/16 x w/16 cells), distinct content.
    factors = [0.5, 1.0, 2.0]
    maps = [
        ScaleMap(torch.randn(4, h, w, generator=gen), f)
        for f, (h, w) in zip(factors, [(13, 19), (25, 38), (50, 75)], strict=True)
    ]
    # Random windows plus the whole image (area 240000 > 1.6 * 224^2: factor 0.5) and a
    # 100 x 100 window (doubled: 200^2, the closest to 224^2).
    extra = np.array([[0, 0, 600, 400], [7, 9, 107, 109]], dtype=np.float32)
    boxes = np.concatenate([random_boxes(rng, 150, 600, 400), extra])
    spp = SPPConfig()
    got = pool_windows(maps, boxes, SPEC, spp)
    chosen = [_brute_scale(b, factors) for b in boxes]
    assert set(chosen) == {0, 1, 2}  # all three scales are exercised
    for row, box, k in zip(got, boxes, chosen, strict=True):
        torch.testing.assert_close(row, reference_pool(maps[k], box, spp), rtol=0, atol=0)


def test_pool_windows_scale_choice_matters():
    # Guard for the test above: the same window pooled at another scale gives another vector.
    gen = torch.Generator().manual_seed(2)
    maps = [
        ScaleMap(torch.randn(4, 7, 10, generator=gen), 0.5),
        ScaleMap(torch.randn(4, 13, 19, generator=gen), 1.0),
    ]
    box = np.array([0, 0, 200, 150], dtype=np.float32)  # area 30000: closest to 224^2 at 1.0
    got = pool_windows(maps, box[None], SPEC, SPPConfig())[0]
    torch.testing.assert_close(got, reference_pool(maps[1], box, SPPConfig()))
    assert not torch.equal(got, reference_pool(maps[0], box, SPPConfig()))


@pytest.mark.parametrize("n_maps", [1, 3])
def test_pool_windows_empty(n_maps):
    maps = [ScaleMap(torch.zeros(4, 5, 5), 1.0 + k) for k in range(n_maps)]
    out = pool_windows(maps, np.zeros((0, 4), np.float32), SPEC, SPPConfig())
    assert out.shape == (0, 4 * 50)
    assert out.dtype == torch.float32


# ---------------------------------------------------------------- flips


def test_flip_boxes_hand_case_and_involution():
    np.testing.assert_array_equal(flip_boxes([[0, 2, 10, 5]], 100), [[90, 2, 100, 5]])
    rng = np.random.default_rng(3)
    # Quarter pixels (as from a resize), exact in float32, so the checks can be exact.
    boxes = (rng.integers(0, 2000, size=(100, 4)) / 4).astype(np.float32)
    boxes[:, 2:] += boxes[:, :2]
    once = flip_boxes(boxes, 1000)
    np.testing.assert_array_equal(once[:, 2] - once[:, 0], boxes[:, 2] - boxes[:, 0])
    np.testing.assert_array_equal(once[:, [1, 3]], boxes[:, [1, 3]])
    np.testing.assert_array_equal(flip_boxes(once, 1000), boxes)
    assert flip_boxes(np.zeros((0, 4)), 10).shape == (0, 4)


def test_flipped_box_covers_the_flipped_pixels():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 255, size=(30, 41, 3), dtype=np.uint8)
    flipped = img[:, ::-1]
    for x1, y1, x2, y2 in random_boxes(rng, 50, 41, 30).astype(int):
        fx1, _, fx2, _ = flip_boxes([[x1, y1, x2, y2]], 41)[0].astype(int)
        np.testing.assert_array_equal(img[y1:y2, x1:x2][:, ::-1], flipped[y1:y2, fx1:fx2])


# ---------------------------------------------------------------- FeatureCache


def test_feature_cache_round_trip_fp16(tmp_path):
    cache = FeatureCache(tmp_path, {"kind": "maps", "dtype": "float16"})
    fmap = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(5)) * 10
    assert not cache.has("img1", [64])
    cache.save("img1", 64, False, fmap)
    cache.save("img1", 64, True, -fmap)
    assert cache.has("img1", [64])
    assert cache.has("img1", [64], flip=True)
    assert not cache.has("img1", [64, 128])
    assert cache.path("img1", 64, False) == tmp_path / "s64" / "img1.npy"
    assert cache.path("img1", 64, True) == tmp_path / "s64_flip" / "img1.npy"
    arr = cache.load("img1", 64)
    assert arr.dtype == np.float16
    assert arr.shape == (3, 4, 5)
    np.testing.assert_array_equal(arr, fmap.numpy().astype(np.float16))
    np.testing.assert_array_equal(cache.load("img1", 64, flip=True), -arr)
    np.testing.assert_allclose(arr.astype(np.float32), fmap.numpy(), rtol=1e-3, atol=1e-3)
    leftovers = [p.name for p in tmp_path.rglob(".*")]
    assert leftovers == []  # no temp files


def test_feature_cache_refuses_other_settings(tmp_path):
    FeatureCache(tmp_path, {"kind": "maps", "scales": [64], "dtype": "float16"})
    FeatureCache(tmp_path, {"kind": "maps", "scales": [64], "dtype": "float16"})  # reopened
    with pytest.raises(CacheMismatchError, match="scales"):
        FeatureCache(tmp_path, {"kind": "maps", "scales": [96], "dtype": "float16"})


def test_feature_cache_corrupt_file(tmp_path):
    cache = FeatureCache(tmp_path, {"dtype": "float16"})
    path = cache.path("bad", 64, False)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not numpy")
    with pytest.raises(CacheMismatchError, match="bad.npy"):
        cache.load("bad", 64)


# ---------------------------------------------------------------- MapProvider


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor(FeatureConfig(backbone="zf5", scales=(48, 64), max_size=128))


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(6).integers(0, 256, size=(48, 80, 3), dtype=np.uint8)


class Loader:
    """``load_image`` callable that counts how often the pixels are read."""

    def __init__(self, img: np.ndarray) -> None:
        self.img, self.calls = img, 0

    def __call__(self) -> np.ndarray:
        self.calls += 1
        return self.img


def test_extractor_maps(extractor, image):
    maps = extractor.compute(image)
    # 48 x 80 at 48 -> factor 1, map 3 x 5; at 64 -> 64 x 107, map 4 x 7 (stride 16, ceil).
    assert [m.factor for m in maps] == pytest.approx([1.0, 64 / 48])
    assert [tuple(m.fmap.shape) for m in maps] == [(256, 3, 5), (256, 4, 7)]
    assert all(m.fmap.dtype == torch.float32 for m in maps)
    assert float(maps[1].fmap.abs().max()) > 0  # not a dead map


def test_extractor_flip_is_the_map_of_the_flipped_image(extractor, image):
    a = extractor.compute(image, flip=True)
    b = extractor.compute(np.ascontiguousarray(image[:, ::-1]))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x.fmap, y.fmap, rtol=0, atol=0)


def test_map_provider_computes_once_then_loads(extractor, image, tmp_path):
    provider = MapProvider(extractor, FeatureCache(tmp_path, extractor.manifest()))
    load = Loader(image)
    first = provider.maps("img", (48, 80), load)
    assert load.calls == 1
    second = provider.maps("img", (48, 80), load)
    assert load.calls == 1  # from the cache
    assert len(first) == len(second) == 2
    for a, b in zip(first, second, strict=True):
        assert a.factor == b.factor
        assert b.fmap.dtype == torch.float32
        # computed maps are rounded as the cache stores them: a first pass and a cached one
        # see the same floats
        torch.testing.assert_close(b.fmap, a.fmap, rtol=0, atol=0)
    # A new provider over the same directory (a resumed job) also reads the cache.
    again = MapProvider(extractor, FeatureCache(tmp_path, extractor.manifest()))
    again.maps("img", (48, 80), load)
    assert load.calls == 1
    # Flipped maps are cached separately.
    flipped = provider.maps("img", (48, 80), load, flip=True)
    assert load.calls == 2
    provider.maps("img", (48, 80), load, flip=True)
    assert load.calls == 2
    assert not torch.allclose(flipped[0].fmap, first[0].fmap)


def test_map_provider_scale_subset(extractor, image, tmp_path):
    provider = MapProvider(extractor, FeatureCache(tmp_path, extractor.manifest()))
    load = Loader(image)
    (m64,) = provider.maps("img", (48, 80), load, scales=[64])
    assert m64.factor == pytest.approx(64 / 48)
    assert tuple(m64.fmap.shape) == (256, 4, 7)
    assert provider.cache.has("img", [64]) and not provider.cache.has("img", [48])
    # Only the asked scale was computed (a 5-scale miss in fine-tuning costs one conv pass)...
    (m48,) = provider.maps("img", (48, 80), load, scales=[48])
    assert load.calls == 2
    assert m48.factor == pytest.approx(1.0)
    assert tuple(m48.fmap.shape) == (256, 3, 5)
    # ... and both are cached now, equal to a full computation (fp16 cache rounding aside).
    both = provider.maps("img", (48, 80), load)
    assert load.calls == 2
    for got, ref in zip(both, extractor.compute(image), strict=True):
        scale = float(ref.fmap.abs().max())
        torch.testing.assert_close(got.fmap, ref.fmap, rtol=1e-3, atol=1e-3 * scale)


def test_map_provider_without_cache(extractor, image):
    provider = MapProvider(extractor, None)
    load = Loader(image)
    a = provider.maps("img", (48, 80), load)
    b = provider.maps("img", (48, 80), load)
    assert load.calls == 2
    torch.testing.assert_close(a[1].fmap, b[1].fmap, rtol=0, atol=0)


def test_cache_refuses_another_extractor(extractor, tmp_path):
    FeatureCache(tmp_path, extractor.manifest())
    other = FeatureExtractor(FeatureConfig(backbone="zf5", scales=(64,), max_size=128))
    with pytest.raises(CacheMismatchError, match="scales"):
        FeatureCache(tmp_path, other.manifest())


# ---------------------------------------------------------------- top blocks after the cache


def test_top_blocks_split_the_trunk_after_the_cache(image, tmp_path):
    # ZF-5 is a Sequential of 14 layers; top_blocks=3 leaves conv5 + ReLU + ... to run on the
    # cached conv4 map: same maps as the whole trunk, a cache of the lower map.
    whole = FeatureExtractor(FeatureConfig(backbone="zf5", scales=(64,), max_size=128))
    split = FeatureExtractor(
        FeatureConfig(backbone="zf5", scales=(64,), max_size=128, top_blocks=3)
    )
    (a,) = whole.compute(image)
    (b,) = split.compute(image)
    (low,) = split.compute_lower(image)
    scale = float(a.fmap.abs().max())
    # equal up to the fp16 rounding of the stored map (the lower map here, the tapped one there)
    torch.testing.assert_close(b.fmap, a.fmap, rtol=1e-2, atol=1e-2 * scale)
    assert torch.equal(low.fmap, low.fmap.half().float())  # rounded as the cache stores it
    assert low.fmap.shape[0] == 384 and b.fmap.shape[0] == 256
    assert split.manifest()["top_blocks"] == 3 and "top_blocks" not in whole.manifest()
    provider = MapProvider(split, FeatureCache(tmp_path, split.manifest()))
    (c,) = provider.maps("img", image.shape[:2], Loader(image))
    assert np.load(tmp_path / "s64" / "img.npy").shape[0] == 384  # the lower map is cached
    torch.testing.assert_close(c.fmap, a.fmap, rtol=1e-2, atol=1e-2 * scale)
    # fine-tuned top weights: another trunk id and other maps from the same cached map
    state = {k: v + 0.01 for k, v in split.top_module.state_dict().items()}
    tuned = split.with_top(state, "finetuned:test")
    assert tuned.trunk_id == "finetuned:test" and split.trunk_id == "frozen"
    (d,) = MapProvider(tuned, provider.cache).maps("img", image.shape[:2], Loader(image))
    assert not torch.allclose(d.fmap, c.fmap)


def test_top_blocks_out_of_range_or_in_rcnn_mode_are_refused():
    from sppdet.errors import ConfigError

    with pytest.raises(ConfigError, match="top_blocks"):
        FeatureExtractor(FeatureConfig(backbone="zf5", top_blocks=14))
    with pytest.raises(ConfigError, match="SPP mode"):
        FeatureExtractor(FeatureConfig(backbone="zf5", top_blocks=2, mode="rcnn"))
    with pytest.raises(ConfigError, match="top_blocks is 0"):
        FeatureExtractor(FeatureConfig(backbone="zf5")).with_top({}, "x")
