"""Window features: one interface for SPP-net and R-CNN (paper section 4.1 vs R-CNN).

Every stage after proposals needs the same thing: a fixed-length vector per window of an image.
SPP-net convolves the image once per scale and pools each window from the conv maps
(:class:`MapProvider`, this module); R-CNN warps each window to the net's input size and
convolves it on its own (:class:`sppdet.rcnn.RCNNProvider`). Both implement
:class:`WindowFeatures` for the images of a dataset split (with their cache) and give an
:class:`ImageWindows` per image for detection. The mode (``features.mode``) is chosen in one
place, :func:`window_features`; the detector, the evaluation, the extract stage and the
training stages see only the interface.

Shape shorthand: ``N`` windows, ``U`` distinct windows, ``D`` vector length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from sppdet.boxes import flip_boxes
from sppdet.errors import CacheMismatchError
from sppdet.features import FeatureCache, FeatureExtractor, ScaleMap, SPPConfig
from sppdet.timing import PROFILER_LABELS, StageHook
from sppdet.window_pool import pool_distinct_windows, pool_windows

#: ``top(Tensor[1, C, h, w]) -> Tensor[1, C', h, w]``: trained conv blocks (fine-tuning).
TopFn = Callable[[Tensor], Tensor]


class ImageWindows(Protocol):
    """One image's window features."""

    def prepare(self, extractor: FeatureExtractor) -> None:
        """Run the per-trunk conv work once (SPP: the top blocks of ``extractor``'s trunk)."""
        ...

    def pool(
        self,
        boxes: np.ndarray,
        extractor: FeatureExtractor,
        *,
        dedup: bool = True,
        hook: StageHook = PROFILER_LABELS,
    ) -> tuple[Tensor, np.ndarray | None]:
        """``(Tensor[U, D], inverse)``: vectors of ``boxes`` (``Array[N, 4]`` internal xyxy)
        with ``extractor``'s trunk; ``inverse`` ``Array[N]`` each window's row (``dedup``:
        windows with identical vectors share one), or None for one row per window."""
        ...


class WindowFeatures(Protocol):
    """Window features of a dataset split's images, cached on disk by the extract stage."""

    extractor: FeatureExtractor
    #: What the cache holds per image, in words ("maps", "window sets").
    STORED: str

    def pool5(
        self,
        image_id: str,
        size: tuple[int, int],
        load_image: Callable[[], np.ndarray],
        boxes: np.ndarray,
        *,
        flip: bool = False,
        scales: Sequence[int] | None = None,
        top: TopFn | None = None,
    ) -> Tensor:
        """``Tensor[N, D]`` vectors of ``boxes`` of one image (training stages)."""
        ...

    def cached(self, image_id: str) -> bool:
        """Whether the extract stage already stored this image."""
        ...

    def check_disk(self, boxes: Sequence[np.ndarray]) -> None:
        """Refuse an extraction of these images' windows that would fill the disk."""
        ...

    def store(self, image_id: str, size: tuple[int, int], load_image, boxes: np.ndarray) -> None:
        """Compute and cache one image (``boxes``: its proposals and ground truth)."""
        ...

    def image(self, image_id: str, size: tuple[int, int], load_image) -> ImageWindows:
        """One dataset image, from the cache where it is stored (evaluation)."""
        ...

    def from_image(self, image: np.ndarray) -> ImageWindows:
        """A new image (uint8 ``[H, W, 3]`` RGB), nothing cached (detection)."""
        ...


def window_features(
    extractor: FeatureExtractor,
    spp: SPPConfig,
    cache_root: str | Path | None = None,
    *,
    tuned: FeatureExtractor | None = None,
) -> WindowFeatures:
    """SPP-net's or R-CNN's window features, as ``extractor.config.mode`` says.

    Args:
        cache_root: the split's cache directory (``RUN/features/<split>``), or None.
        tuned: SPP mode: pool with this extractor (fine-tuned top blocks) from the cache of
            ``extractor``'s frozen maps.
    """
    if extractor.config.mode == "rcnn":
        from sppdet.rcnn import RCNNProvider
        from sppdet.rcnn_cache import RCNNCache, rcnn_cache_manifest

        cache = (
            None
            if cache_root is None
            else RCNNCache(cache_root, rcnn_cache_manifest(extractor, spp))
        )
        return RCNNProvider(extractor, spp, cache)
    maps = None if cache_root is None else FeatureCache(cache_root, extractor.manifest())
    return MapProvider(tuned or extractor, maps, spp)


# ------------------------------------------------------------------------------- SPP mode


class SPPImage:
    """One image's conv maps below the top blocks (what the cache holds); the top blocks of
    each trunk that pools from them (frozen, fine-tuned) run once (:meth:`prepare`)."""

    def __init__(self, lower: list[ScaleMap], spp: SPPConfig) -> None:
        self.lower, self.spp = lower, spp
        self._maps: dict[str, list[ScaleMap]] = {}  # trunk_id -> maps through its top blocks

    def maps(self, extractor: FeatureExtractor) -> list[ScaleMap]:
        """The tapped maps of ``extractor``'s trunk."""
        self.prepare(extractor)
        return self._maps[extractor.trunk_id]

    def prepare(self, extractor: FeatureExtractor) -> None:
        if extractor.trunk_id not in self._maps:
            self._maps[extractor.trunk_id] = [extractor.apply_top(m) for m in self.lower]

    def pool(
        self,
        boxes: np.ndarray,
        extractor: FeatureExtractor,
        *,
        dedup: bool = True,
        hook: StageHook = PROFILER_LABELS,
    ) -> tuple[Tensor, np.ndarray | None]:
        maps = self.maps(extractor)
        if not dedup:
            return pool_windows(maps, boxes, extractor.spec, self.spp), None
        return pool_distinct_windows(maps, boxes, extractor.spec, self.spp)


