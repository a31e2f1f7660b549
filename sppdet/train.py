"""Training stages over a run: fine-tune -> SVMs -> box regressors (SPEC sections 5-7).

Each stage writes its outputs atomically under the run directory and skips itself when they are
complete; features are streamed one image at a time, never all held at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
import zipfile
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sppdet.bbox_train import BBoxRegTrainer
from sppdet.configutil import to_dict
from sppdet.distributed import SINGLE, Dist
from sppdet.errors import ConfigError, DataError, SppdetError
from sppdet.finetune import finetune
from sppdet.head import LAYERS, FCHead, head_box_regressor, load_head
from sppdet.imageio import load_image
from sppdet.locks import writing
from sppdet.run import Run
from sppdet.run_config import LEGACY_SETTINGS
from sppdet.storage import (
    atomic_save_npz,
    atomic_write_json,
    check_manifest,
    file_sha256,
    read_json,
)
from sppdet.svm import LinearSVMs, classifier_prior, feature_scale_from_samples, softmax_prior
from sppdet.svm_mining import SVMTrainer
from sppdet.windows import label_windows

log = logging.getLogger(__name__)

#: Seconds of mining between checkpoints of the SVM stage (``svm_<layer>/checkpoint.npz``). A
#: frozen pool5 of the default backbone caches ~4 GB of negatives, tens of seconds per write.
SVM_CHECKPOINT_SECONDS = 900.0

#: Images sampled to estimate the mean feature norm (R-CNN rcnn_feature_stats samples 200).
NORM_SAMPLE_IMAGES = 50


def _stage_manifest(run: Run, *sections: str) -> dict:
    c = run.config
    out = {"features": run.extractor.manifest(), "spp": to_dict(c.spp), "data": to_dict(c.data)}
    out.update({s: to_dict(getattr(c, s)) for s in sections})
    return out


_PRODUCTS = {"finetune": "fine-tuned head", "svm": "SVMs", "bbox": "box regressors"}


def _done(
    run: Run, out: Path, section: str, product: str, summary: str, *, bound: bool
) -> dict | None:
    """The training stages' skeleton: check ``out``'s manifest (the run's features and the
    stage's ``section``; with ``bound``, also the fine-tuned model the stage's output is only
    valid for) and return the stage's ``summary`` file when its ``product`` and it exist
    (already trained), else None. Each stage writes its product, then its summary: a stage
    killed between the two has not finished and runs again (from its checkpoint, if any)."""
    manifest = _stage_manifest(run, section)
    if bound:
        manifest["finetune_model"] = _model_id(run)
    check_manifest(out, manifest, LEGACY_SETTINGS)
    if not ((out / product).exists() and (out / summary).exists()):
        return None
    log.info("%s already trained: %s", _PRODUCTS[section], out / product)
    return read_json(out / summary)


def _tuned_trunk(run: Run) -> bool:
    """Whether fine-tuning trains conv blocks: the stages after it then use that trunk."""
    return run.config.features.mode == "spp" and run.config.finetune.conv_blocks > 0


def run_finetune(run: Run, *, progress: bool = True, dist: Dist = SINGLE) -> dict:
    """Fine-tune the fc head (skips if ``finetune/model.pt`` exists for this config); ``dist``:
    each step's images split over its ranks (:func:`~sppdet.finetune.finetune`)."""
    with writing(run.root, "finetune") if dist.main else nullcontext():
        return _run_finetune(run, progress, dist)


def _run_finetune(run: Run, progress: bool, dist: Dist) -> dict:
    out = run.path("finetune")
    if (done := _done(run, out, "finetune", "model.pt", "metrics.json", bound=False)) is not None:
        return done
    ds = run.dataset()
    props = run.proposals(ds, dist=dist)
    return finetune(
        ds.records,
        props,
        run.provider(ds, dist=dist),
        run.config.spp,
        len(ds.classes),
        run.config.finetune,
        out,
        progress=progress,
        dist=dist,
    )


def _model_id(run: Run) -> str:
    path = run.path("finetune", "model.pt")
    if not path.exists():
        raise SppdetError(f"no fine-tuned model at {path}; run `sppdet finetune {run.root}` first")
    return "sha256:" + file_sha256(path)


