"""Loading a trained run as a :class:`~sppdet.detect.Detector`, and evaluating it on a split."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from sppdet.bbox_reg import BBoxRegressor
from sppdet.detect import STAGES, Detector
from sppdet.errors import SppdetError
from sppdet.finetune import load_head
from sppdet.imageio import load_image
from sppdet.proposals import propose
from sppdet.run import Run
from sppdet.storage import atomic_write_json, git_commit, read_json
from sppdet.train import load_svms
from sppdet.viz import plot_pr_curves
from sppdet.voc_eval import Detections, EvalResult, evaluate_detections, write_comp4

log = logging.getLogger(__name__)


def load_detector(run: Run) -> Detector:
    """A detector from the run's trained stages and its test config."""
    cfg = run.config.test
    head_path = run.path("finetune", "model.pt")
    need_head = cfg.scorer == "softmax" or cfg.layer != "pool5"
    if need_head and not head_path.exists():
        raise SppdetError(f"no fine-tuned model at {head_path}; run `sppdet train {run.root}`")
    head = load_head(head_path, run.device) if head_path.exists() else None
    svms = load_svms(run, cfg.layer) if cfg.scorer == "svm" else None
    bbox, scale = None, 1.0
    if cfg.bbox_reg:
        path = run.path("bbox", "bbox.npz")
        if not path.exists():
            raise SppdetError(f"no box regressors at {path}; run `sppdet train-bbox {run.root}`")
        bbox = BBoxRegressor.load(path)
        scale = float(read_json(run.path("bbox", "stats.json"))["feature_scale"])
    classes = run.dataset().classes if run.config.data.devkit else _classes_from_stats(run)
    return Detector(
        run.extractor,
        run.config.spp,
        head,
        svms,
        bbox,
        scale,
        classes,
        cfg,
        propose=lambda image: propose(image, run.config.proposals),
    )


def _classes_from_stats(run: Run) -> tuple[str, ...]:
    stats = read_json(run.path(f"svm_{run.config.test.layer}", "stats.json"))
    return tuple(stats["classes"])


def evaluate_run(
    run: Run,
    split: str,
    *,
    devkit: str | None = None,
    limit: int | None = None,
    out_name: str | None = None,
    progress: bool = True,
) -> tuple[EvalResult, dict]:
    """Detect over ``split``, write comp4 files, VOC07 AP, PR curves and per-stage timings.

    Outputs go to ``RUN/eval/<out_name or split>/``. Conv maps come from the split's cache when
    feature caching is on (computed and stored otherwise); the conv timing is then the cache
    load time, so the benchmark stage measures conv time separately.
    """
    ds = run.dataset(split, devkit=devkit, limit=limit)
    detector = load_detector(run)
    props = run.proposals(ds)
    provider = run.provider(split)
    per_class: dict[int, list[Detections]] = defaultdict(list)
    times: dict[str, float] = defaultdict(float)
    t_start = time.perf_counter()
    for rec in tqdm(ds, desc=f"detect {split}", unit="img", disable=not progress):
        t0 = time.perf_counter()
        size = (rec.height, rec.width)
        maps = provider.maps(rec.image_id, size, lambda r=rec: load_image(r.path))
        times["conv"] += time.perf_counter() - t0
        dets = detector.detect_maps(maps, size, props.boxes_for(rec.image_id))
        for k, v in dets.timings.items():
            times[k] += v
        for c in np.unique(dets.labels):
            m = dets.labels == c
            per_class[int(c)].append(
                Detections(np.full(int(m.sum()), rec.image_id), dets.scores[m], dets.boxes[m])
            )
    wall = time.perf_counter() - t_start
    dets_by_name = {
        name: Detections.concat(per_class.get(k, [])) for k, name in enumerate(ds.classes)
    }
    out = run.path("eval", out_name or split)
    write_comp4(out, split, ds.classes, dets_by_name)
    result = evaluate_detections(ds, dets_by_name)
    plot_pr_curves(result.per_class, out / "pr_curves.png")
    n = max(len(ds), 1)
    timing = {s: times.get(s, 0.0) / n for s in STAGES}
    summary = {
        **result.to_json(),
        "split": split,
        "images": len(ds),
        "scorer": run.config.test.scorer,
        "layer": run.config.test.layer,
        "bbox_reg": run.config.test.bbox_reg,
        "seconds_per_image": timing,
        "wall_seconds": wall,
        "commit": git_commit(),
    }
    atomic_write_json(out / "eval.json", summary)
    return result, summary
