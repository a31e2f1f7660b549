"""Loading a trained run as a :class:`~sppdet.detect.Detector`, and evaluating it on a split."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict

import numpy as np
from tqdm import tqdm

from sppdet.bbox_reg import BBoxRegressor
from sppdet.comp4 import write_comp4
from sppdet.detect import STAGES, Detector, TestConfig
from sppdet.errors import SppdetError
from sppdet.finetune import load_head
from sppdet.imageio import load_image
from sppdet.proposals import propose
from sppdet.rcnn import RCNNProvider
from sppdet.run import Run
from sppdet.storage import atomic_write_json, git_commit, read_json
from sppdet.train import load_svms
from sppdet.viz import plot_pr_curves
from sppdet.voc_eval import Detections, EvalResult, evaluate_detections

log = logging.getLogger(__name__)


def load_detector(
    run: Run, test: TestConfig | None = None, *, classes: tuple[str, ...] | None = None
) -> Detector:
    """A detector from the run's trained stages and its test config (or ``test``).

    ``classes``: the class names when the caller has them (else read from the training split).
    """
    cfg = run.config.test if test is None else test
    head_path = run.path("finetune", "model.pt")
    need_head = cfg.scorer == "softmax" or (cfg.scorer == "svm" and cfg.layer != "pool5")
    extractor = _extractor_for(run, cfg, need_head)
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
    if classes is None:
        classes = run.dataset().classes if run.config.data.devkit else _classes_from_stats(run)
    return Detector(
        extractor,
        run.config.spp,
        head,
        svms,
        bbox,
        scale,
        classes,
        cfg,
        propose=lambda image: propose(image, run.config.proposals),
    )


def _extractor_for(run: Run, cfg: TestConfig, need_head: bool):
    """The trunk a test variant runs: fine-tuned when its scorer or its box regressors were
    trained on the fine-tuned trunk (``finetune.conv_blocks``), else the frozen one."""
    tuned_bbox = cfg.bbox_reg and run.config.finetune.conv_blocks > 0
    if cfg.scorer == "svm" and cfg.layer == "pool5" and tuned_bbox:
        raise SppdetError(
            "pool5 SVMs score the frozen trunk's vectors but this run's box regressors were "
            "trained on the fine-tuned trunk: evaluate pool5 SVMs without box regression"
        )
    return run.tuned_extractor if (need_head or tuned_bbox) else run.extractor


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


def fast_variants(run: Run) -> dict[str, TestConfig]:
    """The :data:`FAST_VARIANTS` (needs the fc7 SVMs, the head and the box regressors)."""
    base = ablation_variants(run).get("fc7_bb")
    if base is None:
        raise SppdetError(f"the fast-path variants need fc7 SVMs and box regressors in {run.root}")
    exact = dataclasses.replace(base, **EXACT)
    return {name: dataclasses.replace(exact, **ch) for name, ch in FAST_VARIANTS.items()}


def ablation_variants(run: Run) -> dict[str, TestConfig]:
    """The :data:`ABLATIONS` whose trained parts exist in ``run``."""
    have = {
        "svm_pool5": run.path("svm_pool5", "svm.npz").exists(),
        "svm_fc7": run.path("svm_fc7", "svm.npz").exists(),
        "head": run.path("finetune", "model.pt").exists(),
        "bbox": run.path("bbox", "bbox.npz").exists(),
    }
    out = {}
    for name, changes in ABLATIONS.items():
        test = dataclasses.replace(run.config.test, **changes)
        need = ["bbox"] if test.bbox_reg else []
        if test.scorer == "softmax" or (test.scorer == "svm" and test.layer != "pool5"):
            need.append("head")
        if test.scorer == "svm":
            need.append(f"svm_{test.layer}")
        if all(have[n] for n in need):
            out[name] = test
    if not out:
        raise SppdetError(f"nothing trained in {run.root}; run `sppdet train {run.root}`")
    return out


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
    """Detect over ``split`` with the run's test config; see :func:`evaluate_variants`."""
    name = out_name or split
    results = evaluate_variants(
        run, split, {name: run.config.test}, devkit=devkit, limit=limit, progress=progress
    )
    return results[name]