def _head(run: Run, layer: str) -> FCHead | None:
    if layer == "pool5" and run.config.test.scorer != "softmax":
        return None
    path = run.path("finetune", "model.pt")
    if not path.exists():
        raise SppdetError(f"no fine-tuned model at {path}; run `sppdet finetune {run.root}` first")
    return load_head(path, run.device)


def _image_features(run: Run, provider, rec, boxes, head, layer, flip=False) -> torch.Tensor:
    """``Tensor[N, D]`` features of ``boxes`` of one image at ``layer`` (pool5 = SPP vector)."""
    with torch.inference_mode():
        x = provider.pool5(
            rec.image_id, (rec.height, rec.width), lambda: load_image(rec.path), boxes, flip=flip
        )
        if layer == "pool5" or head is None:
            return x
        return torch.cat([head.embed(c, layer) for c in x.split(run.config.test.fc_batch)])


def _kept(rec, use_difficult: bool) -> np.ndarray:
    """``Array[G]`` bool: the objects used for training. py-faster-rcnn drops difficult
    objects; R-CNN's SVMs keep them (see SVMConfig.use_difficult)."""
    return np.ones(len(rec.difficult), bool) if use_difficult else ~rec.difficult


def _labelled(ds, props, use_difficult: bool = False) -> Iterator:
    for rec in ds:
        keep = _kept(rec, use_difficult)
        lw = label_windows(
            props.boxes_for(rec.image_id), rec.boxes[keep], rec.labels[keep], len(ds.classes)
        )
        yield rec, lw, rec.labels[keep]


def _norm_scale(run, ds, props, provider, head, layer, target: float) -> float:
    rng = np.random.default_rng(0)
    idx = rng.choice(len(ds), min(NORM_SAMPLE_IMAGES, len(ds)), replace=False)
    samples = []
    for i in sorted(idx.tolist()):
        rec = ds.records[i]
        boxes = props.boxes_for(rec.image_id)
        if len(boxes):
            pick = boxes[rng.choice(len(boxes), min(200, len(boxes)), replace=False)]
            samples.append(_image_features(run, provider, rec, pick, head, layer).cpu().numpy())
    if not samples:
        return 1.0
    return feature_scale_from_samples(np.concatenate(samples), target)


def run_train_svm(
    run: Run,
    layer: str = "fc7",
    *,
    progress: bool = True,
    checkpoint_seconds: float = SVM_CHECKPOINT_SECONDS,
) -> dict:
    """Per-class linear SVMs with hard-negative mining on ``layer`` features (SPEC section 6).

    Mining saves its state to ``svm_<layer>/checkpoint.npz`` after the positives and then every
    ``checkpoint_seconds``; a rerun resumes from it (the same SVMs as an uninterrupted run)."""
    if layer not in LAYERS:
        raise SppdetError(f"unknown layer {layer!r}; use one of {', '.join(LAYERS)}")
    prior = run.config.svm.prior
    if prior != "none" and layer != "fc7":  # the classifier reads fc7
        raise ConfigError(f"svm.prior: {prior} adapts fc7 SVMs; --layer {layer} has none")
    with writing(run.root, f"svm_{layer}"):
        return _run_train_svm(run, layer, progress, checkpoint_seconds)


def _run_train_svm(run: Run, layer: str, progress: bool, checkpoint_seconds: float) -> dict:
    out = run.path(f"svm_{layer}")
    finetuned = layer != "pool5"  # fc SVMs are only valid for the fc weights they saw
    if (done := _done(run, out, "svm", "svm.npz", "stats.json", bound=finetuned)) is not None:
        return done
    t0 = time.perf_counter()
    ds = run.dataset()
    props = run.proposals(ds)
    provider = run.provider(ds, tuned=finetuned)
    head = _head(run, layer) if finetuned else None
    ckpt = out / "checkpoint.npz"
    trainer, before = _resume_svm(ckpt, run.config.svm, len(ds))
    if trainer is None:
        scale = _norm_scale(run, ds, props, provider, head, layer, run.config.svm.target_norm)
        trainer = _svm_with_positives(run, ds, props, provider, head, layer, scale, progress)
        _save_svm_checkpoint(ckpt, trainer, time.perf_counter() - t0)
    scale, saved = trainer.feature_scale, time.perf_counter()
    mined = itertools.islice(
        _labelled(ds, props, run.config.svm.use_difficult), trainer.images, None
    )
    for rec, lw, _ in tqdm(
        mined, total=len(ds), initial=trainer.images, desc=f"svm {layer}", disable=not progress
    ):
        x = _image_features(run, provider, rec, lw.boxes, head, layer).cpu().numpy() * scale
        # Positives are all in already; GT rows here only serve as other classes' negatives.
        no_gt = np.zeros(len(lw.boxes), dtype=bool)
        trainer.add_image(x, no_gt, np.full(len(lw.boxes), -1), lw.class_iou, lw.boxes)
        if time.perf_counter() - saved >= checkpoint_seconds and trainer.images < len(ds):
            _save_svm_checkpoint(ckpt, trainer, before + time.perf_counter() - t0)
            saved = time.perf_counter()
    svms = trainer.finish()
    stats = trainer.stats()
    svms.save(out / "svm.npz")
    summary = {
        "layer": layer,
        "feature_scale": scale,
        "seconds": before + time.perf_counter() - t0,
        "classes": dict(zip(ds.classes, stats, strict=True)),
    }
    atomic_write_json(out / "stats.json", summary)
    ckpt.unlink(missing_ok=True)
    return summary


