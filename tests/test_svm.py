"""Tests of sppdet.svm: the liblinear fit, hard-negative mining, scaling, model I/O."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sppdet.errors import DataError
from sppdet.svm import (
    LinearSVMs,
    SVMConfig,
    feature_scale_from_samples,
    svm_objective,
    train_linear_svm,
)
from sppdet.svm_mining import HardNegativeCache, SVMTrainer

D = 32
# C = 0.001 suits ~10^4 samples of norm 20 (R-CNN); these tests have tens of samples
CFG = SVMConfig(C=1.0, tol=1e-4, max_iter=10000, dedup_neg_iou=None)  # rows without boxes


def blob(rng, n, x0, spread=0.1):
    """``n`` points at ``x0`` along axis 0, a small Gaussian around it in every axis."""
    x = rng.normal(0, spread, (n, D)).astype(np.float32)
    x[:, 0] += x0
    return x


def image(rng, n_pos, close, far, cls=0, k=2, close_x0=-0.3):
    """Rows of one synthetic image: GT positives of class ``cls`` then close and far negatives.

    ``close`` negatives sit near the decision boundary; ``far`` ones are trivially negative.
    Every row has IoU 0 with every ground truth except the GT rows themselves.
    """
    x = np.concatenate([blob(rng, n_pos, 3.0), blob(rng, close, close_x0), blob(rng, far, -30.0)])
    n = len(x)
    is_gt = np.arange(n) < n_pos
    labels = np.where(is_gt, cls, -1)
    iou = np.zeros((n, k), np.float32)
    iou[is_gt, cls] = 1.0
    return x, is_gt, labels, iou


def test_feature_scale_from_samples():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 3, (500, 64))
    s = feature_scale_from_samples(x, 20.0)
    assert np.linalg.norm(x * s, axis=1).mean() == pytest.approx(20.0)
    with pytest.raises(ValueError):
        feature_scale_from_samples(np.zeros((3, 4)))


def test_svm_separates_two_blobs():
    rng = np.random.default_rng(1)
    pos, neg = blob(rng, 60, 2.0, 1.0), blob(rng, 200, -2.0, 1.0)
    w, b, converged = train_linear_svm(pos, neg, CFG)
    assert converged
    st = svm_objective(w, b, pos, neg, CFG)
    assert st["train_accuracy"] == 1.0
    z_pos, z_neg = pos @ w + b, neg @ w + b
    assert z_pos.min() > 0.5 and z_neg.max() < -0.5  # a clear margin
    # the solution is the SVM optimum: perturbing it raises the primal objective
    for dw in (np.eye(D)[0] * 1e-2, np.eye(D)[3] * 1e-2):
        assert svm_objective(w + dw, b, pos, neg, CFG)["objective"] > st["objective"]
    assert st["pos_support_vectors"] >= 1 and st["neg_support_vectors"] >= 1


def test_mining_keeps_hard_and_evicts_easy():
    rng = np.random.default_rng(2)
    trainer = SVMTrainer(2, D, dataclasses.replace(CFG, retrain_every=10**6))
    x, is_gt, labels, iou = image(rng, 20, close=30, far=100)
    trainer.add_image(x, is_gt, labels, iou)
    # image 1: w = 0, so all 130 negatives were hard; the first training evicted the far ones
    cache = trainer.caches[0]
    assert cache.hard_added == 130 and cache.evicted >= 100
    neg, _ = cache.negatives()
    assert (neg[:, 0] > -5).all() and len(neg) >= 25  # close ones (support vectors, ~-1) stay
    # later images: far negatives are easy and never enter the cache; these close ones lie
    # inside the margin of the first model, so they are hard
    for _ in range(3):
        trainer.add_image(*image(rng, 5, close=10, far=100, close_x0=0.5))
    assert cache.hard_added == 130 + 30
    svms = trainer.finish()
    neg, _ = cache.negatives()
    # the last model moved its margin to the new close negatives: those make up the cache
    assert (neg[:, 0] > 0.2).all() and len(neg) >= 20
    # after the last retrain's eviction every cached negative scores >= evict_threshold
    assert (svms.scores(neg, scaled=True)[:, 0] >= CFG.evict_threshold - 1e-5).all()
    st = trainer.stats()[0]
    assert st["retrains"] == 2 and st["positives"] == 35 and st["train_accuracy"] == 1.0
    assert st["cached_negatives"] == len(neg)
    z = svms.scores(x, scaled=True)[:, 0]
    assert (z[is_gt] > 0).all() and (z[~is_gt] < 0).all()
    # class 1 has negatives but never a positive: untrained, scores -1 everywhere
    assert trainer.stats()[1]["retrains"] == 0
    np.testing.assert_array_equal(svms.scores(x, scaled=True)[:, 1], -1.0)


def test_retrain_count():
    rng = np.random.default_rng(3)
    # thresholds far from the close negatives' scores (~-1) make the counts exact
    cfg = dataclasses.replace(CFG, retrain_every=10, hard_threshold=-3.0, evict_threshold=-5.0)
    trainer = SVMTrainer(1, D, cfg)
    trainer.add_image(*image(rng, 10, close=5, far=20, k=1))  # first training: retrain 1
    counts = [trainer.stats()[0]["retrains"]]
    for _ in range(4):  # +4 hard negatives per image: 12 >= 10 after the third -> retrain 2
        trainer.add_image(*image(rng, 0, close=4, far=20, k=1))
        counts.append(trainer.stats()[0]["retrains"])
    assert counts == [1, 1, 1, 2, 2]
    st = trainer.stats()[0]
    assert st["hard_added"] == 25 + 16 and st["evicted"] == 20
    trainer.finish()  # 4 new since the last retrain: final retrain 3
    assert trainer.stats()[0]["retrains"] == 3
    trainer.finish()  # nothing new: no retrain
    assert trainer.stats()[0]["retrains"] == 3


@pytest.mark.parametrize(
    ("growth", "expected"), [(0.0, list(range(1, 21))), (0.5, [1, 2, 3, 5, 8, 12, 18])]
)
def test_retrain_growth_spaces_retrains_geometrically(growth, expected):
    rng = np.random.default_rng(5)
    cfg = dataclasses.replace(
        CFG, retrain_every=1, hard_threshold=-3.0, evict_threshold=-5.0, retrain_growth=growth
    )
    trainer = SVMTrainer(1, D, cfg)
    at = []
    for i in range(1, 21):  # every image brings hard negatives: only retrain_growth holds back
        before = trainer.stats()[0]["retrains"]
        trainer.add_image(*image(rng, 10 if i == 1 else 0, close=4, far=20, k=1))
        at += [i] if trainer.stats()[0]["retrains"] > before else []
    assert at == expected


def test_gt_rows_and_overlapping_rows_are_not_negatives():
    rng = np.random.default_rng(4)
    trainer = SVMTrainer(2, D, CFG)
    x, is_gt, labels, iou = image(rng, 4, close=0, far=6)
    iou[4:7, 0] = [0.3, 0.5, 0.29]  # IoU >= 0.3 with a GT of class 0: not a class-0 negative
    trainer.add_positives(blob(rng, 3, 3.0), np.array([1, 1, 1]))
    trainer.add_image(x, is_gt, labels, iou)
    st = trainer.stats()
    assert st[0]["hard_added"] == 4  # 6 - 2; the 4 GT rows are not negatives of class 0
    assert st[1]["hard_added"] == 10  # GT rows of class 0 are negatives of class 1 (R-CNN)
    assert st[1]["positives"] == 3


def test_negative_cache_bound_keeps_hardest():
    cache = HardNegativeCache(2, max_negatives=5)
    x = np.arange(16, dtype=np.float32).reshape(8, 2)
    scores = np.array([0.1, -0.5, 0.9, 0.3, -0.9, 0.5, 0.0, 0.7], np.float32)
    cache.add_negatives(x[:4], scores[:4])
    cache.add_negatives(x[4:], scores[4:])  # 8 > 1.25 * 5: trimmed now
    neg, s = cache.negatives()
    np.testing.assert_array_equal(np.sort(s), np.float32([0.1, 0.3, 0.5, 0.7, 0.9]))
    np.testing.assert_array_equal(neg[np.argmax(s)], x[2])
    cache.add_negatives(x[:1] + 100, np.float32([2.0]))  # 6 <= 1.25 * 5: kept until trim()
    assert cache.num_neg == 6
    cache.trim()
    np.testing.assert_array_equal(
        np.sort(cache.negatives()[1]), np.float32([0.3, 0.5, 0.7, 0.9, 2])
    )


def test_scores_apply_feature_scale_and_save_load(tmp_path):
    rng = np.random.default_rng(6)
    svms = LinearSVMs(
        W=rng.normal(size=(D, 3)).astype(np.float32),
        b=rng.normal(size=3).astype(np.float32),
        feature_scale=0.25,
    )
    x = rng.normal(size=(7, D)).astype(np.float32)
    np.testing.assert_allclose(svms.scores(x), svms.scores(x * 0.25, scaled=True), atol=1e-5)
    np.testing.assert_allclose(svms.scores(x), (x * 0.25) @ svms.W + svms.b, atol=1e-5)
    # detection's torch path (float64 reference; half-precision input is upcast)
    ref = (x.astype(np.float64) * 0.25) @ svms.W.astype(np.float64) + svms.b
    got = svms.scores_tensor(torch.from_numpy(x))
    assert got.dtype == torch.float32 and got.shape == (7, 3)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-4)
    half = torch.from_numpy(x).bfloat16()
    np.testing.assert_allclose(
        svms.scores_tensor(half).numpy(), svms.scores(half.float().numpy()), rtol=1e-5, atol=1e-4
    )
    assert svms.num_classes == 3
    svms.save(tmp_path / "svm.npz")
    back = LinearSVMs.load(tmp_path / "svm.npz")
    np.testing.assert_array_equal(back.W, svms.W)
    np.testing.assert_array_equal(back.b, svms.b)
    assert back.feature_scale == svms.feature_scale
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz"):
        LinearSVMs.load(tmp_path / "bad.npz")


def test_default_config_mining_matches_full_training():
    """R-CNN's settings (C = 0.001, features at mean norm 20) on 3,000 streamed negatives:
    mining keeps a fraction of them and reaches the objective of training on all of them."""
    rng = np.random.default_rng(7)
    pos, neg = blob(rng, 300, 2.0, 1.0), blob(rng, 3000, -2.0, 1.0)
    s = feature_scale_from_samples(np.concatenate([pos, neg]))
    # without deduplication: it drops negatives, so mining would not match training on all
    cfg = SVMConfig(dedup_neg_iou=None)
    trainer = SVMTrainer(1, D, cfg, feature_scale=s)
    trainer.add_positives(pos * s, np.zeros(len(pos), np.int64))
    for chunk in np.array_split(neg * s, 6):
        n = len(chunk)
        trainer.add_image(chunk, np.zeros(n, bool), -np.ones(n, np.int64), np.zeros((n, 1)))
    svms = trainer.finish()
    st = trainer.stats()[0]
    assert st["converged"] and st["cached_negatives"] < 1000 and st["evicted"] > 0
    assert (svms.scores(pos) > 0).mean() > 0.85 and (svms.scores(neg) < 0).mean() > 0.95
    mined = svm_objective(svms.W[:, 0], svms.b[0], pos * s, neg * s, cfg)["objective"]
    w, b, _ = train_linear_svm(pos * s, neg * s, cfg)
    full = svm_objective(w, b, pos * s, neg * s, cfg)["objective"]
    assert mined == pytest.approx(full, rel=0.01)


def test_training_sees_at_most_max_negatives():
    rng = np.random.default_rng(8)
    trainer = SVMTrainer(1, D, dataclasses.replace(CFG, max_negatives_per_class=20))
    trainer.add_image(*image(rng, 5, close=30, far=100, k=1))
    st = trainer.stats()[0]
    assert st["negatives_trained"] == 20 and st["hard_added"] == 130
    assert st["cached_negatives"] <= 20


def test_negative_cap_follows_the_memory_budget():
    cfg = SVMConfig(max_negatives_per_class=15000, max_cache_gb=3.0, retrain_every=2000)
    narrow = SVMTrainer.negative_cap(20, 2048, cfg)
    wide = SVMTrainer.negative_cap(20, 4800, cfg)
    assert narrow == 15000  # 20 x 17,000 x 2048 x 4 B fits in 3 GiB
    assert wide < narrow
    assert 20 * (wide + cfg.retrain_every) * 4800 * 4 <= 3.0 * 2**30
    assert SVMTrainer.negative_cap(20, 10**7, cfg) == 1000  # the floor
    assert SVMTrainer(20, 4800, cfg).caches[0].max_negatives == wide


def test_a_full_cache_skips_storing_what_its_next_trim_would_drop(monkeypatch):
    """The admission threshold saves copies only: with it and without it, the same images give
    the same SVMs to the last bit, the same retrainings and the same counts."""
    cfg = dataclasses.replace(
        CFG, C=0.01, max_negatives_per_class=1000, retrain_every=700, hard_threshold=-1.5,
        evict_threshold=-3.0,
    )  # fmt: skip

    add = HardNegativeCache.add_negatives

    def mine(admit: bool):
        stored = []  # rows copied into the caches

        def counting(self, x, scores, rejected=0):
            stored.append(len(x))
            add(self, x, scores, rejected)

        monkeypatch.setattr(HardNegativeCache, "add_negatives", counting)
        if not admit:
            monkeypatch.setattr(HardNegativeCache, "admission_threshold", lambda self: -np.inf)
        rng = np.random.default_rng(7)
        trainer = SVMTrainer(2, D, cfg)
        for i in range(12):  # ~400 hard negatives an image against a 1,000-row cache
            x, is_gt, labels, iou = image(rng, 5, close=400, far=50, cls=i % 2, close_x0=0.5)
            trainer.add_image(x, is_gt, labels, iou)
        svms = trainer.finish()
        monkeypatch.undo()
        return svms, trainer.stats(), sum(stored)

    (a, stats_a, stored_a), (b, stats_b, stored_b) = mine(True), mine(False)
    np.testing.assert_array_equal(a.W, b.W)
    np.testing.assert_array_equal(a.b, b.b)
    assert stats_a == stats_b and stats_a[0]["retrains"] >= 3
    assert stored_a < 0.9 * stored_b  # it did skip rows


@pytest.mark.parametrize(("stop", "growth"), [(0, 0.0), (5, 0.0), (11, 0.0), (5, 0.5)])
def test_mining_resumed_from_its_saved_state_trains_the_same_svms(tmp_path, stop, growth):
    """An interrupted stage resumes from SVMTrainer.state() written to an .npz (what
    train-svm's checkpoint is): the same SVMs to the last bit, the same statistics."""
    cfg = dataclasses.replace(
        CFG, C=0.01, max_negatives_per_class=300, retrain_every=200, hard_threshold=-1.5,
        evict_threshold=-3.0, retrain_growth=growth,
    )  # fmt: skip
    rng = np.random.default_rng(3)
    images = [image(rng, 4, close=150, far=20, cls=i % 2, close_x0=0.5) for i in range(12)]

    def mine(trainer, todo):
        for x, is_gt, labels, iou in todo:
            trainer.add_image(x, is_gt, labels, iou)
        return trainer

    whole = mine(SVMTrainer(2, D, cfg, feature_scale=0.5), images)
    first = mine(SVMTrainer(2, D, cfg, feature_scale=0.5), images[:stop])
    np.savez(tmp_path / "state.npz", **first.state())
    with np.load(tmp_path / "state.npz", allow_pickle=False) as z:
        state = {k: z[k] for k in z.files}
    resumed = mine(SVMTrainer.from_state(state, cfg), images[stop:])
    assert resumed.images == whole.images == 12
    a, b = whole.finish(), resumed.finish()
    np.testing.assert_array_equal(a.W, b.W)
    np.testing.assert_array_equal(a.b, b.b)
    assert a.feature_scale == b.feature_scale == 0.5
    assert whole.stats() == resumed.stats() and whole.stats()[0]["retrains"] >= 2


def test_a_state_that_is_not_a_mining_state_is_refused():
    state = SVMTrainer(2, D, CFG).state()
    del state["c1/neg"]
    with pytest.raises(DataError, match="not an SVM mining state"):
        SVMTrainer.from_state(state, CFG)
