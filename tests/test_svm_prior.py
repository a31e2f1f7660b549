"""Tests of the SVMs that adapt the fine-tuned classifier (``svm.prior: classifier``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.svm import LinearSVC

from sppdet.errors import ConfigError, DataError
from sppdet.svm import SVMConfig, classifier_prior, train_linear_svm
from sppdet.svm_mining import SVMTrainer

D = 16
CFG = SVMConfig(
    C=1.0, tol=1e-6, max_iter=100000, prior="classifier", prior_scaling=10.0, dedup_neg_iou=None
)


def data(seed: int = 0, n_pos: int = 40, n_neg: int = 300):
    """Positives and negatives apart along a random direction ``d``, plus that direction."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=D)
    pos = rng.normal(size=(n_pos, D)) + 0.5 * d
    neg = rng.normal(size=(n_neg, D)) - 0.2 * d
    return pos.astype(np.float32), neg.astype(np.float32), d


def reference_svc(cfg: SVMConfig) -> LinearSVC:
    """The liblinear fit ``train_linear_svm`` makes, configured directly (the prior's column
    is added to the features by the caller)."""
    return LinearSVC(
        C=cfg.C,
        loss="hinge",
        tol=cfg.tol,
        class_weight={1: cfg.pos_weight, -1: 1.0},
        intercept_scaling=cfg.intercept_scaling,
        max_iter=cfg.max_iter,
        random_state=0,
    )


def test_classifier_prior_is_logit_minus_background_logit():
    """Against a float64 nn.Linear: ``x P + p`` of scaled features = logit_c - logit_0 of the
    raw ones."""
    torch.manual_seed(0)
    k, s = 3, 0.37
    cls = torch.nn.Linear(D, k + 1).double()
    x = torch.rand(50, D, dtype=torch.float64)
    logits = cls(x)
    P, p = classifier_prior(cls.weight.detach().numpy(), cls.bias.detach().numpy(), s)
    assert P.shape == (D, k) and p.shape == (k,) and P.dtype == np.float32
    got = (x.numpy() * s) @ P.astype(np.float64) + p
    np.testing.assert_allclose(got, (logits[:, 1:] - logits[:, :1]).detach().numpy(), atol=1e-5)


def test_prior_fit_is_the_augmented_liblinear_fit_folded_back():
    """The prior joins the features as a column (times prior_scaling); its weight is folded
    into ``w`` and ``b``, so scores equal those of the augmented fit."""
    pos, neg, d = data()
    prior = (0.1 * d, 0.5)
    w, b, converged = train_linear_svm(pos, neg, CFG, 0, prior)
    assert converged
    x = np.concatenate([pos, neg]).astype(np.float64)
    col = CFG.prior_scaling * (x @ prior[0] + prior[1])
    ref = reference_svc(CFG)
    ref.fit(np.column_stack([x, col]), np.r_[np.ones(len(pos)), -np.ones(len(neg))])
    want = np.column_stack([x, col]) @ ref.coef_[0] + ref.intercept_[0]
    np.testing.assert_allclose(x @ w + b, want, rtol=1e-4, atol=1e-4)


def test_strong_regularisation_keeps_the_prior_direction():
    """With a tiny C the plain SVM's w shrinks to ~0, while the prior's weight stays cheap: the
    adapted SVM ranks by the prior's direction."""
    pos, neg, d = data(1)
    cfg = SVMConfig(C=1e-4, tol=1e-6, max_iter=100000, prior="classifier", prior_scaling=100.0)
    w, _, _ = train_linear_svm(pos, neg, cfg, 0, (d, 0.0))
    assert np.dot(w, d) / (np.linalg.norm(w) * np.linalg.norm(d)) > 0.999
    # and with a generous C the data move it away from a wrong prior
    wrong = np.random.default_rng(9).normal(size=D)
    w2, _, _ = train_linear_svm(pos, neg, CFG, 0, (0.01 * wrong, 0.0))
    assert np.dot(w2, d) / (np.linalg.norm(w2) * np.linalg.norm(d)) > 0.8


def mine(trainer: SVMTrainer, seed: int = 0) -> SVMTrainer:
    pos, neg, _ = data(seed)
    trainer.add_positives(pos, np.zeros(len(pos), np.int64))
    iou = np.zeros((len(neg), 2), np.float32)
    for chunk in np.array_split(np.arange(len(neg)), 3):
        trainer.add_image(
            neg[chunk], np.zeros(len(chunk), bool), np.full(len(chunk), -1), iou[chunk]
        )
    return trainer


def test_trainer_with_prior_resumes_from_its_state_and_refuses_mismatches():
    _, _, d = data()
    prior = (np.stack([d, -d], 1).astype(np.float32), np.zeros(2, np.float32))
    cfg = SVMConfig(C=1.0, retrain_every=50, prior="classifier", dedup_neg_iou=None)
    whole = mine(SVMTrainer(2, D, cfg, prior=prior))
    state = whole.state()
    assert np.array_equal(state["prior_W"], prior[0])
    again = SVMTrainer.from_state(state, cfg)
    assert np.array_equal(again.prior[0], prior[0]) and np.array_equal(again.prior[1], prior[1])
    a = whole.finish()
    assert np.corrcoef(a.W[:, 0], d)[0, 1] > 0.5
    with pytest.raises(ConfigError, match="no prior was given"):
        SVMTrainer(2, D, cfg)
    with pytest.raises(ConfigError, match="a prior was given"):
        SVMTrainer(2, D, SVMConfig(), prior=prior)
    with pytest.raises(ConfigError, match="shape"):
        SVMTrainer(3, D, cfg, prior=prior)
    del state["prior_b"]
    with pytest.raises(DataError, match="not an SVM mining state"):
        SVMTrainer.from_state(state, cfg)


def test_prior_settings_are_checked():
    with pytest.raises(ConfigError, match="svm.prior"):
        SVMConfig(prior="bogus")
    with pytest.raises(ConfigError, match="prior_scaling"):
        SVMConfig(prior="classifier", prior_scaling=0.0)
