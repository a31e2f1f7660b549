"""A synthetic VOC-format detection dataset for offline demos and end-to-end tests.

``make_synthetic_voc(out, images=N, seed=S)`` writes ``out/VOC2007/`` exactly in the devkit layout
(``JPEGImages/``, ``Annotations/``, ``ImageSets/Main/{train,val,trainval,test}.txt``) plus
``classes.txt``, so :func:`sppdet.datasets.load_voc` and every later stage read it like real VOC.

The four classes differ in shape *and* colour/texture family, so an SPP-net pipeline whose conv
layers are randomly initialised (no pretrained weights offline) can still separate them through
its trained fc layers / SVMs: ``disc`` (red, solid), ``square`` (blue/white checker, slightly
rotated), ``triangle`` (green stripes, any rotation), ``star`` (yellow, solid, any rotation).
Backgrounds are cluttered: a gradient between two desaturated colours, pixel noise, and small
distractor lines and blobs.

Boxes follow the VOC guideline (box of the *visible* part of the object) and bound the drawn
pixels exactly: a box is the bounding box of the object's visible mask. A new object may hide
at most 40 % of an earlier one, and never touches one of its own class (same-coloured shapes would
merge). Small objects and those more than 30 % hidden are marked ``difficult``: about 10 % of
objects (VOC2007 train: 20 %).

Determinism: image ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` alone, so the
same seed gives byte-identical files, and image ``i`` does not depend on how many are made.
"""

from __future__ import annotations

import colorsys
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from sppdet.datasets import ImageRecord, voc_annotation_xml
from sppdet.errors import DataError
from sppdet.storage import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = [
    "SYNTHETIC_CLASSES",
    "SyntheticConfig",
    "SyntheticObject",
    "SyntheticSummary",
    "render_background",
    "draw_object",
    "render_scene",
    "make_synthetic_voc",
]

SYNTHETIC_CLASSES: tuple[str, ...] = ("disc", "square", "triangle", "star")

# Hue centre (HSV, 0..1) of each class's colour family; distractors stay desaturated.
_HUES = (0.0, 0.61, 0.33, 0.14)

_MARKER = "synthetic.json"  # identifies a tree this module wrote (and may overwrite)


@dataclass(frozen=True)
class SyntheticConfig:
    """How scenes are drawn. None of these come from the paper: they make a small, learnable demo.

    Sizes are fractions of the image's shorter side.
    """

    width: int = 320  # small, so the whole demo pipeline runs in minutes on a CPU
    height: int = 240  # 4:3, like most VOC images (500x375)
    min_objects: int = 1  # objects per image, uniform in [min, max]
    max_objects: int = 4
    min_size: float = 0.2  # side of a normal object, uniform in [min_size, max_size]
    max_size: float = 0.6
    small_prob: float = 0.06  # chance that an object is small, hence "difficult"
    small_size: tuple[float, float] = (0.08, 0.15)  # side range of a small object
    min_visible: float = 0.6  # a new object may not leave an earlier one less visible than this
    difficult_visible: float = 0.7  # less visible than this: difficult (~10 % of all objects)
    distractors: tuple[int, int] = (6, 16)  # number of clutter lines + blobs, uniform range
    jpeg_quality: int = 90  # high enough that colours survive, low enough to be realistic


@dataclass(frozen=True, eq=False)
class SyntheticObject:
    """One drawn object of a scene.

    Attributes:
        label: index into :data:`SYNTHETIC_CLASSES`.
        mask: ``Array[H, W]`` bool, the object's visible pixels in the final image.
        box: ``Array[4]`` float32, internal xyxy, the tight box of ``mask``.
        difficult: small or partly hidden.
    """

    label: int
    mask: np.ndarray
    box: np.ndarray
    difficult: bool