class MapProvider:
    """Conv maps of dataset images: from the cache when present, else computed (and cached)."""

    STORED = "maps"

    def __init__(
        self, extractor: FeatureExtractor, cache: FeatureCache | None, spp: SPPConfig | None = None
    ) -> None:
        self.extractor = extractor
        self.cache = cache
        self.spp = spp if spp is not None else SPPConfig()

    def maps(
        self,
        image_id: str,
        size: tuple[int, int],
        load_image,
        *,
        flip: bool = False,
        scales: Sequence[int] | None = None,
        top: TopFn | None = None,
    ) -> list[ScaleMap]:
        """Maps of one image. ``size`` is ``(height, width)``; ``load_image()`` reads the pixels.

        ``scales`` picks a subset of the configured scales (fine-tuning uses one random scale).
        The resize factors are recomputed from ``size``, so cached maps need no side files.
        The extractor's top blocks run on the cached maps (:meth:`FeatureExtractor.apply_top`),
        or ``top`` (``Tensor[1, C, h, w] -> Tensor[1, C', h, w]``) does, with autograd on:
        fine-tuning passes the blocks it trains.
        """
        lower = self.lower_maps(image_id, size, load_image, flip=flip, scales=scales)
        if top is None:
            return [self.extractor.apply_top(m) for m in lower]
        # a freshly computed (not cached) map is an inference tensor: autograd needs a copy
        plain = [m.fmap.clone() if m.fmap.is_inference() else m.fmap for m in lower]
        return [
            ScaleMap(top(f.unsqueeze(0))[0], m.factor) for f, m in zip(plain, lower, strict=True)
        ]

    def lower_maps(
        self,
        image_id: str,
        size: tuple[int, int],
        load_image,
        *,
        flip: bool = False,
        scales: Sequence[int] | None = None,
    ) -> list[ScaleMap]:
        """The cached (frozen) maps below the top blocks; computed and stored on a miss."""
        all_scales = self.extractor.config.scales
        want = tuple(s for s in all_scales if scales is None or s in scales)
        factors = dict(zip(all_scales, self.extractor.factors(*size), strict=True))
        have = {}
        if self.cache is not None:
            dev = self.extractor.device
            for s in want:
                if self.cache.has(image_id, (s,), flip):
                    arr = self.cache.load(image_id, s, flip)
                    self._check_shape(arr.shape[1:], image_id, s, flip, size, factors[s])
                    have[s] = ScaleMap(torch.from_numpy(arr).to(dev).float(), factors[s])
        missing = [s for s in want if s not in have]
        if missing:
            # Only the missing scales are computed: fine-tuning draws one random scale of a
            # (flipped) image, and a 5-scale miss would otherwise cost all five conv passes.
            maps = self.extractor.compute_lower(load_image(), flip=flip, scales=missing)
            for s, m in zip(missing, maps, strict=True):
                have[s] = m
                if self.cache is not None:
                    self.cache.save(image_id, s, flip, m.fmap)
        return [have[s] for s in want]

    def _check_shape(self, shape, image_id: str, scale: int, flip: bool, size, factor: float):
        """A cached map must have about the shape that the image's size at ``scale`` gives
        (``size`` is the decoded image's): a map of an image of another aspect ratio would map
        windows elsewhere (other images of the same shape: :mod:`sppdet.image_identity`)."""
        stride = self.extractor.spec.stride
        want = [n * factor / stride for n in size]
        if any(abs(got - w) > 2 + 0.02 * w for got, w in zip(shape, want, strict=True)):
            raise CacheMismatchError(
                f"cached map {self.cache.path(image_id, scale, flip)} is {shape[0]}x{shape[1]} "
                f"cells, but image {image_id} ({size[1]}x{size[0]} pixels) gives about "
                f"{want[0]:.0f}x{want[1]:.0f} at scale {scale}: it was made from another image; "
                "delete it"
            )

    def pool5(
        self,
        image_id: str,
        size: tuple[int, int],
        load_image,
        boxes: np.ndarray,
        *,
        flip: bool = False,
        scales: Sequence[int] | None = None,
        top: TopFn | None = None,
    ) -> Tensor:
        """``Tensor[N, D]`` SPP vectors of ``boxes`` (``Array[N, 4]``, unflipped image pixels).

        With ``flip`` the boxes are mirrored to the flipped map; ``top`` as in :meth:`maps`.
        """
        maps = self.maps(image_id, size, load_image, flip=flip, scales=scales, top=top)
        b = flip_boxes(boxes, size[1]) if flip else boxes
        return pool_windows(maps, b, self.extractor.spec, self.spp)

    def cached(self, image_id: str) -> bool:
        return self.cache is not None and self.cache.has(image_id, self.extractor.config.scales)

    def check_disk(self, boxes: Sequence[np.ndarray]) -> None:
        """Nothing to check: maps take about 1 MB per image and scale, whatever the windows."""

    def store(self, image_id: str, size: tuple[int, int], load_image, boxes: np.ndarray) -> None:
        """Compute and cache the image's maps below the top blocks (``boxes`` are not needed:
        every window is pooled from them later)."""
        self.lower_maps(image_id, size, load_image)

    def image(self, image_id: str, size: tuple[int, int], load_image) -> SPPImage:
        return SPPImage(self.lower_maps(image_id, size, load_image), self.spp)

    def from_image(self, image: np.ndarray) -> SPPImage:
        return SPPImage(self.extractor.compute_lower(image), self.spp)
