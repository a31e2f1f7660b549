"""Box voting (``test.box_vote_iou``; Gidaris & Komodakis 2015) against a naive loop."""

from __future__ import annotations

import numpy as np
import torch

from sppdet.boxes import vote_boxes
from sppdet.detect import suppress
from tests import test_cli_e2e

trained = test_cli_e2e.trained  # the same module-scoped fixture: one tiny trained run


def naive_vote(kept, boxes, scores, labels, iou):
    out = []
    for k in kept:
        num, den = np.zeros(4), 0.0
        for j in range(len(boxes)):
            a, b = boxes[k], boxes[j]
            iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
            ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = iw * ih
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if labels[j] == labels[k] and inter / union >= iou and scores[j] > 0:
                num += scores[j] * b
                den += scores[j]
        out.append(num / den if den > 0 else boxes[k])
    return np.array(out)


def test_vote_boxes_equals_the_naive_loop():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 80, (60, 2))
    wh = rng.uniform(10, 40, (60, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    scores = rng.normal(0, 1, 60)
    labels = rng.integers(0, 3, 60)
    kept = np.array([3, 10, 0, 41, 59])
    got = vote_boxes(kept, boxes, scores, labels, 0.5)
    np.testing.assert_allclose(got, naive_vote(kept, boxes, scores, labels, 0.5), rtol=1e-5)
    # a box with no positive voter (its own score <= 0, no overlapping positive) stays put
    lonely = np.array([[0, 0, 10, 10], [50, 50, 60, 60.0]])
    out = vote_boxes(np.array([0]), lonely, np.array([-0.5, 2.0]), np.array([1, 1]), 0.5)
    np.testing.assert_array_equal(out, lonely[:1].astype(np.float32))
    assert vote_boxes(np.zeros(0, np.int64), boxes, scores, labels, 0.5).shape == (0, 4)


def test_suppress_votes_only_when_asked():
    boxes = torch.tensor([[10, 10, 50, 50], [12, 12, 52, 52], [100, 100, 120, 130.0]])
    scores, labels = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([0, 0, 1])
    plain = suppress(boxes, scores, labels, (200, 200), nms_iou=0.3, max_per_image=10)
    voted = suppress(boxes, scores, labels, (200, 200), nms_iou=0.3, max_per_image=10, vote_iou=0.5)
    np.testing.assert_array_equal(plain.scores, voted.scores)
    np.testing.assert_array_equal(plain.boxes[0], [10, 10, 50, 50])
    np.testing.assert_allclose(voted.boxes[0], [(2 * 10 + 12) / 3] * 2 + [(2 * 50 + 52) / 3] * 2)
    np.testing.assert_array_equal(voted.boxes[1], plain.boxes[1])  # its only voter: itself


def test_eval_box_vote_rows_keep_the_scores_and_move_the_boxes(trained, tmp_path):
    import json

    from click.testing import CliRunner

    from sppdet_cli.main import cli
    from tests.test_cli_e2e import invoke

    data, run, classes = trained["data"], trained["run"], trained["classes"]
    out = tmp_path / "vote.json"
    args = ("eval", "--voc2007", "--run", run, "--devkit", data, "--split", "val", "--ablations")
    invoke(*args, "--box-vote", 0.5, "--json", out)
    res = json.loads(out.read_text())
    assert {"val_fc7_vote", "val_fc7_bb_vote", "val_softmax_bb_vote"} <= set(res)
    assert "val_random_vote" not in res and "val_pool5_vote" not in res
    moved = 0
    for c in classes:
        rows = {}
        for v in ("val_softmax_bb", "val_softmax_bb_vote"):
            lines = (run / "eval" / v / f"comp4_det_val_{c}.txt").read_text().splitlines()
            rows[v] = [(ln.split()[0], ln.split()[1], ln.split()[2:]) for ln in lines]
        assert [r[:2] for r in rows["val_softmax_bb"]] == [
            r[:2] for r in rows["val_softmax_bb_vote"]
        ]
        moved += sum(a[2] != b[2] for a, b in zip(*rows.values(), strict=True))
    assert moved > 0
    bad = CliRunner().invoke(cli, [str(a) for a in args[:-1]] + ["--box-vote", "0.5"])
    assert bad.exit_code != 0 and "--box-vote needs" in bad.output
