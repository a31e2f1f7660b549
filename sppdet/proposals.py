"""Selective-search proposals: one image in, boxes out (SPEC section 1).

Two backends behind :func:`propose`:

* ``opencv``: ``cv2.ximgproc.segmentation`` (C++, opencv-contrib). Its hierarchical grouping is
  the selective search of Uijlings et al. (IJCV 2013).
* ``selectivesearch``: the pure-Python PyPI package (skimage Felzenszwalb segmentation, one fixed
  merge strategy). Much slower per box; kept for comparison and as a fallback.

Both run the same *diversification* (Uijlings et al. section 3.2): every combination of colour
space x Felzenszwalb ``k`` x merge strategy is one hierarchical grouping; all their boxes are
merged, ranked and de-duplicated.

Boxes come back in the internal convention of :mod:`sppdet.boxes` (float32 xyxy, on integer pixel
edges), in the backend's rank order, clipped, without degenerate, duplicate or tiny boxes. An image
that cannot be segmented (uniform, 1x1, a backend error) gives a warning and the whole-image box.

Shape shorthand: ``N`` proposals of one image.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from sppdet import boxes as B
from sppdet.errors import ConfigError

__all__ = ["BACKENDS", "MODES", "ProposalConfig", "diversification", "propose", "backend_version"]

log = logging.getLogger(__name__)

BACKENDS = ("opencv", "selectivesearch")
#: ``fast``/``quality``: Uijlings et al. (R-CNN ``selective_search_boxes.m``); ``opencv_fast`` /
#: ``opencv_quality``: OpenCV's own presets (what /work/shared's precomputed boxes used);
#: ``custom``: the ``color_spaces`` x ``ks`` x ``strategies`` fields.
MODES = ("fast", "quality", "opencv_fast", "opencv_quality", "custom")
COLOR_SPACES = ("hsv", "lab", "rgi", "h", "i", "rgb")
_STRATEGY_LETTERS = "CTSF"  # colour, texture, size, fill (Uijlings et al. section 3.2)

# (colour spaces, ks, strategies) of Uijlings et al. Table 5 as R-CNN's selective_search_boxes.m
# sets them: "fast" = HSV, Lab; k 50, 100; C+T+S+F and T+S+F. "quality" adds rgI, H, I; k 150,
# 300; F and S alone.
_PRESETS = {
    "fast": (("hsv", "lab"), (50, 100), ("CTSF", "TSF")),
    "quality": (("hsv", "lab", "rgi", "h", "i"), (50, 100, 150, 300), ("CTSF", "TSF", "F", "S")),
}


@dataclass(frozen=True)
class ProposalConfig:
    """How proposals are computed. Every field changes the boxes, so all enter the cache key."""

    backend: str = "opencv"  # better recall per second on VOC07 val of the two (docs/proposals.md)
    mode: str = "custom"  # the fields below; "fast" / "quality" are Uijlings et al.'s presets
    color_spaces: tuple[str, ...] = ("hsv", "lab")  # SPEC 1 / Uijlings et al. fast mode
    ks: tuple[int, ...] = (50, 100)  # fast mode; with max_side 450 it reached recall@0.5 0.953
    # at 1,717 boxes and 0.84 s/img on 40 VOC07 val images (docs/proposals.md; k 150 added nothing)
    strategies: tuple[str, ...] = ("CTSF", "TSF")  # Uijlings et al. fast mode (SPEC 1)
    sigma: float = 0.8  # Felzenszwalb smoothing, R-CNN selective_search_boxes.m
    segment_min_size: int | None = None  # Felzenszwalb min segment; None = k (R-CNN: minSize = k)
    max_side: int = 450  # downscale longer side to this (0: never). R-CNN resizes to width 500;
    # 450 kept recall@0.5/0.7 on 40 VOC07 val images and cut the time by 30 % (docs/proposals.md)
    min_size: int = 20  # drop boxes with a side < this, in input pixels (R-CNN minBoxWidth = 20)
    max_boxes: int = 0  # keep the first N in rank order (0: all; R-CNN keeps all)
    seed: int = 1  # ranking randomness (Uijlings et al. 3.3); 1 = glibc's default srand seed

    def __post_init__(self) -> None:
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("mode", self.mode, MODES)
        for space in self.color_spaces:
            _check_choice("color_spaces", space, COLOR_SPACES)
        for strategy in self.strategies:
            if not strategy or set(strategy) - set(_STRATEGY_LETTERS):
                raise ConfigError(f"proposals.strategies: {strategy!r} is not a subset of 'CTSF'")
        if not (self.color_spaces and self.ks and self.strategies):
            raise ConfigError("proposals: color_spaces, ks and strategies must not be empty")
        if min(self.ks) <= 0 or self.sigma < 0 or (self.segment_min_size or 0) < 0:
            raise ConfigError("proposals: ks must be positive, sigma and segment_min_size >= 0")
        if min(self.max_side, self.min_size, self.max_boxes) < 0:
            raise ConfigError("proposals: max_side, min_size and max_boxes must be >= 0")
        if self.mode.startswith("opencv_") and self.backend != "opencv":
            raise ConfigError(f"proposals.mode {self.mode!r} needs backend 'opencv'")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"proposals.{name}: {value!r} is not one of {', '.join(choices)}")


def diversification(config: ProposalConfig) -> tuple[tuple[str, ...], tuple[int, ...], tuple]:
    """``(colour spaces, ks, strategies)`` that ``config`` runs (presets resolved)."""
    if config.mode in _PRESETS:
        return _PRESETS[config.mode]
    return config.color_spaces, config.ks, config.strategies


def backend_version(config: ProposalConfig) -> str:
    """Version of the library that computes the boxes (part of a proposal cache's key)."""
    if config.backend == "opencv":
        return f"opencv {cv2.__version__}"
    from importlib.metadata import version

    return f"selectivesearch {version('selectivesearch')}, scikit-image {version('scikit-image')}"


def propose(image: np.ndarray, config: ProposalConfig | None = None) -> np.ndarray:
    """Selective-search windows of one image.

    Args:
        image: ``Array[H, W, 3]`` uint8 RGB (as :func:`sppdet.imageio.load_image` returns).
        config: backend and diversification; default :class:`ProposalConfig`.

    Returns:
        ``Array[N, 4]`` float32 internal xyxy on integer pixel edges, rank order, ``N >= 1``:
        clipped, no degenerate/duplicate box, none with a side below ``config.min_size`` (the
        whole-image box is returned, with a warning, when nothing else is left).

    Raises:
        ValueError: ``image`` is not a non-empty ``[H, W, 3]`` uint8 array.
    """
    config = config or ProposalConfig()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise ValueError(f"propose: expected a non-empty uint8 [H, W, 3] image, got {image.shape}")
    height, width = image.shape[:2]
    small, scale = _downscale(image, config.max_side)
    try:
        raw = _BACKEND_FNS[config.backend](small, config)
    except Exception as exc:  # any backend failure on odd input: warn, fall back (docstring)
        log.warning("selective search failed on a %dx%d image (%r)", width, height, exc)
        raw = np.zeros((0, 4), np.float64)
    boxes = _clean(raw / scale, width, height, config)
    if len(boxes) == 0:
        log.warning(
            "no proposal left for a %dx%d image; using the whole image as the only box",
            width,
            height,
        )
        boxes = np.array([[0, 0, width, height]], dtype=np.float32)
    return boxes


def _downscale(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """The image with its longer side at most ``max_side`` (area-averaged), and the scale."""
    height, width = image.shape[:2]
    if max_side <= 0 or max(height, width) <= max_side:
        return image, 1.0
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def _clean(raw: np.ndarray, width: int, height: int, config: ProposalConfig) -> np.ndarray:
    """Snap to pixel edges, clip, drop degenerate/tiny/duplicate boxes, cap (SPEC 1)."""
    boxes = B.clip_boxes(np.round(np.asarray(raw, np.float64).reshape(-1, 4)), width, height)
    boxes = boxes[B.valid_boxes_mask(boxes, config.min_size)]
    boxes = boxes[B.unique_boxes(boxes)]
    if config.max_boxes:
        boxes = boxes[: config.max_boxes]
    return np.ascontiguousarray(boxes, dtype=np.float32)


# ----------------------------------------------------------------------------- colour spaces


def _convert(rgb: np.ndarray, space: str) -> np.ndarray:
    """``rgb`` in colour space ``space`` (uint8, OpenCV's 8-bit scalings; 1 or 3 channels)."""
    if space == "rgb":
        return rgb
    if space == "hsv":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    if space == "lab":
        return cv2.cvtColor(rgb, cv2.COLOR_RGB2Lab)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    if space == "i":
        return gray
    if space == "h":
        return np.ascontiguousarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 0])
    # "rgi": the red and green channels and intensity (Uijlings et al. section 3.2)
    return np.ascontiguousarray(np.dstack([rgb[:, :, 0], rgb[:, :, 1], gray]))


