"""Tests of sppdet.bbox_reg and sppdet.bbox_train: the delta round trip, ridge solver, reservoir,
model I/O."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from sppdet.bbox_reg import (
    DELTA_CLIP,
    BBoxRegConfig,
    BBoxRegressor,
    decode,
    encode,
    match_training_rows,
)
from sppdet.bbox_train import BBoxRegTrainer, ridge_fit
from sppdet.errors import DataError


def random_boxes(rng, n, size=500.0):
    xy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(10, size / 2, (n, 2))  # size ratios <= 25, inside DELTA_CLIP
    return np.concatenate([xy, xy + wh], 1)


def test_encode_by_hand():
    p = np.array([[0.0, 0.0, 10.0, 20.0]])
    g = np.array([[5.0, 0.0, 25.0, 10.0]])  # centre (15, 5) vs (5, 10); size 20x10 vs 10x20
    np.testing.assert_allclose(encode(p, g), [[1.0, -0.25, math.log(2), math.log(0.5)]])


def test_round_trip_float64():
    rng = np.random.default_rng(0)
    p, g = random_boxes(rng, 1000), random_boxes(rng, 1000)
    np.testing.assert_allclose(decode(p, encode(p, g)), g, rtol=0, atol=1e-9)
    # and the other way: encode(P, decode(P, t)) == t for deltas inside the clamp
    t = rng.normal(0, 0.5, (1000, 4))
    np.testing.assert_allclose(encode(p, decode(p, t)), t, rtol=0, atol=1e-9)


def test_round_trip_float32_and_torch():
    rng = np.random.default_rng(1)
    p, g = random_boxes(rng, 200).astype(np.float32), random_boxes(rng, 200).astype(np.float32)
    d = encode(p, g)
    assert d.dtype == np.float32
    np.testing.assert_allclose(decode(p, d), g, atol=1e-3)
    pt, gt = torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(g, dtype=torch.float64)
    dt = encode(pt, gt)
    assert isinstance(dt, torch.Tensor)
    np.testing.assert_allclose(dt.numpy(), encode(p.astype(np.float64), g), atol=1e-6)
    np.testing.assert_allclose(decode(pt, dt).numpy(), g, atol=1e-6)


def test_decode_clamps_and_broadcasts():
    p = np.array([[0.0, 0.0, 16.0, 16.0]])
    box = decode(p, np.array([[0.0, 0.0, 100.0, 100.0]]))  # exp(100) would be 2.7e43
    assert np.isfinite(box).all()
    np.testing.assert_allclose(box[0, 2] - box[0, 0], 16 * math.exp(DELTA_CLIP))
    deltas = np.zeros((3, 5, 4))
    assert decode(random_boxes(np.random.default_rng(0), 3)[:, None], deltas).shape == (3, 5, 4)
    with pytest.raises(ValueError):
        encode(np.array([[1.0, 1.0, 1.0, 5.0]]), p)


@pytest.mark.parametrize("n,d", [(30, 50), (80, 10)])
def test_ridge_primal_equals_dual_and_closed_form(n, d):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, 3))
    w1, b1 = ridge_fit(x, y, 2.5, form="primal")
    w2, b2 = ridge_fit(x, y, 2.5, form="dual")
    a = np.concatenate([x.astype(np.float64), np.ones((n, 1))], 1)
    ref = np.linalg.solve(a.T @ a + 2.5 * np.eye(d + 1), a.T @ y)
    for w, b in ((w1, b1), (w2, b2)):
        np.testing.assert_allclose(w, ref[:-1], atol=1e-9)
        np.testing.assert_allclose(b, ref[-1], atol=1e-9)


def test_ridge_recovers_known_box_transform():
    rng = np.random.default_rng(3)
    n, d, k = 400, 24, 2
    x = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, k, n)
    w_true = rng.normal(0, 0.05, (k, d, 4))
    b_true = rng.normal(0, 0.1, (k, 4))
    targets = np.einsum("nd,ndt->nt", x.astype(np.float64), w_true[labels]) + b_true[labels]
    p = random_boxes(rng, n)
    g = decode(p, targets)
    trainer = BBoxRegTrainer(k, d, BBoxRegConfig(ridge_lambda=1e-6), seed=0)
    for s in range(0, n, 100):  # streamed in "images"
        sl = slice(s, s + 100)
        trainer.add(x[sl], p[sl], g[sl], labels[sl])
    model = trainer.fit()
    np.testing.assert_allclose(model.weights * model.target_std[:, None], w_true, atol=1e-6)
    np.testing.assert_allclose(model.predict(x, p, labels), g, atol=1e-3)
    all_boxes = model.predict_all(x, p)
    assert all_boxes.shape == (n, k, 4) and all_boxes.dtype == np.float32
    np.testing.assert_allclose(all_boxes[np.arange(n), labels], g, atol=1e-3)
    # a heavily regularised fit shrinks toward the class-mean delta, not toward zero
    loose = BBoxRegTrainer(k, d, BBoxRegConfig(ridge_lambda=1e9))
    loose.add(x, p, g, labels)
    mean0 = targets[labels == 0].mean(0)
    np.testing.assert_allclose(
        loose.fit().deltas_all(x[:5])[:, 0], np.tile(mean0, (5, 1)), atol=1e-4
    )


def test_skip_rows_and_empty_class():
    rng = np.random.default_rng(4)
    p = random_boxes(rng, 10)
    trainer = BBoxRegTrainer(3, 4, BBoxRegConfig(min_iou=0.5))
    labels = np.array([0] * 5 + [-1] * 5)
    ious = np.array([0.9, 0.4, 0.6, 0.5, 0.2] + [1.0] * 5)
    trainer.add(rng.normal(size=(10, 4)), p, p, labels, ious=ious)
    assert trainer.counts() == ([3, 0, 0], [3, 0, 0])
    model = trainer.fit()
    # classes without rows leave the proposals unchanged; label -1 too
    out = model.predict(rng.normal(size=(10, 4)), p, np.array([1, 2, -1] * 3 + [1]))
    np.testing.assert_allclose(out, p, atol=1e-4)


def test_reservoir_is_bounded_and_uniform():
    cap, n = 100, 2000
    trainer = BBoxRegTrainer(2, 1, BBoxRegConfig(max_samples_per_class=cap), seed=5)
    p = np.tile([[0.0, 0.0, 10.0, 10.0]], (50, 1))
    for s in range(0, n, 50):
        ids = np.arange(s, s + 50, dtype=np.float32)[:, None]  # the feature is the row id
        trainer.add(ids, p, p, np.zeros(50, np.int64))
    assert trainer.counts() == ([cap, 0], [n, 0])
    kept = trainer._res[0].x[:, 0]
    assert len(np.unique(kept)) == cap
    assert 0.3 < (kept < n / 2).mean() < 0.7  # uniform over the stream, not the first rows
    assert kept.max() > n * 0.8


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_reservoirs_spilled_to_disk_fit_the_same_regressors(tmp_path, dtype):
    """Rows kept in temporary files (spill_dir) instead of memory: the same regressors to the
    last bit, through the reservoirs' filling and replacement phases; no file left behind."""
    rng = np.random.default_rng(8)
    cfg = BBoxRegConfig(max_samples_per_class=150, storage_dtype=dtype, ridge_lambda=3.0)
    images = []
    for _ in range(12):  # 12 x 40 rows over 3 classes: every reservoir overflows its 150
        p = random_boxes(rng, 40)
        images.append((rng.normal(size=(40, 9)), p, p + rng.normal(0, 2, (40, 4))))
        images[-1] += (rng.integers(0, 3, 40),)
    memory, spilled = (
        BBoxRegTrainer(3, 9, cfg, seed=2),
        BBoxRegTrainer(3, 9, cfg, seed=2, spill_dir=tmp_path),
    )
    for trainer in (memory, spilled):
        for x, p, gt, labels in images:
            trainer.add(x, p, gt, labels)
    assert memory.counts() == spilled.counts() and max(memory.counts()[1]) > 150
    a, b = memory.fit(), spilled.fit()
    for f in ("weights", "bias", "target_mean", "target_std", "num_samples"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    del spilled
    assert list(tmp_path.iterdir()) == []


def test_match_training_rows():
    gt = np.array([[0, 0, 10, 10], [20, 20, 40, 40]], np.float32)
    props = np.array([[0, 0, 10, 9], [20, 20, 40, 36], [0, 0, 4, 4], [21, 21, 40, 40]], np.float32)
    rows, matched, labels = match_training_rows(props, gt, np.array([7, 3]), 0.5)
    np.testing.assert_array_equal(rows, [0, 1, 3])
    np.testing.assert_array_equal(labels, [7, 3, 3])
    np.testing.assert_array_equal(matched, gt[[0, 1, 1]])


def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(6)
    trainer = BBoxRegTrainer(2, 8, BBoxRegConfig(storage_dtype="float16"))
    p = random_boxes(rng, 40)
    trainer.add(rng.normal(size=(40, 8)), p, p + rng.normal(0, 1, (40, 4)), rng.integers(0, 2, 40))
    model = trainer.fit()
    model.save(tmp_path / "bbox.npz")
    back = BBoxRegressor.load(tmp_path / "bbox.npz")
    for f in ("weights", "bias", "target_mean", "target_std", "num_samples"):
        np.testing.assert_array_equal(getattr(back, f), getattr(model, f))
    x = rng.normal(size=(5, 8)).astype(np.float32)
    np.testing.assert_array_equal(back.predict_all(x, p[:5]), model.predict_all(x, p[:5]))
    assert back.feature_scale is None  # not given: an older file, without the scale
    with pytest.raises(DataError, match="missing.npz"):
        BBoxRegressor.load(tmp_path / "missing.npz")
    dataclasses.replace(model, feature_scale=0.125).save(tmp_path / "scaled.npz")
    assert BBoxRegressor.load(tmp_path / "scaled.npz").feature_scale == 0.125


def test_predict_rows_equals_predict_on_gathered_rows():
    rng = np.random.default_rng(5)
    k, d = 3, 6
    model = BBoxRegressor(
        weights=rng.normal(size=(k, d, 4)).astype(np.float32) * 0.01,
        bias=rng.normal(size=(k, 4)).astype(np.float32) * 0.01,
        target_mean=np.zeros((k, 4), np.float32),
        target_std=np.full((k, 4), 0.1, np.float32),
        num_samples=np.full(k, 10, np.int64),
    )
    feats = rng.normal(size=(4, d)).astype(np.float32)
    rows = np.array([0, 2, 2, 3, 1])
    labels = np.array([0, 1, 2, 2, 0])
    props = rng.uniform(0, 50, size=(5, 2)).astype(np.float32)
    props = np.concatenate([props, props + 20], axis=1)
    np.testing.assert_allclose(
        model.predict_rows(feats, rows, props, labels),
        model.predict(feats[rows], props, labels),
        rtol=1e-5,
        atol=1e-4,
    )
    # detection passes a tensor: the product runs in torch and must give the same boxes
    np.testing.assert_allclose(
        model.predict_rows(torch.from_numpy(feats), rows, props, labels),
        model.predict(feats[rows], props, labels),
        rtol=1e-5,
        atol=1e-4,
    )


def test_deltas_all_tensor_matches_float64_reference():
    rng = np.random.default_rng(8)
    k, d = 4, 33
    model = BBoxRegressor(
        weights=rng.normal(size=(k, d, 4)).astype(np.float32),
        bias=rng.normal(size=(k, 4)).astype(np.float32),
        target_mean=rng.normal(size=(k, 4)).astype(np.float32),
        target_std=rng.uniform(0.05, 0.5, size=(k, 4)).astype(np.float32),
        num_samples=np.full(k, 10, np.int64),
    )
    x = rng.normal(size=(9, d)).astype(np.float32)
    ref = np.einsum("nd,kdj->nkj", x.astype(np.float64), model.weights.astype(np.float64))
    ref = (ref + model.bias) * model.target_std + model.target_mean
    got = model.deltas_all_tensor(torch.from_numpy(x))
    assert got.shape == (9, k, 4) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(model.deltas_all(x), ref, rtol=1e-5, atol=1e-4)
