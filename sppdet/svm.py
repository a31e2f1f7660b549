"""Per-class linear SVMs (SPEC section 6, R-CNN protocol): settings, one liblinear fit, and the
trained classifiers. The hard-negative mining that feeds the fits is :mod:`sppdet.svm_mining`.

Features are scaled so their mean L2 norm is 20 (``rcnn_feature_stats``): the caller scales them
with :func:`feature_scale_from_samples` and the factor is stored with the SVMs. Solver:
liblinear L2-regularised L1-loss (hinge) dual through sklearn ``LinearSVC``.

Shape shorthand: ``N`` rows, ``K`` classes, ``D`` feature dims, ``P``/``Q`` positives/negatives
of one class.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from sppdet.errors import ConfigError, DataError
from sppdet.storage import atomic_save_npz

PRIORS = ("none", "classifier", "softmax")  # SVMConfig.prior's values


@dataclass(frozen=True)
class SVMConfig:
    """SVM training knobs (SPEC section 6)."""

    C: float = 0.001  # liblinear -c (spp_train.m svm_C; py-faster-rcnn train_svms.py); 0.0003
    # lost 1.2 fc7 points on VOC07 val at full size (won 1.0 on 300 images; docs/results.md)
    pos_weight: float = 2.0  # liblinear -w1, hinge-loss weight of positives (spp_train.m)
    intercept_scaling: float = 10.0  # liblinear -B, the bias feature's value (spp_train.m)
    tol: float = 0.1  # liblinear -e; 0.1 is liblinear's default for -s 3, which R-CNN/SPP-net
    # used. sklearn's default 1e-4 took 1.3x the time on a synthetic D=4096 stress test and
    # reached an up to 10 % lower objective (a looser SVM optimum, not a different protocol)
    max_iter: int = 1000  # liblinear's default iteration cap of its dual solvers
    neg_iou: float = 0.3  # negative: IoU < this with every GT of the class (R-CNN, SPP-net)
    hard_threshold: float = -1.0001  # a negative scoring above this is hard (rcnn_train.m)
    evict_threshold: float = -1.2  # cached negatives scoring below are evicted (rcnn_train.m;
    # py-faster-rcnn train_svms.py uses -1.1)
    retrain_every: int = 2000  # retrain after this many new hard negatives (rcnn retrain_limit)
    retrain_growth: float = 0.0  # and (ours) only once the images mined have grown by this
    # fraction since the class's last training: 0 is R-CNN's rule. A cache capped by
    # max_cache_gb (pool5 of mobilenet_v2_d17: 16,000-d, 3,033 per class) never outgrows the
    # weak early SVMs, which find hundreds of hard negatives per image: R-CNN's rule then
    # retrains each class every 2-3 images (person: 1,060 solves in 142 min, not done). 0.5
    # retrains each class about 20 times over 2,500 images (at 1, 2, 3, 5, 8, 12, 18, ...)
    target_norm: float = 20.0  # features scaled to this mean L2 norm (rcnn_feature_stats)
    max_negatives_per_class: int = 15000  # cache bound (ours; memory up to K * 1.25 * this *
    # D * 4 bytes between trims): training sees at most this many, the hardest
    max_cache_gb: float = 6.0  # all classes' negative caches together (ours): lowers the
    # per-class bound for wide features (pool5 of 4,800 dims: 15,000 x 20 classes took 9.4 GB;
    # the default backbone's pool5 is 16,000-d: 3,033 per class at 6 GB, 1,000 at 3)
    pos_iou: float | None = None  # also proposals with IoU >= this with a (kept) GT box of a
    # class are that class's positives (ours). None: the GT boxes alone (R-CNN, SPP-net). 0.5 is
    # the fine-tuning's foreground, the set the softmax learns from (the SVM-gap study)
    use_difficult: bool = False  # difficult objects as positives, and windows overlapping them
    # not negatives: R-CNN's roidb_from_voc.m keeps every object for SVM training (SPP-net
    # reuses it); py-faster-rcnn drops them. False: the earlier results' protocol
    prior: str = "none"  # "classifier": adapt the fine-tuned classifier instead of starting from
    # 0 (A-SVM, Yang et al. 2007): class c's linear score logit_c - logit_background on fc7 is an
    # extra feature column whose weight is nearly free, so the fit is that score plus a
    # correction regularised as the plain SVM's w. Why: the plain fc7 SVMs score 3.5-5.5 points
    # under the softmax of the same features. Measured (Lite0, VOC07 val, fc7 / fc7 + bb): +1.4
    # / +2.4 at 1 scale, +0.4 / -0.6 at 5 scales (docs/results.md), so off by default. fc7 only.
    # "softmax": the prior is the classifier's log posterior log p_c (its logits normalised over
    # all classes, which no linear score expresses); the SVMs then keep the classifier and its
    # weight a_c beside w (LinearSVMs.prior_*), as the score is not linear in fc7. Measured a
    # loss (1 scale: fc7 32.3, fc7 + bb 36.9): log p_c saturates on the confident mistakes the
    # mining cache keeps, so the fit drops it (a_c ~ 0) in 8 classes (docs/results.md)
    dedup_neg_iou: float | None = 0.7  # drop a negative overlapping a harder one of the same
    # image and class by more than this IoU (greedy, torchvision nms on the current scores).
    # The paper's rule (section 4.1: "a negative sample is removed if it overlaps another
    # negative sample by more than 70 %"; SPEC section 6); R-CNN and the released spp_train.m
    # do not do it. Measured (Lite0, VOC07 val, the same fine-tuned head, fc7 / fc7 + bb): +1.9
    # / +2.7 at 1 scale (docs/results.md). None: off, R-CNN's mining (runs stored before this
    # default read None: run_config.CHANGED_DEFAULTS)
    prior_scaling: float = 10.0  # the prior column's multiplier (as liblinear -B for the bias):
    # its weight a costs a^2 / 2 for a * prior_scaling times the prior score

    def __post_init__(self) -> None:
        if self.prior not in PRIORS:
            raise ConfigError(f"svm.prior: {self.prior!r} is not one of {', '.join(PRIORS)}")
        if not self.prior_scaling > 0:
            raise ConfigError(f"svm.prior_scaling: {self.prior_scaling} must be > 0")
        if self.dedup_neg_iou is not None and not 0.0 < self.dedup_neg_iou <= 1.0:
            raise ConfigError(f"svm.dedup_neg_iou: {self.dedup_neg_iou} must lie in (0, 1]")
        if self.pos_iou is not None and not self.neg_iou <= self.pos_iou <= 1.0:
            # below neg_iou one window could be a positive and a negative of the same class
            raise ConfigError(
                f"svm.pos_iou: {self.pos_iou} must lie in [svm.neg_iou = {self.neg_iou}, 1]"
            )


def feature_scale_from_samples(features: np.ndarray, target_norm: float = 20.0) -> float:
    """The factor ``s`` making ``mean ||s x|| = target_norm`` (R-CNN ``rcnn_feature_stats``).

    Args:
        features: ``Array[N, D]`` sample feature vectors (R-CNN samples ~200 training images).
    """
    norms = np.linalg.norm(np.asarray(features, np.float64).reshape(len(features), -1), axis=1)
    mean = float(norms.mean()) if len(norms) else 0.0
    if not mean > 0:
        raise ValueError("feature_scale_from_samples: the sample features are all zero")
    return target_norm / mean


def classifier_prior(
    weight: np.ndarray, bias: np.ndarray, feature_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Each class's logit minus the background's, as linear scores on scaled features.

    Args:
        weight: ``Array[K + 1, D]`` the fine-tuned classifier's weights, background first.
        bias: ``Array[K + 1]``.
        feature_scale: the factor the SVM features carry (``feature_scale_from_samples``).

    Returns:
        ``(Array[D, K], Array[K])``: ``x . P[:, c] + p[c] = logit_c - logit_0`` of the raw
        features ``x / feature_scale`` (float32, computed in float64).
    """
    w, b = np.asarray(weight, np.float64), np.asarray(bias, np.float64)
    P = (w[1:] - w[0]).T / feature_scale
    return P.astype(np.float32), (b[1:] - b[0]).astype(np.float32)


