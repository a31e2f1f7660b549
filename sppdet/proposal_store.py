"""Proposal store: one compact file per split (how it is filled, computed resumably and in
parallel or imported: :mod:`sppdet.proposal_sources`).

``RUN/proposals/<split>.npz`` uses the CSR layout of the shared precomputed file:

* ``ids`` ``Array[I]`` str, in the dataset's image order;
* ``offsets`` ``Array[I + 1]`` int64: image ``ids[i]`` owns ``boxes[offsets[i]:offsets[i + 1]]``;
* ``boxes`` ``Array[M, 4]`` uint16, ``x1, y1, x2, y2`` in **0-based inclusive** pixels, rank order;
* ``config`` (JSON string: how the boxes were made) and ``fingerprint`` (sha256 of it + the ids).

The file holds no timings, so a resumed computation gives the same arrays as an uninterrupted one;
timings go to ``<split>.stats.json`` beside it. While computing, each chunk of images is written
atomically to ``<split>.parts/NNNNN.npz`` (the directory has a manifest of the settings): a rerun
skips finished chunks, a rerun with other settings is refused, and the parts are merged into the
store and deleted at the end.

An image may own zero boxes (empty slice; :meth:`ProposalSet.boxes_for` returns ``Array[0, 4]``)
and later stages must handle that. Computed stores never have one (selective search falls back to
the whole image); imported ones can.

Shape shorthand: ``I`` images, ``M`` boxes in all, ``N`` boxes of one image, ``G`` ground truth.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from sppdet import boxes as B
from sppdet import storage as S
from sppdet.errors import DataError

__all__ = ["ProposalSet", "load_proposal_set", "save_proposal_set", "store_path", "read_stats"]
__all__ += ["to_csr", "write_store"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class ProposalSet:
    """Proposals of a set of images in CSR layout (see the module docstring).

    Attributes:
        ids: ``Array[I]`` str image ids.
        offsets: ``Array[I + 1]`` int64.
        boxes: ``Array[M, 4]`` uint16, 0-based inclusive pixel coordinates.
        config: how the boxes were made (``{}`` for a foreign file such as the shared one).
        fingerprint: sha256 of ``config`` and ``ids`` (``""`` for a foreign file).
        source: the file they were read from, for messages.
    """

    ids: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    config: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    source: str = "proposal set"

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids).astype(str).reshape(-1)
        offsets = np.asarray(self.offsets, dtype=np.int64).reshape(-1)
        b = np.asarray(self.boxes)
        if b.dtype != np.uint16 or b.ndim != 2 or b.shape[1] != 4:
            raise DataError(f"{self.source}: boxes must be uint16 [M, 4], not {b.dtype} {b.shape}")
        if (
            len(offsets) != len(ids) + 1
            or offsets[0] != 0
            or offsets[-1] != len(b)
            or np.any(np.diff(offsets) < 0)
        ):
            raise DataError(f"{self.source}: offsets do not match ids and boxes")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "offsets", offsets)

    @cached_property
    def index(self) -> dict[str, int]:
        """``image id -> position`` in ``ids``."""
        return {image_id: i for i, image_id in enumerate(self.ids.tolist())}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self.index

    def num_boxes(self) -> np.ndarray:
        """``Array[I]`` int64 number of boxes of each image."""
        return np.diff(self.offsets)

    def boxes_for(self, image_id: str) -> np.ndarray:
        """``Array[N, 4]`` float32 internal xyxy boxes of ``image_id``; ``N`` may be 0.

        Raises:
            DataError: ``image_id`` is not in the set (the message names the file).
        """
        if image_id not in self.index:
            raise DataError(f"no proposals for image {image_id} in {self.source}")
        i = self.index[image_id]
        return B.from_inclusive0(self.boxes[self.offsets[i] : self.offsets[i + 1]])


def load_proposal_set(path: str | os.PathLike) -> ProposalSet:
    """Read a proposal ``.npz``: a store, or a foreign file without config/fingerprint.

    Raises:
        DataError: missing file, missing arrays or inconsistent layout (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"proposal file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read proposal file {path}: {exc}") from exc
    missing = [k for k in ("ids", "offsets", "boxes") if k not in arrays]
    if missing:
        raise DataError(f"proposal file {path} lacks array(s) {', '.join(missing)}")
    config = json.loads(str(arrays["config"])) if "config" in arrays else {}
    fp = str(arrays.get("fingerprint", ""))
    return ProposalSet(arrays["ids"], arrays["offsets"], arrays["boxes"], config, fp, str(path))


def save_proposal_set(path: str | os.PathLike, pset: ProposalSet) -> None:
    """Atomically write ``pset`` in the store layout (uncompressed ``.npz``)."""
    config = np.array(json.dumps(pset.config, sort_keys=True))
    S.atomic_save_npz(path, ids=pset.ids, offsets=pset.offsets, boxes=pset.boxes, config=config,
                      fingerprint=np.array(pset.fingerprint))  # fmt: skip


def store_path(run_dir: str | os.PathLike, split: str) -> Path:
    """``RUN/proposals/<split>.npz``."""
    return Path(run_dir) / "proposals" / f"{split}.npz"


def read_stats(path: str | os.PathLike) -> dict[str, Any] | None:
    """The timings ``<split>.stats.json`` written beside a store, or None."""
    stats = Path(path).with_suffix(".stats.json")
    return S.read_json(stats) if stats.is_file() else None


def to_csr(boxes: Sequence[np.ndarray], where: str) -> tuple[np.ndarray, np.ndarray]:
    """Internal boxes per image -> (offsets ``Array[I + 1]``, uint16 inclusive ``Array[M, 4]``)."""
    flat = np.concatenate([B.to_inclusive0(b) for b in boxes] or [np.zeros((0, 4), np.int64)])
    if flat.size and (flat.min() < 0 or flat.max() > np.iinfo(np.uint16).max):
        raise DataError(f"{where}: box coordinates outside 0..65535 cannot be stored as uint16")
    offsets = np.cumsum([0] + [len(b) for b in boxes], dtype=np.int64)
    return offsets, flat.astype(np.uint16)


def write_store(dataset, settings: dict, boxes: list[np.ndarray], path: Path, stats: dict):
    """Write the store of ``dataset`` and its stats file; return the set."""
    fp = S.fingerprint({"settings": settings, "ids": list(dataset.image_ids)})
    offsets, flat = to_csr(boxes, str(path))
    pset = ProposalSet(np.array(dataset.image_ids), offsets, flat, settings, fp, str(path))
    save_proposal_set(path, pset)
    n = max(len(boxes), 1)
    stats.update(images=len(boxes), boxes_per_image=sum(map(len, boxes)) / n)
    stats["seconds_per_image"] = stats["seconds_total"] / n
    S.atomic_write_json(path.with_suffix(".stats.json"), stats)
    return pset
