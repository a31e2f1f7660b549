"""Test time: image -> scored, suppressed, regressed detections (SPEC section 8).

Every window is scored by every class (linear SVMs on fc7, or the fine-tuned softmax), boxes
are refined by the class's regressor, then per-class NMS at IoU 0.3
(``torchvision.ops.batched_nms``) and a cap per image (Fast R-CNN: 100).

Shape shorthand: ``N`` windows, ``K`` classes, ``M`` detections, ``D`` feature dims.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from sppdet.boxes import clip_boxes, unique_boxes, valid_boxes_mask
from sppdet.fastpath import CompressedHead, check_fc_dtype, fc_autocast
from sppdet.features import (
    FeatureExtractor,
    ScaleMap,
    SPPConfig,
    pool_distinct_windows,
    pool_windows,
)
from sppdet.rcnn import rcnn_featurizer

#: Timed stages; "warp" (cropping and warping windows) is R-CNN mode's only.
STAGES = ("proposals", "warp", "conv", "spp", "fc", "svm", "bbox", "nms")
SCORERS = ("svm", "softmax", "random")


@dataclass(frozen=True)
class TestConfig:
    """Test-time knobs."""

    scorer: str = "svm"  # "svm" (paper), "softmax" (the fine-tuned 21-way layer, Fast R-CNN),
    # or "random" (uniform scores: the chance baseline on the same proposals)
    seed: int = 0  # random scorer's generator seed
    layer: str = "fc7"  # SVM feature layer: pool5 | fc6 | fc7 (paper's best: ft fc7)
    bbox_reg: bool = True  # apply the class's box regressor (paper table 10 rows "bb")
    nms_iou: float = 0.3  # per-class NMS threshold (R-CNN / SPP-net)
    score_threshold: float = -1.5  # drop windows scoring below (SVM margin units); -inf keeps all
    pre_nms_top_k: int = 300  # per class, before NMS (bounds NMS cost)
    max_per_image: int = 100  # detections kept per image (Fast R-CNN, for evaluation)
    fc_batch: int = 1024  # windows per fc forward pass (bounds memory)
    dedup: bool = True  # pool and score once per distinct (scale, map-cell window): windows
    # that map to the same cells have identical SPP vectors (exact; SPP mode only)
    svd_fc6: int = 0  # rank of fc6's truncated SVD (Fast R-CNN 3.1); 0 = exact fc6
    svd_fc7: int = 0  # rank of fc7's truncated SVD; 0 = exact fc7
    fc_dtype: str = "auto"  # fc stage: float32 | bfloat16 autocast (CPU/CUDA) | float16
    # autocast (CUDA) | int8 matmuls for fc6/fc7 (CPU; sppdet.fastpath.Int8Linear) | auto:
    # int8 on a CPU, float32 on a GPU (sppdet.fastpath.resolve_fc_dtype; issue 7 asks for the
    # fastest setting within 0.3 mAP points, and int8 was measured inside that on VOC07 val)


@dataclass
class Detections:
    """Detections of one image: ``boxes`` ``[M, 4]`` internal xyxy, ``scores`` ``[M]``,
    ``labels`` ``[M]`` class index, ``timings`` seconds per stage."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, defaultdict(float)
        self._t = time.perf_counter()

    def lap(self, stage: str) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed = now - self._t
        self.times[stage] += elapsed
        self._t = now
        return elapsed

    def shared(self, cache: dict, key: str, stage: str, compute):
        """``compute()`` once per ``cache``; later callers are charged the same seconds."""
        if key in cache:
            value, seconds = cache[key]
            self.times[stage] += seconds
            self._t = time.perf_counter()
            return value
        self.lap("_other")
        value = compute()
        cache[key] = (value, self.lap(stage))
        return value


