"""The ``extract`` stage: proposals + cached conv maps (R-CNN mode: window vectors) of a split.

Resumable, and a no-op when done.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import numpy as np
import torch
from tqdm import tqdm

from sppdet.data_source import DataSource
from sppdet.distributed import SINGLE, Dist
from sppdet.imageio import load_image
from sppdet.locks import writing
from sppdet.run import Run
from sppdet.storage import atomic_write_json, read_json

log = logging.getLogger(__name__)

#: ``RUN/features/<split>/extract_log.json``: conv seconds and images computed, over attempts.
EXTRACT_LOG = "extract_log.json"
LOG_EVERY = 25  # images between log updates


def extract(
    run: Run,
    split: str,
    *,
    data: DataSource | str | None = None,
    limit: int | None = None,
    progress: bool = True,
    dist: Dist = SINGLE,
) -> dict:
    """Make sure ``split`` has proposals and (if caching is on) every conv map on disk.

    Maps already in the cache are skipped, so a killed extraction resumes where it stopped and a
    finished one is a no-op. ``dist``: the missing images are sharded over its ranks
    (:mod:`sppdet.distributed`). ``data``: the split's :class:`~sppdet.data_source.DataSource`
    (default: the run's, :meth:`~sppdet.run.Run.data_source`). Returns a summary dict (totals
    over the ranks).
    """
    dataset = run.dataset(split, data=data, limit=limit)
    proposals = run.proposals(dataset, dist=dist)
    n_boxes = sum(len(proposals.boxes_for(r.image_id)) for r in dataset)
    summary = {
        "split": split,
        "images": len(dataset),
        "proposals_per_image": n_boxes / max(len(dataset), 1),
        "computed": 0,
        "seconds": 0.0,
    }
    cfg = run.config.features
    if not cfg.cache:
        log.info("feature caching is off: later stages compute window features on the fly")
        return summary

    # one extraction of a split at a time (the ranks of one are one)
    with writing(run.root, f"features-{split}") if dist.main else nullcontext():
        return _store_maps(run, dataset, proposals, summary, progress and dist.main, dist)


def _store_maps(run: Run, dataset, proposals, summary: dict, progress: bool, dist: Dist) -> dict:
    """Compute and cache the maps (R-CNN mode: window vectors) that the split lacks."""
    split = dataset.split
    provider = run.provider(dataset, dist=dist)
    assert provider.cache is not None
    summary["stored"] = provider.STORED
    todo = [r for r in dataset if not provider.cached(r.image_id)]
    dist.barrier()  # every rank has listed the same images before any is stored
    if not todo:
        log.info(
            "all %d images of %s already cached in %s", len(dataset), split, provider.cache.root
        )
        return summary
    windows = {r.image_id: _cached_boxes(r, proposals) for r in todo}
    provider.check_disk(list(windows.values()))
    log_path = provider.cache.root / EXTRACT_LOG
    before = read_json(log_path) if log_path.exists() else {"seconds": 0.0, "images": 0}
    attempts = before.get("attempts", 0) + 1

    def write_log(seconds: float, images: int) -> None:
        # Cumulative over attempts, written as it goes: a killed extraction (end of a session)
        # keeps the time it spent, so resumed runs can report the whole stage.
        atomic_write_json(
            log_path,
            {
                "seconds": before["seconds"] + seconds,
                "images": before["images"] + images,
                "attempts": attempts,
                "threads": torch.get_num_threads(),
                **({"processes": dist.world} if dist.world > 1 else {}),
            },
        )

    t0 = time.perf_counter()
    mine = dist.shard(todo)
    for k, rec in enumerate(tqdm(mine, desc=f"extract {split}", unit="img", disable=not progress)):
        loader = lambda r=rec: load_image(r.path)  # noqa: E731
        provider.store(rec.image_id, (rec.height, rec.width), loader, windows.pop(rec.image_id))
        if dist.world == 1 and ((k + 1) % LOG_EVERY == 0 or k + 1 == len(mine)):
            write_log(time.perf_counter() - t0, k + 1)
    seconds = max(dist.gather(time.perf_counter() - t0))  # the stage's wall time
    if dist.world > 1 and dist.main:  # ranks log only their totals (a killed one: nothing)
        write_log(seconds, len(todo))
    summary["computed"] = len(todo)
    summary["seconds"] = seconds
    summary["images_per_second"] = len(todo) / max(seconds, 1e-9)
    return summary


def _cached_boxes(rec, proposals) -> np.ndarray:
    """An image's proposals and all its GT boxes: the windows training and evaluation pool (R-CNN
    mode caches their vectors; SPP mode caches maps, from which any window is pooled)."""
    boxes = np.concatenate([proposals.boxes_for(rec.image_id), rec.boxes]).astype(np.float32)
    return np.unique(boxes, axis=0)
