"""Test time: image -> scored, suppressed, regressed detections (SPEC section 8).

Every window is scored by every class (linear SVMs on fc7, or the fine-tuned softmax), boxes
are refined by the class's regressor, then per-class NMS at IoU 0.3
(``torchvision.ops.batched_nms``) and a cap per image (Fast R-CNN: 100).

A functional core: each step is a function of tensors (:func:`prepare_windows`,
:func:`fc_features`, :func:`softmax_scores`, :func:`select_candidates`,
:func:`regress_candidates`, :func:`suppress`); :class:`Detector` holds the trained parts and
chains them. It keeps no clock and no cache: stages are named through a hook
(:mod:`sppdet.timing`; ``sppdet bench`` times them), and the evaluation pass that shares pool5 /
fc7 between test variants is :func:`sppdet.evaluate.detect_variants`.

Shape shorthand: ``N`` windows, ``K`` classes, ``M`` detections, ``D`` feature dims.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import batched_nms

from sppdet.boxes import clip_boxes, unique_boxes, valid_boxes_mask, vote_boxes
from sppdet.fastpath import CompressedHead, check_fc_dtype, fc_autocast
from sppdet.features import FeatureExtractor, ScaleMap, SPPConfig
from sppdet.timing import PROFILER_LABELS, StageHook
from sppdet.window_features import ImageWindows, SPPImage, window_features

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
    box_vote_iou: float = 0.0  # > 0: box voting after NMS (Gidaris & Komodakis 2015: 0.5),
    # each kept box the score-weighted mean of its class's candidates overlapping it this much;
    # 0 = off (the paper)
    fc_batch: int = 1024  # windows per fc forward pass (bounds memory)
    dedup: bool = True  # pool and score once per distinct (scale, map-cell window): windows
    # that map to the same cells have identical SPP vectors (exact; SPP mode only)
    svd_fc6: int = 0  # rank of fc6's truncated SVD (Fast R-CNN 3.1); 0 = exact fc6
    svd_fc7: int = 0  # rank of fc7's truncated SVD; 0 = exact fc7
    fc_dtype: str = "auto"  # fc stage: float32 | bfloat16 autocast (CPU/CUDA) | float16
    # autocast (CUDA) | int8 matmuls for fc6/fc7 (CPU; sppdet.fastpath.Int8Linear) | auto:
    # int8 on a CPU with int8 dot-product instructions, else float32 (a GPU, or an AVX2-only CPU
    # where torch._int_mm is ~100x slower; sppdet.fastpath.resolve_fc_dtype; issue 7 asks for
    # the fastest setting within 0.3 mAP points, and int8 was measured inside that on VOC07 val)


@dataclass
class Detections:
    """Detections of one image: ``boxes`` ``Array[M, 4]`` internal xyxy, ``scores``
    ``Array[M]``, ``labels`` ``Array[M]`` class index."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


#: ``pool(boxes: Array[N, 4]) -> (Tensor[U, D], inverse)``: pool5 vectors of the distinct
#: windows and ``Array[N]`` each window's row (``inverse = None``: one row per window).
PoolFn = Callable[[np.ndarray], tuple[Tensor, np.ndarray | None]]


# ------------------------------------------------------------------------ pure functions