def _save_svm_checkpoint(path: Path, trainer: SVMTrainer, seconds: float) -> None:
    atomic_save_npz(path, seconds=np.float64(seconds), **trainer.state())
    log.info("svm: checkpoint after %d images: %s", trainer.images, path)


def _resume_svm(path: Path, config, num_images: int) -> tuple[SVMTrainer | None, float]:
    """The trainer saved in ``path`` and the seconds it had run, or ``(None, 0.0)``."""
    if not path.exists():
        return None, 0.0
    try:
        with np.load(path, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
        trainer = SVMTrainer.from_state(state, config)
        seconds = float(state["seconds"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, DataError) as exc:
        raise DataError(f"cannot resume from {path} ({exc}); delete it to start over") from exc
    if trainer.images > num_images:
        raise DataError(f"{path} has mined {trainer.images} images of {num_images}; delete it")
    log.info("svm: resuming after %d of %d images from %s", trainer.images, num_images, path)
    return trainer, seconds


def _svm_with_positives(run: Run, ds, props, provider, head, layer, scale, progress) -> SVMTrainer:
    """An :class:`SVMTrainer` holding every positive: the non-difficult GT boxes of all images
    (and, with ``svm.pos_iou``, the proposals that overlap one of them that much).

    R-CNN (``rcnn_train.m``) gathers all positives before mining negatives, so even the first
    retrain of a class sees all its positives; accumulating them image by image would make the
    early models (which pick the hard negatives) from a handful of positives.
    """
    cfg = run.config.svm
    xs, ys = [], []
    for rec in tqdm(ds, desc=f"svm {layer} positives", disable=not progress):
        boxes, labels = _positive_windows(rec, props, cfg, len(ds.classes))
        if len(boxes):
            x = _image_features(run, provider, rec, boxes, head, layer)
            xs.append(x.cpu().numpy() * scale)
            ys.append(labels)
    if not xs:
        raise SppdetError("no non-difficult ground-truth boxes in the training images")
    prior = None
    if cfg.prior != "none":
        w, b = head.cls.weight.detach().cpu().numpy(), head.cls.bias.detach().cpu().numpy()
        prior = (classifier_prior if cfg.prior == "classifier" else softmax_prior)(w, b, scale)
    trainer = SVMTrainer(len(ds.classes), xs[0].shape[1], cfg, feature_scale=scale, prior=prior)
    trainer.add_positives(np.concatenate(xs), np.concatenate(ys))
    return trainer


def _positive_windows(rec, props, cfg, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``Array[P, 4]`` positive windows of one image and ``Array[P]`` their classes: the kept GT
    boxes, then (``cfg.pos_iou``) each proposal whose best same-class IoU reaches it, labelled
    with that class (a window over two classes' objects goes to the one it overlaps most)."""
    keep = _kept(rec, cfg.use_difficult)
    gt, gt_labels = rec.boxes[keep], rec.labels[keep]
    if cfg.pos_iou is None or not len(gt):
        return gt, gt_labels
    lw = label_windows(props.boxes_for(rec.image_id), gt, gt_labels, num_classes, include_gt=False)
    best = lw.class_iou.argmax(axis=1)
    hit = lw.class_iou[np.arange(len(best)), best] >= cfg.pos_iou
    boxes = np.concatenate([gt, lw.boxes[hit]]).astype(np.float32)
    return boxes, np.concatenate([gt_labels, best[hit]]).astype(np.int64)


def run_train_bbox(run: Run, *, progress: bool = True) -> dict:
    """Per-class ridge regressors from SPP (pool5) vectors, or with ``bbox.layer`` fc6 / fc7 of
    the fine-tuned head, to R-CNN deltas (SPEC section 7)."""
    with writing(run.root, "bbox"):
        return _run_train_bbox(run, progress)


def _run_train_bbox(run: Run, progress: bool) -> dict:
    out = run.path("bbox")
    cfg = run.config.bbox
    tuned = _tuned_trunk(run)  # pool5 of a fine-tuned trunk: valid for its conv weights only
    # fc features exist only for the fine-tuned head they came from
    bound = tuned or cfg.layer != "pool5" or cfg.method == "finetuned"
    if (done := _done(run, out, "bbox", "bbox.npz", "stats.json", bound=bound)) is not None:
        return done
    t0 = time.perf_counter()
    if cfg.method == "finetuned":
        model = head_box_regressor(_head(run, "fc7"))
        model.save(out / "bbox.npz")
        summary = {"feature_scale": 1.0, "seconds": time.perf_counter() - t0, "config": asdict(cfg)}
        atomic_write_json(out / "stats.json", summary)
        return summary
    ds = run.dataset()
    props = run.proposals(ds)
    provider = run.provider(ds, tuned=tuned)
    head = _head(run, cfg.layer) if cfg.layer != "pool5" else None
    scale = _norm_scale(run, ds, props, provider, head, cfg.layer, run.config.svm.target_norm)
    trainer = None
    for rec, lw, labels in tqdm(
        _labelled(ds, props), total=len(ds), desc="bbox", disable=not progress
    ):
        sel = np.flatnonzero((lw.max_iou >= cfg.min_iou) & (lw.gt_index >= 0))
        if len(sel) == 0:
            continue
        x = _image_features(run, provider, rec, lw.boxes[sel], head, cfg.layer).cpu().numpy()
        if trainer is None:
            # rows in temporary files: pool5 reservoirs are gigabytes (sppdet.bbox_train.FileRows)
            trainer = BBoxRegTrainer(len(ds.classes), x.shape[1], cfg, spill_dir=out)
        gt = rec.boxes[~rec.difficult][lw.gt_index[sel]]
        trainer.add(x * scale, lw.boxes[sel], gt, labels[lw.gt_index[sel]])
    if trainer is None:
        raise SppdetError("no training windows overlap a ground truth box")
    # the scale goes into the regressors' own file: test time needs nothing else
    model = dataclasses.replace(trainer.fit(), feature_scale=scale, layer=cfg.layer)
    trainer.close()
    model.save(out / "bbox.npz")
    summary = {"feature_scale": scale, "seconds": time.perf_counter() - t0, "config": asdict(cfg)}
    atomic_write_json(out / "stats.json", summary)
    return summary


def run_train(
    run: Run, *, layer: str = "fc7", svm: bool | None = None, progress: bool = True
) -> dict:
    """finetune -> train-svm -> train-bbox, each skipped when already complete.

    ``svm``: train the SVMs (True), or not (False); None trains them when the run's scorer
    uses them (``test.scorer: svm``): a softmax-scored run (``configs/small_data.yaml``) needs
    only the fine-tuned head and the box regressors (``eval --ablations`` scores the SVM rows
    of runs that have SVMs)."""
    if svm is None:
        svm = run.config.test.scorer == "svm"
    stages = [("finetune", lambda: run_finetune(run, progress=progress))]
    if svm:
        stages.append(("svm", lambda: run_train_svm(run, layer, progress=progress)))
    stages.append(("bbox", lambda: run_train_bbox(run, progress=progress)))
    timings = {}
    for name, fn in stages:
        t0 = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - t0
    return timings


def load_svms(run: Run, layer: str) -> LinearSVMs:
    path = run.path(f"svm_{layer}", "svm.npz")
    if not path.exists():
        raise SppdetError(f"no SVMs at {path}; run `sppdet train-svm {run.root} --layer {layer}`")
    return LinearSVMs.load(path)
