"""Evaluating a trained run on a split: every test variant in one pass over the images.

:func:`detect_variants` is that pass for one image: pool5 of the distinct windows once per trunk,
fc features once per head, scores once per scorer, then each variant selects, regresses and
suppresses its own candidates. The trained parts and the detectors come from
:mod:`sppdet.model` (``load_detector`` is re-exported here for older callers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping

import numpy as np
import torch
from tqdm import tqdm

from sppdet.coco_eval import COCO_RESULTS, write_coco_results
from sppdet.comp4 import write_comp4
from sppdet.data_source import DataSource
from sppdet.detect import (
    STAGES,
    Detections,
    Detector,
    PoolFn,
    TestConfig,
    expand_rows,
    prepare_windows,
)
from sppdet.distributed import SINGLE, Dist, unshard
from sppdet.errors import SppdetError
from sppdet.eval_blocks import BLOCK, EvalBlocks, blocks_key
from sppdet.imageio import load_image
from sppdet.locks import writing
from sppdet.model import RunParts, load_detector, load_detectors, needed_parts
from sppdet.run import Run
from sppdet.storage import atomic_write_json, git_commit
from sppdet.timing import PROFILER_LABELS, StageTimer, synchronize
from sppdet.viz import plot_pr_curves
from sppdet.voc_eval import Detections as ClassDetections
from sppdet.voc_eval import EvalResult, evaluate_detections

__all__ = [
    "ABLATIONS",
    "FAST_VARIANTS",
    "ablation_variants",
    "detect_variants",
    "evaluate_run",
    "evaluate_variants",
    "fast_variants",
    "load_detector",
    "vote_variants",
]

log = logging.getLogger(__name__)


#: The paper's ablation rows (table 10) plus the fine-tuned softmax (Fast R-CNN): name -> test
#: settings over the run's defaults. "pool5" is the SVM on SPP vectors without fine-tuning.
ABLATIONS: dict[str, dict] = {
    "pool5": {"scorer": "svm", "layer": "pool5", "bbox_reg": False},
    "fc7": {"scorer": "svm", "layer": "fc7", "bbox_reg": False},
    "fc7_bb": {"scorer": "svm", "layer": "fc7", "bbox_reg": True},
    "softmax": {"scorer": "softmax", "bbox_reg": False},
    "softmax_bb": {"scorer": "softmax", "bbox_reg": True},
    "random": {"scorer": "random", "bbox_reg": False},  # chance: same proposals, random scores
}


#: Speed settings of the test path (issue 7), each one change to the exact ``fc7_bb`` row
#: (``fc7_bb_exact``: float32 fc, dedup on, no SVD, whatever the run's test defaults): their
#: mAP cost is measured in the same pass over the images (``eval --ablations --fast-path``).
#: Fast R-CNN's ranks were fc6 1024 / fc7 256 for VGG16's 4096-wide fc layers.
EXACT: dict = {"dedup": True, "svd_fc6": 0, "svd_fc7": 0, "fc_dtype": "float32"}
FAST_VARIANTS: dict[str, dict] = {
    "fc7_bb_exact": {},
    "fc7_bb_nodedup": {"dedup": False},
    "fc7_bb_svd1024_256": {"svd_fc6": 1024, "svd_fc7": 256},
    "fc7_bb_svd512_128": {"svd_fc6": 512, "svd_fc7": 128},
    "fc7_bb_svd256_64": {"svd_fc6": 256, "svd_fc7": 64},
    "fc7_bb_bf16": {"fc_dtype": "bfloat16"},
    "fc7_bb_svd512_128_bf16": {"svd_fc6": 512, "svd_fc7": 128, "fc_dtype": "bfloat16"},
    "fc7_bb_int8": {"fc_dtype": "int8"},
}


def fast_variants(source) -> dict[str, TestConfig]:
    """The :data:`FAST_VARIANTS` (needs the fc7 SVMs, the head and the box regressors)."""
    base = ablation_variants(source).get("fc7_bb")
    if base is None:
        raise SppdetError("the fast-path variants need fc7 SVMs and box regressors")
    exact = dataclasses.replace(base, **EXACT)
    return {name: dataclasses.replace(exact, **ch) for name, ch in FAST_VARIANTS.items()}


def vote_variants(source, iou: float) -> dict[str, TestConfig]:
    """Each scored :data:`ABLATIONS` row again with box voting at ``iou``, as ``<row>_vote``
    (``eval --ablations --box-vote IOU``): the same scores in the same pass, other boxes."""
    rows = ablation_variants(source)
    return {
        f"{name}_vote": dataclasses.replace(test, box_vote_iou=iou)
        for name, test in rows.items()
        if name not in ("pool5", "random")
    }


def ablation_variants(source) -> dict[str, TestConfig]:
    """The :data:`ABLATIONS` whose trained parts exist in ``source`` (a run, or a model file's
    :class:`~sppdet.model_file.ModelFile`), over its test settings."""
    parts = RunParts(source) if isinstance(source, Run) else source
    have = parts.have()
    out = {}
    for name, changes in ABLATIONS.items():
        test = dataclasses.replace(parts.test, **changes)
        if all(n in have for n in needed_parts(test)):
            out[name] = test
    if not out:
        where = source.root if isinstance(source, Run) else source.path
        raise SppdetError(f"nothing trained in {where}; run `sppdet train RUN`")
    return out


def evaluate_run(
    run: Run,
    split: str,
    *,
    data: DataSource | str | None = None,
    limit: int | None = None,
    out_name: str | None = None,
    progress: bool = True,
    source=None,
    cache_maps: bool = True,
    dist: Dist = SINGLE,
) -> tuple[EvalResult, dict] | None:
    """Detect over ``split`` with the run's test config; see :func:`evaluate_variants` (None on
    the ranks other than 0)."""
    name = out_name or split
    results = evaluate_variants(
        run,
        split,
        {name: run.config.test},
        data=data,
        limit=limit,
        progress=progress,
        source=source,
        cache_maps=cache_maps,
        dist=dist,
    )
    return results.get(name)


def evaluate_variants(
    run: Run,
    split: str,
    variants: dict[str, TestConfig],
    *,
    data: DataSource | str | None = None,
    limit: int | None = None,
    progress: bool = True,
    source=None,
    cache_maps: bool = True,
    dist: Dist = SINGLE,
) -> dict[str, tuple[EvalResult, dict]]:
    """Detect over ``split`` with each test variant; comp4 files, VOC07 AP, PR curves, timings.

    All variants share one pass over the images (:func:`detect_variants`); each variant's
    seconds per stage count the shared values it used, as if it had run alone.
    Outputs go to ``RUN/eval/<name>/`` per variant. Conv maps come from the split's cache when
    feature caching is on (computed and stored otherwise); the conv timing is then the cache load
    time, so ``sppdet bench`` measures conv time separately. ``cache_maps=False`` reads and
    stores no map of the split (every map computed from the pixels, conv time included): for
    disks that cannot hold them (5-scale maps of a 320-channel tap: about 11 MB per image).

    ``source``: where the trained parts come from (default: ``run`` itself; a
    :class:`~sppdet.model_file.ModelFile` with the run of :func:`~sppdet.model_file.model_run`).

    ``dist``: the images are sharded over its ranks (:mod:`sppdet.distributed`); rank 0 gathers
    the detections in image order and writes the outputs (the others return ``{}``).
    """
    with contextlib.ExitStack() as stack:
        for name in variants if dist.main else ():  # one writer of each RUN/eval/<name>
            stack.enter_context(writing(run.root, f"eval-{name}"))
        return _evaluate(
            run, split, variants, data, limit, progress and dist.main, source, cache_maps, dist
        )


def _evaluate(run, split, variants, data, limit, progress, source, cache_maps, dist) -> dict:
    ds = run.dataset(split, data=data, limit=limit)
    detectors = load_detectors(run if source is None else source, variants, classes=ds.classes)
    props = run.proposals(ds, dist=dist)
    provider = run.provider(ds, cache=cache_maps, dist=dist)
    timers = {name: StageTimer(run.device) for name in variants}
    records = dist.shard(ds.records)
    key = blocks_key(run, split, records, props, detectors, source, cache_maps, dist)
    blocks = EvalBlocks(run.path("eval", ".blocks"), key, list(variants), dist.rank)
    if blocks.saved():
        log.info("eval: resuming, %d block(s) of %d images already detected", blocks.saved(), BLOCK)
    mine, wall = [], 0.0  # this rank's images' detections ({variant: Detections} each), seconds
    bar = tqdm(total=len(records), desc=f"detect {split}", unit="img", disable=not progress)
    for b, start in enumerate(range(0, len(records), BLOCK)):
        chunk = records[start : start + BLOCK]
        done = blocks.load(b, len(chunk))
        if done is None:
            done = _detect_block(chunk, provider, props, detectors, timers, bar)
            blocks.save(b, *done)
        else:
            _add_seconds(timers, done[1])
            bar.update(len(chunk))
        mine.extend(done[0])
        wall += done[2]
    bar.close()
    wall = max(dist.gather(wall))
    every = unshard(dist.gather(mine))
    rank_seconds = dist.gather({name: dict(t.seconds) for name, t in timers.items()})
    if not dist.main:
        return {}
    for other in rank_seconds[1:]:  # per-image seconds over every rank's images
        _add_seconds(timers, other)
    per_class = {name: defaultdict(list) for name in variants}
    for rec, dets in zip(ds, every, strict=True):
        for name, d in dets.items():
            _collect(per_class[name], rec.image_id, d)
    # where conv maps came from: what the "conv" seconds per image measure
    maps = "cache" if cache_maps and run.config.features.cache else "computed"
    out = {
        # the detector's config: "auto" fc dtype resolved to what ran
        name: _finish(
            run, ds, split, name, detectors[name].config, per_class[name], timers[name], wall, maps
        )
        for name in variants
    }
    blocks.remove()  # every output is written: the saved detections are not needed any more
    return out


def _add_seconds(timers: Mapping[str, StageTimer], seconds: Mapping[str, Mapping]) -> None:
    """Charge each variant's timer with seconds per stage measured elsewhere (another rank, or
    a saved block)."""
    for name, per_stage in seconds.items():
        for stage, sec in per_stage.items():
            timers[name].seconds[stage] += sec


def _detect_block(chunk, provider, props, detectors, timers, bar) -> tuple[list, dict, float]:
    """Detections of ``chunk``'s images, each variant's seconds per stage, wall seconds."""
    before = {name: dict(t.seconds) for name, t in timers.items()}
    t0 = time.perf_counter()
    dets = []
    for rec in chunk:
        size = (rec.height, rec.width)
        pool_for = _image_pools(provider, rec, size, detectors, timers)
        dets.append(
            detect_variants(detectors, size, props.boxes_for(rec.image_id), pool_for, timers)
        )
        bar.update(1)
    seconds = {
        name: {k: v - before[name].get(k, 0.0) for k, v in t.seconds.items()}
        for name, t in timers.items()
    }
    return dets, seconds, time.perf_counter() - t0


class _Shared:
    """The values of one image that several variants use: each is computed once, and every
    variant that uses it is charged the seconds it took."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._values: dict = {}

    def get(self, key: tuple, stage: str, timer: StageTimer | None, compute: Callable):
        if key not in self._values:
            t0 = time.perf_counter()
            value = compute()
            synchronize(self.device)
            self._values[key] = (value, time.perf_counter() - t0)
        value, seconds = self._values[key]
        if timer is not None:
            timer.record(stage, seconds)
        return value