def softmax_prior(
    weight: np.ndarray, bias: np.ndarray, feature_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """The fine-tuned classifier on scaled features (``svm.prior: softmax``).

    Args:
        weight: ``Array[K + 1, D]`` the classifier's weights, background first.
        bias: ``Array[K + 1]``.
        feature_scale: the factor the SVM features carry.

    Returns:
        ``(Array[D, K + 1], Array[K + 1])`` float32: ``x . P + p`` of the scaled features
        ``x`` are the logits of the raw ones (:func:`log_posterior` reads them).
    """
    P = np.asarray(weight, np.float64).T / feature_scale
    return P.astype(np.float32), np.asarray(bias, np.float32)


def log_posterior(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The classifier's log posteriors of the object classes (``svm.prior: softmax``).

    Args:
        x: ``Array[N, D]`` features.
        weight: ``Array[D, K + 1]`` the classifier on those features, background first.
        bias: ``Array[K + 1]``.

    Returns:
        ``Array[N, K]`` float64 ``log p_c`` (the background's column dropped).
    """
    # the product in the rows' dtype (no float64 copy of a 15,000-row cache), the rest in float64
    z = (np.asarray(x) @ np.asarray(weight)).astype(np.float64) + np.asarray(bias, np.float64)
    z -= z.max(axis=1, keepdims=True)
    return z[:, 1:] - np.log(np.exp(z).sum(axis=1, keepdims=True))


def train_linear_svm(
    pos: np.ndarray,
    neg: np.ndarray,
    config: SVMConfig,
    seed: int = 0,
    prior: tuple[np.ndarray, float] | None = None,
) -> tuple[np.ndarray, float, bool]:
    """One liblinear fit: ``Array[P, D]`` positives vs ``Array[Q, D]`` negatives.

    ``prior``: ``(Array[D] d, d0)``, a linear score ``x . d + d0`` the fit adapts
    (``svm.prior``): it joins the features as a column scaled by ``prior_scaling``, and its
    weight is folded back, so the result is one linear SVM ``x . w + b`` either way.

    Returns:
        ``w`` ``Array[D]`` float32, ``b`` (already multiplied by the bias feature's value, as
        ``spp_train.m`` does), and whether liblinear converged within ``max_iter``.
    """
    if prior is None:
        w, b, _, converged = _liblinear(pos, neg, None, config, seed)
        return w.astype(np.float32), b, converged
    d, d0 = np.asarray(prior[0], np.float64), float(prior[1])
    w, b, a, converged = _liblinear(pos, neg, lambda x: x @ d + d0, config, seed)
    # fold the prior's weight back: x . w + b + a (x . d + d0) is one linear score
    return (w + a * d).astype(np.float32), b + a * d0, converged


def train_adapted_svm(
    pos: np.ndarray,
    neg: np.ndarray,
    prior: np.ndarray | Callable[[np.ndarray], np.ndarray] | None,
    config: SVMConfig,
    seed: int = 0,
) -> tuple[np.ndarray, float, float, bool]:
    """One liblinear fit of ``x . w + b + a prior(x)``, ``prior`` a fixed score the fit adapts
    (A-SVM): its values join the features as a column scaled by ``prior_scaling``, so ``a``
    costs ``(a / prior_scaling)^2 / 2`` while ``w`` is regularised as a plain SVM's.

    Args:
        pos: ``Array[P, D]`` positives.
        neg: ``Array[Q, D]`` negatives.
        prior: the prior scores ``Array[P + Q]`` of the positives then the negatives, or a
            function giving them from the ``Array[P + Q, D]`` float64 rows; ``None``: a plain
            SVM (``a = 0``).

    Returns:
        ``w`` ``Array[D]`` float32, ``b`` (times the bias feature's value, as ``spp_train.m``),
        ``a`` and whether liblinear converged within ``max_iter``.
    """
    w, b, a, converged = _liblinear(pos, neg, prior, config, seed)
    return w.astype(np.float32), b, a, converged


def _liblinear(pos, neg, prior, config, seed):
    """:func:`train_adapted_svm` with ``w`` in float64."""
    # imported here: scikit-learn (with scipy) takes ~0.5 s to import, and detection never fits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    # liblinear works in float64: copy once, with room for the prior's column
    dim = pos.shape[1]
    x = np.empty((len(pos) + len(neg), dim + (prior is not None)), np.float64)
    x[: len(pos), :dim], x[len(pos) :, :dim] = pos, neg
    if prior is not None:
        values = prior(x[:, :dim]) if callable(prior) else np.asarray(prior, np.float64)
        x[:, dim] = config.prior_scaling * values
    y = np.concatenate([np.ones(len(pos)), -np.ones(len(neg))])
    svm = LinearSVC(
        C=config.C,
        loss="hinge",  # L1-loss SVM, dual (liblinear -s 3, as spp_train.m / rcnn_train.m)
        dual=True,
        tol=config.tol,
        class_weight={1: config.pos_weight, -1: 1.0},
        fit_intercept=True,
        intercept_scaling=config.intercept_scaling,
        max_iter=config.max_iter,
        random_state=seed,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(x, y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    w, b = svm.coef_[0], float(svm.intercept_[0])
    a = float(w[dim]) * config.prior_scaling if prior is not None else 0.0
    return w[:dim], b, a, converged


def svm_objective(
    w: np.ndarray,
    b: float,
    pos: np.ndarray,
    neg: np.ndarray,
    config: SVMConfig,
    offsets: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """Primal objective terms, as ``spp_train.m`` prints them, and training accuracy.

    ``offsets``: ``(Array[P], Array[Q])`` added to the scores (``svm.prior: softmax``: ``a``
    times the prior). With ``svm.prior`` the regulariser counts ``w`` alone (the folded ``w``
    of ``classifier``, the prior's direction included), not the adapted fit's: compare such
    objectives only to each other."""
    z_pos, z_neg = pos @ w + b, neg @ w + b
    if offsets is not None:
        z_pos, z_neg = z_pos + offsets[0], z_neg + offsets[1]
    pos_loss = config.C * config.pos_weight * float(np.maximum(0, 1 - z_pos).sum())
    neg_loss = config.C * float(np.maximum(0, 1 + z_neg).sum())
    reg_loss = 0.5 * float(w @ w) + 0.5 * (b / config.intercept_scaling) ** 2
    correct = int((z_pos > 0).sum() + (z_neg < 0).sum())
    return {
        "objective": pos_loss + neg_loss + reg_loss,
        "pos_loss": pos_loss,
        "neg_loss": neg_loss,
        "reg_loss": reg_loss,
        "train_accuracy": correct / max(len(z_pos) + len(z_neg), 1),
        "pos_support_vectors": int((z_pos < 1 + 1e-6).sum()),
        "neg_support_vectors": int((z_neg > -1 - 1e-6).sum()),
    }


@dataclass(frozen=True)
class LinearSVMs:
    """Trained per-class linear SVMs.

    Attributes:
        W: ``Array[D, K]`` float32, on features multiplied by ``feature_scale``.
        b: ``Array[K]`` float32.
        feature_scale: the factor that brings raw features to mean L2 norm ``target_norm``.
        prior_W: ``svm.prior: softmax`` only (else ``None``): ``Array[D, K + 1]`` float32, the
            fine-tuned classifier on features multiplied by ``feature_scale`` (background
            first), whose log posterior ``log p_c`` each class's score adds ``prior_a[c]`` times.
        prior_b: ``Array[K + 1]`` float32, its bias.
        prior_a: ``Array[K]`` float32, each class's weight of its prior.
    """

    W: np.ndarray
    b: np.ndarray
    feature_scale: float
    prior_W: np.ndarray | None = None  # noqa: N815 (W as in W, the matrix)
    prior_b: np.ndarray | None = None
    prior_a: np.ndarray | None = None

    def __post_init__(self) -> None:
        given = [a is not None for a in (self.prior_W, self.prior_b, self.prior_a)]
        if any(given) and not all(given):
            raise ValueError("LinearSVMs: prior_W, prior_b and prior_a go together")
        if all(given):
            dim, k = self.W.shape
            if self.prior_W.shape != (dim, k + 1) or self.prior_b.shape != (k + 1,):
                raise ValueError(f"LinearSVMs: a prior of {self.prior_W.shape} for W of {dim, k}")
            if self.prior_a.shape != (k,):
                raise ValueError(f"LinearSVMs: prior_a of {self.prior_a.shape}, expected {(k,)}")

    @property
    def has_prior(self) -> bool:
        """Whether the scores add the classifier's weighted log posterior (``softmax``)."""
        return self.prior_W is not None

    @property
    def num_classes(self) -> int:
        return int(self.W.shape[1])

    def scores(self, features: np.ndarray, *, scaled: bool = False) -> np.ndarray:
        """SVM scores ``Array[N, K]`` (float32) of ``Array[N, D]`` features: :meth:`scores_tensor`
        on the CPU."""
        x = torch.from_numpy(np.asarray(features, np.float32).reshape(-1, self.W.shape[0]))
        return self.scores_tensor(x, scaled=scaled).numpy()

    def scores_tensor(self, features: torch.Tensor, *, scaled: bool = False) -> torch.Tensor:
        """SVM scores ``Tensor[N, K]`` (float32) of ``Tensor[N, D]`` features, on their device.

        ``scaled=False`` (default): raw features, ``feature_scale`` is applied here (folded into
        the product, so no scaled copy is made); ``True``: already multiplied by it.

        Why torch (detection's path): numpy's matmul runs on OpenBLAS's own thread pool, whose
        workers keep spinning for a while after each call and so take the cores from the next
        image's conv pass (torch's OpenMP pool). On 2 cores that made the 688-px MobileNetV2
        pass ~40 ms slower per image. On CUDA it also saves moving fc7 to the host.
        """
        x = features.float().reshape(-1, self.W.shape[0])
        out = self._linear(x, self.W, self.b, scaled)
        if self.has_prior:  # + a_c log p_c (svm.prior: softmax)
            logits = self._linear(x, self.prior_W, self.prior_b, scaled)
            out = out + torch.log_softmax(logits, dim=1)[:, 1:] * self._tensor(self.prior_a, x)
        return out

    def _linear(self, x: torch.Tensor, w: np.ndarray, b: np.ndarray, scaled: bool) -> torch.Tensor:
        """``x . w + b`` of features scaled by ``feature_scale`` (applied here unless
        ``scaled``: folded into the product, so no scaled copy of ``x`` is made)."""
        z = x @ self._tensor(w, x)
        if not scaled:
            z = z * float(self.feature_scale)
        return z + self._tensor(b, x)

    @staticmethod
    def _tensor(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(a).to(device=like.device, dtype=torch.float32)

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically."""
        prior = {k: getattr(self, k) for k in self.PRIOR_FIELDS} if self.has_prior else {}
        scale = np.float64(self.feature_scale)
        atomic_save_npz(path, W=self.W, b=self.b, feature_scale=scale, **prior)

    PRIOR_FIELDS = ("prior_W", "prior_b", "prior_a")  # svm.prior: softmax; all or none

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearSVMs:
        """Read what :meth:`save` wrote; a missing file or key is a :class:`DataError`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                prior = {k: z[k] for k in cls.PRIOR_FIELDS if k in z.files}
                return cls(W=z["W"], b=z["b"], feature_scale=float(z["feature_scale"]), **prior)
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read SVMs {path}: {exc}") from exc
