"""``torchrun`` with two gloo processes gives what one process gives (issue 21): the same
proposals and conv maps, byte for byte, and the same comp4 lines and mAP."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sppdet.distributed import SINGLE, Dist, unshard
from tests.test_cli_e2e import CONFIG

ROOT = Path(__file__).resolve().parents[1]


def test_shards_are_disjoint_and_unshard_restores_the_order():
    items = list(range(11))
    parts = [Dist(r, 3).shard(items) for r in range(3)]
    assert sorted(sum(parts, [])) == items and parts[1] == [1, 4, 7, 10]
    assert unshard(parts) == items
    assert SINGLE.shard(items) == items and SINGLE.gather("x") == ["x"]
    with pytest.raises(ValueError):
        Dist(2, 2)


def _sppdet(*args, procs: int = 1) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if procs == 1:
        cmd = [sys.executable, "-m", "sppdet_cli.main"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        # "--": torchrun would take eval's --run for an abbreviation of its own --run-path
        # (pytorch/pytorch#120601); what follows it goes to sppdet unparsed
        cmd = [*launcher, "--nproc-per-node", str(procs), "-m", "sppdet_cli.main", "--"]
    res = subprocess.run([*cmd, *map(str, args)], cwd=ROOT, env=env, capture_output=True)
    out = res.stdout.decode() + res.stderr.decode()
    assert res.returncode == 0, f"{' '.join(map(str, args))} with {procs} process(es):\n{out}"
    return out


def _digests(folder: Path, pattern: str) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob(pattern))
    }


def test_two_processes_extract_and_evaluate_as_one(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(CONFIG)
    data = tmp_path / "data"
    _sppdet("make-synthetic", data, "--images", 16, "--size", "96x96", "--seed", 2)
    one, two = tmp_path / "one", tmp_path / "two"
    for run, procs, splits in ((one, 1, ("train", "val")), (two, 2, ("val",))):
        for split in splits:
            args = ("extract", "--devkit", data, "--split", split, "--out", run, "--config", cfg)
            _sppdet(*args, procs=procs)
    for pattern in ("proposals/val.npz", "features/val/*/*.npy"):
        d1, d2 = _digests(one, pattern), _digests(two, pattern)
        assert d1 and d1 == d2, pattern
    log = json.loads((two / "features/val/extract_log.json").read_text())
    assert log["processes"] == 2 and log["images"] == 8

    _sppdet("train", one, "--quiet")
    ev = ("eval", "--voc2007", "--run", one, "--devkit", data, "--split", "val", "--ablations")
    _sppdet(*ev, "--json", tmp_path / "one.json")
    (one / "eval").rename(one / "eval_one")
    out = _sppdet(*ev, "--json", tmp_path / "two.json", procs=2)
    assert out.count("== val_fc7_bb") == 1  # rank 0 alone reports
    assert json.loads((tmp_path / "one.json").read_text()) == json.loads(
        (tmp_path / "two.json").read_text()
    )
    assert _digests(one / "eval_one", "*/comp4_*.txt") == _digests(one / "eval", "*/comp4_*.txt")
    # detect over many images: the same JSON, in the order given, one unreadable image reported
    jpegs = sorted((data / "VOC2007/JPEGImages").glob("*.jpg"))[:5]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    images = [*jpegs[:2], bad, *jpegs[2:]]
    outs = {}
    for procs in (1, 2):
        json_out = tmp_path / f"detect{procs}.json"
        res = _detect(procs, "detect", *images, "--run", one, "--json", json_out)
        # exit 2 (torchrun reports its failed rank with its own status, 1)
        assert res.returncode == (2 if procs == 1 else 1), res.stdout.decode()
        assert "1 of 6 images could not be read" in res.stdout.decode()
        outs[procs] = json.loads(json_out.read_text())
    assert outs[1] == outs[2] and [r["image"] for r in outs[1]] == list(map(str, jpegs))


def _detect(procs: int, *args) -> subprocess.CompletedProcess:
    """``sppdet ARGS`` (1 or 2 processes), whatever its exit status (stderr in stdout)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "sppdet_cli.main"]
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
               str(procs), "-m", "sppdet_cli.main", "--"]  # fmt: skip
    return subprocess.run(
        [*cmd, *map(str, args)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def test_two_processes_fine_tune_as_one(tmp_path):
    """Each step's two images split over two gloo processes, dropout masks drawn for the whole
    batch, gradients summed: the same parameters as one process, up to float rounding."""
    import torch

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        CONFIG.replace("iterations: 30", "iterations: 6")
        .replace("eval_every: 10", "eval_every: 3")
        .replace("checkpoint_every: 10", "checkpoint_every: 3")
    )
    data = tmp_path / "data"
    _sppdet("make-synthetic", data, "--images", 12, "--size", "96x96", "--seed", 3)
    one = tmp_path / "one"
    _sppdet("extract", "--devkit", data, "--split", "train", "--out", one, "--config", cfg)
    two = tmp_path / "two"
    shutil.copytree(one, two)
    _sppdet("finetune", one, "--quiet")
    _sppdet("finetune", two, "--quiet", procs=2)
    a, b = (torch.load(r / "finetune/model.pt", weights_only=True)["model"] for r in (one, two))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6, msg=k)
    logs = [(r / "finetune/log.jsonl").read_text().splitlines() for r in (one, two)]
    assert len(logs[0]) == len(logs[1]) == 2  # rank 0 alone logs
