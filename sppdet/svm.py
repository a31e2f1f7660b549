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
from dataclasses import dataclass

import numpy as np
import torch

from sppdet.errors import ConfigError, DataError
from sppdet.storage import atomic_save_npz


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
    # / +2.4 at 1 scale, +0.4 / -0.6 at 5 scales (docs/results.md), so off by default. fc7 only
    prior_scaling: float = 10.0  # the prior column's multiplier (as liblinear -B for the bias):
    # its weight a costs a^2 / 2 for a * prior_scaling times the prior score

    def __post_init__(self) -> None:
        if self.prior not in ("none", "classifier"):
            raise ConfigError(f"svm.prior: {self.prior!r} is not 'none' or 'classifier'")
        if not self.prior_scaling > 0:
            raise ConfigError(f"svm.prior_scaling: {self.prior_scaling} must be > 0")
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
    # imported here: scikit-learn (with scipy) takes ~0.5 s to import, and detection never fits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    # liblinear works in float64: copy once, with room for the prior's column
    dim = pos.shape[1]
    x = np.empty((len(pos) + len(neg), dim + (prior is not None)), np.float64)
    x[: len(pos), :dim], x[len(pos) :, :dim] = pos, neg
    if prior is not None:
        d, d0 = np.asarray(prior[0], np.float64), float(prior[1])
        x[:, dim] = config.prior_scaling * (x[:, :dim] @ d + d0)
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
    if prior is not None:  # fold the prior column's weight back into w and b
        a = float(w[dim]) * config.prior_scaling
        w, b = w[:dim] + a * d, b + a * d0
    return w.astype(np.float32), b, converged


def svm_objective(
    w: np.ndarray, b: float, pos: np.ndarray, neg: np.ndarray, config: SVMConfig
) -> dict[str, float]:
    """Primal objective terms, as ``spp_train.m`` prints them, and training accuracy.

    With ``svm.prior`` the regulariser counts the whole folded ``w`` (the prior's direction
    included), not the adapted fit's ``||v||^2 + a^2``: compare such objectives only to each
    other."""
    z_pos, z_neg = pos @ w + b, neg @ w + b
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
    """

    W: np.ndarray
    b: np.ndarray
    feature_scale: float

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
        w = torch.from_numpy(self.W).to(device=x.device, dtype=torch.float32)
        b = torch.from_numpy(self.b).to(device=x.device, dtype=torch.float32)
        z = x @ w
        if not scaled:
            z = z * float(self.feature_scale)
        return z + b

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically."""
        atomic_save_npz(path, W=self.W, b=self.b, feature_scale=np.float64(self.feature_scale))

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearSVMs:
        """Read what :meth:`save` wrote; a missing file or key is a :class:`DataError`."""
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(W=z["W"], b=z["b"], feature_scale=float(z["feature_scale"]))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"cannot read SVMs {path}: {exc}") from exc
