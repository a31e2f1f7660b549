"""Hard-negative mining for the per-class SVMs (SPEC section 6): ``spp_train.m`` /
``rcnn_train.m`` in one pass over the training images.

* Positives of class ``c``: its ground-truth boxes (accumulated image by image, or all up front
  with :meth:`SVMTrainer.add_positives`). Negatives: rows with IoU < 0.3 with every ground truth
  of ``c`` (ground-truth boxes of other classes included, as in R-CNN).
* Each image's rows are scored by all ``K`` current classifiers in one matmul; a negative scoring
  above -1.0001 is "hard" and joins the class's cache. Before a class is first trained its
  classifier is ``w = 0, b = 0``, so every negative is hard (R-CNN's ``first_time``). With
  ``svm.dedup_neg_iou`` (the paper's rule at 0.7), a hard negative overlapping a harder one of
  the same image and class by more than that IoU is dropped first.
* A class is (re)trained after the first image that gives it negatives (once it has positives),
  then whenever 2,000 new hard negatives have arrived, and a last time in :meth:`finish` if new
  ones came in since; after each training, cached negatives scoring below -1.2 are evicted.
* The whole mining state is a flat dict of arrays (:meth:`SVMTrainer.state` /
  :meth:`SVMTrainer.from_state`): a stage interrupted after image ``i`` resumes there and
  trains the same SVMs, bit for bit, as an uninterrupted one.

Shape shorthand: ``N`` rows of one image, ``K`` classes, ``D`` feature dims, ``P``/``Q``
positives/negatives cached for one class.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch
from torchvision.ops import nms

from sppdet.errors import ConfigError, DataError
from sppdet.svm import (
    LinearSVMs,
    SVMConfig,
    log_posterior,
    svm_objective,
    train_adapted_svm,
    train_linear_svm,
)

log = logging.getLogger(__name__)


def dedup_negatives(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Indices (by decreasing score) of the negatives ``Array[M, 4]`` kept so that none
    overlaps a harder kept one by more than ``iou`` (``svm.dedup_neg_iou``).

    The paper's "a negative sample is removed if it overlaps another negative sample by more
    than 70 %", resolved greedily in favour of the harder one: ``torchvision.ops.nms``. Applied
    to the hard negatives only, it keeps the same hard set as applied to all negatives first,
    since only a higher-scoring (so also hard) box can remove a hard one.
    """
    b = torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4))
    s = torch.as_tensor(np.asarray(scores, np.float32).reshape(-1))
    return nms(b, s, iou).numpy().astype(np.int64)


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

    def rescore_and_evict(
        self, w: np.ndarray, b: float, evict_threshold: float, offset: np.ndarray | None = None
    ) -> np.ndarray:
        """Score the cache with a new model, drop negatives below ``evict_threshold``.

        Args:
            offset: ``Array[Q]`` added to each negative's score (``svm.prior: softmax``).

        Returns:
            the scores ``Array[Q]`` of the negatives before eviction.
        """
        neg, _ = self.negatives()
        z = neg @ w + b
        if offset is not None:
            z = z + offset
        keep = np.flatnonzero(z >= evict_threshold)
        self.evicted += len(neg) - len(keep)
        self._keep(keep, neg, z)
        self.trained, self.new_since_retrain = True, 0
        return z

    def _keep(self, idx: np.ndarray, neg: np.ndarray, scores: np.ndarray) -> None:
        self._neg, self._neg_scores = [neg[idx]], [scores[idx].astype(np.float32)]

    _COUNTERS = ("trained", "new_since_retrain", "hard_added", "evicted", "_rejected")

    def state(self) -> dict[str, np.ndarray]:
        """The cache as arrays: ``pos`` ``Array[P, D]``, ``neg`` ``Array[Q, D]``,
        ``neg_scores`` ``Array[Q]`` and its ``counters`` ``Array[5]`` int64."""
        neg, scores = self.negatives()
        counters = np.array([int(getattr(self, k)) for k in self._COUNTERS], np.int64)
        return {"pos": self.positives(), "neg": neg, "neg_scores": scores, "counters": counters}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what :meth:`state` returned (the arrays are taken over, not copied)."""
        pos, neg = state["pos"], state["neg"]
        if pos.shape[1:] != (self.dim,) or neg.shape[1:] != (self.dim,):
            raise DataError(f"SVM cache state of {pos.shape[1:]} dims, expected {self.dim}")
        self._pos, self._neg = [pos.astype(np.float32)], [neg.astype(np.float32)]
        self._neg_scores = [state["neg_scores"].astype(np.float32)]
        for key, value in zip(self._COUNTERS, state["counters"].tolist(), strict=True):
            setattr(self, key, bool(value) if key == "trained" else int(value))


class SVMTrainer:
    """Streams training images in and mines hard negatives for all classes at once.

    Args:
        num_classes: ``K`` (class indices ``0..K-1``, no background).
        dim: ``D``.
        config: :class:`SVMConfig`.
        feature_scale: the factor the caller applied to the features (stored with the SVMs).
        seed: liblinear's random seed (its dual coordinate descent shuffles).
        prior: with ``svm.prior``, on the scaled features: ``classifier``: ``(Array[D, K],
            Array[K])``, each class's linear score that its SVM adapts
            (:func:`~sppdet.svm.classifier_prior`); ``softmax``: ``(Array[D, K + 1],
            Array[K + 1])``, the classifier whose log posteriors they adapt
            (:func:`~sppdet.svm.softmax_prior`).
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        config: SVMConfig | None = None,
        feature_scale: float = 1.0,
        seed: int = 0,
        prior: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.num_classes, self.dim = num_classes, dim
        self.config = config or SVMConfig()
        if (prior is None) != (self.config.prior == "none"):
            given = "no prior" if prior is None else "a prior"
            raise ConfigError(f"svm.prior is {self.config.prior!r} but {given} was given")
        self.prior = None
        if prior is not None:
            self.prior = (np.asarray(prior[0], np.float32), np.asarray(prior[1], np.float32))
            k = num_classes + (self.config.prior == "softmax")  # softmax: background too
            if self.prior[0].shape != (dim, k) or self.prior[1].shape != (k,):
                shape = self.prior[0].shape
                raise ConfigError(
                    f"svm.prior {self.config.prior}: a prior of shape {shape} for "
                    f"D={dim}, K={num_classes}"
                )
        self.A = np.zeros(num_classes, np.float32)  # each class's prior weight (softmax)
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
        boxes: np.ndarray | None = None,
    ) -> None:
        """Mine one image.

        Args:
            features: ``Array[N, D]`` float32, already multiplied by ``feature_scale``.
            is_gt: ``Array[N]`` bool, rows that are ground-truth boxes (positives of their class;
                pass all False if the positives were given to :meth:`add_positives`).
            gt_labels: ``Array[N]`` int64 class of each ground-truth row, -1 for proposals.
            max_iou: ``Array[N, K]`` IoU of each row with the ground truth of each class (0 where
                the class is absent).
            boxes: ``Array[N, 4]`` the rows' boxes; needed only with ``svm.dedup_neg_iou``.
        """
        cfg = self.config
        if cfg.dedup_neg_iou is not None and boxes is None:
            raise ValueError("add_image: svm.dedup_neg_iou needs the rows' boxes")
        x = np.asarray(features, np.float32).reshape(-1, self.dim)
        gt_labels = np.asarray(gt_labels, np.int64).reshape(-1)
        pos = np.asarray(is_gt, bool).reshape(-1) & (gt_labels >= 0)
        self.add_positives(x[pos], gt_labels[pos])
        scores = x @ self.W + self.b  # the one per-image matmul: all rows x all classes
        if self._softmax:
            scores += (self.A * self._log_posterior(x)).astype(np.float32)
        hard = (np.asarray(max_iou).reshape(len(x), -1) < cfg.neg_iou) & (
            scores > cfg.hard_threshold
        )
        hard[np.flatnonzero(pos), gt_labels[pos]] = False  # a GT is never its own negative
        for c in range(self.num_classes):
            rows = np.flatnonzero(hard[:, c])
            if cfg.dedup_neg_iou is not None and len(rows) > 1:
                rows = rows[dedup_negatives(boxes[rows], scores[rows, c], cfg.dedup_neg_iou)]
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

    @property
    def _softmax(self) -> bool:
        return self.config.prior == "softmax"

    def _log_posterior(self, x: np.ndarray) -> np.ndarray:
        """``Array[N, K]`` the classifier's log posteriors of scaled rows (``softmax``)."""
        return log_posterior(x, self.prior[0], self.prior[1])

    def _train(self, c: int) -> None:
        cache, cfg = self.caches[c], self.config
        cache.trim()
        pos, (neg, _) = cache.positives(), cache.negatives()
        offsets = None
        if self._softmax:
            s_pos, s_neg = self._log_posterior(pos)[:, c], self._log_posterior(neg)[:, c]
            w, b, a, converged = train_adapted_svm(pos, neg, np.r_[s_pos, s_neg], cfg, self.seed)
            offsets, self.A[c] = (a * s_pos, a * s_neg), a
        else:
            prior = None if self.prior is None else (self.prior[0][:, c], float(self.prior[1][c]))
            w, b, converged = train_linear_svm(pos, neg, cfg, self.seed, prior)
        stats = svm_objective(w, b, pos, neg, cfg, offsets)
        cache.rescore_and_evict(w, b, cfg.evict_threshold, None if offsets is None else offsets[1])
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
        prior = {}
        if self._softmax:
            prior = {"prior_W": self.prior[0], "prior_b": self.prior[1], "prior_a": self.A.copy()}
        return LinearSVMs(
            W=self.W.copy(), b=self.b.copy(), feature_scale=self.feature_scale, **prior
        )

    def state(self) -> dict[str, np.ndarray]:
        """Everything mining has learnt so far, as flat arrays (``np.savez`` without pickle):
        the classifiers, the images mined, and per class ``c{c}/...`` its cache's arrays."""
        out = {
            "W": self.W,
            "b": self.b,
            "images": np.int64(self.images),
            "trained_at": np.asarray(self._trained_at, np.int64),
            "feature_scale": np.float64(self.feature_scale),
            "stats": np.asarray(json.dumps(self._stats)),
        }
        if self.prior is not None:
            out.update(prior_W=self.prior[0], prior_b=self.prior[1], prior_a=self.A)
        for c, cache in enumerate(self.caches):
            out.update({f"c{c}/{k}": v for k, v in cache.state().items()})
        return out

    @classmethod
    def from_state(
        cls, state: dict[str, np.ndarray], config: SVMConfig, seed: int = 0
    ) -> SVMTrainer:
        """A trainer that continues where the one that wrote ``state`` (:meth:`state`) stopped.

        Raises:
            DataError: ``state`` lacks a key or its shapes disagree.
        """
        try:
            dim, num_classes = state["W"].shape
            prior = (state["prior_W"], state["prior_b"]) if "prior_W" in state else None
            trainer = cls(num_classes, dim, config, float(state["feature_scale"]), seed, prior)
            trainer.W, trainer.b = state["W"].astype(np.float32), state["b"].astype(np.float32)
            if "prior_a" in state:  # older states (classifier prior) lack it: all zero there
                trainer.A = state["prior_a"].astype(np.float32)
            trainer.images = int(state["images"])
            trainer._trained_at = [int(i) for i in state["trained_at"]]
            trainer._stats = json.loads(str(state["stats"]))
            for c, cache in enumerate(trainer.caches):
                prefix = f"c{c}/"  # the keys state() wrote for this class
                cache.load_state(
                    {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
                )
        except (KeyError, ValueError, ConfigError) as exc:
            raise DataError(f"not an SVM mining state: {exc}") from exc
        return trainer

    def stats(self) -> list[dict]:
        """Per class: retrains, positives, cached negatives, hard negatives added, evicted, and
        the last training's objective terms, training accuracy, support vectors, convergence."""
        out = []
        for st, cache in zip(self._stats, self.caches, strict=True):
            d = dict(st, cached_negatives=cache.num_neg, hard_added=cache.hard_added)
            out.append(dict(d, evicted=cache.evicted, positives=cache.num_pos))
        return out
