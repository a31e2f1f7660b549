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
* The EXIF orientation tag is **applied**, as image viewers and ``cv2.imread`` do
  (``PIL.ImageOps.exif_transpose``'s table): a phone photo stored sideways with a tag saying
  "turn 90 degrees" is read upright, in every stage (extraction, training, detection), and
  :func:`image_size` gives the upright size. None of the 5,008 VOC2007 trainval JPEGs carries
  an orientation tag (checked in ``../shared/data/VOCdevkit``: no EXIF at all), so they decode
  exactly as before. An annotated dataset's boxes must then refer to the upright image; a
  dataset whose ``<size>`` is that of the stored pixels of a turned image is refused by
  :mod:`sppdet.datasets` (:func:`read_header` gives both sizes). Only a tag read with the
  header counts: a PNG's ``eXIf`` chunk after its pixel data is ignored, so the size read
  without decoding and the decoded image always agree.
* A truncated file is an error (``ImageFile.LOAD_TRUNCATED_IMAGES`` is left at its default,
  ``False``); a half-decoded image would give wrong features without a trace.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sppdet.errors import DataError

__all__ = [
    "ImageHeader",
    "load_image",
    "image_size",
    "read_header",
    "check_annotated_size",
    "warn_unsure_orientations",
]

log = logging.getLogger(__name__)

# Errors Pillow raises for unreadable, corrupt or truncated files. DecompressionBombError is an
# Exception subclass of its own; SyntaxError comes from some format plugins on garbage headers.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

_INT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

_ORIENTATION_TAG = 0x0112  # EXIF "Orientation": how to turn the stored pixels to show them

# What turns the stored pixels upright for each orientation value: the table of
# PIL.ImageOps.exif_transpose (1 and unknown values: as stored).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without decoding the pixels.

    Attributes:
        stored_size: ``(width, height)`` of the pixel grid as stored in the file.
        orientation: the EXIF orientation, 2 to 8 when it turns or flips the image, else 1
            (no tag, an unreadable one, or an unknown value).
    """

    stored_size: tuple[int, int]
    orientation: int = 1

    @property
    def turned(self) -> bool:
        """Whether the orientation turns the image by 90 degrees (width and height swap)."""
        return self.orientation >= 5

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the upright image, as :func:`load_image` returns it."""
        width, height = self.stored_size
        return (height, width) if self.turned else (width, height)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as RGB, upright (its EXIF orientation applied).

    Args:
        path: an image file in any format Pillow reads (JPEG, PNG, BMP, TIFF, ...). Only the first
            frame of a multi-frame file is read.

    Returns:
        ``Array[H, W, 3]`` ``uint8``, RGB order, C-contiguous.

    Raises:
        DataError: ``image not found: PATH``, ``image PATH is a directory`` or ``cannot read
            image PATH: <reason>``.
    """
    path = _checked(path)
    try:
        with Image.open(path) as im:
            orientation = _orientation(im)  # before decoding, as read_header sees it
            im.load()  # decodes now, so truncation and corrupt data raise here
            if orientation in _UPRIGHT:
                im = im.transpose(_UPRIGHT[orientation])
            return _to_rgb_uint8(im)
    except _PIL_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from exc


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Stored size and EXIF orientation of an image, from its header only (no decoding).

    Raises:
        DataError: as :func:`load_image`, for a missing file, a directory or an unreadable
            header.
    """
    path = _checked(path)
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = _orientation(im)
    except _PIL_ERRORS as exc:
        raise DataError(f"cannot read image {path}: {_reason(exc)}") from exc
    return ImageHeader((int(width), int(height)), orientation)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of an image as :func:`load_image` returns it (upright), read from its
    header only (no decoding).

    Raises:
        DataError: as :func:`read_header`.
    """
    return read_header(path).size


def check_annotated_size(
    path: str | os.PathLike, size: tuple[int, int], source: str | os.PathLike
) -> bool:
    """Check the image size an annotation gives against the image's EXIF orientation.

    :func:`load_image` reads images upright, so an annotation's boxes must refer to the upright
    image. Where the orientation turns the image by 90 degrees the size tells which view was
    annotated; where it flips it or turns it by 180 degrees (or the image is square) it cannot.

    Args:
        path: the image file.
        size: ``(width, height)`` the annotation gives.
        source: the annotation file, for the message.

    Returns:
        True when the image carries an orientation whose annotated view the size cannot tell,
        False otherwise (no orientation, or the size is the upright one). An unreadable header
        is False too: :func:`load_image` reports it when the pixels are read.

    Raises:
        DataError: the orientation turns the image and ``size`` is its stored size.
    """
    try:
        header = read_header(path)
    except DataError:
        return False
    if header.orientation == 1:
        return False
    if header.size == header.stored_size:  # a flip, a 180-degree turn, or a square image
        return True
    if tuple(size) == header.stored_size:
        (w, h), (uw, uh) = header.stored_size, header.size
        raise DataError(
            f"{source} gives {path} the size {w}x{h} of its stored pixels, but its EXIF "
            f"orientation {header.orientation} turns it to {uw}x{uh} and sppdet reads images "
            "upright (as viewers do), so boxes drawn on the stored pixels would land turned: "
            "remove the tag (exiftool -n -Orientation=1 FILE) or annotate the upright image"
        )
    return False


def warn_unsure_orientations(dataset: str, paths: list[Path]) -> None:
    """One warning for the images of a dataset for which :func:`check_annotated_size` returned
    True: read upright, their boxes are right only if they were drawn on that view."""
    if paths:
        log.warning(
            "%s: %d image(s) carry an EXIF orientation that flips them or turns them by 180 "
            "degrees (first: %s): they are read as viewers show them, so their boxes must have "
            "been drawn on that view",
            dataset,
            len(paths),
            paths[0],
        )


@dataclass
class SizeNotes:
    """What the annotated sizes of a dataset's images left unsure or got wrong: one warning
    each for the whole dataset (:meth:`warn`), not one per image."""

    unsure: list[Path] = field(default_factory=list)  # orientation the size cannot tell
    differing: list[tuple[Path, tuple[int, int], tuple[int, int]]] = field(default_factory=list)

    def warn(self, dataset: str) -> None:
        warn_unsure_orientations(dataset, self.unsure)
        if self.differing:
            source, (aw, ah), (w, h) = self.differing[0]
            log.warning(
                "%s: %d annotation(s) give a size that is not their image's (first: %s says "
                "%dx%d, the image is %dx%d); sppdet uses the image's own size for all geometry",
                dataset,
                len(self.differing),
                source,
                aw,
                ah,
                w,
                h,
            )


def annotated_size(
    path: str | os.PathLike, size: tuple[int, int], source: str | os.PathLike, notes: SizeNotes
) -> tuple[int, int]:
    """The ``(width, height)`` that geometry uses for an annotated image: the decoded (upright)
    image's, whatever the annotation says. The annotation is checked as in
    :func:`check_annotated_size`; a size that disagrees is noted in ``notes`` (a conv map
    computed from the pixels has the pixels' shape, and windows mapped with another size would
    land elsewhere). An unreadable header leaves the annotated size: :func:`load_image` reports
    the file when its pixels are read.
    """
    if check_annotated_size(path, size, source):
        notes.unsure.append(Path(path))
    try:
        actual = image_size(path)
    except DataError:
        return (int(size[0]), int(size[1]))
    if actual != tuple(size):
        notes.differing.append((Path(source), (int(size[0]), int(size[1])), actual))
    return actual


def _checked(path: str | os.PathLike) -> Path:
    """``path`` as a Path, if it is a file; a one-line error naming it otherwise."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"image {path} is a directory")
    if not path.exists():
        raise DataError(f"image not found: {path}")
    if not path.is_file():
        raise DataError(f"image {path} is not a regular file")
    return path


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation an opened, not yet decoded image declares (1: none or unknown)."""
    if im.format == "PNG" and "exif" not in im.info:
        # Pillow would decode the whole PNG to look for an eXIf chunk after the pixel data;
        # the header gives what counts (see the module docstring).
        return 1
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except (*_PIL_ERRORS, struct.error):
        return 1  # a malformed EXIF block: the pixels are fine, read them as stored
    return value if isinstance(value, int) and value in _UPRIGHT else 1


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