@dataclass(frozen=True)
class SyntheticSummary:
    """What :func:`make_synthetic_voc` wrote."""

    root: Path  # the VOC2007 directory
    images: int
    train: int
    val: int
    objects: dict[str, int]  # per class
    difficult: int

    def line(self) -> str:
        """One-line human summary."""
        per_class = ", ".join(f"{k} {v}" for k, v in self.objects.items())
        return (
            f"wrote {self.images} images ({self.train} train / {self.val} val) to {self.root}: "
            f"{sum(self.objects.values())} objects ({per_class}), {self.difficult} difficult"
        )


# ------------------------------------------------------------------------------------- drawing


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    """HSV (0..1) -> RGB float ``Array[3]`` in 0..255."""
    return np.asarray(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32) * 255.0


def render_background(rng: np.random.Generator, width: int, height: int, config=None) -> np.ndarray:
    """A cluttered background ``Array[H, W, 3]`` uint8: gradient, noise, lines and blobs."""
    config = config or SyntheticConfig()
    c0 = _rgb(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.3, 0.9))
    c1 = _rgb(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.3, 0.9))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    t = xx * math.cos(angle) + yy * math.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0 + t[..., None] * (c1 - c0)
    img += rng.uniform(4, 14) * rng.standard_normal(img.shape, dtype=np.float32)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(config.distractors[0], config.distractors[1] + 1))):
        colour = tuple(int(c) for c in _rgb(rng.random(), rng.uniform(0, 0.5), rng.uniform(0.1, 1)))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        if rng.random() < 0.5:
            dx, dy = rng.normal(0, 0.15 * width, size=2)
            draw.line([(x, y), (x + dx, y + dy)], fill=colour, width=int(rng.integers(1, 4)))
        else:
            r = rng.uniform(2, max(2.0, 0.04 * min(width, height)))  # 32-px images: 1.28
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return np.asarray(pil).copy()


