"""Per-class linear SVMs trained with hard-negative mining (SPEC section 6, R-CNN protocol).

The protocol of ``spp_train.m`` / ``rcnn_train.m`` in one pass over the training images:

* Features are scaled so their mean L2 norm is 20 (``rcnn_feature_stats``); the caller scales
  them with :func:`feature_scale_from_samples` and the factor is stored with the SVMs.
* Positives of class ``c``: its ground-truth boxes (accumulated image by image, or all up front
  with :meth:`SVMTrainer.add_positives`). Negatives: rows with IoU < 0.3 with every ground truth
  of ``c`` (ground-truth boxes of other classes included, as in R-CNN).
* Each image's rows are scored by all ``K`` current classifiers in one matmul; a negative scoring
  above -1.0001 is "hard" and joins the class's cache. Before a class is first trained its
  classifier is ``w = 0, b = 0``, so every negative is hard (R-CNN's ``first_time``).
* A class is (re)trained after the first image that gives it negatives (once it has positives),
  then whenever 2,000 new hard negatives have arrived, and a last time in :meth:`finish` if new
  ones came in since; after each training, cached negatives scoring below -1.2 are evicted.
* Solver: liblinear L2-regularised L1-loss (hinge) dual through sklearn ``LinearSVC``.

Shape shorthand: ``N`` rows of one image, ``K`` classes, ``D`` feature dims, ``P``/``Q``
positives/negatives cached for one class.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

from sppdet.errors import DataError
from sppdet.storage import atomic_save_npz

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SVMConfig:
    """SVM training knobs (SPEC section 6)."""

    C: float = 0.001  # liblinear -c (spp_train.m svm_C; py-faster-rcnn train_svms.py)
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
    use_difficult: bool = False  # difficult objects as positives, and windows overlapping them
    # not negatives: R-CNN's roidb_from_voc.m keeps every object for SVM training (SPP-net
    # reuses it); py-faster-rcnn drops them. False: the earlier results' protocol


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


def train_linear_svm(
    pos: np.ndarray, neg: np.ndarray, config: SVMConfig, seed: int = 0
) -> tuple[np.ndarray, float, bool]:
    """One liblinear fit: ``Array[P, D]`` positives vs ``Array[Q, D]`` negatives.

    Returns:
        ``w`` ``Array[D]`` float32, ``b`` (already multiplied by the bias feature's value, as
        ``spp_train.m`` does), and whether liblinear converged within ``max_iter``.
    """
    x = np.concatenate([pos, neg], dtype=np.float64)  # liblinear works in float64: copy once
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
    return svm.coef_[0].astype(np.float32), float(svm.intercept_[0]), converged


def svm_objective(
    w: np.ndarray, b: float, pos: np.ndarray, neg: np.ndarray, config: SVMConfig
) -> dict[str, float]:
    """Primal objective terms, as ``spp_train.m`` prints them, and training accuracy."""
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


class HardNegativeCache:
    """One class's training cache: its positives and its current hard negatives (float32)."""

    def __init__(self, dim: int, max_negatives: int) -> None:
        self.dim, self.max_negatives = dim, max_negatives
        self._pos: list[np.ndarray] = []
        self._neg: list[np.ndarray] = []
        self._neg_scores: list[np.ndarray] = []
        self.trained = False
        self.new_since_retrain = 0
        self.hard_added = 0
        self.evicted = 0
        self._rejected = 0  # hard negatives not stored since the last trim (admission_threshold)

    @property
    def num_pos(self) -> int:
        return sum(len(p) for p in self._pos)

    @property
    def num_neg(self) -> int:
        return sum(len(n) for n in self._neg)

    def add_positives(self, x: np.ndarray) -> None:
        self._pos.append(np.asarray(x, np.float32).reshape(-1, self.dim))

    def admission_threshold(self) -> float:
        """Hard negatives scoring at most this are not worth storing: the cache already holds
        ``max_negatives`` that score at least as high (and are older, so win ties), so the next
        trim, which comes before any retraining, would drop them. -inf until the cache is full.

        Skipping them changes nothing the SVMs see (:meth:`trim` counts them), and saves most
        of the copying where a weak model finds hundreds of hard negatives per image (a frozen
        pool5 of 16,000 dims: ~1,600 rows of 64 KB per image and class)."""
        if self.num_neg < self.max_negatives:
            return -np.inf
        # the scores alone: negatives() would consolidate the rows, a copy of the whole cache
        s = np.concatenate(self._neg_scores)
        return float(np.partition(s, len(s) - self.max_negatives)[len(s) - self.max_negatives])

    def add_negatives(self, x: np.ndarray, scores: np.ndarray, rejected: int = 0) -> None:
        """Add hard negatives ``Array[M, D]`` with their current scores ``Array[M]``;
        ``rejected``: more hard negatives of the same image that scored at most
        :meth:`admission_threshold` and were not stored (counted as if they were)."""
        self._neg.append(np.asarray(x, np.float32).reshape(-1, self.dim))
        self._neg_scores.append(np.asarray(scores, np.float32).reshape(-1))
        self._rejected += rejected
        self.new_since_retrain += len(x) + rejected
        self.hard_added += len(x) + rejected
        # amortised: not a full copy per image; at the same moments as if nothing was rejected
        if self.num_neg + self._rejected > self.max_negatives * 5 // 4:
            self.trim()

    def trim(self) -> None:
        """Keep the ``max_negatives`` hardest negatives (by their last scores; ties: oldest)."""
        if self.num_neg + self._rejected > self.max_negatives:
            neg, s = self.negatives()
            self._keep(np.argsort(-s, kind="stable")[: self.max_negatives], neg, s)
        self._rejected = 0

    def needs_training(self, retrain_every: int) -> bool:
        if not self.num_pos or not self.num_neg:
            return False
        return not self.trained or self.new_since_retrain >= retrain_every

    def positives(self) -> np.ndarray:
        """``Array[P, D]``, consolidated into one array."""
        if len(self._pos) != 1:
            self._pos = [np.concatenate(self._pos or [np.zeros((0, self.dim), np.float32)])]
        return self._pos[0]

    def negatives(self) -> tuple[np.ndarray, np.ndarray]:
        """``Array[Q, D]`` and their scores ``Array[Q]``, consolidated."""
        if len(self._neg) != 1:
            empty = [np.zeros((0, self.dim), np.float32)], [np.zeros(0, np.float32)]
            self._neg = [np.concatenate(self._neg or empty[0])]
            self._neg_scores = [np.concatenate(self._neg_scores or empty[1])]
        return self._neg[0], self._neg_scores[0]

    def rescore_and_evict(self, w: np.ndarray, b: float, evict_threshold: float) -> np.ndarray:
        """Score the cache with a new model, drop negatives below ``evict_threshold``.

        Returns:
            the scores ``Array[Q]`` of the negatives before eviction.
        """
        neg, _ = self.negatives()
        z = neg @ w + b
        keep = np.flatnonzero(z >= evict_threshold)
        self.evicted += len(neg) - len(keep)
        self._keep(keep, neg, z)
        self.trained, self.new_since_retrain = True, 0
        return z

    def _keep(self, idx: np.ndarray, neg: np.ndarray, scores: np.ndarray) -> None:
        self._neg, self._neg_scores = [neg[idx]], [scores[idx].astype(np.float32)]


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