@torch.inference_mode()
def detect_variants(
    detectors: Mapping[str, Detector],
    size: tuple[int, int],
    proposals: np.ndarray,
    pool_for: Callable[[Detector], PoolFn],
    timers: Mapping[str, StageTimer] | None = None,
) -> dict[str, Detections]:
    """Every variant's detections of one image, each shared value computed once.

    The same as ``detectors[name].detect_with(pool_for(detector), size, proposals)`` for each
    variant (tests/test_evaluate.py checks it), but the windows are prepared once, pool5 is
    pooled once per (trunk, dedup) (:attr:`~sppdet.detect.Detector.extractor`'s ``trunk_id``),
    fc features once per (pool5, :attr:`~sppdet.detect.Detector.fc_key`) and class scores once
    per (pool5, :attr:`~sppdet.detect.Detector.score_key`); random scores, candidates, box
    regression and NMS are each variant's own.

    Args:
        detectors: name -> detector; detectors that should share fc work must share their
            trained head object (:func:`sppdet.model.load_detectors` does).
        size: ``(H, W)`` of the image.
        proposals: ``Array[N, 4]`` internal xyxy.
        pool_for: the window featuriser of a detector's trunk (:data:`~sppdet.detect.PoolFn`).
        timers: name -> :class:`~sppdet.timing.StageTimer` charged with that variant's seconds.
    """
    shared = _Shared(next(iter(detectors.values())).device) if detectors else None
    out = {}
    for name, det in detectors.items():
        timer = timers[name] if timers is not None else None
        out[name] = _detect_shared(det, shared, size, proposals, pool_for, timer)
    return out


