"""Proposal store: CSR layout, compute/resume/reuse/refuse, import (.npz, .mat), recall."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from sppdet import boxes as B
from sppdet.datasets import Dataset, ImageRecord
from sppdet.distributed import Dist
from sppdet.errors import CacheMismatchError, DataError
from sppdet.proposal_sources import (
    chunk_size_for,
    compute_proposals,
    ensure_proposals,
    import_proposals,
)
from sppdet.proposal_store import (
    ProposalSet,
    load_proposal_set,
    read_stats,
    save_proposal_set,
    store_path,
)
from sppdet.proposals import ProposalConfig, propose
from sppdet.recall import proposal_recall, write_recall_report

CONFIG = ProposalConfig(mode="fast", ks=(100,), min_size=4)  # "fast" preset: ks unused


def blocks(seed: int, width: int = 64, height: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(small, 8, 0), 8, 1)[:height, :width])


def make_dataset(tmp_path, n: int = 5, split: str = "val") -> Dataset:
    """``n`` 64x48 PNG images of random blocks, one ground-truth box each (plus a difficult one)."""
    records = []
    for i in range(n):
        path = tmp_path / "images" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(blocks(i)).save(path)
        gt = [[8, 8, 40, 32], [0, 0, 10, 10]]
        records.append(ImageRecord(f"{i:06d}", path, 64, 48, gt, [i % 2, 1], [False, True]))
    return Dataset("toy_" + split, ("a", "b"), records, tmp_path, split)


def arrays(path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_compute_matches_propose_and_layout(tmp_path):
    ds = make_dataset(tmp_path)
    pset = ensure_proposals(ds, CONFIG, tmp_path / "run", progress=False)
    path = store_path(tmp_path / "run", "val")
    stored = arrays(path)
    assert stored["boxes"].dtype == np.uint16 and stored["offsets"].dtype == np.int64
    assert stored["ids"].tolist() == list(ds.image_ids)
    assert json.loads(str(stored["config"]))["proposals"]["min_size"] == 4
    assert not path.with_suffix(".parts").exists()  # merged and cleaned up
    for r in ds:
        expected = propose(blocks(int(r.image_id)), CONFIG)
        np.testing.assert_array_equal(pset.boxes_for(r.image_id), expected)
        np.testing.assert_array_equal(load_proposal_set(path).boxes_for(r.image_id), expected)
    assert read_stats(path)["images"] == 5


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    ds = make_dataset(tmp_path, n=7)
    whole = tmp_path / "whole.npz"
    compute_proposals(ds, CONFIG, whole, workers=2, chunk_size=2, progress=False)
    cut = tmp_path / "cut.npz"
    # "killed" after 2 of 4 chunks: part files exist, no store yet
    assert compute_proposals(ds, CONFIG, cut, chunk_size=2, progress=False, stop_after=2) is None
    assert not cut.exists() and len(list(cut.with_suffix(".parts").glob("0*.npz"))) == 2
    # settings changed before resuming: refused, not mixed
    other = dataclasses.replace(CONFIG, min_size=8)
    with pytest.raises(CacheMismatchError, match="min_size"):
        compute_proposals(ds, other, cut, chunk_size=2, progress=False)
    compute_proposals(ds, CONFIG, cut, chunk_size=2, progress=False)
    a, b = arrays(whole), arrays(cut)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_reuse_and_refuse(tmp_path, monkeypatch):
    ds = make_dataset(tmp_path, n=3)
    run = tmp_path / "run"
    first = ensure_proposals(ds, CONFIG, run, progress=False)

    import sppdet.proposal_sources as store

    monkeypatch.setattr(store, "compute_proposals", lambda *a, **k: pytest.fail("recomputed"))
    again = ensure_proposals(ds, CONFIG, run, progress=False)
    np.testing.assert_array_equal(first.boxes, again.boxes)
    subset = Dataset(ds.name, ds.classes, ds.records[:2], ds.root, ds.split)
    assert len(ensure_proposals(subset, CONFIG, run)) == 3  # a subset reuses the store
    with pytest.raises(
        CacheMismatchError, match=r"proposals\.backend: 'opencv' -> 'selectivesearch'"
    ):
        ensure_proposals(ds, dataclasses.replace(CONFIG, backend="selectivesearch"), run)
    bigger = make_dataset(tmp_path / "more", n=4)
    with pytest.raises(CacheMismatchError, match="lacks 1 image"):
        ensure_proposals(bigger, CONFIG, run)


def shared_file(tmp_path, ds, extra: bool = True):
    """A file in the shared ``.npz`` layout: 0-based inclusive uint16, one foreign image."""
    ids = list(ds.image_ids)[::-1] + (["999999"] if extra else [])
    per = {i: [[8, 8, 39, 31], [8, 8, 39, 31], [0, 0, 70, 47], [5, 5, 5, 9]] for i in ids}
    per[ids[0]] = []  # an image without proposals
    boxes = np.array([b for i in ids for b in per[i]], np.uint16).reshape(-1, 4)
    offsets = np.cumsum([0] + [len(per[i]) for i in ids])
    path = tmp_path / "shared.npz"
    np.savez(path, ids=np.array(ids), offsets=offsets, boxes=boxes)
    return path


def test_import_shared_npz(tmp_path):
    ds = make_dataset(tmp_path, n=4)
    pset = ensure_proposals(ds, CONFIG, tmp_path / "run", import_path=shared_file(tmp_path, ds))
    assert pset.ids.tolist() == list(ds.image_ids)  # restricted, dataset order
    assert pset.config["kind"] == "import" and len(pset.config["source_sha256"]) == 64
    # duplicate dropped, [0,0,70,47] clipped to the 64x48 image, 1-pixel-wide box kept
    expected = [[8, 8, 40, 32], [0, 0, 64, 48], [5, 5, 6, 10]]
    assert pset.boxes_for("000000").tolist() == expected
    empty = pset.boxes_for("000003")
    assert empty.shape == (0, 4) and empty.dtype == np.float32
    # later stages call without import_path: the imported store is reused
    assert ensure_proposals(ds, CONFIG, tmp_path / "run").fingerprint == pset.fingerprint


def test_import_refusals(tmp_path):
    ds = make_dataset(tmp_path, n=3)
    src = shared_file(tmp_path, ds, extra=False)
    bigger = make_dataset(tmp_path / "more", n=5)
    with pytest.raises(DataError, match=r"shared\.npz has no proposals for 2 of the 5 .*000004"):
        ensure_proposals(bigger, CONFIG, tmp_path / "run", import_path=src)
    ensure_proposals(ds, CONFIG, tmp_path / "run", import_path=src)
    other = tmp_path / "other.npz"
    np.savez(other, ids=np.array(ds.image_ids), offsets=np.zeros(4, np.int64),
             boxes=np.zeros((0, 4), np.uint16))  # fmt: skip
    with pytest.raises(CacheMismatchError, match="source_sha256"):
        ensure_proposals(ds, CONFIG, tmp_path / "run", import_path=other)
    compute_proposals(ds, CONFIG, store_path(tmp_path / "run3", "val"), progress=False)
    with pytest.raises(CacheMismatchError, match="kind: 'computed' -> 'import'"):
        ensure_proposals(ds, CONFIG, tmp_path / "run3", import_path=other)


def test_import_rcnn_mat(tmp_path):
    ds = make_dataset(tmp_path, n=2)
    images = np.empty((2, 1), dtype=object)
    images[:, 0] = list(ds.image_ids)
    cells = np.empty((1, 2), dtype=object)
    cells[0, 0] = np.array([[9, 9, 32, 40], [1, 1, 48, 64]], np.float64)  # y1 x1 y2 x2, 1-based
    cells[0, 1] = np.array([[2, 3, 4, 5]], np.float64)
    mat = tmp_path / "ss.mat"
    savemat(mat, {"images": images, "boxes": cells})
    pset = import_proposals(ds, mat, tmp_path / "store.npz")
    assert pset.boxes_for("000000").tolist() == [[8, 8, 40, 32], [0, 0, 64, 48]]
    assert pset.boxes_for("000001").tolist() == [[2, 1, 5, 4]]


def naive_best_iou(gt: np.ndarray, props: np.ndarray) -> float:
    """Best VOC "+1" IoU of one 1-based inclusive ``gt`` box over 1-based inclusive ``props``."""
    best = 0.0
    for p in props.astype(np.float64):
        iw = min(gt[2], p[2]) - max(gt[0], p[0]) + 1
        ih = min(gt[3], p[3]) - max(gt[1], p[1]) + 1
        if iw > 0 and ih > 0:
            inter = iw * ih
            union = (
                (gt[2] - gt[0] + 1) * (gt[3] - gt[1] + 1)
                + (p[2] - p[0] + 1) * (p[3] - p[1] + 1)
                - inter
            )
            best = max(best, inter / union)
    return best


def test_recall_against_naive_loop(tmp_path):
    ds = make_dataset(tmp_path, n=4)
    rng = np.random.default_rng(0)
    per = []
    for _ in ds:
        xy = rng.integers(0, 40, (30, 2))
        wh = rng.integers(1, 30, (30, 2))
        per.append(np.c_[xy, np.minimum(xy + wh, [63, 47])].astype(np.uint16))
    per[2] = per[2][:0]  # an image without proposals
    offsets = np.cumsum([0] + [len(p) for p in per])
    pset = ProposalSet(np.array(ds.image_ids), offsets, np.concatenate(per))
    report = proposal_recall(ds, pset, grid=[1, 10])
    best, labels = [], []
    for r, p in zip(ds, per, strict=True):
        gt_voc = B.to_voc(r.boxes[~r.difficult])  # difficult boxes are not counted
        best += [naive_best_iou(g, p.astype(np.float64) + 1) for g in gt_voc]
        labels += r.labels[~r.difficult].tolist()
    best, labels = np.array(best), np.array(labels)
    assert report["gt_boxes"] == 4 and report["images"] == 4
    assert report["recall_0.5"] == pytest.approx((best >= 0.5).mean())
    assert report["recall_0.7"] == pytest.approx((best >= 0.7).mean())
    assert report["abo_all"] == pytest.approx(best.mean(), abs=1e-6)
    per_class = [best[labels == c].mean() for c in (0, 1)]
    assert report["mabo"] == pytest.approx(np.mean(per_class), abs=1e-6)
    assert report["boxes_per_image"] == pytest.approx(22.5)
    assert report["curve"]["num_boxes"] == [1, 10, 30]
    assert report["curve"]["recall_0.5"][-1] == pytest.approx(report["recall_0.5"])
    assert report["curve"]["recall_0.5"] == sorted(report["curve"]["recall_0.5"])
    png = write_recall_report(report, tmp_path / "out" / "recall.json", title="toy")
    assert png.stat().st_size > 0
    assert json.loads((tmp_path / "out" / "recall.json").read_text())["mabo"] == report["mabo"]


def test_bad_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_proposal_set(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    np.savez(bad, ids=np.array(["a"]), offsets=np.array([0, 5]), boxes=np.zeros((2, 4), np.uint16))
    with pytest.raises(DataError, match="bad.npz"):
        load_proposal_set(bad)
    np.savez(bad, ids=np.array(["a"]))
    with pytest.raises(DataError, match="lacks"):
        load_proposal_set(bad)
    good = ProposalSet(np.array(["a"]), np.array([0, 1]), np.ones((1, 4), np.uint16))
    save_proposal_set(tmp_path / "good.npz", good)
    with pytest.raises(DataError, match="image b"):
        load_proposal_set(tmp_path / "good.npz").boxes_for("b")


@pytest.mark.parametrize("n", [1, 7, 40, 300, 2500, 5011])
def test_chunks_balance_ranks(n):
    """Chunks depend on the split alone and leave two or eight ranks within one chunk's images
    of each other (16-image chunks had given one of two ranks 24 of 40 images)."""
    size = chunk_size_for(n)
    assert 1 <= size <= 16
    n_chunks = -(-n // size)
    assert n_chunks >= min(n, 64)
    for world in (2, 8):
        loads = [
            sum(min(size, n - j * size) for j in Dist(r, world).shard(range(n_chunks)))
            for r in range(world)
        ]
        assert sum(loads) == n
        assert max(loads) - min(loads) <= size
    assert chunk_size_for(40) == 1 and chunk_size_for(2500) == 16
