"""``sppdet detect``: a trained run or model file applied to image files, with drawings and JSON.

Shape shorthand: ``M`` detections.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sppdet.detect import Detector
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


def detect_images(
    paths: list[Path],
    detector: Detector,
    *,
    out_image: str | Path | None = None,
    score_threshold: float | None = None,
) -> list[dict]:
    """Detect in each image; returns ``[{"image", "detections": [{class, score, box}]}]``.

    Boxes are internal 0-based continuous xyxy pixels. ``score_threshold``: report scores at
    or above it (default :data:`DISPLAY_THRESHOLDS` of the detector's scorer). With
    ``out_image`` a PNG with the boxes is written (to that path for one image, into that
    directory for several).
    """
    if score_threshold is None:
        score_threshold = DISPLAY_THRESHOLDS[detector.config.scorer]
    results = []
    for path in paths:
        image = load_image(path)
        dets = detector.detect(image)
        keep = dets.scores >= score_threshold
        boxes, scores, labels = dets.boxes[keep], dets.scores[keep], dets.labels[keep]
        if out_image is not None:
            target = Path(out_image)
            if len(paths) > 1 or target.is_dir():
                target = target / f"{path.stem}_det.png"
            draw_detections(image, boxes, labels, scores, detector.classes, target)
        results.append(
            {
                "image": str(path),
                "detections": [
                    {"class": detector.classes[int(c)], "score": float(s), "box": b.tolist()}
                    for b, s, c in zip(boxes, scores, labels, strict=True)
                ],
            }
        )
    return results
