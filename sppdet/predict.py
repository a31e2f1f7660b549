"""``sppdet detect``: a trained run applied to image files, with drawings and JSON output."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sppdet.imageio import load_image
from sppdet.model import load_detector
from sppdet.run import Run
from sppdet.viz import draw_detections


def detect_images(
    paths: list[Path],
    run_dir: str | Path,
    *,
    out_image: str | Path | None = None,
    device: str | None = None,
    score_threshold: float | None = None,
    scorer: str | None = None,
    test: dict | None = None,
) -> list[dict]:
    """Detect in each image; returns ``[{"image", "detections": [{class, score, box}]}]``.

    Boxes are internal 0-based continuous xyxy pixels. With ``out_image`` a PNG with the boxes
    is written (to that path for one image, into that directory for several). ``test``:
    further :class:`~sppdet.detect.TestConfig` overrides (e.g. the speed options).
    """
    run = Run.open(run_dir)
    if device is not None:
        run = Run(run.root, dataclasses.replace(run.config, device=device))
    run = run.with_test(scorer=scorer, **(test or {}))
    detector = load_detector(run)
    results = []
    for path in paths:
        image = load_image(path)
        dets = detector.detect(image)
        keep = dets.scores >= score_threshold if score_threshold is not None else slice(None)
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