def _detect_shared(det: Detector, shared: _Shared, size, proposals, pool_for, timer):
    """One variant of :func:`detect_variants`: :meth:`Detector.detect_with`'s steps, reading
    the values other variants share from ``shared``."""
    boxes = shared.get(("windows",), "proposals", timer, lambda: prepare_windows(proposals, size))
    if len(boxes) == 0:
        return Detections.empty()
    key = ("pool5", det.extractor.trunk_id, det.config.dedup)
    pool5, inverse = shared.get(key, "spp", timer, lambda: pool_for(det)(boxes))
    hook = timer if timer is not None else PROFILER_LABELS
    if det.config.scorer == "random":
        with hook("fc"):
            scores = det.random_scores(boxes)
    else:
        layer = det.score_layer
        x = pool5
        if layer != "pool5":
            x = shared.get((key, det.fc_key, layer), "fc", timer, lambda: det.embed(pool5, layer))
        s = shared.get((key, det.score_key), det.score_stage, timer, lambda: det.score_features(x))
        scores = expand_rows(s, inverse)
    return det.finish(boxes, scores, pool5, inverse, size, hook)


def _image_pools(provider, rec, size, detectors, timers) -> Callable[[Detector], PoolFn]:
    """``pool_for(detector)`` for one dataset image: its window features read once (SPP: the
    cached maps below the top blocks; R-CNN: nothing until pooled), each trunk's own conv work
    once (SPP: its top blocks), their seconds charged as "conv" to the variants of that trunk.
    (R-CNN mode's conv passes happen when pooling: counted under "spp".)"""
    t0 = time.perf_counter()
    windows = provider.image(rec.image_id, size, lambda: load_image(rec.path))
    conv = time.perf_counter() - t0
    trunks: dict[str, float] = {}  # trunk_id -> seconds of its own conv work
    for name, det in detectors.items():
        ext = det.extractor
        if ext.trunk_id not in trunks:
            t0 = time.perf_counter()
            windows.prepare(ext)
            synchronize(ext.device)
            trunks[ext.trunk_id] = time.perf_counter() - t0
        timers[name].record("conv", conv + trunks[ext.trunk_id])
    return lambda det: det.pool_fn(windows)


