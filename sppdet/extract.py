"""The ``extract`` stage: proposals + cached conv maps (R-CNN mode: window vectors) of a split.

Resumable, and a no-op when done.
"""

from __future__ import annotations

import logging
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

from sppdet.errors import SppdetError
from sppdet.imageio import load_image
from sppdet.run import Run
from sppdet.spp import spp_dim
from sppdet.storage import atomic_write_json, read_json

log = logging.getLogger(__name__)

#: ``RUN/features/<split>/extract_log.json``: conv seconds and images computed, over attempts.
EXTRACT_LOG = "extract_log.json"
LOG_EVERY = 25  # images between log updates
DISK_MARGIN = 2 * 10**9  # bytes left free after an R-CNN extraction


def extract(
    run: Run,
    split: str,
    *,
    devkit: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Make sure ``split`` has proposals and (if caching is on) every conv map on disk.

    Maps already in the cache are skipped, so a killed extraction resumes where it stopped and a
    finished one is a no-op. Returns a summary dict.
    """
    dataset = run.dataset(split, devkit=devkit, limit=limit)
    proposals = run.proposals(dataset)
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

    provider = run.provider(split)
    assert provider.cache is not None
    rcnn = cfg.mode == "rcnn"
    cached = provider.cache.has if rcnn else lambda i: provider.cache.has(i, cfg.scales)
    todo = [r for r in dataset if not cached(r.image_id)]
    if not todo:
        log.info(
            "all %d images of %s already cached in %s", len(dataset), split, provider.cache.root
        )
        return summary
    windows = {r.image_id: _rcnn_boxes(r, proposals) for r in todo} if rcnn else {}
    if rcnn:
        _check_disk(provider, list(windows.values()))
    log_path = provider.cache.root / EXTRACT_LOG
    before = read_json(log_path) if log_path.exists() else {"seconds": 0.0, "images": 0}
    attempts = before.get("attempts", 0) + 1
    t0 = time.perf_counter()
    for k, rec in enumerate(tqdm(todo, desc=f"extract {split}", unit="img", disable=not progress)):
        loader = lambda r=rec: load_image(r.path)  # noqa: E731
        if rcnn:
            provider.store(rec.image_id, loader, windows.pop(rec.image_id))
        else:
            provider.maps(rec.image_id, (rec.height, rec.width), loader)
        if (k + 1) % LOG_EVERY == 0 or k + 1 == len(todo):
            # Cumulative over attempts, written as it goes: a killed extraction (end of a
            # session) keeps the time it spent, so resumed runs can report the whole stage.
            atomic_write_json(
                log_path,
                {
                    "seconds": before["seconds"] + time.perf_counter() - t0,
                    "images": before["images"] + k + 1,
                    "attempts": attempts,
                    "threads": torch.get_num_threads(),
                },
            )
    summary["computed"] = len(todo)
    summary["seconds"] = time.perf_counter() - t0
    summary["images_per_second"] = len(todo) / max(summary["seconds"], 1e-9)
    return summary


def _rcnn_boxes(rec, proposals) -> np.ndarray:
    """The windows R-CNN mode caches for an image: its proposals and all its GT boxes (training
    uses both; :meth:`~sppdet.rcnn.RCNNProvider.pool5` computes any other window)."""
    boxes = np.concatenate([proposals.boxes_for(rec.image_id), rec.boxes]).astype(np.float32)
    return np.unique(boxes, axis=0)


def _check_disk(provider, boxes: list[np.ndarray]) -> None:
    """Refuse an R-CNN extraction that would fill the disk (~15 MB per VOC image)."""
    dim = spp_dim(provider.extractor.spec.channels, provider.spp.levels)
    need = sum(len(b) for b in boxes) * dim * provider.cache.dtype.itemsize
    free = shutil.disk_usage(provider.cache.root).free
    log.info("R-CNN mode caches %.1f GB of window vectors (%.1f GB free)", need / 1e9, free / 1e9)
    if need + DISK_MARGIN > free:
        raise SppdetError(
            f"caching R-CNN window vectors of {len(boxes)} images needs {need / 1e9:.1f} GB "
            f"but {provider.cache.root} has {free / 1e9:.1f} GB free (keeping "
            f"{DISK_MARGIN / 1e9:.0f} GB spare); free space, extract fewer images (--limit) or "
            "pass --no-cache (later stages then recompute the windows, ~5 ms each on a CPU)"
        )
