"""Resumable evaluation: each block of images' detections kept on disk until the outputs exist.

An ``eval --ablations`` over VOC07 val takes most of an hour on a 2-core CPU (five scales with
maps computed from the pixels: longer). :func:`~sppdet.evaluate.evaluate_variants` saves the
detections of every :data:`BLOCK` images of its shard as one ``.npz`` (with the seconds they
took), and a rerun with the same inputs loads the finished blocks instead of detecting them
again: the comp4 files, APs and per-image seconds come out as from one uninterrupted pass
(tests/test_cli_e2e.py). The blocks live in ``RUN/eval/.blocks/<key digest>/``; the key holds
everything that decides the detections (split and images, proposals, config and test variants,
the bytes of the trained parts or model file, device, shard, library versions), so a changed
input starts a fresh set instead of mixing in stale detections. Rank 0 removes the set once the
outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sppdet.configutil import to_dict
from sppdet.detect import Detections
from sppdet.model import BBOX_FILE, head_path, svm_file
from sppdet.run import Run
from sppdet.run_config import LEGACY_SETTINGS
from sppdet.storage import (
    atomic_save_npz,
    atomic_write_json,
    drop_legacy,
    file_sha256,
    fingerprint,
    versions,
)

__all__ = ["BLOCK", "EvalBlocks", "blocks_key", "arrays_digest"]

log = logging.getLogger(__name__)

BLOCK = 50  # images per saved block: at most this many images' work is lost to an interruption


def arrays_digest(arrays: Sequence[np.ndarray]) -> str:
    """sha256 of a sequence of arrays' shapes, dtypes and bytes (e.g. each image's proposals)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


class EvalBlocks:
    """The saved blocks of one evaluation (one key), for one rank of ``world``.

    Args:
        root: ``RUN/eval/.blocks``.
        key: JSON-able description of every input of the detections (see the module docstring);
            its digest names the directory, and it is written there as ``key.json``.
        names: the test variants, in the order their detections are stored.
        rank: this process's rank (its files are its own: ``r<rank>_b<block>.npz``).
    """

    def __init__(self, root: str | Path, key: Mapping[str, Any], names: Sequence[str], rank: int):
        self.key = dict(key)
        self.dir = Path(root) / fingerprint(self.key)[:16]
        self.names = list(names)
        self.rank = rank
        self.dir.mkdir(parents=True, exist_ok=True)
        key_file = self.dir / "key.json"
        if not key_file.exists():
            atomic_write_json(key_file, self.key)

    def path(self, block: int) -> Path:
        return self.dir / f"r{self.rank}_b{block:05d}.npz"

    def load(
        self, block: int, images: int
    ) -> tuple[list[dict[str, Detections]], dict[str, dict[str, float]], float] | None:
        """Block ``block``'s detections (one ``{variant: Detections}`` per image), each variant's
        seconds per stage and the block's wall seconds; None if it is not saved (or unreadable:
        it is detected again)."""
        path = self.path(block)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta["names"] != self.names or meta["images"] != images:
                    return None
                dets: list[dict[str, Detections]] = [{} for _ in range(images)]
                for k, name in enumerate(self.names):
                    off = z[f"offsets{k}"]
                    boxes, scores, labels = z[f"boxes{k}"], z[f"scores{k}"], z[f"labels{k}"]
                    for i in range(images):
                        s = slice(int(off[i]), int(off[i + 1]))
                        dets[i][name] = Detections(boxes[s], scores[s], labels[s])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # torn: redo it
            log.warning("eval: ignoring unreadable block %s (%s)", path, e)
            return None
        return dets, meta["seconds"], float(meta["wall"])

    def save(
        self,
        block: int,
        dets: Sequence[Mapping[str, Detections]],
        seconds: Mapping[str, Mapping[str, float]],
        wall: float,
    ) -> None:
        """Atomically write block ``block`` (see :meth:`load`)."""
        arrays: dict[str, np.ndarray] = {}
        for k, name in enumerate(self.names):
            per = [d[name] for d in dets]
            arrays[f"offsets{k}"] = np.cumsum([0] + [len(p.scores) for p in per], dtype=np.int64)
            arrays[f"boxes{k}"] = _cat([p.boxes for p in per], (0, 4), np.float32)
            arrays[f"scores{k}"] = _cat([p.scores for p in per], (0,), np.float32)
            arrays[f"labels{k}"] = _cat([p.labels for p in per], (0,), np.int64)
        meta = {"names": self.names, "images": len(dets), "seconds": seconds, "wall": wall}
        atomic_save_npz(self.path(block), meta=np.asarray(json.dumps(meta)), **arrays)

    def saved(self) -> int:
        """How many of this rank's blocks are on disk."""
        return len(list(self.dir.glob(f"r{self.rank}_b*.npz")))

    def remove(self) -> None:
        """Delete the whole set (every rank's blocks): the outputs are written."""
        shutil.rmtree(self.dir, ignore_errors=True)


def _cat(parts: list[np.ndarray], empty: tuple[int, ...], dtype) -> np.ndarray:
    parts = [np.asarray(p, dtype) for p in parts]
    return np.concatenate(parts) if parts else np.zeros(empty, dtype)


def blocks_key(run, split, records, props, detectors, source, cache_maps, dist) -> dict:
    """Everything that decides a rank's detections in :func:`~sppdet.evaluate.evaluate_variants`:
    the key of its :class:`EvalBlocks` (``source``: None, a run, or a model file)."""
    if source is not None and not isinstance(source, Run):  # a model file
        parts = {"model": file_sha256(source.path)}
    else:
        src = run if source is None else source
        files = [head_path(src), src.path(*BBOX_FILE)]
        files += [src.path(*svm_file(la)) for la in ("pool5", "fc6", "fc7")]
        parts = {str(f.relative_to(src.root)): file_sha256(f) for f in files if f.exists()}
    return {
        "split": split,
        "images": [r.image_id for r in records],
        "proposals": arrays_digest([props.boxes_for(r.image_id) for r in records]),
        # settings added since at their defaults left out: a saved evaluation stays resumable
        "config": drop_legacy(to_dict(run.config), LEGACY_SETTINGS),
        "variants": {
            name: drop_legacy({"test": to_dict(det.config)}, LEGACY_SETTINGS)["test"]
            for name, det in detectors.items()
        },
        "parts": parts,
        "cache_maps": cache_maps,
        "device": str(run.device),
        "shard": [dist.rank, dist.world],
        "versions": versions(),
    }
