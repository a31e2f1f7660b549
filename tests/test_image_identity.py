"""Caches know which image files they were made from (sppdet.image_identity)."""

from __future__ import annotations

import os
import shutil

import pytest

from sppdet.errors import CacheMismatchError
from sppdet.image_identity import ImageIndex, identity, same_file


def test_same_file_follows_the_content_not_the_mtime(tmp_path):
    a = tmp_path / "a.jpg"
    a.write_bytes(b"pixels-1")
    rec = identity(a)
    assert same_file(a, rec)
    os.utime(a, ns=(1, 1))  # touched
    assert same_file(a, rec)
    copy = tmp_path / "copy.jpg"
    shutil.copy(a, copy)  # another place, another mtime
    assert same_file(copy, rec)
    a.write_bytes(b"pixels-2")  # same size, other content
    assert not same_file(a, rec)
    a.write_bytes(b"other size")
    assert not same_file(a, rec)


def test_index_records_new_images_and_refuses_changed_ones(tmp_path):
    img = {k: tmp_path / f"{k}.jpg" for k in "xy"}
    for k, p in img.items():
        p.write_bytes(k.encode() * 10)
    index = ImageIndex(tmp_path / "cache" / "images.jsonl", "cached maps in cache")
    index.verify([("x", img["x"])])
    index.verify([("x", img["x"]), ("y", img["y"])])  # y is recorded on first use
    assert len(index.path.read_text().splitlines()) == 2
    img["y"].write_bytes(b"z" * 10)
    with pytest.raises(CacheMismatchError, match=r"cached maps in cache of image y .*y\.jpg"):
        index.verify([("x", img["x"]), ("y", img["y"])])
    with index.path.open("a") as f:
        f.write('{"id": "cut')  # a line cut by a kill mid-append is ignored
    index.verify([("x", img["x"])])
