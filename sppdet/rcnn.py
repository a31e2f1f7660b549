"""R-CNN mode: the baseline SPP-net replaces (Girshick et al. 2014; SPEC section 10).

Every window is cropped from the image with R-CNN's context padding, warped to the backbone's
input size and run through the SAME frozen conv layers; its map is pooled with the SAME pyramid
(the whole warped map is the window) and fed to the same fc / SVM / box-regression stages. So
the two modes differ only in where the conv layers run: once per image (SPP) or once per window
(R-CNN), which is the comparison of the paper's table 10.

The crop follows ``rcnn_im_crop.m`` ("warp", ``padding = 16``): the box is dilated about its
centre so that, once warped to ``S x S``, it is surrounded by ``padding`` pixels of context, and
the part of the dilated box outside the image is filled with the mean colour (zero after mean
subtraction). Warping is bilinear without antialiasing, as ``imresize(..., 'antialiasing',
false)`` there. On a CPU :func:`warp_windows_cpu` does exactly that with OpenCV on the uint8
pixels (the window rounded to whole pixels as R-CNN does); on a GPU :func:`warp_windows` samples
a whole batch at once with :func:`torchvision.ops.roi_align` (one bilinear sample per output
pixel, zero outside the image). Both sample at the same points (tests/test_rcnn.py).

Shape shorthand: ``N`` windows, ``S`` warped size, ``C`` channels, ``D = C * B`` SPP dims.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor
from torchvision.ops import roi_align

from sppdet.backbones import BackboneSpec, normalize
from sppdet.boxes import flip_boxes
from sppdet.errors import SppdetError
from sppdet.features import FeatureExtractor, SPPConfig
from sppdet.rcnn_cache import RCNNCache, as_boxes
from sppdet.spp import SpatialPyramidPool, spp_dim
from sppdet.timing import PROFILER_LABELS, StageHook

log = logging.getLogger(__name__)

DISK_MARGIN = 2 * 10**9  # bytes left free after an R-CNN extraction

#: R-CNN's context padding in warped pixels (``rcnn_extract_regions``: padding = 16).
CONTEXT_PADDING = 16


def context_boxes(boxes: np.ndarray, size: int, padding: int = CONTEXT_PADDING) -> np.ndarray:
    """Dilate internal xyxy ``Array[N, 4]`` boxes so ``padding`` of ``size`` warped pixels are
    context on each side: half-sizes grow by ``size / (size - 2 * padding)`` about the centre.

    Returns ``Array[N, 4]`` float32 (may extend past the image; :func:`warp_windows` fills the
    outside with the mean colour).
    """
    if not 0 <= 2 * padding < size:
        raise ValueError(f"context padding {padding} does not fit a {size}-pixel warp")
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scale = size / (size - 2.0 * padding)
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    hw, hh = (b[:, 2] - b[:, 0]) / 2 * scale, (b[:, 3] - b[:, 1]) / 2 * scale
    return np.stack([cx - hw, cy - hh, cx + hw, cy + hh], axis=1).astype(np.float32)


def warp_windows(image: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Bilinear warp of each window of ``image`` to ``size x size`` (R-CNN's "warp" crop).

    Args:
        image: ``Tensor[1, 3, H, W]`` normalised float image (zero = mean colour).
        boxes: ``Tensor[N, 4]`` internal xyxy (continuous pixel edges), any extent.

    Returns:
        ``Tensor[N, 3, size, size]``; output pixel ``(i, j)`` samples the window at the centre of
        its ``1 / size`` cell, and samples beyond the image border are zero.
    """
    rois = torch.cat([boxes.new_zeros((len(boxes), 1)), boxes], dim=1)
    # aligned=True: continuous coordinates (pixel i spans [i, i + 1)), our box convention.
    return roi_align(image, rois, (size, size), spatial_scale=1.0, sampling_ratio=1, aligned=True)


