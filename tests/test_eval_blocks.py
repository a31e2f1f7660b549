"""sppdet.eval_blocks: the saved blocks of a resumable evaluation."""

from __future__ import annotations

import numpy as np

from sppdet.detect import Detections
from sppdet.eval_blocks import EvalBlocks, arrays_digest


def _dets(n: int, seed: int) -> Detections:
    rng = np.random.default_rng(seed)
    return Detections(
        rng.random((n, 4), dtype=np.float32),
        rng.random(n, dtype=np.float32),
        rng.integers(0, 20, n).astype(np.int64),
    )


def test_a_block_round_trips_with_empty_images(tmp_path):
    blocks = EvalBlocks(tmp_path, {"split": "val", "x": 1}, ["a", "b"], rank=0)
    dets = [{"a": _dets(3, 0), "b": Detections.empty()}, {"a": _dets(0, 1), "b": _dets(5, 2)}]
    seconds = {"a": {"fc": 1.5}, "b": {"fc": 0.5, "nms": 0.1}}
    assert blocks.load(0, 2) is None and blocks.saved() == 0
    blocks.save(0, dets, seconds, 2.25)
    got, sec, wall = blocks.load(0, 2)
    assert sec == seconds and wall == 2.25 and blocks.saved() == 1
    for want, have in zip(dets, got, strict=True):
        for name in ("a", "b"):
            np.testing.assert_array_equal(have[name].boxes, want[name].boxes)
            np.testing.assert_array_equal(have[name].scores, want[name].scores)
            np.testing.assert_array_equal(have[name].labels, want[name].labels)
    assert blocks.load(0, 3) is None  # another block size: not this block
    assert EvalBlocks(tmp_path, {"split": "val", "x": 1}, ["b", "a"], 0).load(0, 2) is None
    blocks.remove()
    assert not blocks.dir.exists()


def test_keys_and_ranks_keep_their_own_files(tmp_path):
    a = EvalBlocks(tmp_path, {"k": 1}, ["v"], rank=0)
    b = EvalBlocks(tmp_path, {"k": 2}, ["v"], rank=0)
    r1 = EvalBlocks(tmp_path, {"k": 1}, ["v"], rank=1)
    assert a.dir != b.dir and a.dir == r1.dir and a.path(0) != r1.path(0)
    a.save(0, [{"v": _dets(2, 0)}], {"v": {}}, 1.0)
    assert b.load(0, 1) is None and r1.load(0, 1) is None and a.load(0, 1) is not None


def test_a_torn_block_is_detected_again(tmp_path):
    blocks = EvalBlocks(tmp_path, {"k": 1}, ["v"], rank=0)
    blocks.path(0).write_bytes(b"PK\x03\x04 not a whole zip")
    assert blocks.load(0, 1) is None


def test_arrays_digest_sees_values_shapes_and_dtypes():
    a = [np.arange(8, dtype=np.float32).reshape(2, 4)]
    assert arrays_digest(a) == arrays_digest([a[0].copy()])
    assert arrays_digest(a) != arrays_digest([a[0].reshape(4, 2)])
    assert arrays_digest(a) != arrays_digest([a[0].astype(np.float64)])
    assert arrays_digest(a) != arrays_digest([a[0] + 1])


def test_blocks_key_leaves_out_settings_added_since_at_their_defaults(tmp_path, monkeypatch):
    """An evaluation saved before a setting existed resumes under code that has it, at its
    default; another value is another key."""
    import dataclasses
    from types import SimpleNamespace

    import numpy as np

    from sppdet.distributed import SINGLE
    from sppdet.eval_blocks import blocks_key
    from sppdet.run import Run, build_config

    monkeypatch.setattr("sppdet.run.check_paths_exist", lambda config: None)
    run = Run.create(tmp_path / "run", build_config())
    records = [SimpleNamespace(image_id="a")]
    props = SimpleNamespace(boxes_for=lambda i: np.zeros((1, 4), np.float32))

    def key(test):
        det = {"fc7": SimpleNamespace(config=test)}
        return blocks_key(run, "val", records, props, det, None, True, SINGLE)

    test = run.config.test
    plain = key(test)
    assert "box_vote_iou" not in plain["variants"]["fc7"]
    assert "box_vote_iou" not in plain["config"]["test"] and "C" in plain["config"]["svm"]
    assert "bbox_loss_weight" not in plain["config"]["finetune"]
    voted = key(dataclasses.replace(test, box_vote_iou=0.5))
    assert voted["variants"]["fc7"]["box_vote_iou"] == 0.5 and voted != plain