def prepare_windows(proposals: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``Array[N', 4]``: ``proposals`` clipped to an ``(H, W)`` image, degenerate and duplicate
    windows dropped."""
    h, w = size
    boxes = clip_boxes(proposals, w, h)
    boxes = boxes[valid_boxes_mask(boxes)]
    return boxes[unique_boxes(boxes)]


def fc_features(
    head: torch.nn.Module,
    pool5: Tensor,
    layer: str,
    *,
    fc_dtype: str = "float32",
    batch: int = 1024,
) -> Tensor:
    """``Tensor[U, H]`` float32 activations of ``layer`` (fc6 or fc7) for pool5 rows
    ``Tensor[U, D]``, ``batch`` rows per forward pass (bounds the activations' memory)."""
    out = []
    with fc_autocast(pool5.device, fc_dtype):
        for chunk in pool5.split(batch):
            out.append(head.embed(chunk, layer).float())
    return torch.cat(out)


def softmax_scores(head: torch.nn.Module, fc7: Tensor, *, fc_dtype: str = "float32") -> Tensor:
    """``Tensor[U, K]`` class probabilities (background dropped) from fc7 features: the head's
    classifier in eval mode (dropout off), apart from fc7 so that fc7 can be shared."""
    with fc_autocast(fc7.device, fc_dtype):
        logits = head.cls(fc7).float()
    return torch.softmax(logits, dim=1)[:, 1:]


def expand_rows(x: Tensor, inverse: np.ndarray | None) -> Tensor:
    """Rows of the distinct windows back to one row per window (``inverse`` ``Array[N]``)."""
    return x if inverse is None else x[torch.from_numpy(inverse).to(x.device)]


def select_candidates(
    scores: Tensor, threshold: float, top_k: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per class, the windows scoring ``>= threshold``, at most the ``top_k`` best.

    Args:
        scores: ``Tensor[N, K]``.

    Returns:
        ``(idx, scores, labels)``, each ``Tensor[M]``: window index, score and class of each
        candidate, classes in order.
    """
    cand_idx, cand_scores, cand_labels = [], [], []
    for c in range(scores.shape[1]):
        s = scores[:, c]
        keep = torch.nonzero(s >= threshold).flatten()
        if len(keep) > top_k:
            keep = keep[s[keep].topk(top_k).indices]
        cand_idx.append(keep)
        cand_scores.append(s[keep])
        cand_labels.append(torch.full((len(keep),), c, dtype=torch.long, device=scores.device))
    return torch.cat(cand_idx), torch.cat(cand_scores), torch.cat(cand_labels)


def regress_candidates(
    bbox,
    pool5: Tensor,
    inverse: np.ndarray | None,
    boxes: np.ndarray,
    idx: Tensor,
    labels: Tensor,
    feature_scale: float,
    embed: Callable[[Tensor, str], Tensor] | None = None,
) -> Tensor:
    """``Tensor[M, 4]``: window ``idx[i]`` refined by the regressor of class ``labels[i]``.

    Only the candidates are regressed (R-CNN regresses the scored windows), not every window
    for every class; each distinct pool5 row is scaled once (and, for regressors of an fc
    layer, embedded once).

    Args:
        bbox: a :class:`~sppdet.bbox_reg.BBoxRegressor` (its ``predict_rows``).
        pool5: ``Tensor[U, D]`` rows of the distinct windows, ``inverse`` ``Array[N]`` each
            window's row (``None``: one row per window).
        boxes: ``Array[N, 4]`` the windows.
        feature_scale: factor the regressors' training features were scaled by.
        embed: ``(pool5 rows, layer) -> Tensor[U, H]``, the fine-tuned head's activations;
            needed when ``bbox.layer`` is not pool5.
    """
    cand = idx.cpu().numpy()
    rows = inverse[cand] if inverse is not None else cand
    uniq, pos = np.unique(rows, return_inverse=True)
    feats = pool5[torch.from_numpy(uniq).to(pool5.device)]
    layer = getattr(bbox, "layer", "pool5")
    if layer != "pool5":
        if embed is None:
            raise ValueError(f"box regressors of {layer} need the fine-tuned head (embed)")
        feats = embed(feats, layer)
    feats = feats * feature_scale
    out = bbox.predict_rows(  # a tensor: its product runs in torch, not OpenBLAS
        feats, pos.reshape(-1), boxes[cand], labels.cpu().numpy()
    )
    return torch.as_tensor(out, dtype=torch.float32, device=pool5.device)


def suppress(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    size: tuple[int, int],
    *,
    nms_iou: float,
    max_per_image: int,
    vote_iou: float = 0.0,
) -> Detections:
    """Clip ``boxes`` ``Tensor[M, 4]`` to an ``(H, W)`` image, drop degenerate ones, per-class
    NMS at ``nms_iou``, keep the ``max_per_image`` best (over all classes); with ``vote_iou``
    the kept boxes are voted (:func:`~sppdet.boxes.vote_boxes`)."""
    h, w = size
    dev = boxes.device
    b = torch.as_tensor(clip_boxes(boxes.cpu().numpy(), w, h), device=dev)
    ok = torch.as_tensor(valid_boxes_mask(b.cpu().numpy()), device=dev)
    b, s, lab = b[ok], scores[ok], labels[ok]
    keep = batched_nms(b, s, lab, nms_iou)[:max_per_image]
    b, s, lab = (t.cpu().numpy() for t in (b, s, lab))
    k = keep.cpu().numpy()
    out = vote_boxes(k, b, s, lab, vote_iou) if vote_iou > 0 else b[k].astype(np.float32)
    return Detections(out, s[k].astype(np.float32), lab[k].astype(np.int64))


# ----------------------------------------------------------------------------- detector


class Detector:
    """A loaded model: call :meth:`detect` on images (the Python API of ``sppdet detect``).

    Args:
        extractor: backbone + scales (with the fine-tuned top blocks, if any).
        spp: window mapping / pyramid config.
        head: fine-tuned :class:`~sppdet.head.FCHead` (``None`` only for pool5 SVMs).
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
        # "auto" becomes the device's dtype here, so outputs and JSON name what actually ran
        # (and checked against it: e.g. int8 on CUDA is a ConfigError)
        config = replace(config, fc_dtype=check_fc_dtype(config.fc_dtype, extractor.device))
        self.extractor, self.spp, self.head, self.svms = extractor, spp, head, svms
        self.bbox, self.bbox_scale, self.classes, self.config = bbox, bbox_scale, classes, config
        self.propose = propose
        if config.scorer not in SCORERS:
            raise ValueError(f"unknown scorer {config.scorer!r}; expected one of {SCORERS}")
        if config.scorer == "svm" and svms is None:
            raise ValueError("scorer 'svm' needs trained SVMs")
        if config.scorer == "softmax" and head is None:
            raise ValueError("scorer 'softmax' needs a fine-tuned head")
        self.trained_head = head  # as trained; ``head`` may become its compressed form
        int8 = config.fc_dtype == "int8"
        if head is not None and (config.svd_fc6 or config.svd_fc7 or int8):
            self.head = CompressedHead(head, config.svd_fc6, config.svd_fc7, int8=int8)
        self.windows = window_features(extractor, spp)  # SPP-net's, or R-CNN's per window

    @property
    def device(self) -> torch.device:
        return self.extractor.device

    # -- what determines each intermediate value (for sharing them between detectors)

    @property
    def fc_key(self) -> tuple:
        """Identifies the fc features this detector computes from given pool5 rows: the
        trained head object and how it runs (SVD ranks, dtype)."""
        c = self.config
        return (id(self.trained_head), c.svd_fc6, c.svd_fc7, c.fc_dtype, c.fc_batch)

    @property
    def score_layer(self) -> str:
        """The features the scorer reads: the SVMs' layer, or fc7 for the softmax."""
        return "fc7" if self.config.scorer == "softmax" else self.config.layer

    @property
    def score_key(self) -> tuple:
        """Identifies the scores this detector computes from given pool5 rows."""
        fc = self.fc_key if self.score_layer != "pool5" else None
        scorer = self.config.scorer
        return (scorer, self.score_layer, fc, id(self.svms) if scorer == "svm" else None)

    # -- steps

    def embed(self, pool5: Tensor, layer: str) -> Tensor:
        """``Tensor[U, H]`` fc features (``layer`` fc6 or fc7) of the pool5 rows."""
        c = self.config
        return fc_features(self.head, pool5, layer, fc_dtype=c.fc_dtype, batch=c.fc_batch)

    def score_features(self, x: Tensor) -> Tensor:
        """``Tensor[U, K]`` float32 class scores of :attr:`score_layer` features ``x``."""
        if self.config.scorer == "softmax":
            return softmax_scores(self.head, x, fc_dtype=self.config.fc_dtype)
        return self.svms.scores_tensor(x).float()  # in torch: see LinearSVMs.scores_tensor

    def random_scores(self, boxes: np.ndarray) -> Tensor:
        """``Tensor[N, K]`` uniform scores of ``boxes`` (``Array[N, 4]``), one draw per window
        (not per distinct window): chance on the same proposals. The generator is seeded by
        ``config.seed`` and the windows themselves, so an image's scores do not depend on which
        images were scored before it, or by which process (:mod:`sppdet.distributed`)."""
        key = zlib.crc32(np.ascontiguousarray(boxes, np.float32).tobytes(), self.config.seed)
        gen = torch.Generator().manual_seed(key)
        return torch.rand(len(boxes), len(self.classes), generator=gen).to(self.device)

    @property
    def score_stage(self) -> str:
        """The stage name of :meth:`score_features` ("svm", or "fc" for the softmax layer)."""
        return "svm" if self.config.scorer == "svm" else "fc"

    def finish(
        self,
        boxes: np.ndarray,
        scores: Tensor,
        pool5: Tensor,
        inverse: np.ndarray | None,
        size: tuple[int, int],
        hook: StageHook = PROFILER_LABELS,
    ) -> Detections:
        """Candidates of ``scores`` ``Tensor[N, K]``, regressed (if configured) and suppressed."""
        cfg = self.config
        with hook("nms"):
            idx, s, lab = select_candidates(scores, cfg.score_threshold, cfg.pre_nms_top_k)
        if cfg.bbox_reg and self.bbox is not None and len(idx):
            with hook("bbox"):
                b = regress_candidates(
                    self.bbox, pool5, inverse, boxes, idx, lab, self.bbox_scale, self.embed
                )
        else:
            b = torch.as_tensor(boxes, device=self.device)[idx]
        with hook("nms"):
            nms = dict(nms_iou=cfg.nms_iou, max_per_image=cfg.max_per_image)
            return suppress(b, s, lab, size, **nms, vote_iou=cfg.box_vote_iou)

    # -- whole detections

    @torch.inference_mode()
    def detect(
        self,
        image: np.ndarray,
        proposals: np.ndarray | None = None,
        *,
        hook: StageHook = PROFILER_LABELS,
    ) -> Detections:
        """Detect objects in ``image`` (uint8 ``[H, W, 3]`` RGB).

        Args:
            proposals: ``Array[N, 4]`` internal xyxy windows; computed with ``propose`` if None.
            hook: entered around each stage (:mod:`sppdet.timing`).
        """
        if proposals is None:
            if self.propose is None:
                raise ValueError("no proposals given and no proposal function configured")
            with hook("proposals"):
                proposals = self.propose(image)
        with hook("conv"):
            windows = self.windows.from_image(image)
            windows.prepare(self.extractor)
        return self.detect_image(windows, image.shape[:2], proposals, hook=hook)

    @torch.inference_mode()
    def detect_image(
        self,
        windows: ImageWindows,
        size: tuple[int, int],
        proposals: np.ndarray,
        *,
        hook: StageHook = PROFILER_LABELS,
    ) -> Detections:
        """Detect from an image's window features (e.g. a dataset image read from a cache);
        ``size`` is ``(H, W)``."""
        return self.detect_with(self.pool_fn(windows, hook), size, proposals, hook=hook)

    @torch.inference_mode()
    def detect_maps(
        self,
        maps: list[ScaleMap],
        size: tuple[int, int],
        proposals: np.ndarray,
        *,
        hook: StageHook = PROFILER_LABELS,
    ) -> Detections:
        """Detect from an image's conv maps below the top blocks (what a cache holds; the
        tapped maps when the trunk has none)."""
        return self.detect_image(SPPImage(maps, self.spp), size, proposals, hook=hook)

    def pool_fn(self, windows: ImageWindows, hook: StageHook = PROFILER_LABELS) -> PoolFn:
        """This detector's :data:`PoolFn` over an image's window features: its trunk and its
        ``dedup`` setting."""
        ext, dedup = self.extractor, self.config.dedup
        return lambda b: windows.pool(b, ext, dedup=dedup, hook=hook)

    @torch.inference_mode()
    def detect_with(
        self,
        pool: PoolFn,
        size: tuple[int, int],
        proposals: np.ndarray,
        *,
        hook: StageHook = PROFILER_LABELS,
    ) -> Detections:
        """Detect given a window featuriser ``pool`` (:data:`PoolFn`): the core of
        :meth:`detect` and :meth:`detect_image`."""
        with hook("proposals"):
            boxes = prepare_windows(proposals, size)
        if len(boxes) == 0:
            return Detections.empty()
        with hook("spp"):
            pool5, inverse = pool(boxes)
        if self.config.scorer == "random":
            with hook("fc"):
                scores = self.random_scores(boxes)
        else:
            x = pool5
            if self.score_layer != "pool5":
                with hook("fc"):
                    x = self.embed(pool5, self.score_layer)
            with hook(self.score_stage):
                scores = expand_rows(self.score_features(x), inverse)
        return self.finish(boxes, scores, pool5, inverse, size, hook)
