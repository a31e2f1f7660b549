"""R-CNN mode's cache of window vectors (:mod:`sppdet.rcnn`), one file per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sppdet.errors import CacheMismatchError
from sppdet.features import FeatureExtractor, SPPConfig
from sppdet.storage import atomic_save_npz, check_manifest


class RCNNCache:
    """R-CNN mode's window vectors on disk, like R-CNN's own ``rcnn_cache_pool5_features.m``.

    One ``<root>/pool5/<image_id>.npz`` per image holds ``boxes`` (``Array[N, 4]`` float32 internal
    xyxy: the image's proposals and ground truth) and ``vectors`` (``Array[N, D]`` in the
    manifest's dtype, fp16 by default). Max pooling commutes with rounding, so fp16 vectors are
    exactly the pyramid of fp16 maps, as SPP mode's cache gives. Files are written atomically; an
    interrupted extraction resumes by skipping existing files. ~15 MB per VOC image with
    MobileNetV2 (1,600 x 4,800 dims): the extract stage checks the free disk space first.
    """

    def __init__(self, root: str | Path, manifest: dict) -> None:
        self.root = Path(root)
        check_manifest(self.root, manifest)
        self.dtype = np.dtype(manifest["dtype"])
        self.torch_dtype = torch.from_numpy(np.empty(0, self.dtype)).dtype

    def path(self, image_id: str) -> Path:
        return self.root / "pool5" / f"{image_id}.npz"

    def has(self, image_id: str) -> bool:
        return self.path(image_id).exists()

    def load(self, image_id: str) -> tuple[np.ndarray, np.ndarray]:
        """``(boxes Array[N, 4] float32, vectors Array[N, D])`` of one image."""
        path = self.path(image_id)
        try:
            with np.load(path, allow_pickle=False) as z:
                boxes, vectors = z["boxes"], z["vectors"]
        except (OSError, ValueError, KeyError) as exc:
            raise CacheMismatchError(f"corrupt cached vectors {path} ({exc}); delete it") from exc
        if len(boxes) != len(vectors):
            raise CacheMismatchError(f"corrupt cached vectors {path}: rows differ; delete it")
        return boxes, vectors

    def save(self, image_id: str, boxes: np.ndarray, vectors: Tensor) -> None:
        arr = vectors.detach().to("cpu").numpy().astype(self.dtype)
        atomic_save_npz(self.path(image_id), boxes=as_boxes(boxes), vectors=arr)


def rcnn_cache_manifest(extractor: FeatureExtractor, spp: SPPConfig) -> dict:
    """What determines R-CNN mode's vectors: the conv trunk and warp (the extractor's manifest
    without the SPP scales, which R-CNN ignores) and the pyramid levels (the vectors are pooled)."""
    m = extractor.manifest()
    for key in ("scales", "max_size"):
        m.pop(key, None)
    return {**m, "kind": "rcnn_pool5_vectors", "levels": list(spp.levels)}


def as_boxes(boxes: np.ndarray) -> np.ndarray:
    """``boxes`` as a contiguous float32 ``Array[N, 4]``."""
    return np.ascontiguousarray(boxes, dtype=np.float32).reshape(-1, 4)
