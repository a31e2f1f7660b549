"""sppdet: SPP-net object detection (He, Zhang, Ren, Sun, ECCV 2014) in PyTorch.

Importing this package has no side effects; stages live in their own modules.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no import at run time: importing sppdet stays free of torch
    from sppdet.detect import Detector

__version__ = "0.1.0"


def load_model(path: str | os.PathLike | None = None, *, device: str = "auto") -> Detector:
    """The detector of a model file (``sppdet export``), or of the shipped model without one.

    Returns a :class:`sppdet.detect.Detector`: ``load_model().detect(image)`` with ``image`` a
    uint8 ``[H, W, 3]`` RGB array (:func:`sppdet.imageio.load_image`).
    """
    # imported here: importing sppdet stays free of torch and of any side effect
    from sppdet.model import load_detector
    from sppdet.model_file import default_model_path, read_model

    return load_detector(read_model(path if path is not None else default_model_path(), device))