class SVMTrainer:
    """Streams training images in and mines hard negatives for all classes at once.

    Args:
        num_classes: ``K`` (class indices ``0..K-1``, no background).
        dim: ``D``.
        config: :class:`SVMConfig`.
        feature_scale: the factor the caller applied to the features (stored with the SVMs).
        seed: liblinear's random seed (its dual coordinate descent shuffles).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        config: SVMConfig | None = None,
        feature_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.num_classes, self.dim = num_classes, dim
        self.config = config or SVMConfig()
        self.feature_scale, self.seed = feature_scale, seed
        self.W = np.zeros((dim, num_classes), np.float32)
        self.b = np.zeros(num_classes, np.float32)
        cap = self.negative_cap(num_classes, dim, self.config)
        if cap < self.config.max_negatives_per_class:
            log.info("svm: at most %d negatives per class (max_cache_gb at D=%d)", cap, dim)
        self.caches = [HardNegativeCache(dim, cap) for _ in range(num_classes)]
        self._stats: list[dict] = [{"retrains": 0} for _ in range(num_classes)]
        self.images = 0
        self._trained_at = [0] * num_classes  # images mined when each class last trained

    @staticmethod
    def negative_cap(num_classes: int, dim: int, config: SVMConfig) -> int:
        """Per-class negative cache size: ``max_negatives_per_class``, lowered so all ``K``
        float32 caches (each growing by up to ``retrain_every`` rows between trims) fit in
        ``max_cache_gb``; the budget never takes it below 1,000."""
        budget = int(config.max_cache_gb * 2**30 / (num_classes * dim * 4)) - config.retrain_every
        return min(config.max_negatives_per_class, max(1000, budget))

    def add_positives(self, features: np.ndarray, labels: np.ndarray) -> None:
        """Add positive rows ``Array[N, D]`` (scaled) of classes ``labels`` ``Array[N]``."""
        features = np.asarray(features, np.float32).reshape(-1, self.dim)
        labels = np.asarray(labels, np.int64).reshape(-1)
        for c in np.unique(labels[labels >= 0]):
            self.caches[c].add_positives(features[labels == c])

    def add_image(
        self,
        features: np.ndarray,
        is_gt: np.ndarray,
        gt_labels: np.ndarray,
        max_iou: np.ndarray,
    ) -> None:
        """Mine one image.

        Args:
            features: ``Array[N, D]`` float32, already multiplied by ``feature_scale``.
            is_gt: ``Array[N]`` bool, rows that are ground-truth boxes (positives of their class;
                pass all False if the positives were given to :meth:`add_positives`).
            gt_labels: ``Array[N]`` int64 class of each ground-truth row, -1 for proposals.
            max_iou: ``Array[N, K]`` IoU of each row with the ground truth of each class (0 where
                the class is absent).
        """
        cfg = self.config
        x = np.asarray(features, np.float32).reshape(-1, self.dim)
        gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
        pos = np.asarray(is_gt, bool).reshape(-1) & (gt_labels >= 0)
        self.add_positives(x[pos], gt_labels[pos])
        scores = x @ self.W + self.b  # the one per-image matmul: all rows x all classes
        hard = (np.asarray(max_iou).reshape(len(x), -1) < cfg.neg_iou) & (
            scores > cfg.hard_threshold
        )
        hard[np.flatnonzero(pos), gt_labels[pos]] = False  # a GT is never its own negative
        for c in range(self.num_classes):
            rows = np.flatnonzero(hard[:, c])
            if len(rows):
                cache = self.caches[c]
                kept = rows[scores[rows, c] > cache.admission_threshold()]
                cache.add_negatives(x[kept], scores[kept, c], rejected=len(rows) - len(kept))
            if self.caches[c].needs_training(cfg.retrain_every) and self._due(c):
                self._train(c)
        self.images += 1

    def _due(self, c: int) -> bool:
        """Whether enough images were mined since class ``c`` last trained (``retrain_growth``)."""
        mined = self.images + 1  # this image included
        growth = self.config.retrain_growth
        return not self.caches[c].trained or mined >= (1 + growth) * self._trained_at[c]

    def _train(self, c: int) -> None:
        cache, cfg = self.caches[c], self.config
        cache.trim()
        pos, (neg, _) = cache.positives(), cache.negatives()
        w, b, converged = train_linear_svm(pos, neg, cfg, self.seed)
        stats = svm_objective(w, b, pos, neg, cfg)
        cache.rescore_and_evict(w, b, cfg.evict_threshold)
        self.W[:, c], self.b[c] = w, b
        st = self._stats[c]
        st.update(stats, positives=len(pos), negatives_trained=len(neg), converged=converged)
        st["retrains"] += 1
        self._trained_at[c] = self.images + 1
        log.info(
            "svm class %d retrain %d: %d pos, %d neg -> %d after eviction, objective %.4f",
            c,
            st["retrains"],
            len(pos),
            len(neg),
            cache.num_neg,
            stats["objective"],
        )

    def finish(self) -> LinearSVMs:
        """Retrain every class that got new negatives since its last training; the SVMs.

        A class that never had both positives and negatives keeps ``w = 0`` and gets
        ``b = -1`` (the hinge-loss optimum for negatives only), with a warning.
        """
        for c, cache in enumerate(self.caches):
            if cache.num_pos and cache.num_neg and (not cache.trained or cache.new_since_retrain):
                self._train(c)
            elif not cache.trained:
                log.warning(
                    "svm class %d: %d pos / %d neg, not trained", c, cache.num_pos, cache.num_neg
                )
                self.b[c] = -1.0
        return LinearSVMs(W=self.W.copy(), b=self.b.copy(), feature_scale=self.feature_scale)

    def stats(self) -> list[dict]:
        """Per class: retrains, positives, cached negatives, hard negatives added, evicted, and
        the last training's objective terms, training accuracy, support vectors, convergence."""
        out = []
        for st, cache in zip(self._stats, self.caches, strict=True):
            d = dict(st, cached_negatives=cache.num_neg, hard_added=cache.hard_added)
            out.append(dict(d, evicted=cache.evicted, positives=cache.num_pos))
        return out
