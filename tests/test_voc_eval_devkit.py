"""``sppdet eval`` against an independent port of the VOC devkit, on the real VOC2007 val split.

Makes synthetic detections over the 2,508 val images (jittered ground truth at several noise
levels, boxes with "+1" IoU exactly 0.5, exact and jittered duplicates, detections on difficult
objects, confusions with other classes, random boxes, scores with many ties), writes them as
comp4 files with ``sppdet.comp4.write_comp4``, runs ``sppdet eval --detections`` and compares each
class's AP (VOC2007 11-point and VOC2010 all-point) with a line-by-line Python port of the
devkit's ``VOCevaldet.m`` / ``VOCap.m`` that parses the XML and comp4 files itself.

Needs ``../shared/data/VOCdevkit`` (skipped without it); about 5 s on one core.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sppdet.comp4 import write_comp4
from sppdet.datasets import VOC_CLASSES
from sppdet.voc_eval import Detections
from sppdet_cli.main import cli
from tests.devkit_port import read_annotation, vocevaldet

DEVKIT = Path(__file__).resolve().parents[2] / "shared" / "data" / "VOCdevkit"
RANDOM_PER_CLASS = 1500  # random boxes per class, anywhere in the split

pytestmark = pytest.mark.skipif(
    not (DEVKIT / "VOC2007" / "Annotations").is_dir(), reason="needs ../shared/data/VOCdevkit"
)

# ----------------------------------------------------------------- synthetic detections


def _clip(box: np.ndarray, w: int, h: int) -> np.ndarray | None:
    b = np.clip(box, 0, [w, h, w, h]).astype(np.float32)
    return b if b[2] - b[0] >= 1 and b[3] - b[1] >= 1 else None


def _half_iou_box(g: np.ndarray, w: int, h: int) -> np.ndarray | None:
    """A box containing ``g`` with twice its area ("+1" IoU exactly 0.5), inside the image."""
    gw, gh = g[2] - g[0], g[3] - g[1]
    for cand in ([g[0], g[1], g[2] + gw, g[3]], [g[0] - gw, g[1], g[2], g[3]],
                 [g[0], g[1], g[2], g[3] + gh], [g[0], g[1] - gh, g[2], g[3]]):  # fmt: skip
        if cand[0] >= 0 and cand[1] >= 0 and cand[2] <= w and cand[3] <= h:
            return np.array(cand, np.float32)
    return None


def _object_detections(rng, g, difficult, w, h) -> list[tuple[np.ndarray, float]]:
    """(box, quality in [0, 1]) of one object (internal box ``g``): jittered, duplicated, ..."""
    out = []
    size = np.array([g[2] - g[0], g[3] - g[1]] * 2)
    n = int(rng.choice([0, 1, 1, 1, 2, 3])) + int(difficult)
    for _ in range(n):
        sigma = rng.choice([0.03, 0.1, 0.2, 0.35])
        box = g + rng.normal(0, sigma, 4) * size
        if rng.random() < 0.5:
            box = np.round(box)  # integer VOC coordinates: exact-tie arithmetic
        out.append((_clip(box, w, h), 1.0 - 2 * sigma))
    if rng.random() < 0.15:
        out.append((g.copy(), 1.0))  # exact, possibly a duplicate of a good jittered one
    if rng.random() < 0.08:
        out.append((_half_iou_box(g, w, h), 0.5))
    return [(b, q) for b, q in out if b is not None]


def make_detections(gtids, recs, classes, seed: int, n_random: int) -> dict[str, Detections]:
    """Synthetic detections of every class (see the module docstring)."""
    rng = np.random.default_rng(seed)
    per_class: dict[str, tuple[list, list, list]] = {c: ([], [], []) for c in classes}
    for i in gtids:
        w, h = recs[i]["width"], recs[i]["height"]
        for o in recs[i]["objects"]:
            g = np.array(o["bbox"], np.float32) - np.array([1, 1, 0, 0], np.float32)
            target = o["class"]
            if rng.random() < 0.05:  # confusion: detected as another class
                target = classes[int(rng.integers(len(classes)))]
            for b, q in _object_detections(rng, g, o["difficult"], w, h):
                per_class[target][0].append(i)
                per_class[target][1].append(b)
                per_class[target][2].append(q if target == o["class"] else 0.0)
    out = {}
    for c in classes:
        ids, boxes, quality = per_class[c]
        for _ in range(n_random):
            i = gtids[int(rng.integers(len(gtids)))]
            w, h = recs[i]["width"], recs[i]["height"]
            xy = rng.uniform(0, [w - 2, h - 2])
            b = _clip(np.r_[xy, xy + rng.uniform(2, [w, h])], w, h)
            if b is not None:
                ids.append(i)
                boxes.append(b)
                quality.append(0.0)
        # Better boxes score higher on average, so AP spans a realistic range (about 0.2-0.6).
        scores = 0.6 * np.array(quality) + 0.4 * rng.random(len(ids))
        ties = rng.random(len(ids)) < 0.5
        scores[ties] = np.round(scores[ties], 3)  # many equal scores: order must follow the file
        perm = rng.permutation(len(ids))
        out[c] = Detections(np.array(ids)[perm], scores[perm], np.array(boxes)[perm])
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict:
    """The val images' annotations (read by the devkit port) and their comp4 detections."""
    root = DEVKIT / "VOC2007"
    gtids = (root / "ImageSets" / "Main" / "val.txt").read_text().split()
    recs = {i: read_annotation(root / "Annotations" / f"{i}.xml") for i in gtids}
    dets = make_detections(gtids, recs, VOC_CLASSES, seed=0, n_random=RANDOM_PER_CLASS)
    det_dir = tmp_path_factory.mktemp("voc_eval") / "comp4"
    write_comp4(det_dir, "val", VOC_CLASSES, dets)
    return {"gtids": gtids, "recs": recs, "dir": det_dir}


