"""Image pyramid geometry and per-window scale selection (SPEC section 2).

Shape shorthand: ``N`` windows, ``S`` scales.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["SINGLE_SCALE", "FIVE_SCALES", "scale_factor", "resized_size", "select_scales"]

#: Single-scale testing resizes the shorter side to 688 (paper section 4.1).
SINGLE_SCALE: tuple[int, ...] = (688,)
#: Five scales {480, 576, 688, 864, 1200} (paper section 4.1; the released script uses 874).
FIVE_SCALES: tuple[int, ...] = (480, 576, 688, 864, 1200)
#: Multi-scale window assignment aims each window at 224 x 224 pixels (``spm_expected_scale.m``).
TARGET_AREA = 224.0 * 224.0


def scale_factor(height: int, width: int, short_side: int, max_size: int) -> float:
    """Resize factor that makes the shorter side ``short_side`` with the longer side capped.

    The cap on the longer side follows Fast R-CNN (``MAX_SIZE = 2000``); without it a very
    elongated image at scale 1200 would not fit in memory.
    """
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    f = short_side / min(height, width)
    if round(f * max(height, width)) > max_size:
        f = max_size / max(height, width)
    return float(f)


def resized_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """``(height, width)`` after resizing by ``factor`` (at least one pixel each)."""
    return max(1, round(height * factor)), max(1, round(width * factor))


def select_scales(boxes: np.ndarray, factors: Sequence[float]) -> np.ndarray:
    """For each window the index of the scale whose resized window area is closest to 224².

    ``argmin_s |area * f_s^2 - 224^2|`` (``spm_expected_scale.m``; Fast R-CNN
    ``_project_im_rois``). ``boxes`` is ``Array[N, 4]`` internal xyxy in original image pixels,
    ``factors`` the ``S`` resize factors; returns ``Array[N]`` int64.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    area = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    f2 = np.asarray(factors, dtype=np.float64) ** 2
    return np.abs(area[:, None] * f2[None, :] - TARGET_AREA).argmin(axis=1).astype(np.int64)
