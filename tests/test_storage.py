"""Tests of sppdet.storage: atomic writes, manifests that refuse other settings, fingerprints."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from sppdet import storage
from sppdet.errors import CacheMismatchError, SppdetError
from sppdet.storage import (
    MANIFEST,
    atomic_save_npy,
    atomic_save_npz,
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    canonical,
    check_manifest,
    file_sha256,
    fingerprint,
    git_commit,
    read_json,
    versions,
)


def listing(directory: Path) -> list[str]:
    """Every entry under ``directory`` (hidden temp files included), relative, sorted."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# ---------------------------------------------------------------- atomic writes


def test_atomic_writers_round_trip_and_leave_no_temp_files(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    atomic_write_json(tmp_path / "c.json", {"x": (1, 2), "y": np.float32(0.5), "p": Path("q")})
    atomic_save_npz(tmp_path / "d.npz", boxes=arr, labels=np.array([1, 2]))
    atomic_save_npy(tmp_path / "e.npy", arr)
    atomic_torch_save({"w": torch.ones(2), "step": 3}, tmp_path / "f.pt")

    assert listing(tmp_path) == ["a.bin", "b.txt", "c.json", "d.npz", "e.npy", "f.pt"]
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert read_json(tmp_path / "c.json") == {"x": [1, 2], "y": 0.5, "p": "q"}
    with np.load(tmp_path / "d.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["boxes"], arr)
        np.testing.assert_array_equal(z["labels"], [1, 2])
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy", allow_pickle=False), arr)
    state = torch.load(tmp_path / "f.pt", weights_only=True)
    assert torch.equal(state["w"], torch.ones(2))
    assert state["step"] == 3


def test_atomic_write_creates_parents_and_overwrites(tmp_path):
    path = tmp_path / "deep" / "er" / "x.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert listing(tmp_path) == ["deep", "deep/er", "deep/er/x.txt"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"v": 1})

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"v": 2})
    monkeypatch.undo()
    assert read_json(path) == {"v": 1}
    assert listing(tmp_path) == ["x.json"]


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    def interrupt(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.os, "fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        atomic_save_npy(tmp_path / "x.npy", np.zeros(3))
    monkeypatch.undo()
    assert listing(tmp_path) == []


def test_json_rejects_unknown_objects(tmp_path):
    with pytest.raises(TypeError, match="not JSON serialisable"):
        atomic_write_json(tmp_path / "x.json", {"f": object()})


# ---------------------------------------------------------------- manifests


def test_check_manifest_creates_then_accepts(tmp_path):
    content = {"kind": "maps", "scales": (480, 688), "versions": {"torch": "2", "np": "1"}}
    check_manifest(tmp_path, content)
    assert read_json(tmp_path / MANIFEST) == {
        "kind": "maps",
        "scales": [480, 688],
        "versions": {"torch": "2", "np": "1"},
    }
    before = (tmp_path / MANIFEST).read_bytes()
    # Same content in another key order and with a list for the tuple: accepted, untouched.
    same = {"versions": {"np": "1", "torch": "2"}, "scales": [480, 688], "kind": "maps"}
    check_manifest(tmp_path, same)
    assert (tmp_path / MANIFEST).read_bytes() == before
    assert listing(tmp_path) == [MANIFEST]


def test_check_manifest_creates_the_directory(tmp_path):
    check_manifest(tmp_path / "new" / "cache", {"a": 1})
    assert read_json(tmp_path / "new" / "cache" / MANIFEST) == {"a": 1}


@pytest.mark.parametrize(
    "changed,key,fragment",
    [
        ({"scales": [688]}, "scales", "[480, 688] -> [688]"),
        ({"versions": {"torch": "3", "np": "1"}}, "versions.torch", "'2' -> '3'"),
        ({"extra": True}, "extra", "(absent) -> True"),
    ],
)
def test_check_manifest_refuses_other_content(tmp_path, changed, key, fragment):
    content = {"kind": "maps", "scales": [480, 688], "versions": {"torch": "2", "np": "1"}}
    check_manifest(tmp_path, content)
    before = (tmp_path / MANIFEST).read_bytes()
    with pytest.raises(CacheMismatchError) as info:
        check_manifest(tmp_path, {**content, **changed})
    msg = str(info.value)
    assert f"{key}: " in msg
    assert fragment in msg
    assert str(tmp_path) in msg
    assert "\n" not in msg
    assert isinstance(info.value, SppdetError)
    assert (tmp_path / MANIFEST).read_bytes() == before


def test_check_manifest_names_a_missing_key(tmp_path):
    check_manifest(tmp_path, {"a": 1, "b": 2})
    with pytest.raises(CacheMismatchError, match=r"b: 2 -> \(absent\)"):
        check_manifest(tmp_path, {"a": 1})


@pytest.mark.xfail(
    strict=True,
    raises=ValueError,
    reason="check_manifest lets json.JSONDecodeError out for an unreadable manifest.json "
    "instead of a one-line SppdetError naming the file",
)
def test_check_manifest_unreadable_manifest_is_an_sppdet_error(tmp_path):
    (tmp_path / MANIFEST).write_text("{truncated")
    with pytest.raises(SppdetError, match=MANIFEST):
        check_manifest(tmp_path, {"a": 1})


# ---------------------------------------------------------------- fingerprints and hashes


def test_fingerprint_is_stable_across_dict_order():
    a = {"x": 1, "y": {"p": [1, 2], "q": "s"}, "z": None}
    b = {"z": None, "y": {"q": "s", "p": (1, 2)}, "x": 1}
    assert fingerprint(a) == fingerprint(b)
    assert len(fingerprint(a)) == 64
    int(fingerprint(a), 16)  # hex
    assert fingerprint(a) != fingerprint({**a, "x": 2})
    assert fingerprint(a) != fingerprint({**a, "y": {"p": [2, 1], "q": "s"}})  # lists keep order


def test_canonical():
    assert canonical({"b": (1, 2), "a": Path("x/y"), "c": np.int64(3)}) == {
        "a": "x/y",
        "b": [1, 2],
        "c": 3,
    }


def test_file_sha256(tmp_path):
    data = os.urandom(5000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert file_sha256(path) == expected
    assert file_sha256(path, chunk=7) == expected


def test_versions_and_git_commit(tmp_path):
    v = versions()
    assert {"sppdet", "torch", "torchvision", "numpy", "sklearn", "python"} <= set(v)
    assert v["torch"] == torch.__version__
    json.dumps(v)
    assert git_commit(tmp_path) == "unknown"  # not a git checkout
    # this checkout's commit, as git itself names it
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip("the source tree is not a git checkout")
    assert git_commit() in (head.stdout.strip(), head.stdout.strip() + "-dirty")


def test_git_commit_is_dirty_for_code_not_for_outputs(tmp_path):
    import shutil

    if shutil.which("git") is None:
        pytest.skip("git not installed")

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "b.json").write_text("{}\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    clean = git_commit(tmp_path / "pkg")
    assert len(clean) == 40 and not clean.endswith("-dirty")
    (tmp_path / "benchmarks" / "b.json").write_text('{"ratio": 1}\n')
    assert git_commit(tmp_path / "pkg") == clean  # an output changed: still the same code
    (tmp_path / "pkg" / "code.py").write_text("x = 2\n")
    assert git_commit(tmp_path / "pkg") == clean + "-dirty"


def test_check_manifest_legacy_settings_at_their_value_are_left_out(tmp_path):
    legacy = {"svm": {"loss": "hinge", "growth": 0.0}}
    # written before "growth" existed and while "loss" did: still valid at those values
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "manifest.json").write_text(json.dumps({"svm": {"C": 1, "loss": "hinge"}}))
    check_manifest(tmp_path / "a", {"svm": {"C": 1, "growth": 0.0}}, legacy)
    with pytest.raises(CacheMismatchError, match=r"svm.growth: \(absent\) -> 0.5"):
        check_manifest(tmp_path / "a", {"svm": {"C": 1, "growth": 0.5}}, legacy)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "manifest.json").write_text(json.dumps({"svm": {"C": 1, "loss": "sq"}}))
    with pytest.raises(CacheMismatchError, match=r"svm.loss: 'sq' -> \(absent\)"):
        check_manifest(tmp_path / "b", {"svm": {"C": 1}}, legacy)
    # new manifests are written without them
    check_manifest(tmp_path / "c", {"svm": {"C": 1, "growth": 0.0}}, legacy)
    assert json.loads((tmp_path / "c" / "manifest.json").read_text()) == {"svm": {"C": 1}}
