"""sppdet.packing: how a model file stores tensors (float32 / float16 / int8 per channel)."""

from __future__ import annotations

import numpy as np
import torch

from sppdet.bbox_reg import BBoxRegressor
from sppdet.packing import (
    HALF_MIN_NUMEL,
    pack_bbox,
    pack_state,
    quantize,
    unpack,
    unpack_bbox,
    unpack_state,
)


def naive_quantize(w: np.ndarray) -> np.ndarray:
    """float64 reference: each output channel (first axis) rounded to 1/254 of its range."""
    out = np.empty_like(w, dtype=np.float64)
    for o in range(w.shape[0]):
        s = np.abs(w[o]).max() / 127.0
        out[o] = np.round(w[o] / s) * s
    return out


def test_quantize_per_output_channel_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    # channels of very different ranges: one scale for all would flatten the small ones
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.logspace(-3, 1, 16)[:, None, None, None]
    packed = quantize(w, (1, 2, 3))
    q, s = packed["int8"], packed["scale"]
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (16, 1, 1, 1)
    assert q.abs().amax(dim=(1, 2, 3)).eq(127).all()  # every channel uses its full range
    ref = naive_quantize(w.double().numpy())
    np.testing.assert_allclose(unpack(packed).numpy(), ref, rtol=1e-5, atol=1e-9)
    err = (unpack(packed) - w).abs()
    assert (err <= s / 2 * (1 + 1e-5)).all() and err.max() > 0


def test_quantize_keeps_an_all_zero_channel_zero():
    w = torch.randn(3, 5)
    w[1] = 0
    out = unpack(quantize(w, (1,)))
    assert torch.equal(out[1], torch.zeros(5)) and torch.isfinite(out).all()


def test_pack_state_halves_only_big_floating_tensors():
    state = {
        "conv.weight": torch.randn(64, 32, 3, 3),  # big: float16
        "bn.running_var": torch.rand(64),  # small: as it is
        "bn.num_batches_tracked": torch.tensor(7),
    }
    p16, p32 = pack_state(state, True), pack_state(state, False)
    assert p16["conv.weight"].dtype == torch.float16
    assert p16["bn.running_var"].dtype == torch.float32
    assert p16["bn.num_batches_tracked"].dtype == torch.int64
    back = unpack_state(p16)
    assert torch.equal(back["bn.running_var"], state["bn.running_var"])
    assert (back["conv.weight"] - state["conv.weight"]).abs().max() < 5e-3
    assert unpack_state(p32)["conv.weight"].equal(state["conv.weight"])
    assert HALF_MIN_NUMEL > 64  # the batch-norm vectors above are below it


def test_box_regressors_get_one_scale_per_class_and_coordinate():
    rng = np.random.default_rng(0)
    k, d = 3, 2000
    w = rng.normal(size=(k, d, 4)).astype(np.float32)
    w[:, :, 2] *= 100  # one coordinate much larger: it must not coarsen the others
    bbox = BBoxRegressor(
        weights=w,
        bias=rng.normal(size=(k, 4)).astype(np.float32),
        target_mean=rng.normal(size=(k, 4)).astype(np.float32),
        target_std=rng.random(size=(k, 4)).astype(np.float32) + 0.1,
        num_samples=np.array([5, 6, 7]),
        feature_scale=0.25,
    )
    packed = pack_bbox(bbox, True, int8=True)
    assert packed["weights"]["scale"].shape == (k, 1, 4)
    back = unpack_bbox(packed)
    ref = naive_quantize(w.transpose(0, 2, 1).reshape(k * 4, d)).reshape(k, 4, d)
    np.testing.assert_allclose(back.weights, ref.transpose(0, 2, 1), rtol=1e-5, atol=1e-8)
    rel = np.abs(back.weights - w).max(axis=1) / np.abs(w).max(axis=1)
    assert rel.max() <= 0.5 / 127 * (1 + 1e-5)  # each coordinate within half its own step
    np.testing.assert_array_equal(back.bias, bbox.bias)  # small arrays stay exact
    np.testing.assert_array_equal(back.num_samples, bbox.num_samples)
    assert back.feature_scale == 0.25 and back.weights.dtype == np.float32