def warp_windows_cpu(
    image: np.ndarray, boxes: np.ndarray, size: int, fill: tuple[int, int, int]
) -> np.ndarray:
    """``rcnn_im_crop.m`` ("warp") on uint8 pixels: ``Array[N, size, size, 3]`` uint8.

    Each (context-padded) window is rounded to whole pixels, the part inside the image is
    resized bilinearly (``cv2.INTER_LINEAR``, no antialiasing) to its share of the ``size x
    size`` output and pasted there; the rest is ``fill`` (the mean colour, zero once
    normalised). 2,000 windows take ~0.1 s, 50x less than ``roi_align`` on a CPU.

    Args:
        image: ``[H, W, 3]`` uint8.
        boxes: ``Array[N, 4]`` internal xyxy, any extent.
    """
    h, w = image.shape[:2]
    out = np.empty((len(boxes), size, size, 3), np.uint8)
    out[:] = np.asarray(fill, np.uint8)
    for k, box in enumerate(np.rint(np.asarray(boxes, np.float64)).astype(np.int64)):
        bx1, by1, bx2, by2 = box.tolist()
        sx, sy = size / max(bx2 - bx1, 1), size / max(by2 - by1, 1)
        cx1, cy1, cx2, cy2 = max(bx1, 0), max(by1, 0), min(bx2, w), min(by2, h)
        if cx2 <= cx1 or cy2 <= cy1:
            continue  # entirely outside the image: all mean colour
        ox, oy = round((cx1 - bx1) * sx), round((cy1 - by1) * sy)
        tw = min(max(round((cx2 - cx1) * sx), 1), size - ox)
        th = min(max(round((cy2 - cy1) * sy), 1), size - oy)
        if tw > 0 and th > 0:
            crop = image[cy1:cy2, cx1:cx2]
            out[k, oy : oy + th, ox : ox + tw] = cv2.resize(
                crop, (tw, th), interpolation=cv2.INTER_LINEAR
            )
    return out


@dataclass(frozen=True)
class Prepared:
    """An image ready for warping: ``image`` uint8 ``[H, W, 3]``; ``tensor`` its normalised
    ``Tensor[1, 3, H, W]`` on a GPU (``None`` on a CPU, where OpenCV warps the pixels)."""

    image: np.ndarray
    tensor: Tensor | None
    device: torch.device


