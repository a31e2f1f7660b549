"""Tests of R-CNN mode (sppdet.rcnn): context padding, the batched warp against a naive float64
bilinear reference, and per-window features against the SPP pooling of the warped map."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sppdet.backbones import backbone_spec, build_backbone
from sppdet.errors import CacheMismatchError
from sppdet.features import FeatureConfig, FeatureExtractor, SPPConfig
from sppdet.rcnn import (
    RCNNFeaturizer,
    RCNNProvider,
    context_boxes,
    warp_windows,
    warp_windows_cpu,
)
from sppdet.rcnn_cache import RCNNCache, rcnn_cache_manifest
from sppdet.spp import spp_pool


def test_context_boxes_leave_padding_pixels_of_context_after_the_warp():
    boxes = np.array([[10, 20, 110, 60], [0, 0, 7, 300]], dtype=np.float32)
    size, pad = 224, 16
    out = context_boxes(boxes, size, pad)
    # centres are kept
    np.testing.assert_allclose(out[:, [0, 1]] + out[:, [2, 3]], boxes[:, [0, 1]] + boxes[:, [2, 3]])
    # the original box lands on warped pixels [pad, size - pad] on both axes
    for axis in (0, 1):
        lo, hi = out[:, axis], out[:, axis + 2]
        scale = size / (hi - lo)
        np.testing.assert_allclose((boxes[:, axis] - lo) * scale, pad, rtol=1e-5)
        np.testing.assert_allclose((boxes[:, axis + 2] - lo) * scale, size - pad, rtol=1e-5)


def test_context_boxes_reject_padding_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        context_boxes(np.zeros((1, 4)), 32, 16)


def naive_warp(image: np.ndarray, box, size: int) -> np.ndarray:
    """float64 bilinear sampling at the centre of each output cell, zero beyond the border.

    ``image`` is ``[C, H, W]``; samples at ``x = x1 + (j + 0.5) * w / size - 0.5`` in pixel-centre
    coordinates (pixel i's centre is i), clamped to the edge within one pixel of the border.
    """
    c, h, w = image.shape
    x1, y1, x2, y2 = (float(v) for v in box)
    out = np.zeros((c, size, size))
    for i in range(size):
        y = y1 + (i + 0.5) * (y2 - y1) / size - 0.5
        for j in range(size):
            x = x1 + (j + 0.5) * (x2 - x1) / size - 0.5
            if y < -1 or y > h or x < -1 or x > w:
                continue
            yc, xc = min(max(y, 0.0), h - 1), min(max(x, 0.0), w - 1)
            y0, x0 = int(np.floor(yc)), int(np.floor(xc))
            y1_, x1_ = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            ly, lx = yc - y0, xc - x0
            out[:, i, j] = (
                image[:, y0, x0] * (1 - ly) * (1 - lx)
                + image[:, y0, x1_] * (1 - ly) * lx
                + image[:, y1_, x0] * ly * (1 - lx)
                + image[:, y1_, x1_] * ly * lx
            )
    return out


def test_warp_matches_a_naive_bilinear_reference_inside_and_outside_the_image():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(3, 20, 30))
    boxes = np.array(
        [[2.0, 3.0, 17.5, 12.0], [5.0, 1.0, 9.0, 19.0], [-12.0, -6.0, 14.0, 10.0]], np.float32
    )
    got = warp_windows(
        torch.from_numpy(image).float()[None], torch.from_numpy(boxes), size=12
    ).numpy()
    for k, box in enumerate(boxes):
        np.testing.assert_allclose(got[k], naive_warp(image, box, 12), atol=1e-5)
    # the part of the last window left of / above the image (beyond one pixel) is mean colour (0)
    assert np.all(got[2][:, :2, :] == 0) and np.all(got[2][:, :, :4] == 0)


def test_cpu_warp_samples_where_roi_align_does():
    """OpenCV on uint8 pixels (the CPU path) vs roi_align on floats (the GPU path): the same
    bilinear sample points for whole-pixel windows inside the image; mean colour outside."""
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    boxes = np.array([[3, 4, 33, 30], [10, 0, 50, 40], [20, 5, 28, 17]], np.float32)
    got = warp_windows_cpu(image, boxes, 16, (0, 0, 0)).astype(np.float64)
    ref = warp_windows(
        torch.from_numpy(image).permute(2, 0, 1)[None].double(),
        torch.from_numpy(boxes).double(),
        16,
    )
    ref = ref.permute(0, 2, 3, 1).numpy()
    # cv2 replicates the crop's edge pixels where roi_align reads the neighbours beyond it:
    # compare away from the output border; uint8 rounding and cv2's fixed point allow ~1 level
    np.testing.assert_allclose(got[:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1.5)
    # a window half outside the image: its left half is the fill colour
    out = warp_windows_cpu(image, np.array([[-25.0, 0, 25, 40]]), 16, (7, 8, 9))
    assert np.all(out[0, :, :8] == [7, 8, 9]) and not np.all(out[0, :, 8:] == [7, 8, 9])
    # entirely outside: all fill
    assert np.all(warp_windows_cpu(image, np.array([[60.0, 0, 80, 9]]), 8, (1, 2, 3)) == [1, 2, 3])


@pytest.fixture(scope="module")
def zf5():
    torch.manual_seed(0)
    return build_backbone("zf5", "random", seed=0), backbone_spec("zf5")


def test_features_are_the_pyramid_of_each_warped_window(zf5):
    net, spec = zf5
    levels = (3, 2, 1)
    feat = RCNNFeaturizer(net, spec, levels, padding=8, batch=2, size=64)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 40, 30], [30, 10, 69, 49], [0, 0, 70, 50]], np.float32)
    got = feat(image, boxes, torch.device("cpu"))
    assert got.shape == (3, spec.channels * 14)
    crops = feat._warp(feat.prepare(image, torch.device("cpu")), context_boxes(boxes, 64, 8))
    assert crops.shape == (3, 3, 64, 64)
    with torch.inference_mode():
        maps = net(crops)
    for k in range(3):
        h, w = maps.shape[-2:]
        whole = torch.tensor([[0, 0, w - 1, h - 1]])
        ref = spp_pool(maps[k], whole, levels, method="loop")[0]
        torch.testing.assert_close(got[k], ref)  # same layout as SPP vectors


def test_features_do_not_depend_on_the_batch_size(zf5):
    net, spec = zf5
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    boxes = rng.uniform(0, 20, size=(5, 2)).astype(np.float32)
    boxes = np.concatenate([boxes, boxes + 15], axis=1)
    a = RCNNFeaturizer(net, spec, (2, 1), padding=4, batch=1, size=32)
    b = RCNNFeaturizer(net, spec, (2, 1), padding=4, batch=64, size=32)
    dev = torch.device("cpu")
    torch.testing.assert_close(a(image, boxes, dev), b(image, boxes, dev), atol=1e-5, rtol=1e-5)
    assert b(image, boxes[:0], dev).shape == (0, spec.channels * 5)


def test_timings_split_warp_conv_and_pooling(zf5):
    net, spec = zf5
    feat = RCNNFeaturizer(net, spec, (1,), padding=4, size=32)
    image = np.zeros((30, 30, 3), np.uint8)
    t: dict = {}
    feat.features(feat.prepare(image, torch.device("cpu")), np.array([[0, 0, 9, 9]]), t)
    assert set(t) == {"warp", "conv", "spp"} and all(v >= 0 for v in t.values())


@pytest.fixture(scope="module")
def extractor():
    cfg = FeatureConfig(
        backbone="zf5", weights="random", scales=(64,), mode="rcnn", rcnn_input=32,
        context_padding=4, rcnn_batch=3,
    )  # fmt: skip
    return FeatureExtractor(cfg, "cpu")


def _image_and_boxes(seed: int = 3):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    xy = rng.uniform(0, 25, size=(7, 2)).astype(np.float32)
    return image, np.concatenate([xy, xy + rng.uniform(5, 15, size=(7, 2))], axis=1)


def test_cached_vectors_equal_computed_ones_for_any_box_subset_and_flip(extractor, tmp_path):
    """Hits are read, misses (new boxes, flipped windows) computed; all rounded to fp16, so the
    output is the same whichever boxes were cached, in the order asked."""
    spp = SPPConfig(levels=(2, 1))
    image, boxes = _image_and_boxes()
    cache = RCNNCache(tmp_path / "c", rcnn_cache_manifest(extractor, spp))
    cached = RCNNProvider(extractor, spp, cache)
    plain = RCNNProvider(extractor, spp)  # no cache: float32 vectors, computed every time
    calls = []

    def load():
        calls.append(1)
        return image

    cached.store("img", (40, 50), load, boxes[:5])
    assert cache.has("img") and not cache.has("other") and len(calls) == 1
    assert cached.cached("img") and not cached.cached("other") and not plain.cached("img")
    _, stored = cache.load("img")
    assert stored.dtype == np.float16 and stored.shape == (5, extractor.spec.channels * 5)
    ask = boxes[[4, 0, 6, 2, 5]]  # cached and uncached, permuted
    for flip in (False, True):
        got = cached.pool5("img", (40, 50), load, ask, flip=flip)
        ref = plain.pool5("img", (40, 50), load, ask, flip=flip).half().float()
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
    calls.clear()
    hits = cached.pool5("img", (40, 50), load, boxes[[3, 1]])
    assert not calls  # all cached: the image is not even read
    torch.testing.assert_close(hits, torch.from_numpy(stored[[3, 1]]).float())
    # the evaluation's per-image interface gives the same rows, one per window (no dedup)
    pooled, inverse = cached.image("img", (40, 50), load).pool(ask, extractor)
    assert inverse is None
    torch.testing.assert_close(pooled, cached.pool5("img", (40, 50), load, ask), atol=0, rtol=0)
    assert cached.pool5("img", (40, 50), load, boxes[:0]).shape == (0, stored.shape[1])


def test_rcnn_cache_refuses_other_levels_and_reports_corrupt_files(extractor, tmp_path):
    RCNNCache(tmp_path, rcnn_cache_manifest(extractor, SPPConfig(levels=(2, 1))))
    with pytest.raises(CacheMismatchError, match="levels"):
        RCNNCache(tmp_path, rcnn_cache_manifest(extractor, SPPConfig(levels=(3, 1))))
    cache = RCNNCache(tmp_path, rcnn_cache_manifest(extractor, SPPConfig(levels=(2, 1))))
    cache.path("bad").parent.mkdir(parents=True, exist_ok=True)
    cache.path("bad").write_bytes(b"not an npz")
    with pytest.raises(CacheMismatchError, match="corrupt cached vectors"):
        cache.load("bad")
