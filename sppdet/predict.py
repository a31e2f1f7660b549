"""``sppdet detect``: a trained run or model file applied to image files, with drawings and JSON.

Shape shorthand: ``M`` detections.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from sppdet.detect import Detector
from sppdet.distributed import SINGLE, Dist, unshard
from sppdet.errors import DataError, SppdetError
from sppdet.fastpath import resolve_conv_dtype
from sppdet.imageio import load_image
from sppdet.model import load_detector
from sppdet.run import Run
from sppdet.viz import draw_detections

#: Default score threshold of what ``sppdet detect`` reports, per scorer: SVM margins above 0
#: are what the SVMs call positive (R-CNN's test threshold); softmax probabilities above 0.5
#: are more likely the class than anything else; random scores are uniform in [0, 1).
DISPLAY_THRESHOLDS = {"svm": 0.0, "softmax": 0.5, "random": 0.5}


def detector_for(
    run_dir: str | Path | None = None,
    model: str | Path | None = None,
    *,
    device: str | None = None,
    test: dict | None = None,
) -> Detector:
    """The detector of a run directory, of a model file, or (neither) of the shipped model.

    ``test``: :class:`~sppdet.detect.TestConfig` overrides (``None`` values ignored), plus
    ``conv_dtype`` for the conv trunk (``auto``: :func:`~sppdet.fastpath.resolve_conv_dtype`).
    """
    test = {k: v for k, v in (test or {}).items() if v is not None}
    if run_dir is not None:
        run = Run.open(run_dir)
        if device is not None:
            run = Run(run.root, dataclasses.replace(run.config, device=device))
        return load_detector(run.with_test(**test))
    from sppdet.model_file import default_model_path, read_model

    source = read_model(model if model is not None else default_model_path(), device or "auto")
    conv_dtype = test.pop("conv_dtype", None)
    if conv_dtype is not None:
        source = source.with_features(conv_dtype=resolve_conv_dtype(conv_dtype, source.device))
    return load_detector(source, dataclasses.replace(source.test, **test))


def drawing_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """File names of the drawings of ``paths`` in a directory: unique and deterministic.

    ``<stem>_det.png``, except for images whose stems are equal (ignoring case, for
    case-insensitive file systems; e.g. ``a/x.png`` and ``b/x.jpg``, or one image given twice):
    those are ``<stem>_det_<k>.png``, ``k`` = 1, 2, ... in the order given. No two names can be
    equal: only the shared stems end in ``_det_<digits>``.
    """
    stems = [Path(p).stem for p in paths]
    count = Counter(s.casefold() for s in stems)
    seen: Counter[str] = Counter()
    names = []
    for stem in stems:
        key = stem.casefold()
        if count[key] == 1:
            names.append(f"{stem}_det.png")
        else:
            seen[key] += 1
            names.append(f"{stem}_det_{seen[key]}.png")
    return names


def drawing_paths(paths: Sequence[str | os.PathLike], out_image: str | os.PathLike) -> list[Path]:
    """Where :func:`detect_images` draws each image: ``out_image`` itself for one image (unless
    it is a directory), else :func:`drawing_names` in the directory ``out_image``.

    Raises:
        SppdetError: several images and ``out_image`` is an existing file.
    """
    target = Path(out_image)
    if len(paths) == 1 and not target.is_dir():
        return [target]
    if target.exists() and not target.is_dir():
        raise SppdetError(f"{target} is a file: the drawings of several images need a directory")
    return [target / name for name in drawing_names(paths)]


def detect_images(
    paths: Sequence[str | os.PathLike],
    detector: Detector,
    *,
    out_image: str | os.PathLike | None = None,
    score_threshold: float | None = None,
    on_error: Callable[[Path, DataError], None] | None = None,
    dist: Dist = SINGLE,
) -> list[dict]:
    """Detect in each image; returns ``[{"image", "detections": [{class, score, box}]}]``.

    Boxes are internal 0-based continuous xyxy pixels of the upright image
    (:func:`~sppdet.imageio.load_image`). ``score_threshold``: report scores at or above it
    (default :data:`DISPLAY_THRESHOLDS` of the detector's scorer). With ``out_image`` a PNG with
    the boxes is written (:func:`drawing_paths`: to that path for one image, into that
    directory for several).

    Args:
        on_error: called with the path and the error of each image that cannot be read
            (missing, a directory, unreadable or corrupt), which is then left out of the
            results; without it the first such error is raised.

        dist: the images are sharded over its ranks (:mod:`sppdet.distributed`); every rank
            returns the results of all, in the order of ``paths``.

    Raises:
        DataError: an image cannot be read and ``on_error`` is None.
    """
    paths = [Path(p) for p in paths]
    if score_threshold is None:
        score_threshold = DISPLAY_THRESHOLDS[detector.config.scorer]
    drawings = drawing_paths(paths, out_image) if out_image is not None else [None] * len(paths)
    mine = [
        _detect_one(path, drawing, detector, score_threshold, on_error)
        for path, drawing in dist.shard(list(zip(paths, drawings, strict=True)))
    ]
    return [r for r in unshard(dist.gather(mine)) if r is not None]


def _detect_one(path: Path, drawing, detector: Detector, threshold: float, on_error) -> dict | None:
    """One image's entry of :func:`detect_images` (None: it could not be read)."""
    try:
        image = load_image(path)
    except DataError as exc:
        if on_error is None:
            raise
        on_error(path, exc)
        return None
    dets = detector.detect(image)
    keep = dets.scores >= threshold
    boxes, scores, labels = dets.boxes[keep], dets.scores[keep], dets.labels[keep]
    if drawing is not None:
        draw_detections(image, boxes, labels, scores, detector.classes, drawing)
    return {
        "image": str(path),
        "detections": [
            {"class": detector.classes[int(c)], "score": float(s), "box": b.tolist()}
            for b, s, c in zip(boxes, scores, labels, strict=True)
        ],
    }