class RCNNFeaturizer:
    """Pool5-equivalent vectors of windows by R-CNN's per-window conv passes.

    Args:
        net: the frozen conv trunk (the same module SPP mode runs once per image).
        spec: its :class:`~sppdet.backbones.BackboneSpec` (``input_size`` is the warp size).
        levels: SPP pyramid levels; the whole warped map is pooled, so the vector has the same
            ``D = C * B`` dims (and layout) as an SPP vector and feeds the same fc head.
        padding: context padding in warped pixels.
        batch: windows per conv forward pass (bounds memory: ``batch * 3 * S * S`` floats).
        size: warp size ``S``; 0 = ``spec.input_size``.
        channels_last: feed the crops as NHWC (when ``net`` was converted to channels-last).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        spec: BackboneSpec,
        levels: tuple[int, ...],
        padding: int = CONTEXT_PADDING,
        batch: int = 64,
        size: int = 0,
        channels_last: bool = False,
    ) -> None:
        self.net, self.spec, self.padding, self.batch = net, spec, padding, batch
        self.channels_last = channels_last
        self.size = size or spec.input_size
        context_boxes(np.zeros((0, 4)), self.size, padding)  # validates padding vs size
        self.pool = SpatialPyramidPool(levels)

    @torch.inference_mode()
    def __call__(self, image: np.ndarray, boxes: np.ndarray, device: torch.device) -> Tensor:
        """``Tensor[N, D]`` float32 on ``device`` for uint8 ``[H, W, 3]`` RGB ``image``."""
        return self.features(self.prepare(image, device), boxes)

    def prepare(self, image: np.ndarray, device: torch.device) -> Prepared:
        """The image the windows are warped from: uint8 pixels on a CPU, the normalised
        ``Tensor[1, 3, H, W]`` on a GPU."""
        image = np.ascontiguousarray(image)
        if device.type == "cpu":
            return Prepared(image, None, device)
        x = torch.from_numpy(image).to(device).permute(2, 0, 1)
        return Prepared(image, normalize(x.unsqueeze(0), self.spec), device)

    def _warp(self, prepared: Prepared, padded: np.ndarray) -> Tensor:
        """``Tensor[n, 3, S, S]`` normalised crops of the padded windows."""
        if prepared.tensor is None:
            fill = tuple(int(round(255 * m)) for m in self.spec.mean)
            crops = warp_windows_cpu(prepared.image, padded, self.size, fill)
            # NHWC uint8 -> NCHW view: already channels-last in memory
            x = normalize(torch.from_numpy(crops).permute(0, 3, 1, 2), self.spec)
        else:
            boxes = torch.from_numpy(padded).to(prepared.device)
            x = warp_windows(prepared.tensor, boxes, self.size)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)

    @torch.inference_mode()
    def features(
        self, prepared: Prepared, boxes: np.ndarray, timings: dict | None = None
    ) -> Tensor:
        """Vectors of ``boxes`` (``Array[N, 4]`` internal xyxy) from a :meth:`prepare` d image.

        ``timings``: if given, seconds spent warping (``"warp"``), in the conv layers
        (``"conv"``) and pooling (``"spp"``) are added to it.
        """
        size = self.size
        if len(boxes) == 0:
            dim = self.spec.channels * sum(n * n for n in self.pool.levels)
            return torch.zeros((0, dim), device=prepared.device)
        padded = context_boxes(boxes, size, self.padding)
        out = []
        t = {"warp": 0.0, "conv": 0.0, "spp": 0.0}
        for start in range(0, len(padded), self.batch):
            t0 = time.perf_counter()
            crops = self._warp(prepared, padded[start : start + self.batch])
            t1 = time.perf_counter()
            fmap = self.net(crops).float()
            _sync(prepared.device)
            t2 = time.perf_counter()
            out.append(self.pool(fmap))
            _sync(prepared.device)
            t3 = time.perf_counter()
            t["warp"] += t1 - t0
            t["conv"] += t2 - t1
            t["spp"] += t3 - t2
        if timings is not None:
            for k, v in t.items():
                timings[k] = timings.get(k, 0.0) + v
        return torch.cat(out)


def rcnn_featurizer(extractor: FeatureExtractor, spp: SPPConfig) -> RCNNFeaturizer:
    """The :class:`RCNNFeaturizer` of an extractor's net and R-CNN settings."""
    c = extractor.config
    return RCNNFeaturizer(
        extractor.net,
        extractor.spec,
        tuple(spp.levels),
        c.context_padding,
        c.rcnn_batch,
        c.rcnn_input,
        c.channels_last,
    )


class RCNNImage:
    """One image's R-CNN window features (:class:`~sppdet.window_features.ImageWindows`):
    every window warped and convolved on its own (or read from the cache) when pooled.

    Args:
        compute: ``compute(boxes, hook) -> Tensor[N, D]``.
    """

    def __init__(self, compute: Callable[[np.ndarray, StageHook], Tensor]) -> None:
        self._compute = compute

    def prepare(self, extractor: FeatureExtractor) -> None:
        """Nothing: the conv passes are per window, in :meth:`pool`."""

    def pool(
        self,
        boxes: np.ndarray,
        extractor: FeatureExtractor,
        *,
        dedup: bool = True,
        hook: StageHook = PROFILER_LABELS,
    ) -> tuple[Tensor, None]:
        """``(Tensor[N, D], None)``: one row per window (``dedup`` is SPP's: warped windows
        never share a vector)."""
        return self._compute(as_boxes(boxes), hook), None