def sppdet_eval(det_dir: Path, use_07: bool, out: Path) -> dict:
    """``sppdet eval --detections`` in-process: its JSON (``map``, ``ap``)."""
    args = ["eval", "--voc2007", "--devkit", str(DEVKIT), "--split", "val"]
    args += ["--detections", str(det_dir), "--json", str(out)]
    args += [] if use_07 else ["--use-2010-metric"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


@pytest.mark.parametrize("use_07", [True, False], ids=["voc07", "voc10"])
def test_sppdet_eval_equals_the_devkit_port(synthetic, use_07, tmp_path):
    gtids, recs, det_dir = synthetic["gtids"], synthetic["recs"], synthetic["dir"]
    ours = sppdet_eval(det_dir, use_07, tmp_path / "eval.json")
    ref = {
        c: vocevaldet(gtids, recs, c, det_dir / f"comp4_det_val_{c}.txt", use_07)
        for c in VOC_CLASSES
    }
    assert set(ours["ap"]) == set(VOC_CLASSES)
    for c in VOC_CLASSES:
        assert ours["ap"][c] == pytest.approx(ref[c], abs=1e-9), c
    assert ours["map"] == pytest.approx(sum(ref.values()) / len(ref), abs=1e-9)
    # every class's detections are neither hopeless nor perfect
    assert all(0.05 < ap < 0.99 for ap in ref.values())


@pytest.mark.parametrize("variant", ["gt", "ties", "arange"])
def test_the_data_tells_the_devkit_rules_apart(synthetic, variant):
    """Negative controls: ``ovmax > 0.5`` (py-faster-rcnn) instead of ``>= 0.5``, equal scores in
    reverse file order, and ``np.arange`` recall thresholds instead of MATLAB's ``0:0.1:1`` each
    change some class's 11-point AP on these detections, so the agreement above tests them."""
    gtids, recs, det_dir = synthetic["gtids"], synthetic["recs"], synthetic["dir"]
    gap = 0.0
    for c in VOC_CLASSES:
        path = det_dir / f"comp4_det_val_{c}.txt"
        ref = vocevaldet(gtids, recs, c, path, use_07=True)
        gap = max(gap, abs(vocevaldet(gtids, recs, c, path, use_07=True, variant=variant) - ref))
    assert gap > 1e-4
