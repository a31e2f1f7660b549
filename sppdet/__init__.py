"""sppdet: SPP-net object detection (He, Zhang, Ren, Sun, ECCV 2014) in PyTorch.

Importing this package has no side effects; stages live in their own modules.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no import at run time: importing sppdet stays free of torch
    from sppdet.detect import Detector

__version__ = "0.1.0"


def load_model(
    path: str | os.PathLike | None = None, *, device: str = "auto", fc_dtype: str = "auto"
) -> Detector:
    """The detector of a model file (``sppdet export``), or of the shipped model without one.

    Returns a :class:`sppdet.detect.Detector`: ``load_model().detect(image)`` with ``image`` a
    uint8 ``[H, W, 3]`` RGB array (:func:`sppdet.imageio.load_image`). ``fc_dtype`` as
    ``sppdet detect --fc-dtype``: ``auto`` (the default of both) runs fc6 / fc7 in int8 on a
    CPU with int8 dot-product instructions (the shipped model's VOC07 val mAP moved by -0.03
    points, 3x faster fc), float32 elsewhere; ``None`` keeps the model's own test setting.
    """
    # imported here: importing sppdet stays free of torch and of any side effect
    from sppdet.predict import detector_for

    return detector_for(model=path, device=device, test={"fc_dtype": fc_dtype})
