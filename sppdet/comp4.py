"""comp4 detection files (the devkit's ``comp4_det_<split>_<class>.txt``): write, read, evaluate.

One file per class, one line per detection: ``image_id score x1 y1 x2 y2`` with VOC 1-based
inclusive boxes. Reading keeps file order, which breaks score ties as the devkit does
(:mod:`sppdet.voc_eval`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np

from sppdet.boxes import to_voc
from sppdet.errors import DataError
from sppdet.storage import atomic_write_text
from sppdet.voc_eval import Detections, EvalResult, evaluate_detections

log = logging.getLogger(__name__)


def comp4_path(directory: str | Path, split: str, class_name: str) -> Path:
    """``directory/comp4_det_<split>_<class>.txt`` (the devkit's ``VOCopts.detrespath``)."""
    return Path(directory) / f"comp4_det_{split}_{class_name}.txt"


def write_comp4(
    directory: str | Path,
    split: str,
    classes: Sequence[str],
    detections: Mapping[str, Detections],
) -> list[Path]:
    """Write one comp4 file per class (atomically); a class without detections gets an empty file.

    Lines are ``image_id score x1 y1 x2 y2`` with VOC 1-based boxes (``to_voc``), score ``%.6f``,
    boxes ``%.3f`` (R-CNN writes ``%f``; 3 decimals keep sub-pixel regression output).
    """
    paths = []
    for name in classes:
        dets = detections.get(name, Detections.empty())
        voc = to_voc(dets.boxes)
        lines = [
            f"{i} {s:.6f} {b[0]:.3f} {b[1]:.3f} {b[2]:.3f} {b[3]:.3f}\n"
            for i, s, b in zip(
                dets.image_ids.tolist(), dets.scores.tolist(), voc.tolist(), strict=True
            )
        ]
        path = comp4_path(directory, split, name)
        atomic_write_text(path, "".join(lines))
        paths.append(path)
    return paths


def _parse_comp4(path: Path) -> tuple[list[str], list[float], list[list[float]]]:
    ids, scores, boxes = [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue  # blank lines: MATLAB textread skips them too
            try:
                if len(fields) != 6:
                    raise ValueError
                values = [float(v) for v in fields[1:]]
                if not all(math.isfinite(v) for v in values):
                    raise ValueError
            except ValueError:
                raise DataError(
                    f"{path}:{lineno}: expected 'image_id score x1 y1 x2 y2', got {line.strip()!r}"
                ) from None
            ids.append(fields[0])
            scores.append(values[0])
            boxes.append(values[1:])
    return ids, scores, boxes


def read_comp4(
    directory: str | Path,
    split: str,
    classes: Sequence[str],
    *,
    image_ids: Collection[str] | None = None,
    strict: bool = True,
) -> dict[str, Detections]:
    """Read the comp4 files of ``classes``; file order is kept (it breaks score ties).

    Boxes are converted back with the inverse of ``to_voc`` in float64, so the devkit's own parse
    of the file is reproduced exactly (``from_voc`` would round them to float32).

    A class without its file has no detections (as in the devkit, with a warning); a directory
    without the file of any class is an error: nothing was detected, or the directory, split or
    class names are not the ones the files were written for.

    Args:
        image_ids: the split's image ids; a detection on another image is a :class:`DataError`
            (``strict``) or is dropped with a warning (``strict=False``: a ``--limit``-ed split).

    Raises:
        DataError: a malformed line (file and line number in the message), an unknown image id,
            or no file of ``split`` for any of ``classes``.
    """
    _check_some_file(Path(directory), split, classes)
    known = None if image_ids is None else set(image_ids)
    out, dropped = {}, 0
    for name in classes:
        path = comp4_path(directory, split, name)
        if not path.is_file():
            log.warning("%s is missing: no detections for class %r", path, name)
            out[name] = Detections.empty()
            continue
        ids, scores, voc = _parse_comp4(path)
        boxes = np.asarray(voc, dtype=np.float64).reshape(-1, 4) - np.array([1.0, 1.0, 0.0, 0.0])
        dets = Detections(np.asarray(ids, dtype=str), np.asarray(scores), boxes)
        keep = np.array([known is None or i in known for i in ids], dtype=bool)
        if not keep.all():
            if strict:
                first = ids[int(np.flatnonzero(~keep)[0])]
                raise DataError(f"{path}: image id {first!r} is not in split {split!r}")
            dropped += int((~keep).sum())
            dets = Detections(dets.image_ids[keep], dets.scores[keep], dets.boxes[keep])
        out[name] = dets
    if dropped:
        log.warning(
            "%s: dropped %d detections on images outside the evaluated set", directory, dropped
        )
    return out


def _check_some_file(directory: Path, split: str, classes: Sequence[str]) -> None:
    """A :class:`DataError` unless ``directory`` holds the comp4 file of ``split`` of at least
    one of ``classes``; the message says which splits its comp4 files are for, if any."""
    if not directory.is_dir():
        raise DataError(f"detections directory not found: {directory}")
    if not classes or any(comp4_path(directory, split, c).is_file() for c in classes):
        return
    names = [p.name for p in directory.glob("comp4_det_*.txt")]
    # a file name is comp4_det_<split>_<class>.txt and class names may hold "_": match them
    head = len("comp4_det_")
    splits = sorted(
        {
            n[head : -len(tail)]
            for n in names
            for tail in (f"_{c}.txt" for c in classes)
            if n.endswith(tail) and len(n) > head + len(tail)
        }
    )
    if splits:
        found = f"its comp4 files are for split(s) {', '.join(splits)}"
    elif names:
        found = f"its {len(names)} comp4 file(s) name none of these classes"
    else:
        found = "it holds no comp4 files"
    raise DataError(
        f"{directory} has no comp4_det_{split}_<class>.txt file for any of the {len(classes)} "
        f"classes (e.g. {comp4_path(directory, split, classes[0]).name}): {found}"
    )


def evaluate_comp4_dir(
    dataset, directory: str | Path, *, use_07_metric: bool = True, strict: bool = True
) -> EvalResult:
    """Read ``comp4_det_<dataset.split>_<class>.txt`` from ``directory`` and evaluate them."""
    dets = read_comp4(
        directory, dataset.split, dataset.classes, image_ids=dataset.image_ids, strict=strict
    )
    return evaluate_detections(dataset, dets, use_07_metric=use_07_metric)
