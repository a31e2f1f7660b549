"""Tests of the window-features interface (sppdet.window_features): the mode is chosen by
:func:`window_features` alone, and the per-image objects of both modes give the vectors of the
functions they wrap."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sppdet.errors import CacheMismatchError
from sppdet.features import FeatureCache, FeatureConfig, FeatureExtractor, SPPConfig
from sppdet.rcnn import RCNNProvider
from sppdet.timing import StageTimer
from sppdet.window_features import MapProvider, SPPImage, window_features
from sppdet.window_pool import pool_windows

SPP = SPPConfig(levels=(2, 1))


def _extractor(mode: str, top_blocks: int = 0) -> FeatureExtractor:
    extra = {"rcnn_input": 32, "context_padding": 4, "rcnn_batch": 3} if mode == "rcnn" else {}
    cfg = FeatureConfig(
        backbone="zf5", weights="random", scales=(64, 48), mode=mode, top_blocks=top_blocks,
        **extra,
    )  # fmt: skip
    return FeatureExtractor(cfg, "cpu")


def _image_and_boxes():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    xy = rng.uniform(0, 25, size=(9, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + rng.uniform(5, 15, size=(9, 2))], axis=1)
    return image, np.concatenate([boxes, boxes[:3]])  # repeated windows: dedup has work


@pytest.mark.parametrize(("mode", "kind"), [("spp", MapProvider), ("rcnn", RCNNProvider)])
def test_the_mode_is_chosen_by_the_factory(mode, kind, tmp_path):
    ext = _extractor(mode)
    assert type(window_features(ext, SPP)) is kind
    cached = window_features(ext, SPP, tmp_path / "c")
    assert type(cached) is kind and cached.cache is not None and not cached.cached("x")
    assert (tmp_path / "c" / "manifest.json").is_file()


def test_spp_image_pools_the_maps_of_each_trunk(tmp_path):
    ext = _extractor("spp", top_blocks=1)
    image, boxes = _image_and_boxes()
    maps = ext.compute(image)  # the tapped maps: lower part, then the top block
    ref = pool_windows(maps, boxes, ext.spec, SPP)
    windows = window_features(ext, SPP).from_image(image)
    assert isinstance(windows, SPPImage)
    plain, none = windows.pool(boxes, ext, dedup=False)
    assert none is None
    torch.testing.assert_close(plain, ref, atol=0, rtol=0)
    distinct, inverse = windows.pool(boxes, ext)
    assert len(distinct) < len(boxes)
    torch.testing.assert_close(distinct[torch.from_numpy(inverse)], ref, atol=0, rtol=0)
    # a dataset image stored by the extract stage pools the same vectors from the cache
    provider = window_features(ext, SPP, tmp_path / "c")
    provider.store("img", image.shape[:2], lambda: image, boxes)
    assert provider.cached("img")
    cached, _ = provider.image("img", image.shape[:2], lambda: 1 / 0).pool(boxes, ext, dedup=False)
    torch.testing.assert_close(cached, ref, atol=0, rtol=0)  # fp16 maps: compute() rounds too


def test_rcnn_image_from_an_image_times_warp_and_conv():
    ext = _extractor("rcnn")
    image, boxes = _image_and_boxes()
    provider = window_features(ext, SPP)
    timer = StageTimer()
    with timer("spp"):
        x, inverse = provider.from_image(image).pool(boxes, ext, hook=timer)
    assert inverse is None and len(x) == len(boxes)  # no dedup: one row per window
    torch.testing.assert_close(x, provider.pool5("img", image.shape[:2], lambda: image, boxes))
    assert timer.seconds["warp"] > 0 and timer.seconds["conv"] > 0


def test_cache_made_for_maps_is_not_reused_for_vectors(tmp_path):
    FeatureCache(tmp_path, _extractor("spp").manifest())
    with pytest.raises(CacheMismatchError, match="other settings"):
        window_features(_extractor("rcnn"), SPP, tmp_path)


def test_a_cached_map_of_another_image_size_is_refused(tmp_path):
    ext = _extractor("spp")
    image, boxes = _image_and_boxes()
    provider = window_features(ext, SPP, tmp_path / "c")
    provider.store("x", image.shape[:2], lambda: image, boxes)
    provider.pool5("x", image.shape[:2], lambda: image, boxes)  # the image it was made from
    # same id, another shape (scales fix the shorter side: the aspect ratio tells)
    wide = np.zeros((40, 100, 3), np.uint8)
    with pytest.raises(CacheMismatchError, match=r"cached map .*x\.npy is .* made from another"):
        provider.pool5("x", wide.shape[:2], lambda: wide, boxes)
