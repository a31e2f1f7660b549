"""Which image file a cached item was made from: its size, mtime and content hash.

Caches (proposals, conv maps, R-CNN window vectors) are keyed by image id. An id alone does not
tell a stale cache: a run evaluated against another devkit whose split has the same ids reused
proposals and maps of other images (0.6 mAP instead of 94.7). So each cache keeps an index of
the files its items came from (``images.jsonl``, one JSON line per image, appended), and every
stage that opens the cache checks the images it is about to use against it.

The check costs one ``stat`` per image; only a file whose mtime changed is hashed (a copied or
touched devkit: the content decides). An image not yet in the index is recorded, hash included,
when a stage first opens the cache with it (caches made before the index existed are trusted
then, once).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sppdet.distributed import SINGLE, Dist
from sppdet.errors import CacheMismatchError

INDEX_FILE = "images.jsonl"


def identity(path: str | os.PathLike) -> dict[str, Any]:
    """``{"bytes", "mtime_ns", "sha1"}`` of a file."""
    st = os.stat(path)
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": _sha1(path)}


def same_file(path: str | os.PathLike, recorded: dict[str, Any]) -> bool:
    """Whether ``path`` still holds the content ``recorded`` by :func:`identity`."""
    st = os.stat(path)
    if st.st_size != recorded["bytes"]:
        return False
    return st.st_mtime_ns == recorded["mtime_ns"] or _sha1(path) == recorded["sha1"]


def _sha1(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha1").hexdigest()


class ImageIndex:
    """The images a cache's items were made from, in an append-only JSON-lines file."""

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        """``what`` names the cache in messages, e.g. ``"conv maps in RUN/features/val"``."""
        self.path, self.what = Path(path), what

    def _load(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        out = {}
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
                out[row["id"]] = row
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by a kill mid-append: that image is recorded again
        return out

    def verify(self, images: Sequence[tuple[str, str | os.PathLike]], dist: Dist = SINGLE) -> None:
        """Check ``(image_id, path)`` pairs against the index; record the ones not in it.

        With several processes (``dist``) rank 0 checks and records first; the others then
        check against its records (and never append).

        Raises:
            CacheMismatchError: an image's file is not the one the cache was made from (the
                message names both and how to recover).
        """
        if not dist.main:
            dist.barrier()  # rank 0 records first
        known = self._load()
        new = []
        for image_id, path in images:
            row = known.get(image_id)
            if row is None:
                new.append({"id": image_id, "path": str(path), **identity(path)})
            elif not same_file(path, row):
                raise CacheMismatchError(
                    f"the {self.what} of image {image_id} were made from {row['path']} "
                    f"({row['bytes']} bytes, sha1 {row['sha1'][:12]}), not from {path} as it is "
                    "now: the image changed or the run reads another dataset; delete the cache "
                    "or use another run directory"
                )
        if new and dist.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = "".join(json.dumps(r) + "\n" for r in new)
            with open(self.path, "a", encoding="utf-8") as f:  # appends: no writer loses lines
                f.write(text)
        if dist.main:
            dist.barrier()