# ------------------------------------------------------------------------------------ opencv


@functools.lru_cache(maxsize=1)
def _libc_srand() -> Callable[[int], None] | None:
    """C ``srand``: OpenCV ranks regions with ``rand()``, so seeding it makes the order fixed."""
    try:
        return ctypes.CDLL(None).srand
    except (OSError, AttributeError, TypeError):
        log.warning("cannot seed C rand(); OpenCV proposal order will vary between processes")
        return None


def _opencv_strategy(letters: str):
    seg = cv2.ximgproc.segmentation
    make = {
        "C": seg.createSelectiveSearchSegmentationStrategyColor,
        "T": seg.createSelectiveSearchSegmentationStrategyTexture,
        "S": seg.createSelectiveSearchSegmentationStrategySize,
        "F": seg.createSelectiveSearchSegmentationStrategyFill,
    }
    parts = [make[c]() for c in letters]
    return (
        parts[0]
        if len(parts) == 1
        else seg.createSelectiveSearchSegmentationStrategyMultiple(*parts)
    )


def _opencv(rgb: np.ndarray, config: ProposalConfig) -> np.ndarray:
    """OpenCV selective search; ``Array[N, 4]`` float64 internal xyxy on ``rgb``."""
    seg = cv2.ximgproc.segmentation
    ss = seg.createSelectiveSearchSegmentation()
    if config.mode.startswith("opencv_"):
        ss.setBaseImage(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if config.mode == "opencv_fast":
            ss.switchToSelectiveSearchFast(sigma=config.sigma)  # k = 150, 300, 450
        else:
            ss.switchToSelectiveSearchQuality(sigma=config.sigma)  # k = 150 ... 750
    else:
        spaces, ks, strategies = diversification(config)
        for space in spaces:
            ss.addImage(_convert(rgb, space))
        for k in ks:
            min_size = k if config.segment_min_size is None else config.segment_min_size
            ss.addGraphSegmentation(seg.createGraphSegmentation(config.sigma, float(k), min_size))
        for letters in strategies:
            ss.addStrategy(_opencv_strategy(letters))
    srand = _libc_srand()
    if srand is not None:
        srand(config.seed)
    rects = np.asarray(ss.process(), dtype=np.float64).reshape(-1, 4)
    return B.from_xywh(rects).astype(np.float64)  # OpenCV Rect: pixels x .. x + w - 1


# --------------------------------------------------------------------------- selectivesearch


def _selectivesearch(rgb: np.ndarray, config: ProposalConfig) -> np.ndarray:
    """The ``selectivesearch`` package over colour spaces x ks, in Uijlings et al. rank order.

    The package has one merge strategy (its colour+texture+size+fill), so ``strategies`` is not
    used. Its ``rect`` is ``(min_x, min_y, max_x - min_x, max_y - min_y)`` with *inclusive*
    maxima, i.e. one pixel narrower than OpenCV's.
    """
    import selectivesearch

    spaces, ks, _ = diversification(config)
    rng = np.random.default_rng(config.seed)
    boxes, ranks = [], []
    for space in spaces:
        image = _convert(rgb, space)
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        for k in ks:
            min_size = k if config.segment_min_size is None else config.segment_min_size
            with warnings.catch_warnings():  # skimage warns about the package's float LBP input
                warnings.simplefilter("ignore")
                _, regions = selectivesearch.selective_search(
                    image, scale=k, sigma=config.sigma, min_size=min_size
                )
            xywh = np.array([r["rect"] for r in regions], dtype=np.float64).reshape(-1, 4)
            xywh[:, 2:] += 1.0  # inclusive maxima -> continuous right/bottom edges
            boxes.append(B.from_xywh(xywh).astype(np.float64))
            # Uijlings et al. 3.3: the last merge (the whole image) gets level 1; rank = level * rnd
            levels = np.arange(len(xywh), 0, -1, dtype=np.float64)
            ranks.append(levels * rng.random(len(xywh)))
    order = np.argsort(np.concatenate(ranks), kind="stable")
    return np.concatenate(boxes)[order]


_BACKEND_FNS: dict[str, Callable[[np.ndarray, ProposalConfig], np.ndarray]] = {
    "opencv": _opencv,
    "selectivesearch": _selectivesearch,
}
