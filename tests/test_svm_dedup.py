"""``svm.dedup_neg_iou``: the paper's removal of a negative overlapping another by > 70 %."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sppdet.boxes import box_iou
from sppdet.errors import ConfigError
from sppdet.run import run_config
from sppdet.svm import SVMConfig
from sppdet.svm_mining import SVMTrainer, dedup_negatives
from tests import test_cli_e2e
from tests.test_cli_e2e import invoke

trained = test_cli_e2e.trained  # the same module-scoped fixture: one tiny trained run

D = 8


def naive_dedup(boxes: np.ndarray, scores: np.ndarray, iou: float) -> list[int]:
    """Greedy in float64: take the highest-scoring box left, drop what overlaps it by > iou."""
    ious = box_iou(boxes.astype(np.float64), boxes.astype(np.float64))
    kept: list[int] = []
    for i in np.argsort(-scores.astype(np.float64), kind="stable"):
        if all(ious[i, j] <= iou for j in kept):
            kept.append(int(i))
    return kept


def random_boxes(rng, n: int) -> np.ndarray:
    """``n`` boxes in clusters of near-duplicates, as selective search gives."""
    centres = rng.uniform(20, 200, (max(1, n // 4), 2))
    c = centres[rng.integers(len(centres), size=n)] + rng.normal(0, 3, (n, 2))
    wh = rng.uniform(20, 60, (n, 2))
    return np.concatenate([c - wh / 2, c + wh / 2], axis=1).astype(np.float32)


@pytest.mark.parametrize("iou", [0.3, 0.7, 0.9])
def test_dedup_matches_a_greedy_float64_reference(iou):
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, 200)
    scores = rng.permutation(200).astype(np.float32)  # distinct: the order is defined
    kept = dedup_negatives(boxes, scores, iou)
    assert kept.tolist() == naive_dedup(boxes, scores, iou)
    assert 0 < len(kept) < 200
    ious = box_iou(boxes[kept], boxes[kept])
    assert (ious[~np.eye(len(kept), dtype=bool)] <= iou + 1e-6).all()


def one_image():
    """Two near-identical windows (IoU 0.95) and one far away, all negatives of both classes;
    class 0 scores the first window higher, class 1 the second."""
    boxes = np.array([[0, 0, 100, 100], [0, 0, 100, 95], [300, 300, 350, 350]], np.float32)
    x = np.zeros((3, D), np.float32)
    x[:, 0] = [1.0, -1.0, 0.0]
    return x, boxes


def trainer_with_model(dedup: float | None) -> SVMTrainer:
    trainer = SVMTrainer(2, D, SVMConfig(dedup_neg_iou=dedup))
    # a model that makes every row hard for both classes, with opposite preferences
    trainer.W[0] = [0.5, -0.5]
    trainer.caches[0].trained = trainer.caches[1].trained = True
    return trainer


def test_each_class_keeps_its_own_harder_duplicate():
    x, boxes = one_image()
    no_gt, labels, iou = np.zeros(3, bool), np.full(3, -1), np.zeros((3, 2))
    plain = trainer_with_model(None)
    plain.add_image(x, no_gt, labels, iou, boxes)
    assert [c.num_neg for c in plain.caches] == [3, 3]
    dedup = trainer_with_model(0.7)
    dedup.add_image(x, no_gt, labels, iou, boxes)
    neg0, s0 = dedup.caches[0].negatives()
    neg1, s1 = dedup.caches[1].negatives()
    assert sorted(neg0[:, 0].tolist()) == [0.0, 1.0]  # class 0 keeps window 0 (score +0.5)
    assert sorted(neg1[:, 0].tolist()) == [-1.0, 0.0]  # class 1 keeps window 1 (score +0.5)
    assert sorted(s0.tolist()) == sorted(s1.tolist()) == [0.0, 0.5]
    assert [st["hard_added"] for st in dedup.stats()] == [2, 2]


def test_dedup_needs_the_boxes():
    x, _ = one_image()
    trainer = trainer_with_model(0.7)
    with pytest.raises(ValueError, match="boxes"):
        trainer.add_image(x, np.zeros(3, bool), np.full(3, -1), np.zeros((3, 2)))


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_dedup_iou_outside_0_1_is_refused(bad):
    with pytest.raises(ConfigError, match="dedup_neg_iou"):
        SVMConfig(dedup_neg_iou=bad)


def test_dedup_is_a_setting_again_not_a_removed_one():
    assert run_config({"svm": {"dedup_neg_iou": 0.5}}, "test").svm.dedup_neg_iou == 0.5
    assert run_config({"svm": {"dedup_neg_iou": None}}, "test").svm.dedup_neg_iou is None
    assert run_config(None, "test").svm.dedup_neg_iou == 0.7  # the paper's rule by default


def test_train_svm_dedup_neg_iou_0_mines_more_negatives(trained, tmp_path):
    """The default (the paper's 0.7) records itself in the SVM stage; `train-svm
    --dedup-neg-iou 0` (R-CNN's mining) records the setting off and stores more hard negatives
    than the default stage of the same run, for every class that has any."""
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run, symlinks=True)
    shutil.rmtree(run / "svm_fc7")
    invoke("train-svm", run, "--layer", "fc7", "--dedup-neg-iou", "0", "--quiet")
    manifest = json.loads((trained["run"] / "svm_fc7/manifest.json").read_text())
    assert manifest["svm"]["dedup_neg_iou"] == 0.7
    manifest = json.loads((run / "svm_fc7/manifest.json").read_text())
    assert manifest["svm"].get("dedup_neg_iou") is None  # off: a manifest as before the key
    dedup, plain = (
        json.loads((r / "svm_fc7/stats.json").read_text())["classes"] for r in (trained["run"], run)
    )
    assert plain.keys() == dedup.keys()
    added = [(plain[c]["hard_added"], dedup[c]["hard_added"]) for c in plain]
    assert all(0 < d < p for p, d in added if p), added