def _polygon(label: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-scale outline ``Array[P, 2]`` of a polygon class, randomly rotated."""
    if label == 1:  # square: slight rotation only, so it stays a "square" to the eye
        theta = rng.uniform(-0.35, 0.35)
        angles = theta + np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    theta = rng.uniform(0, 2 * math.pi)
    if label == 2:  # triangle
        angles = theta + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(angles), np.sin(angles)], axis=1)
    angles = theta + np.arange(10) * np.pi / 5  # star: 5 outer and 5 inner points
    radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)


def _shape_mask(label: int, rect: Sequence[int], width: int, height: int, rng) -> np.ndarray:
    """``Array[H, W]`` bool mask of a class shape filling the integer rect ``x0, y0, x1, y1``."""
    x0, y0, x1, y1 = rect  # exclusive right/bottom
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    if label == 0:
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    else:
        pts = _polygon(label, rng)
        pts = (pts - pts.min(0)) / (pts.max(0) - pts.min(0))  # stretch onto the rect
        pts = pts * [x1 - 1 - x0, y1 - 1 - y0] + [x0, y0]
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255)
    return np.asarray(canvas) > 0


def _texture(label: int, width: int, height: int, rng) -> np.ndarray:
    """``Array[height, width, 3]`` float texture patch of a class's colour family."""
    hue = _HUES[label] + rng.uniform(-0.03, 0.03)
    base = _rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.7, 1.0))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if label == 1:  # blue/white checker
        cell = int(rng.integers(4, 10))
        on = ((xx // cell + yy // cell) % 2).astype(bool)
        second = _rgb(hue, rng.uniform(0.05, 0.3), 1.0)
    elif label == 2:  # green stripes, dark and light
        period, angle = rng.uniform(6, 12), rng.uniform(0, math.pi)
        on = ((xx * math.cos(angle) + yy * math.sin(angle)) % period) < period / 2
        second = base * 0.4
    else:  # disc, star: solid
        on, second = np.zeros((height, width), dtype=bool), base
    tex = np.where(on[..., None], second, base)
    return tex + 5.0 * rng.standard_normal(tex.shape, dtype=np.float32)


def draw_object(
    image: np.ndarray, label: int, rect: Sequence[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one object of class ``label`` filling the integer rect ``x0, y0, x1, y1`` (exclusive).

    Returns:
        (new image ``Array[H, W, 3]`` uint8, its mask ``Array[H, W]`` bool). Exactly the mask's
        pixels are drawn; ``image`` itself is not modified.
    """
    height, width = image.shape[:2]
    mask = _shape_mask(label, rect, width, height, rng)
    return _paint(image, label, rect, mask, rng), mask


def _paint(image: np.ndarray, label: int, rect: Sequence[int], mask: np.ndarray, rng) -> np.ndarray:
    """A copy of ``image`` with the class texture on the pixels of ``mask`` (inside ``rect``)."""
    x0, y0, x1, y1 = rect
    tex = np.clip(np.round(_texture(label, x1 - x0, y1 - y0, rng)), 0, 255).astype(np.uint8)
    out = image.copy()
    patch, inside = out[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    patch[inside] = tex[inside]
    return out


def _random_rect(rng, width: int, height: int, config: SyntheticConfig):
    """An integer rect ``x0, y0, x1, y1`` inside the image and whether the object is small."""
    short = min(width, height)
    small = rng.random() < config.small_prob
    lo, hi = config.small_size if small else (config.min_size, config.max_size)
    side = rng.uniform(lo, hi) * short
    aspect = math.exp(rng.uniform(-0.3, 0.3))
    w = int(np.clip(round(side * math.sqrt(aspect)), 4, width))
    h = int(np.clip(round(side / math.sqrt(aspect)), 4, height))
    x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    return (x0, y0, x0 + w, y0 + h), small


def _tight_box(mask: np.ndarray) -> np.ndarray:
    """Internal xyxy ``Array[4]`` of the True pixels of ``mask``."""
    ys, xs = np.nonzero(mask)
    return np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32)


def render_scene(
    rng: np.random.Generator, config: SyntheticConfig | None = None
) -> tuple[np.ndarray, list[SyntheticObject]]:
    """Draw one image with 1-4 objects on a cluttered background.

    Returns:
        (image ``Array[H, W, 3]`` uint8, its objects with visible masks and tight boxes).
    """
    config = config or SyntheticConfig()
    width, height = config.width, config.height
    image = render_background(rng, width, height, config)
    placed: list[tuple[int, np.ndarray, int, bool]] = []  # label, visible mask, full area, small
    for _ in range(int(rng.integers(config.min_objects, config.max_objects + 1))):
        label = int(rng.integers(len(SYNTHETIC_CLASSES)))
        for _attempt in range(30):  # re-draw placements that would hide too much of another
            rect, small = _random_rect(rng, width, height, config)
            mask = _shape_mask(label, rect, width, height, rng)
            if _fits(label, rect, mask, placed, config):
                break
        else:
            continue
        image = _paint(image, label, rect, mask, rng)
        placed = [(lab, vis & ~mask, area, sm) for lab, vis, area, sm in placed]
        placed.append((label, mask, int(mask.sum()), small))
    objects = [
        SyntheticObject(
            lab, vis, _tight_box(vis), small or vis.sum() < config.difficult_visible * area
        )
        for lab, vis, area, small in placed
        if vis.any()  # an object can vanish only when min_visible is 0
    ]
    return image, objects


def _fits(label: int, rect, mask: np.ndarray, placed: list, config: SyntheticConfig) -> bool:
    """Whether a new object leaves every earlier one visible enough.

    Objects of the same class may not overlap or touch (2 px margin): two same-coloured shapes
    would merge into one blob that even a person could not split.
    """
    for lab, vis, area, _ in placed:
        if (vis & ~mask).sum() < config.min_visible * area:
            return False
        if lab == label:
            bx0, by0, bx1, by1 = _tight_box(vis)
            x0, y0, x1, y1 = rect
            if x0 < bx1 + 2 and bx0 < x1 + 2 and y0 < by1 + 2 and by0 < y1 + 2:
                return False
    return True


# ------------------------------------------------------------------------------------- writing


def _jpeg_bytes(image: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _prepare_root(out: Path) -> Path:
    """``out/VOC2007``, refusing to write into a VOC tree this module did not make."""
    root = out / "VOC2007"
    if (root / "Annotations").is_dir() and not (root / _MARKER).is_file():
        raise DataError(
            f"{root} holds a VOC tree not made by make-synthetic; refusing to overwrite"
        )
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in ("train", "val", "trainval", "test"):  # no stale lists while files are rewritten
        (root / "ImageSets" / "Main" / f"{name}.txt").unlink(missing_ok=True)
    return root


def make_synthetic_voc(
    out: str | os.PathLike,
    *,
    images: int,
    seed: int = 0,
    val_fraction: float = 0.5,
    size: tuple[int, int] = (320, 240),
    config: SyntheticConfig | None = None,
) -> SyntheticSummary:
    """Write a synthetic VOC2007-layout dataset under ``out/VOC2007``.

    Args:
        out: output directory (the "VOCdevkit"); created if needed. A tree previously written
            here by this function is overwritten; any other VOC tree is refused.
        images: number of images (ids ``000001`` ...).
        seed: random seed; equal seeds give identical files.
        val_fraction: share of images in ``val`` (the rest is ``train``; VOC2007 is about half
            and half). ``test.txt`` repeats ``val.txt``: there is no separate test set.
        size: ``(width, height)`` of every image; overrides ``config.width/height``.
        config: drawing parameters; defaults to :class:`SyntheticConfig`.

    Returns:
        Counts of what was written.
    """
    if images < 1 or not 0.0 <= val_fraction <= 1.0:
        raise ValueError(
            f"need images >= 1 and 0 <= val_fraction <= 1, got {images}, {val_fraction}"
        )
    config = config or SyntheticConfig()
    config = SyntheticConfig(**{**config.__dict__, "width": size[0], "height": size[1]})
    root = _prepare_root(Path(out))
    atomic_write_json(
        root / _MARKER,
        {"generator": "sppdet.synthetic", "images": images, "seed": seed,
         "val_fraction": val_fraction, "config": config.__dict__},
    )  # fmt: skip
    atomic_write_text(root / "classes.txt", "\n".join(SYNTHETIC_CLASSES) + "\n")
    ids = [f"{i + 1:06d}" for i in range(images)]
    counts = dict.fromkeys(SYNTHETIC_CLASSES, 0)
    difficult = 0
    for i in tqdm(range(images), desc="make-synthetic", unit="img", disable=images < 200):
        image, objects = render_scene(np.random.default_rng([seed, i]), config)
        atomic_write_bytes(
            root / "JPEGImages" / f"{ids[i]}.jpg", _jpeg_bytes(image, config.jpeg_quality)
        )
        rec = ImageRecord(
            ids[i], root / "JPEGImages" / f"{ids[i]}.jpg", config.width, config.height,
            [o.box for o in objects], [o.label for o in objects], [o.difficult for o in objects],
        )  # fmt: skip
        xml = voc_annotation_xml(
            rec, SYNTHETIC_CLASSES, folder="VOC2007", database="sppdet synthetic"
        )
        atomic_write_text(root / "Annotations" / f"{ids[i]}.xml", xml)
        for obj in objects:
            counts[SYNTHETIC_CLASSES[obj.label]] += 1
            difficult += int(obj.difficult)
    train, val = _write_splits(root, ids, seed, val_fraction)
    return SyntheticSummary(root, images, len(train), len(val), counts, difficult)


def _write_splits(root: Path, ids: list[str], seed: int, val_fraction: float):
    """Write train/val/trainval/test lists (split files last: an interrupted run has none)."""
    n_val = int(round(val_fraction * len(ids)))
    order = np.random.default_rng([seed, 1 << 30]).permutation(len(ids))  # own stream: no reuse
    val_set = {ids[k] for k in order[:n_val]}
    val = [i for i in ids if i in val_set]
    train = [i for i in ids if i not in val_set]
    main = root / "ImageSets" / "Main"
    for name, lst in (("train", train), ("val", val), ("trainval", ids), ("test", val)):
        atomic_write_text(main / f"{name}.txt", "".join(f"{i}\n" for i in lst))
    return train, val
