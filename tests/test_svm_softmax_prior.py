"""Tests of the SVMs that adapt the classifier's log posterior (``svm.prior: softmax``): the
score ``x . w + b + a_c log p_c(x)`` against float64 references, its fit against the augmented
liblinear fit, mining and resuming with it, and the whole CLI path (train-svm, detect, export)
on the tiny synthetic run of tests/test_cli_e2e.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sppdet.errors import ConfigError
from sppdet.svm import (
    LinearSVMs,
    SVMConfig,
    log_posterior,
    softmax_prior,
    train_adapted_svm,
)
from sppdet.svm_mining import SVMTrainer
from sppdet_cli.main import cli
from tests import test_cli_e2e
from tests.test_cli_e2e import invoke
from tests.test_svm_prior import reference_svc

trained = test_cli_e2e.trained  # the same module-scoped fixture: one tiny trained run

D, K = 12, 3
CFG = SVMConfig(
    C=1.0, tol=1e-6, max_iter=100000, prior="softmax", prior_scaling=10.0, dedup_neg_iou=None
)


def classifier(seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(D, K + 1).double()


def test_softmax_prior_gives_the_log_posteriors_of_the_raw_features():
    """Against torch's float64 log_softmax: the prior reads features scaled by ``s``."""
    cls, s = classifier(), 0.37
    x = torch.rand(40, D, dtype=torch.float64) * 3
    want = torch.log_softmax(cls(x), dim=1)[:, 1:].detach().numpy()
    P, p = softmax_prior(cls.weight.detach().numpy(), cls.bias.detach().numpy(), s)
    assert P.shape == (D, K + 1) and p.shape == (K + 1,) and P.dtype == np.float32
    got = log_posterior(x.numpy() * s, P.astype(np.float64), p.astype(np.float64))
    np.testing.assert_allclose(got, want, atol=1e-6)
    # stable where exp() of the raw logits overflows
    big = log_posterior(np.array([[1000.0, 0.0]]), np.eye(2), np.zeros(2))
    np.testing.assert_allclose(big, [[-1000.0]])


def test_adapted_fit_is_the_augmented_liblinear_fit():
    """The prior's values join the features as a column times prior_scaling; ``a`` is that
    column's weight times prior_scaling, and ``w`` / ``b`` are the rest of the fit."""
    rng = np.random.default_rng(0)
    pos = (rng.normal(size=(30, D)) + 0.4).astype(np.float32)
    neg = rng.normal(size=(200, D)).astype(np.float32)
    prior = rng.normal(size=230) - np.r_[np.zeros(30), np.ones(200)]
    w, b, a, converged = train_adapted_svm(pos, neg, prior, CFG, 0)
    assert converged and w.dtype == np.float32 and a > 0
    x = np.column_stack([np.concatenate([pos, neg]), CFG.prior_scaling * prior])
    ref = reference_svc(CFG).fit(x, np.r_[np.ones(30), -np.ones(200)])
    np.testing.assert_allclose(w, ref.coef_[0, :D], rtol=1e-5, atol=1e-6)
    assert b == pytest.approx(ref.intercept_[0]) and a == pytest.approx(10 * ref.coef_[0, D])
    # a function of the rows gives the same fit as its values
    d = rng.normal(size=D)
    by_values = train_adapted_svm(pos, neg, np.concatenate([pos, neg]) @ d, CFG, 0)
    by_function = train_adapted_svm(pos, neg, lambda rows: rows @ d, CFG, 0)
    np.testing.assert_allclose(by_values[0], by_function[0], rtol=1e-6, atol=1e-7)


def svms_with_prior(s: float = 0.5) -> LinearSVMs:
    rng = np.random.default_rng(1)
    cls = classifier(1)
    P, p = softmax_prior(cls.weight.detach().numpy(), cls.bias.detach().numpy(), s)
    return LinearSVMs(
        W=rng.normal(size=(D, K)).astype(np.float32),
        b=rng.normal(size=K).astype(np.float32),
        feature_scale=s,
        prior_W=P,
        prior_b=p,
        prior_a=np.array([0.5, 1.0, 2.0], np.float32),
    )


def test_scores_add_the_weighted_log_posterior(tmp_path):
    """``scores`` of raw and of scaled features against a float64 reference; save / load keep
    the prior; plain SVMs load as before."""
    m = svms_with_prior()
    x = np.random.default_rng(2).random((25, D)).astype(np.float32) * 4
    xs = x.astype(np.float64) * m.feature_scale
    logits = xs @ m.prior_W.astype(np.float64) + m.prior_b
    logp = torch.log_softmax(torch.from_numpy(logits), dim=1)[:, 1:].numpy()
    want = xs @ m.W.astype(np.float64) + m.b + m.prior_a * logp
    np.testing.assert_allclose(m.scores(x), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.scores(xs, scaled=True), want, rtol=1e-5, atol=1e-5)
    m.save(tmp_path / "svm.npz")
    back = LinearSVMs.load(tmp_path / "svm.npz")
    assert back.has_prior and np.array_equal(back.prior_a, m.prior_a)
    np.testing.assert_array_equal(back.scores(x), m.scores(x))
    plain = LinearSVMs(W=m.W, b=m.b, feature_scale=m.feature_scale)
    plain.save(tmp_path / "plain.npz")
    assert not LinearSVMs.load(tmp_path / "plain.npz").has_prior


