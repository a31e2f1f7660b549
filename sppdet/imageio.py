"""Reading images as ``uint8`` RGB arrays, with one-line errors that name the file.

Every image that enters sppdet goes through :func:`load_image`, so all stages see the same
pixels:

* Output is always ``Array[H, W, 3]`` ``uint8`` RGB, whatever the file holds.
* Grayscale (``1``, ``L``, ``P``, ``LA``) is replicated to three channels; palette images are
  expanded through their palette; CMYK and YCbCr go through Pillow's colour conversion.
* Alpha is **dropped** (the stored colour is kept, no compositing on a background). That is what
  OpenCV's ``cv2.imread(path, cv2.IMREAD_COLOR)`` does, so selective-search proposals computed
  through OpenCV and features computed here see the same pixels.
* 16-bit and 32-bit integer images (``I;16``, ``I;16B``, ``I;16L``, ``I``) are mapped to 8 bits
  by ``value >> 8`` after clipping to ``[0, 65535]`` — a fixed mapping, so equal values give equal
  pixels in every image, again as ``cv2.imread`` does for 16-bit files. Float images (``F``) are
  rescaled from their own ``[min, max]`` range to ``[0, 255]`` (they have no natural scale).
* The EXIF orientation tag is **ignored**: VOC and COCO annotations refer to the stored pixel
  grid, and rotating would silently misplace every box.
* A truncated file is an error (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default,
  ``False``); a half-decoded image would give wrong features without a trace.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sppdet.errors import DataError

__all__ = ["load_image", "image_size"]

# Errors Pillow raises for unreadable, corrupt or truncated files. DecompressionBombError is an
# Exception subclass of its own; SyntaxError comes from some format plugins on garbage headers.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB.

    Args:
        path: an image file in any format Pillow reads (JPEG, PNG, BMP, TIFF, ...). Only the first
            frame of a multi-frame file is read.

    Returns:
        ``Array[H, W, 3]`` ``uint8``, RGB order, C-contiguous.

    Raises:
        DataError: ``image not found: PATH`` or ``cannot read image PATH: <reason>``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()  # decodes now, so truncation and corrupt data raise here
            return _to_rgb_uint8(im)
    except _PIL_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from exc


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image, read from its header only (no decoding).

    Raises:
        DataError: ``image not found: PATH`` or ``cannot read image PATH: <reason>``.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            width, height = im.size
    except _PIL_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from exc
    return int(width), int(height)


def _to_rgb_uint8(im: Image.Image) -> np.ndarray:
    """Convert a loaded Pillow image of any mode to ``Array[H, W, 3]`` uint8 RGB."""
    if im.mode in _INT_MODES:
        values = np.asarray(im).astype(np.int64)
        gray = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)
        gray = np.round(scaled).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if im.mode != "RGB":
        # Palette images with transparency go through RGBA so the palette is applied; the alpha
        # is then dropped like any other (see the module docstring).
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8, copy=True)


def _reason(exc: BaseException) -> str:
    """One-line reason for a Pillow error, without repeating the file name."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognised image format"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text