def evaluate_variants(
    run: Run,
    split: str,
    variants: dict[str, TestConfig],
    *,
    devkit: str | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, tuple[EvalResult, dict]]:
    """Detect over ``split`` with each test variant; comp4 files, VOC07 AP, PR curves, timings.

    All variants share one pass over the images: the conv maps, SPP vectors and fc features of
    an image are computed once (each variant's timings still count them); each variant regresses
    its own scored candidates.
    Outputs go to ``RUN/eval/<name>/`` per variant. Conv maps come from the split's cache when
    feature caching is on (computed and stored otherwise); the conv timing is then the cache load
    time, so ``sppdet bench`` measures conv time separately.
    """
    ds = run.dataset(split, devkit=devkit, limit=limit)
    detectors = {
        name: load_detector(run, test, classes=ds.classes) for name, test in variants.items()
    }
    props = run.proposals(ds)
    provider = run.provider(split)
    per_class = {name: defaultdict(list) for name in variants}
    times = {name: defaultdict(float) for name in variants}
    t_start = time.perf_counter()
    for rec in tqdm(ds, desc=f"detect {split}", unit="img", disable=not progress):
        t0 = time.perf_counter()
        size = (rec.height, rec.width)
        detect = _image_detect(provider, rec, size, props.boxes_for(rec.image_id))
        conv = time.perf_counter() - t0
        # one shared memo per trunk: frozen and fine-tuned trunks give different vectors
        shared: dict = defaultdict(dict)
        for name, detector in detectors.items():
            dets = detect(detector, shared[detector.extractor.trunk_id])
            times[name]["conv"] += conv
            for k, v in dets.timings.items():
                times[name][k] += v
            _collect(per_class[name], rec.image_id, dets)
    wall = time.perf_counter() - t_start
    return {
        # the detector's config: "auto" fc dtype resolved to what ran
        name: _finish(
            run, ds, split, name, detectors[name].config, per_class[name], times[name], wall
        )
        for name in variants
    }


def _image_detect(provider, rec, size, boxes):
    """``detect(detector, shared)`` for one image: SPP mode pools its (cached) conv maps,
    R-CNN mode reads its window vectors from the cache or warps them from the image (their
    conv time is counted under "spp")."""
    if isinstance(provider, RCNNProvider):
        # cached vectors when the split was extracted, else warped and convolved here
        loader = lambda: load_image(rec.path)  # noqa: E731
        pool = lambda b: (provider.pool5(rec.image_id, size, loader, b), None)  # noqa: E731
        return lambda det, shared: det.detect_with(pool, size, boxes, shared)
    lower = provider.lower_maps(rec.image_id, size, lambda: load_image(rec.path))
    tops: dict = {}  # the trunk's top blocks run once per image and trunk

    def detect(det, shared):
        ext = det.extractor
        if ext.trunk_id not in tops:
            tops[ext.trunk_id] = [ext.apply_top(m) for m in lower]
        return det.detect_maps(tops[ext.trunk_id], size, boxes, shared)

    return detect


def _collect(per_class: dict, image_id: str, dets) -> None:
    for c in np.unique(dets.labels):
        m = dets.labels == c
        per_class[int(c)].append(
            Detections(np.full(int(m.sum()), image_id), dets.scores[m], dets.boxes[m])
        )


def _finish(run, ds, split, name, test: TestConfig, per_class, times, wall) -> tuple:
    dets_by_name = {c: Detections.concat(per_class.get(k, [])) for k, c in enumerate(ds.classes)}
    out = run.path("eval", name)
    write_comp4(out, split, ds.classes, dets_by_name)
    result = evaluate_detections(ds, dets_by_name)
    plot_pr_curves(result.per_class, out / "pr_curves.png")
    n = max(len(ds), 1)
    timing = {s: times.get(s, 0.0) / n for s in STAGES}
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
        "seconds_per_image": timing,
        "wall_seconds": wall,
        "commit": git_commit(),
    }
    atomic_write_json(out / "eval.json", summary)
    return result, summary
