"""COCO-style box evaluation through ``pycocotools.cocoeval.COCOeval`` (bbox).

For datasets loaded with :func:`sppdet.coco_data.load_coco`: class index ``k`` is the ``k``-th
category in increasing category id (the loader's order), and ``int(image_id)`` is the COCO image
id. Only the images of the dataset are evaluated (so a ``limit``-ed dataset evaluates its subset).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Mapping

import numpy as np

from sppdet.boxes import to_xywh
from sppdet.errors import DataError
from sppdet.storage import atomic_write_json
from sppdet.voc_eval import Detections

log = logging.getLogger(__name__)

#: Name of the COCO results file written beside the comp4 files (``RUN/eval/<name>/``).
COCO_RESULTS = "coco_results.json"

# The 12 numbers of COCOeval.summarize(), in its order.
COCO_STAT_NAMES: tuple[str, ...] = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip


def _category_ids(annotation: dict, classes: tuple[str, ...], source) -> list[int]:
    """Category id of each class index (categories sorted by id, names checked)."""
    cats = sorted(annotation.get("categories", []), key=lambda c: c["id"])
    names = tuple(str(c["name"]) for c in cats)
    if names != tuple(classes):
        raise DataError(f"categories of {source} {list(names)} differ from dataset classes")
    return [int(c["id"]) for c in cats]


def _results(dataset, detections: Mapping[str, Detections], cat_ids: list[int]) -> list[dict]:
    """COCO result dicts (``bbox`` as continuous ``x, y, w, h``)."""
    known = set(dataset.image_ids)
    out = []
    for k, name in enumerate(dataset.classes):
        dets = detections.get(name, Detections.empty())
        bad = [i for i in dets.image_ids.tolist() if i not in known]
        if bad:
            raise DataError(f"{name} detection on image {bad[0]!r}, not in {dataset.name}")
        for image_id, score, box in zip(
            dets.image_ids.tolist(), dets.scores.tolist(), to_xywh(dets.boxes).tolist(), strict=True
        ):
            out.append(
                {"image_id": int(image_id), "category_id": cat_ids[k], "bbox": box, "score": score}
            )
    return out


def evaluate_coco(
    dataset, detections: Mapping[str, Detections], *, verbose: bool = False
) -> dict[str, float]:
    """COCO bbox metrics of ``detections`` (class name -> :class:`Detections`).

    Args:
        dataset: a :class:`sppdet.datasets.Dataset` with ``coco_annotation`` set.
        verbose: let pycocotools print its progress and summary table.

    Returns:
        ``{"AP": ..., "AP50": ..., ..., "ARl": ...}`` (:data:`COCO_STAT_NAMES`; -1 where COCO
        has no ground truth for a size range).

    Raises:
        DataError: the dataset is not from a COCO json, its categories differ, or a detection is
            on an image outside the dataset.
    """
    annotation, cat_ids = _annotation(dataset)
    return _summarize(dataset, annotation, _results(dataset, detections, cat_ids), verbose)


def write_coco_results(
    dataset, detections: Mapping[str, Detections], path: str | os.PathLike
) -> dict[str, float]:
    """Write ``detections`` as a COCO results json (``[{image_id, category_id, bbox: [x, y, w,
    h], score}]``, what ``COCO.loadRes`` reads) and return their COCO metrics, as
    :func:`evaluate_coco` computes them."""
    annotation, cat_ids = _annotation(dataset)
    results = _results(dataset, detections, cat_ids)
    atomic_write_json(path, results)
    return _summarize(dataset, annotation, results, False)


def _annotation(dataset) -> tuple[dict, list[int]]:
    """The COCO json of ``dataset`` and the category id of each class."""
    if dataset.coco_annotation is None:
        raise DataError(f"dataset {dataset.name} was not loaded from a COCO json")
    path = dataset.coco_annotation
    with open(path, encoding="utf-8") as f:
        annotation = json.load(f)
    return annotation, _category_ids(annotation, dataset.classes, path)


def _summarize(dataset, annotation: dict, results: list[dict], verbose: bool) -> dict[str, float]:
    """``COCOeval`` (bbox) of ``results`` on the images of ``dataset``: its 12 numbers."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not results:
        log.warning("no detections to evaluate on %s: every COCO metric is 0", dataset.name)
        return dict.fromkeys(COCO_STAT_NAMES, 0.0)
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        gt = COCO()
        gt.dataset = annotation
        gt.createIndex()
        evaluator = COCOeval(gt, gt.loadRes(results), iouType="bbox")
        evaluator.params.imgIds = [int(i) for i in dataset.image_ids]
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.asarray(evaluator.stats, dtype=np.float64)
    return {name: float(v) for name, v in zip(COCO_STAT_NAMES, stats, strict=True)}