class Detector:
    """A loaded model: call :meth:`detect` on images (the Python API of ``sppdet detect``).

    Args:
        extractor: frozen backbone + scales.
        spp: window mapping / pyramid config.
        head: fine-tuned :class:`~sppdet.finetune.FCHead` (``None`` only for pool5 SVMs).
        svms: :class:`~sppdet.svm.LinearSVMs` (``None`` with ``scorer="softmax"``); detection
            calls its ``scores_tensor(Tensor[N, D]) -> Tensor[N, K]``.
        bbox: box regressor with ``predict_rows(features, rows, boxes, labels) -> [M, 4]``
            (:meth:`~sppdet.bbox_reg.BBoxRegressor.predict_rows`) or ``None``.
        bbox_scale: factor applied to pool5 vectors before the regressor.
        classes: class names.
        propose: function ``image -> Array[N, 4]`` used when no proposals are given.
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        spp: SPPConfig,
        head,
        svms,
        bbox,
        bbox_scale: float,
        classes: tuple[str, ...],
        config: TestConfig,
        propose=None,
    ) -> None:
        # "auto" becomes the device's dtype here, so timings and JSON name what actually ran
        # (and checked against it: e.g. int8 on CUDA is a ConfigError)
        config = replace(config, fc_dtype=check_fc_dtype(config.fc_dtype, extractor.device))
        self.extractor, self.spp, self.head, self.svms = extractor, spp, head, svms
        self.bbox, self.bbox_scale, self.classes, self.config = bbox, bbox_scale, classes, config
        self.propose = propose
        if config.scorer not in SCORERS:
            raise ValueError(f"unknown scorer {config.scorer!r}; expected one of {SCORERS}")
        self._rng = torch.Generator().manual_seed(config.seed)
        if config.scorer == "svm" and svms is None:
            raise ValueError("scorer 'svm' needs trained SVMs")
        if config.scorer == "softmax" and head is None:
            raise ValueError("scorer 'softmax' needs a fine-tuned head")
        self.trained_head = head  # as trained; ``head`` may become its compressed form
        int8 = config.fc_dtype == "int8"
        if head is not None and (config.svd_fc6 or config.svd_fc7 or int8):
            self.head = CompressedHead(head, config.svd_fc6, config.svd_fc7, int8=int8)
        self._fc_key = f"{config.svd_fc6}/{config.svd_fc7}/{config.fc_dtype}"
        self.rcnn = None
        if extractor.config.mode == "rcnn":
            self.rcnn = rcnn_featurizer(extractor, spp)

    @property
    def device(self) -> torch.device:
        return self.extractor.device

    @torch.inference_mode()
    def detect(self, image: np.ndarray, proposals: np.ndarray | None = None) -> Detections:
        """Detect objects in ``image`` (uint8 ``[H, W, 3]`` RGB).

        Args:
            proposals: ``Array[N, 4]`` internal xyxy windows; computed with ``propose`` if None.
        """
        t0 = time.perf_counter()
        if proposals is None:
            if self.propose is None:
                raise ValueError("no proposals given and no proposal function configured")
            proposals = self.propose(image)
        t1 = time.perf_counter()
        if self.rcnn is not None:
            return self._detect_rcnn(image, proposals, t1 - t0)
        maps = self.extractor.compute(image)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        dets = self.detect_maps(maps, image.shape[:2], proposals)
        dets.timings["proposals"] = dets.timings.get("proposals", 0.0) + t1 - t0
        dets.timings["conv"] = t2 - t1
        return dets

    def _detect_rcnn(self, image: np.ndarray, proposals: np.ndarray, t_prop: float) -> Detections:
        """R-CNN mode: every window warped and run through the conv layers on its own."""
        sub: dict[str, float] = {}
        prepared = self.rcnn.prepare(image, self.device)
        dets = self.detect_with(
            lambda b: (self.rcnn.features(prepared, b, sub), None), image.shape[:2], proposals
        )
        t = dets.timings
        t["proposals"] = t.get("proposals", 0.0) + t_prop
        t["warp"], t["conv"] = sub.get("warp", 0.0), sub.get("conv", 0.0)
        t["spp"] = max(t.get("spp", 0.0) - t["warp"] - t["conv"], 0.0)
        return dets

    @torch.inference_mode()
    def detect_maps(
        self,
        maps: list[ScaleMap],
        size: tuple[int, int],
        proposals: np.ndarray,
        shared: dict | None = None,
    ) -> Detections:
        """Detect from an image's conv maps (e.g. from a cache); ``size`` is ``(H, W)``.

        ``shared``: a dict that several detectors of the same run (test-time variants such as
        SVM vs softmax, with or without box regression) pass for the same image, so SPP vectors
        and fc features are computed once (box regression depends on each variant's candidates).
        Each variant's timings still include the time the shared values took, as if it had run
        alone.
        """
        spec, spp = self.extractor.spec, self.spp

        def pool(boxes: np.ndarray) -> tuple[Tensor, np.ndarray | None]:
            if not self.config.dedup:
                return pool_windows(maps, boxes, spec, spp), None
            return pool_distinct_windows(maps, boxes, spec, spp)

        return self.detect_with(pool, size, proposals, shared)

    @torch.inference_mode()
    def detect_with(self, pool, size: tuple[int, int], proposals: np.ndarray, shared=None):
        """Detect given a window featuriser (the core of :meth:`detect_maps` / R-CNN mode).

        ``pool(boxes: Array[N, 4]) -> (Tensor[U, D], inverse)``: pool5 vectors of the distinct
        windows and ``Array[N]`` each window's row (``inverse = None``: one row per window).
        """
        clock = _Clock(self.device)
        h, w = size
        boxes = clip_boxes(proposals, w, h)
        boxes = boxes[valid_boxes_mask(boxes)]
        boxes = boxes[unique_boxes(boxes)]
        clock.lap("proposals")
        if len(boxes) == 0:
            return _empty(clock.times)
        scores, regress = self._score(pool, boxes, clock, {} if shared is None else shared)
        dets = self._suppress(boxes, scores, regress, (w, h), clock)
        dets.timings = {k: v for k, v in clock.times.items() if not k.startswith("_")}
        return dets

    def _score(self, pool, boxes: np.ndarray, clock: _Clock, shared: dict):
        cfg = self.config
        key = f"pool5/{cfg.dedup}"
        pool5, inverse = clock.shared(shared, key, "spp", lambda: pool(boxes))
        fc_key = f"{key}/{self._fc_key}"
        if cfg.scorer == "random":
            n_cls = len(self.classes)
            # One draw per window (not per distinct window): chance on the same proposals.
            scores = torch.rand(len(boxes), n_cls, generator=self._rng).to(self.device)
            inverse = None
            clock.lap("fc")
        elif cfg.scorer == "softmax":
            # fc7 is shared with the fc7 SVM variants: only the 21-way layer is the softmax's own
            fc7 = clock.shared(shared, f"{fc_key}/fc7", "fc", lambda: self._fc(pool5, "fc7"))
            scores = clock.shared(shared, f"{fc_key}/softmax", "fc", lambda: self._softmax(fc7))
        else:
            x = (
                pool5  # pool5 SVMs score the SPP vectors themselves: no fc work to share
                if cfg.layer == "pool5"
                else clock.shared(
                    shared, f"{fc_key}/{cfg.layer}", "fc", lambda: self._fc(pool5, cfg.layer)
                )
            )
            scores = self.svms.scores_tensor(x)  # in torch: see LinearSVMs.scores_tensor
            clock.lap("svm")
        regress = None
        if cfg.bbox_reg and self.bbox is not None:
            regress = lambda idx, labels: self._regress(pool5, inverse, boxes, idx, labels)  # noqa: E731
        return _expand(scores.float(), inverse), regress

    def _fc(self, pool5: Tensor, layer: str) -> Tensor:
        """``Tensor[U, H]`` fc features (``layer`` fc6 or fc7) of the pool5 rows."""
        out = []
        with fc_autocast(self.device, self.config.fc_dtype):
            for chunk in pool5.split(self.config.fc_batch):  # bounds fc activations' memory
                out.append(self.head.embed(chunk, layer).float())
        return torch.cat(out)

    def _softmax(self, fc7: Tensor) -> Tensor:
        """``Tensor[U, K]`` class probabilities (background dropped) from fc7 features: the
        head's forward pass in eval mode (dropout off), split so fc7 can be shared."""
        with fc_autocast(self.device, self.config.fc_dtype):
            logits = self.head.cls(fc7).float()
        return torch.softmax(logits, dim=1)[:, 1:]

    def _regress(self, pool5: Tensor, inverse, boxes: np.ndarray, idx: Tensor, labels: Tensor):
        """``Tensor[M, 4]``: window ``idx[i]`` refined by the regressor of class ``labels[i]``.

        Only the candidates that survive the score threshold and the per-class top-k are
        regressed (R-CNN regresses the scored windows), not every window for every class.
        """
        cand = idx.cpu().numpy()
        rows = inverse[cand] if inverse is not None else cand
        uniq, pos = np.unique(rows, return_inverse=True)
        feats = pool5[torch.from_numpy(uniq).to(pool5.device)] * self.bbox_scale
        out = self.bbox.predict_rows(  # a tensor: its product runs in torch, not OpenBLAS
            feats, pos.reshape(-1), boxes[cand], labels.cpu().numpy()
        )
        return torch.as_tensor(out, dtype=torch.float32, device=self.device)

    def _suppress(self, boxes, scores: Tensor, regress, size, clock: _Clock) -> Detections:
        cfg = self.config
        n, k = scores.shape
        cand_idx, cand_scores, cand_labels = [], [], []
        for c in range(k):
            s = scores[:, c]
            keep = torch.nonzero(s >= cfg.score_threshold).flatten()
            if len(keep) > cfg.pre_nms_top_k:
                keep = keep[s[keep].topk(cfg.pre_nms_top_k).indices]
            cand_idx.append(keep)
            cand_scores.append(s[keep])
            cand_labels.append(torch.full((len(keep),), c, dtype=torch.long, device=self.device))
        idx, s, lab = torch.cat(cand_idx), torch.cat(cand_scores), torch.cat(cand_labels)
        clock.lap("nms")
        if regress is not None and len(idx):
            b = regress(idx, lab)
            clock.lap("bbox")
        else:
            b = torch.as_tensor(boxes, device=self.device)[idx]
        w, h = size
        b = torch.as_tensor(clip_boxes(b.cpu().numpy(), w, h), device=self.device)
        ok = torch.as_tensor(valid_boxes_mask(b.cpu().numpy()), device=self.device)
        b, s, lab = b[ok], s[ok], lab[ok]
        keep = batched_nms(b, s, lab, cfg.nms_iou)[: cfg.max_per_image]
        clock.lap("nms")
        return Detections(
            b[keep].cpu().numpy().astype(np.float32),
            s[keep].cpu().numpy().astype(np.float32),
            lab[keep].cpu().numpy().astype(np.int64),
        )


def _expand(x: Tensor, inverse: np.ndarray | None) -> Tensor:
    """Rows of the distinct windows back to one row per window."""
    return x if inverse is None else x[torch.from_numpy(inverse).to(x.device)]


def _empty(times) -> Detections:
    return Detections(
        np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64), dict(times)
    )
