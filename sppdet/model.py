"""The trained parts of a run: where each lives, how it is loaded, and the detector they make.

Layout (under the run directory)::

    finetune/model.pt   fc head state_dict, its config, and (conv fine-tuning) the tuned top
                        blocks of the trunk ("trunk_top") with "conv_blocks"
    svm_<layer>/svm.npz per-class linear SVMs on pool5 | fc6 | fc7 (with their feature scale)
    bbox/bbox.npz       per-class box regressors (with their feature scale; runs trained before
                        it was stored keep it in bbox/stats.json, read as a fallback)

:func:`load_detector` / :func:`load_detectors` build :class:`~sppdet.detect.Detector` s from
them; detectors built together share the loaded parts (one head, one set of SVMs per layer), so
the evaluation pass computes each shared value once (:func:`sppdet.evaluate.detect_variants`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sppdet.bbox_reg import BBoxRegressor
from sppdet.detect import Detector, TestConfig
from sppdet.errors import SppdetError
from sppdet.features import FeatureExtractor
from sppdet.finetune import FCHead, load_head
from sppdet.proposals import propose
from sppdet.run import Run
from sppdet.storage import read_json
from sppdet.svm import LinearSVMs

HEAD_FILE = ("finetune", "model.pt")
BBOX_FILE = ("bbox", "bbox.npz")
BBOX_STATS_FILE = ("bbox", "stats.json")


def svm_file(layer: str) -> tuple[str, str]:
    """The SVMs of ``layer`` (pool5, fc6 or fc7), relative to the run directory."""
    return (f"svm_{layer}", "svm.npz")


def head_path(run: Run) -> Path:
    return run.path(*HEAD_FILE)


def load_run_head(run: Run) -> FCHead:
    """The fine-tuned fc head on the run's device."""
    path = head_path(run)
    if not path.exists():
        raise SppdetError(f"no fine-tuned model at {path}; run `sppdet train {run.root}`")
    return load_head(path, run.device)


def load_svms(run: Run, layer: str) -> LinearSVMs:
    """The SVMs trained on ``layer`` features."""
    path = run.path(*svm_file(layer))
    if not path.exists():
        raise SppdetError(f"no SVMs at {path}; run `sppdet train-svm {run.root} --layer {layer}`")
    return LinearSVMs.load(path)


def load_bbox(run: Run) -> BBoxRegressor:
    """The box regressors, with their feature scale (from ``bbox/stats.json`` for runs whose
    ``bbox.npz`` predates storing it)."""
    path = run.path(*BBOX_FILE)
    if not path.exists():
        raise SppdetError(f"no box regressors at {path}; run `sppdet train-bbox {run.root}`")
    model = BBoxRegressor.load(path)
    if model.feature_scale is None:
        scale = float(read_json(run.path(*BBOX_STATS_FILE))["feature_scale"])
        model = dataclasses.replace(model, feature_scale=scale)
    return model


def trained_parts(run: Run) -> set[str]:
    """Which parts exist: ``head``, ``bbox`` and ``svm_<layer>`` for each trained layer."""
    have = {"head"} if head_path(run).exists() else set()
    if run.path(*BBOX_FILE).exists():
        have.add("bbox")
    have.update(f"svm_{la}" for la in ("pool5", "fc6", "fc7") if run.path(*svm_file(la)).exists())
    return have


def needed_parts(test: TestConfig) -> list[str]:
    """The parts a test variant needs (see :func:`trained_parts`)."""
    need = ["bbox"] if test.bbox_reg else []
    if uses_head(test):
        need.append("head")
    if test.scorer == "svm":
        need.append(f"svm_{test.layer}")
    return need


def uses_head(test: TestConfig) -> bool:
    """Whether a variant runs the fine-tuned fc layers (softmax, or SVMs on fc6 / fc7)."""
    return test.scorer == "softmax" or (test.scorer == "svm" and test.layer != "pool5")


def extractor_for(run: Run, test: TestConfig) -> FeatureExtractor:
    """The trunk a test variant runs: fine-tuned when its scorer or its box regressors were
    trained on the fine-tuned trunk (``finetune.conv_blocks``), else the frozen one."""
    tuned_bbox = test.bbox_reg and run.config.finetune.conv_blocks > 0
    if test.scorer == "svm" and test.layer == "pool5" and tuned_bbox:
        raise SppdetError(
            "pool5 SVMs score the frozen trunk's vectors but this run's box regressors were "
            "trained on the fine-tuned trunk: evaluate pool5 SVMs without box regression"
        )
    return run.tuned_extractor if (uses_head(test) or tuned_bbox) else run.extractor


def run_classes(run: Run) -> tuple[str, ...]:
    """Class names: the training split's (when the run knows its devkit), else the ones the
    SVMs were trained with."""
    if run.config.data.devkit:
        return run.dataset().classes
    stats = read_json(run.path(f"svm_{run.config.test.layer}", "stats.json"))
    return tuple(stats["classes"])


def load_detector(
    run: Run, test: TestConfig | None = None, *, classes: tuple[str, ...] | None = None
) -> Detector:
    """A detector from the run's trained parts and its test config (or ``test``).

    ``classes``: the class names when the caller has them (else :func:`run_classes`).
    """
    test = run.config.test if test is None else test
    return load_detectors(run, {"": test}, classes=classes)[""]


def load_detectors(
    run: Run, variants: dict[str, TestConfig], *, classes: tuple[str, ...] | None = None
) -> dict[str, Detector]:
    """One detector per test variant; each trained part is loaded once and shared."""
    parts: dict = {}

    def part(key: str, load):
        if key not in parts:
            parts[key] = load()
        return parts[key]

    if classes is None:
        classes = run_classes(run)
    out = {}
    for name, test in variants.items():
        extractor = extractor_for(run, test)  # checks the variant before anything loads
        need = needed_parts(test)
        head = part("head", lambda: load_run_head(run)) if "head" in need else None
        if head is None and head_path(run).exists():
            head = part("head", lambda: load_run_head(run))
        svms = None
        if test.scorer == "svm":
            svms = part(f"svm_{test.layer}", lambda t=test: load_svms(run, t.layer))
        bbox = part("bbox", lambda: load_bbox(run)) if test.bbox_reg else None
        out[name] = Detector(
            extractor,
            run.config.spp,
            head,
            svms,
            bbox,
            bbox.feature_scale if bbox is not None else 1.0,
            classes,
            test,
            propose=_proposer(run),
        )
    return out


def _proposer(run: Run):
    cfg = run.config.proposals
    return lambda image: propose(image, cfg)
