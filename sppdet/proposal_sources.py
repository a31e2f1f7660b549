"""Where a split's proposals come from: reused from the store, imported, or computed (resumably,
in parallel, sharded over processes). The store's format is :mod:`sppdet.proposal_store`."""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sppdet import boxes as B
from sppdet import storage as S
from sppdet.distributed import SINGLE, Dist
from sppdet.errors import CacheMismatchError, DataError
from sppdet.image_identity import INDEX_FILE, ImageIndex
from sppdet.locks import writing
from sppdet.proposal_store import (
    ProposalSet,
    load_proposal_set,
    store_path,
    to_csr,
    write_store,
)
from sppdet.proposals import ProposalConfig, backend_version, propose
from sppdet.workers import run_in_workers

__all__ = ["ensure_proposals", "compute_proposals", "import_proposals", "chunk_size_for"]

log = logging.getLogger(__name__)

CHUNK_SIZE = 16  # most images per part file: the unit of work and of resumption
# Fewest part files a split is cut into (while it has that many images): the chunks are shared
# over worker processes and torchrun ranks, so 40 images in 16-image chunks (3 chunks) left one
# of two ranks with 24 images; 64 chunks keep ranks within one small chunk of each other.
MIN_CHUNKS = 64


def chunk_size_for(n_images: int) -> int:
    """Images per part file for a split of ``n_images``: at most :data:`CHUNK_SIZE`, small
    enough for at least :data:`MIN_CHUNKS` chunks. It depends on the split alone (not on the
    number of processes), so a run resumed with another ``--nproc-per-node`` finds its chunks."""
    return max(1, min(CHUNK_SIZE, n_images // MIN_CHUNKS))


def ensure_proposals(
    dataset,
    config: ProposalConfig,
    run_dir: str | os.PathLike,
    *,
    workers: int = 1,
    import_path: str | os.PathLike | None = None,
    progress: bool = True,
    dist: Dist = SINGLE,
) -> ProposalSet:
    """Proposals of ``dataset`` in ``RUN/proposals/<split>.npz``: reused, imported or computed.

    A finished store is reused when it was made as asked (an imported one whenever
    ``import_path`` is None) and covers every image of ``dataset``. Otherwise the boxes are
    imported from ``import_path``, or computed with ``config`` on ``workers`` processes
    (resuming an interrupted computation), sharded over the ranks of ``dist``.

    Raises:
        CacheMismatchError: the store or its unfinished parts were made with other settings, or
            the store lacks images of ``dataset``. DataError: unreadable image or import file.
    """
    path = store_path(run_dir, dataset.split)
    want = _import_settings(dataset, import_path) if import_path else _settings(dataset, config)
    index = ImageIndex(path.parent / f"{dataset.split}.{INDEX_FILE}", f"proposals in {path}")
    images = [(r.image_id, r.path) for r in dataset]
    # rank 0 decides for every rank (sppdet.distributed): they must pass the same barriers
    pset = _reusable(path, dataset, want, import_path) if dist.main else None
    if not dist.gather(pset is not None)[0]:
        lock = writing(run_dir, f"proposals-{dataset.split}") if dist.main else nullcontext()
        with lock:
            # another command may have finished them between the look above and the lock
            pset = _reusable(path, dataset, want, import_path) if dist.main else None
            if not dist.gather(pset is not None)[0]:
                if dist.main:
                    index.path.unlink(missing_ok=True)  # a new store: forget an old one's images
                if import_path and dist.main:  # also when a store of the file lacks images
                    pset = import_proposals(dataset, import_path, path, settings=want)
                elif not import_path:
                    pset = compute_proposals(
                        dataset, config, path, workers=workers, progress=progress, dist=dist
                    )
            dist.barrier()
    pset = pset if dist.main else load_proposal_set(path)
    index.verify(images, dist)
    return pset


def _reusable(path: Path, dataset, want: dict, import_path) -> ProposalSet | None:
    """The finished store at ``path`` if it serves ``dataset`` as asked; None if it must be
    (re)imported or computed; raises when it was made otherwise."""
    if not path.is_file():
        return None
    pset = load_proposal_set(path)
    if import_path or pset.config.get("kind") != "import":
        _check_same(path, pset.config, want)
    missing = [i for i in dataset.image_ids if i not in pset]
    if not missing:
        log.info("reusing proposals %s (%d images, %s)", path, len(pset), pset.config["kind"])
        return pset
    if not import_path:
        raise CacheMismatchError(
            f"{path} lacks {len(missing)} image(s) of {dataset.name} (e.g. "
            f"{', '.join(missing[:3])}); delete it or use another run directory"
        )
    return None


def _settings(dataset, config: ProposalConfig) -> dict[str, Any]:
    kind = {"kind": "computed", "dataset": dataset.name, "split": dataset.split}
    return S.canonical({**kind, "proposals": asdict(config), "library": backend_version(config)})


def _import_settings(dataset, source: str | os.PathLike) -> dict[str, Any]:
    source = Path(source)
    if not source.is_file():
        raise DataError(f"proposal file to import not found: {source}")
    kind = {"kind": "import", "dataset": dataset.name, "split": dataset.split}
    return {**kind, "source": str(source.resolve()), "source_sha256": S.file_sha256(source)}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_same(path: Path, stored: dict, want: dict) -> None:
    """CacheMismatchError listing ``key: stored -> wanted`` (the import path itself may move)."""
    old, new = _flat(stored), _flat(want)
    keys = sorted((set(old) | set(new)) - {"source"})
    diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    if diffs:
        raise CacheMismatchError(
            f"{path} was made with other settings ({'; '.join(diffs)}); "
            "delete it or use another run directory"
        )


# ---------------------------------------------------------------------------------- compute


def compute_proposals(
    dataset,
    config: ProposalConfig,
    path: str | os.PathLike,
    *,
    workers: int = 1,
    chunk_size: int | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    dist: Dist = SINGLE,
) -> ProposalSet | None:
    """Compute the proposals of ``dataset`` into the store ``path``, resuming finished chunks.

    Each image is computed on its own with a fixed seed and chunks are merged in dataset order,
    so the store does not depend on ``workers``, scheduling or interruptions.

    Args:
        workers: processes (1: this process); each runs OpenCV on one thread.
        chunk_size: images per part file (None: :func:`chunk_size_for` the split).
        stop_after: compute at most this many missing chunks and return None if some are left
            (what a killed run leaves behind; for tests).
        dist: ranks that share the missing chunks; rank 0 merges them and returns the store,
            the others return None.

    Raises:
        CacheMismatchError: ``<split>.parts`` holds work made with other settings.
    """
    t0, path, ids = time.perf_counter(), Path(path), list(dataset.image_ids)
    chunk_size = chunk_size or chunk_size_for(len(ids))
    settings, parts = _settings(dataset, config), path.with_suffix(".parts")
    chunks = [ids[i : i + chunk_size] for i in range(0, len(ids), chunk_size)]
    fp = S.fingerprint({"settings": settings, "ids": ids})
    manifest = {"fingerprint": fp, "settings": settings, "chunk_size": chunk_size}
    if dist.main:
        S.check_manifest(parts, manifest)
    dist.barrier()
    if not dist.main:
        S.check_manifest(parts, manifest)  # rank 0's: checked, not written
    todo = [j for j in range(len(chunks)) if not (parts / f"{j:05d}.npz").is_file()]
    dist.barrier()  # every rank has listed the same chunks before any is written
    if len(todo) < len(chunks) and dist.main:
        log.info("resuming %s: %d of %d chunks done", parts, len(chunks) - len(todo), len(chunks))
    mine = dist.shard(todo)
    tasks = [
        (
            parts / f"{j:05d}.npz",
            [str(dataset.record(i).path) for i in chunks[j]],
            chunks[j],
            config,
        )
        for j in mine[:stop_after]
    ]
    _run_tasks(tasks, workers, progress and dist.main, desc=f"proposals {dataset.split}")
    dist.barrier()
    if len(tasks) < len(mine) or not dist.main:
        return None
    boxes, seconds = _merge_parts(parts, chunks)
    # wall_seconds: this call's, all ranks (a resumed computation's covers the rest only)
    stats = {"kind": "computed", "seconds_total": seconds, "wall_seconds": time.perf_counter() - t0}
    pset = write_store(dataset, settings, boxes, path, stats)
    shutil.rmtree(parts, ignore_errors=True)
    log.info("wrote %s (%d images, %d boxes)", path, len(ids), len(pset.boxes))
    return pset


def _run_tasks(tasks: list, workers: int, progress: bool, desc: str) -> None:
    """Run :func:`_compute_chunk` over ``tasks`` here or on a pool of ``workers`` processes."""
    import cv2

    n_images = sum(len(t[2]) for t in tasks)
    with tqdm(total=n_images, desc=desc, unit="img", disable=not progress or not tasks) as bar:
        if workers <= 1 or len(tasks) <= 1:
            threads = cv2.getNumThreads()
            try:
                for task in tasks:
                    bar.update(_compute_chunk(task))
            finally:
                cv2.setNumThreads(threads)  # _compute_chunk set 1; give the caller its own back
            return
        # workers that die with this process, whatever kills it (sppdet.workers)
        for future in run_in_workers(_compute_chunk, tasks, min(workers, len(tasks))):
            bar.update(future.result())


def _compute_chunk(task: tuple) -> int:
    """Compute one chunk and write its part file atomically; return its number of images."""
    import cv2

    from sppdet.imageio import load_image

    cv2.setNumThreads(1)  # one core per worker: the workers are the parallelism
    part, paths, ids, config = task
    boxes, seconds = [], []
    for image_path in paths:
        image = load_image(image_path)
        start = time.perf_counter()
        boxes.append(propose(image, config))
        seconds.append(time.perf_counter() - start)
    offsets, flat = to_csr(boxes, str(part))
    S.atomic_save_npz(part, ids=np.array(ids), offsets=offsets, boxes=flat, seconds=seconds)
    return len(ids)


def _merge_parts(parts: Path, chunks: list[list[str]]) -> tuple[list[np.ndarray], float]:
    """Per-image internal boxes (chunk order) and the summed seconds of the part files."""
    boxes: list[np.ndarray] = []
    seconds = 0.0
    for j, chunk in enumerate(chunks):
        part = load_proposal_set(parts / f"{j:05d}.npz")
        if part.ids.tolist() != chunk:
            raise CacheMismatchError(f"{part.source} holds other images than expected; delete it")
        boxes += [part.boxes_for(i) for i in chunk]
        with np.load(part.source) as data:
            seconds += float(data["seconds"].sum())
    return boxes, seconds


# ----------------------------------------------------------------------------------- import


def import_proposals(
    dataset, source: str | os.PathLike, path: str | os.PathLike, *, settings: dict | None = None
) -> ProposalSet:
    """Import precomputed boxes of ``dataset``'s images into the store ``path``.

    ``source``: the shared ``.npz`` layout (``ids``, ``offsets``, uint16 0-based inclusive
    ``boxes``) or an R-CNN selective-search ``.mat`` (cell arrays ``images`` and ``boxes``, each
    box ``y1 x1 y2 x2`` 1-based inclusive). Boxes are clipped to the image, empty and duplicate
    ones dropped, the order kept.

    Raises:
        DataError: unreadable file, or images of ``dataset`` missing from it (names a few).
    """
    source, path = Path(source), Path(path)
    settings = settings or _import_settings(dataset, source)
    start = time.perf_counter()
    table = _read_mat(source) if source.suffix.lower() == ".mat" else load_proposal_set(source)
    missing = [i for i in dataset.image_ids if i not in table]
    if missing:
        raise DataError(
            f"{source} has no proposals for {len(missing)} of the {len(dataset)} images of "
            f"{dataset.name} (e.g. {', '.join(missing[:5])})"
        )
    boxes = []
    for r in dataset:
        b = table[r.image_id] if isinstance(table, dict) else table.boxes_for(r.image_id)
        b = B.clip_boxes(b, r.width, r.height)
        b = b[B.valid_boxes_mask(b)]
        boxes.append(b[B.unique_boxes(b)])
    stats = {"kind": "import", "seconds_total": time.perf_counter() - start}
    pset = write_store(dataset, settings, boxes, path, stats)
    log.info("imported %s into %s (%d images)", source, path, len(dataset))
    return pset


def _read_mat(source: Path) -> dict[str, np.ndarray]:
    """``image id -> Array[N, 4]`` internal xyxy from an R-CNN selective-search ``.mat``."""
    from scipy.io import loadmat

    try:
        mat = loadmat(source)
    except (OSError, ValueError, NotImplementedError) as exc:  # NotImplementedError: v7.3 file
        raise DataError(f"cannot read MAT file {source}: {exc}") from exc
    if "images" not in mat or "boxes" not in mat:
        raise DataError(f"MAT file {source} lacks the cell arrays 'images' and 'boxes'")
    ids = [str(np.ravel(x)[0]) for x in np.ravel(mat["images"])]
    cells = np.ravel(mat["boxes"])
    if len(ids) != len(cells):
        raise DataError(f"MAT file {source}: {len(ids)} images but {len(cells)} box arrays")
    yxyx = [np.asarray(c, dtype=np.float64).reshape(-1, 4) for c in cells]
    return {i: B.from_voc(b[:, [1, 0, 3, 2]]) for i, b in zip(ids, yxyx, strict=True)}