def _collect(per_class: dict, image_id: str, dets) -> None:
    for c in np.unique(dets.labels):
        m = dets.labels == c
        per_class[int(c)].append(
            ClassDetections(np.full(int(m.sum()), image_id), dets.scores[m], dets.boxes[m])
        )


def _finish(run, ds, split, name, test: TestConfig, per_class, timer, wall, maps) -> tuple:
    dets_by_name = {
        c: ClassDetections.concat(per_class.get(k, [])) for k, c in enumerate(ds.classes)
    }
    out = run.path("eval", name)
    write_comp4(out, split, ds.classes, dets_by_name)
    result = evaluate_detections(ds, dets_by_name)
    plot_pr_curves(result.per_class, out / "pr_curves.png")
    coco = {}
    if ds.coco_annotation is not None:  # COCO data: its metrics and a results file too
        coco = {"coco": write_coco_results(ds, dets_by_name, out / COCO_RESULTS)}
    n = max(len(ds), 1)
    timing = {s: timer.seconds.get(s, 0.0) / n for s in STAGES}
    summary = {
        **result.to_json(),
        "split": split,
        "images": len(ds),
        "variant": name,
        "scorer": test.scorer,
        "layer": test.layer,
        "bbox_reg": test.bbox_reg,
        "fc_dtype": test.fc_dtype,
        "conv_dtype": run.config.features.conv_dtype,
        "conv_maps": maps,
        **coco,
        "seconds_per_image": timing,
        "wall_seconds": wall,
        "commit": git_commit(),
    }
    atomic_write_json(out / "eval.json", summary)
    return result, summary
