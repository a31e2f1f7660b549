"""How a model file stores its tensors: float32, float16, or int8 with per-channel scales.

:mod:`sppdet.model_file` writes a trained run with these helpers and reads it back with
:func:`unpack`. A float tensor is stored

* as it is (float32 export, and small tensors: biases, batch-norm statistics, standardisation
  vectors, which cost nothing and carry the offsets that rounding would shift);
* in float16 when it has at least :data:`HALF_MIN_NUMEL` elements (float16 / int8 exports);
* with the int8 export, the fc6 / fc7 weights (:func:`pack_head`) and the box regressors'
  weights (:func:`pack_bbox`) in int8: symmetric rounding to 1/254 of the range of each output
  channel. The box regressors' ``Array[K, D, 4]`` is stored as
  ``{"int8": Tensor[int8], "scale": Tensor[float32]}`` (:func:`quantize`: one scale per class and
  coordinate, over the ``D`` features, broadcast with ``keepdim``, so ``unpack`` is one
  multiply); the trunk stays float16 (:func:`pack_state` says why).

Per-channel symmetric int8 is the weight rounding that :class:`sppdet.fastpath.Int8Linear`
applies to fc6 / fc7 at test time on a CPU; weights only, every activation stays float32.
The head keeps the version-2 layout (int8 ``state`` entries with a separate ``scales`` dict)
so that one reader serves both versions.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from sppdet.bbox_reg import ARRAY_FIELDS, BBoxRegressor
from sppdet.fastpath import quantize_rows, quantize_symmetric

#: Floating tensors with at least this many elements are stored in float16 (or int8).
HALF_MIN_NUMEL = 4096
#: Head weights stored as int8 with the int8 export.
INT8_KEYS = ("fc6.weight", "fc7.weight")


def _big(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() >= HALF_MIN_NUMEL


def half(t: torch.Tensor, on: bool) -> torch.Tensor:
    """``t`` in float16 when ``on`` and it is a big floating tensor, else unchanged."""
    return t.half() if on and _big(t) else t


def quantize(t: torch.Tensor, dims: Iterable[int]) -> dict[str, torch.Tensor]:
    """Symmetric int8 rounding of ``t`` with one float32 scale per slice over ``dims``.

    Returns:
        ``{"int8": q, "scale": s}``: ``q`` int8 of ``t``'s shape with ``|q| <= 127``, ``s``
        float32 with size 1 in ``dims`` (``t ~= q * s``; error at most ``s / 2``).
    """
    q, scale = quantize_symmetric(t.detach().float(), tuple(dims))
    return {"int8": q, "scale": scale}


def unpack(v: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """A stored tensor (plain, float16, or :func:`quantize`'s dict) -> float32."""
    if isinstance(v, Mapping):
        return v["int8"].float() * v["scale"]
    return v.float()


def pack_state(state: Mapping[str, torch.Tensor], half_on: bool) -> dict:
    """A state_dict for the file: big floating tensors in float16 when ``half_on``.

    The trunk's conv weights stay float16 even in the int8 export: :func:`quantize` per output
    channel moved the shipped Lite0 model's mAP on the first 300 VOC07 val images by +0.40
    points, with class APs moving by up to 12 (docs/results.md): not the rounding noise that
    the head's and box regressors' int8 cost, so not called lossless.
    """
    return {k: half(v.detach().cpu(), half_on) for k, v in state.items()}


def unpack_state(state: Mapping) -> dict[str, torch.Tensor]:
    """:func:`pack_state`'s output -> a float32 state_dict."""
    return {k: unpack(v) for k, v in state.items()}


def pack_head(head: dict, half_on: bool, int8: bool) -> dict:
    """The fine-tuned head file's model for the file: fc6 / fc7 weights in int8 (``int8``)."""
    model, keys = head["model"], INT8_KEYS if int8 else ()
    state = pack_state({k: v for k, v in model.items() if k not in keys}, half_on)
    scales = {}
    for k in keys:
        state[k], scales[k] = quantize_rows(model[k].detach().cpu().float())
    return {"config": head["config"], "state": state, "scales": scales}


def unpack_head(h: dict) -> dict[str, torch.Tensor]:
    """:func:`pack_head`'s output -> the head's float32 state_dict."""
    scales = h.get("scales", {})
    return {
        k: v.float() * scales[k][:, None] if k in scales else unpack(v)
        for k, v in h["state"].items()
    }


def pack_bbox(bbox: BBoxRegressor, half_on: bool, int8: bool) -> dict:
    """Box regressors for the file; with ``int8`` the ``Array[K, D, 4]`` weights get one scale
    per class and coordinate (the other arrays are small and stay as they are)."""
    out: dict = {}
    for f in ARRAY_FIELDS:
        t = torch.from_numpy(np.asarray(getattr(bbox, f)))
        out[f] = quantize(t, (1,)) if int8 and f == "weights" else half(t, half_on)
    out["feature_scale"] = float(bbox.feature_scale)
    out["layer"] = bbox.layer
    return out


def unpack_bbox(b: Mapping) -> BBoxRegressor:
    """:func:`pack_bbox`'s output -> the box regressors (float32 weights)."""
    arrays = {
        k: unpack(v).numpy() if k != "num_samples" else v.numpy()
        for k, v in b.items()
        if k not in ("feature_scale", "layer")
    }
    # files exported before the layer was stored regress from pool5
    layer = b.get("layer", "pool5")
    return BBoxRegressor(**arrays, feature_scale=b["feature_scale"], layer=layer)
