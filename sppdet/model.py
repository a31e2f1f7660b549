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
from sppdet.head import FCHead, load_head
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


class RunParts:
    """The trained parts of a run directory, read on demand (what :func:`load_detectors`
    needs; :class:`sppdet.model_file.ModelFile` offers the same from one exported file)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        c = run.config
        self.device, self.spp, self.proposals, self.test = run.device, c.spp, c.proposals, c.test
        self.conv_blocks = c.finetune.conv_blocks

    @property
    def extractor(self) -> FeatureExtractor:
        return self.run.extractor

    @property
    def tuned_extractor(self) -> FeatureExtractor:
        return self.run.tuned_extractor

    def classes(self) -> tuple[str, ...]:
        return run_classes(self.run)

    def have(self) -> set[str]:
        return trained_parts(self.run)

    def head(self) -> FCHead | None:
        return load_run_head(self.run) if head_path(self.run).exists() else None

    def require_head(self) -> FCHead:
        return load_run_head(self.run)

    def svms(self, layer: str) -> LinearSVMs:
        return load_svms(self.run, layer)

    def bbox(self) -> BBoxRegressor:
        return load_bbox(self.run)


def extractor_for(parts, test: TestConfig) -> FeatureExtractor:
    """The trunk a test variant runs: fine-tuned when its scorer or its box regressors were
    trained on the fine-tuned trunk (``finetune.conv_blocks``), else the frozen one.

    ``parts``: a :class:`RunParts` or a :class:`~sppdet.model_file.ModelFile`.
    """
    tuned_bbox = test.bbox_reg and parts.conv_blocks > 0
    if test.scorer == "svm" and test.layer == "pool5" and tuned_bbox:
        raise SppdetError(
            "pool5 SVMs score the frozen trunk's vectors but this run's box regressors were "
            "trained on the fine-tuned trunk: evaluate pool5 SVMs without box regression"
        )
    return parts.tuned_extractor if (uses_head(test) or tuned_bbox) else parts.extractor


def run_classes(run: Run) -> tuple[str, ...]:
    """Class names: the training split's (when the run knows its data), else the ones the
    SVMs were trained with."""
    if run.config.data.devkit or run.config.data.coco:
        return run.dataset().classes
    stats = read_json(run.path(f"svm_{run.config.test.layer}", "stats.json"))
    return tuple(stats["classes"])


def load_detector(
    source, test: TestConfig | None = None, *, classes: tuple[str, ...] | None = None
) -> Detector:
    """A detector from a run's trained parts (or a model file's) and its test config (or
    ``test``).

    Args:
        source: a :class:`~sppdet.run.Run` or a :class:`~sppdet.model_file.ModelFile`.
        classes: the class names when the caller has them (else the run's / the file's).
    """
    parts = RunParts(source) if isinstance(source, Run) else source
    test = parts.test if test is None else test
    return load_detectors(parts, {"": test}, classes=classes)[""]


def load_detectors(
    source, variants: dict[str, TestConfig], *, classes: tuple[str, ...] | None = None
) -> dict[str, Detector]:
    """One detector per test variant of a run or model file (as :func:`load_detector`); each
    trained part is loaded once and shared between them."""
    parts = RunParts(source) if isinstance(source, Run) else source
    loaded: dict = {}

    def part(key: str, load):
        if key not in loaded:
            loaded[key] = load()
        return loaded[key]

    if classes is None:
        classes = parts.classes()
    out = {}
    for name, test in variants.items():
        extractor = extractor_for(parts, test)  # checks the variant before anything loads
        head = part("head", parts.head)
        if head is None and uses_head(test):
            parts.require_head()  # raises, saying where the head should be
        svms = None
        if test.scorer == "svm":
            svms = part(f"svm_{test.layer}", lambda t=test: parts.svms(t.layer))
        bbox = part("bbox", parts.bbox) if test.bbox_reg else None
        if bbox is not None and bbox.layer != "pool5" and head is None:
            parts.require_head()  # regressors of an fc layer run the head, too
        out[name] = Detector(
            extractor,
            parts.spp,
            head,
            svms,
            bbox,
            bbox.feature_scale if bbox is not None else 1.0,
            classes,
            test,
            propose=_proposer(parts.proposals),
        )
    return out


def _proposer(cfg):
    return lambda image: propose(image, cfg)