def test_prior_parts_must_agree():
    m = svms_with_prior()
    with pytest.raises(ValueError, match="go together"):
        LinearSVMs(W=m.W, b=m.b, feature_scale=1.0, prior_W=m.prior_W, prior_b=m.prior_b)
    with pytest.raises(ValueError, match="prior of"):
        LinearSVMs(m.W, m.b, 1.0, m.prior_W[:, :K], m.prior_b, m.prior_a)
    with pytest.raises(ValueError, match="prior_a"):
        LinearSVMs(m.W, m.b, 1.0, m.prior_W, m.prior_b, m.prior_a[:2])


def mining_data(seed: int = 0):
    """Class 0's positives, negatives of both classes, and a classifier that knows class 0."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=D)
    pos = (rng.normal(size=(40, D)) + 0.6 * d).astype(np.float32)
    neg = (rng.normal(size=(300, D)) - 0.2 * d).astype(np.float32)
    weight = np.zeros((3, D), np.float32)  # background, class 0, class 1
    weight[1] = d
    return pos, neg, softmax_prior(weight, np.zeros(3, np.float32))


def mine(trainer: SVMTrainer, images: slice = slice(None)) -> SVMTrainer:
    pos, neg, _ = mining_data()
    if not images.start:  # the positives come first, with the first image
        trainer.add_positives(pos, np.zeros(len(pos), np.int64))
    iou = np.zeros((len(neg), 2), np.float32)
    for chunk in np.array_split(np.arange(len(neg)), 4)[images]:
        trainer.add_image(
            neg[chunk], np.zeros(len(chunk), bool), np.full(len(chunk), -1), iou[chunk]
        )
    return trainer


def test_trainer_mines_with_the_prior_and_resumes_bit_for_bit():
    _, _, prior = mining_data()
    # a small C: w is costly, the prior's weight cheap, so the SVM leans on the classifier
    cfg = SVMConfig(C=0.01, retrain_every=50, prior="softmax", dedup_neg_iou=None)
    whole = mine(SVMTrainer(2, D, cfg, prior=prior)).finish()
    half = mine(SVMTrainer(2, D, cfg, prior=prior), slice(0, 2))
    resumed = mine(SVMTrainer.from_state(half.state(), cfg), slice(2, None)).finish()
    for key in ("W", "b", "prior_W", "prior_b", "prior_a"):
        np.testing.assert_array_equal(getattr(whole, key), getattr(resumed, key))
    assert whole.has_prior and whole.prior_a[0] > 0
    pos, neg, _ = mining_data()
    s_pos, s_neg = whole.scores(pos)[:, 0], whole.scores(neg)[:, 0]
    assert (s_pos > 0).mean() > 0.7 and (s_neg < 0).mean() > 0.85  # overlapping classes
    with pytest.raises(ConfigError, match="shape"):  # a classifier prior's shape is refused
        SVMTrainer(2, D, cfg, prior=(prior[0][:, 1:], prior[1][1:]))


def test_train_svm_prior_softmax_detects_and_exports(trained, tmp_path):
    """--prior softmax writes fc7 SVMs carrying the classifier; `detect --run` uses it, and a
    float32 model file detects the same (its SVMs keep the prior)."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, symlinks=True)
    shutil.rmtree(run / "svm_fc7")
    invoke("train-svm", run, "--layer", "fc7", "--prior", "softmax", "--quiet")
    assert json.loads((run / "svm_fc7/manifest.json").read_text())["svm"]["prior"] == "softmax"
    svms = LinearSVMs.load(run / "svm_fc7/svm.npz")
    state = torch.load(run / "finetune/model.pt", weights_only=True)["model"]
    np.testing.assert_allclose(
        svms.prior_W * svms.feature_scale, state["cls.weight"].numpy().T, rtol=1e-6, atol=1e-7
    )
    assert svms.prior_a.max() > 0
    val = trained["data"] / "VOC2007"
    image = val / "JPEGImages" / f"{(val / 'ImageSets/Main/val.txt').read_text().split()[0]}.jpg"
    model = tmp_path / "m.pt"
    invoke("export", run, "--out", model, "--dtype", "float32")
    out = []
    for source in (("--run", run), ("--model", model)):
        path = tmp_path / f"{source[0][2:]}.json"
        invoke("detect", image, *source, "--score-threshold", -100, "--json", path)
        out.append(json.loads(path.read_text()))
    assert out[0] == out[1] and len(out[0][0]["detections"])
    res = CliRunner().invoke(cli, ["train-svm", str(run), "--layer", "pool5", "--prior", "softmax"])
    assert res.exit_code != 0 and "svm.prior" in res.output