class RCNNProvider:
    """R-CNN mode's :class:`~sppdet.window_features.WindowFeatures` (SPP's:
    :class:`~sppdet.window_features.MapProvider`).

    With a :class:`RCNNCache` (``features.cache``, filled by the extract stage) the vectors of
    cached boxes are read and the others (flipped windows for fine-tuning, boxes that are not an
    image's proposals or ground truth) are computed; every vector is rounded to the cache dtype,
    so the result does not depend on what was cached. Without one, everything is recomputed.
    """

    STORED = "window sets"

    def __init__(
        self, extractor: FeatureExtractor, spp: SPPConfig, cache: RCNNCache | None = None
    ) -> None:
        self.extractor, self.spp, self.cache = extractor, spp, cache
        self.featurizer = rcnn_featurizer(extractor, spp)

    def pool5(
        self,
        image_id: str,
        size: tuple[int, int],
        load_image,
        boxes: np.ndarray,
        *,
        flip: bool = False,
        scales: Sequence[int] | None = None,
        top: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """``Tensor[N, D]`` vectors of ``boxes`` of one image; ``scales`` is ignored (R-CNN
        warps every window to one size). ``top`` (trained conv blocks, as in
        :meth:`sppdet.window_features.MapProvider.pool5`) must be None: R-CNN mode has no cached map
        below them."""
        if top is not None:
            raise SppdetError("conv fine-tuning through top blocks needs SPP mode")
        boxes = as_boxes(boxes)
        if self.cache is None or flip or not self.cache.has(image_id):
            return self._compute(load_image, boxes, flip)
        cached, vectors = self.cache.load(image_id)
        index = {row.tobytes(): i for i, row in enumerate(cached)}
        rows = np.array([index.get(b.tobytes(), -1) for b in boxes], dtype=np.int64)
        out = torch.from_numpy(vectors[np.maximum(rows, 0)].astype(np.float32))
        miss = rows < 0
        if miss.any():
            out[torch.from_numpy(miss)] = self._compute(load_image, boxes[miss], False).cpu()
        return out.to(self.extractor.device)

    def cached(self, image_id: str) -> bool:
        return self.cache is not None and self.cache.has(image_id)

    def check_disk(self, boxes: Sequence[np.ndarray]) -> None:
        """Refuse caching these windows' vectors when they would fill the disk (~15 MB per
        VOC image with MobileNetV2: 1,600 x 4,800 dims)."""
        if self.cache is None:
            return
        dim = spp_dim(self.extractor.spec.channels, self.spp.levels)
        need = sum(len(b) for b in boxes) * dim * self.cache.dtype.itemsize
        free = shutil.disk_usage(self.cache.root).free
        log.info(
            "R-CNN mode caches %.1f GB of window vectors (%.1f GB free)", need / 1e9, free / 1e9
        )
        if need + DISK_MARGIN > free:
            raise SppdetError(
                f"caching R-CNN window vectors of {len(boxes)} images needs {need / 1e9:.1f} GB "
                f"but {self.cache.root} has {free / 1e9:.1f} GB free (keeping "
                f"{DISK_MARGIN / 1e9:.0f} GB spare); free space, extract fewer images (--limit) "
                "or pass --no-cache (later stages then recompute the windows, ~5 ms each on a CPU)"
            )

    def store(self, image_id: str, size: tuple[int, int], load_image, boxes: np.ndarray) -> None:
        """Compute and cache the vectors of ``boxes`` (an image's proposals and GT boxes)."""
        if self.cache is None:
            raise SppdetError("R-CNN vector caching is off (features.cache)")
        boxes = as_boxes(boxes)
        vectors = self.featurizer(load_image(), boxes, self.extractor.device)
        self.cache.save(image_id, boxes, vectors)

    def image(self, image_id: str, size: tuple[int, int], load_image) -> RCNNImage:
        """A dataset image: vectors from the cache, the others computed."""
        return RCNNImage(lambda b, hook: self.pool5(image_id, size, load_image, b))

    def from_image(self, image: np.ndarray) -> RCNNImage:
        """A new image: every window warped from it and convolved (timed as ``warp`` and
        ``conv`` through the hook)."""
        prepared = self.featurizer.prepare(image, self.extractor.device)

        def compute(boxes: np.ndarray, hook: StageHook) -> Tensor:
            sub: dict[str, float] = {}
            x = self.featurizer.features(prepared, boxes, sub)
            hook.record("warp", sub.get("warp", 0.0))
            hook.record("conv", sub.get("conv", 0.0))
            return x

        return RCNNImage(compute)

    def _compute(self, load_image, boxes: np.ndarray, flip: bool) -> Tensor:
        image = load_image()
        if flip:
            image, boxes = image[:, ::-1], flip_boxes(boxes, image.shape[1])
        x = self.featurizer(image, boxes, self.extractor.device)
        if self.cache is not None:
            x = x.to(self.cache.torch_dtype).float()  # as if read back from the cache
        return x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
