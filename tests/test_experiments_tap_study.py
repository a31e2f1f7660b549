"""Tests of the tap-study table's merging of rows measured in different sessions."""

from __future__ import annotations

import json

from experiments.tap_study import kept_rows


def test_kept_rows_drop_the_remeasured_and_keep_their_machine(tmp_path):
    old = {
        "command": "python -m experiments.tap_study --row c",
        "machine": {"cpu_model": "Xeon"},
        "rows": [
            {"label": "a", "map": {"fc7": 0.3}},
            {"label": "b", "map": {"fc7": 0.2}, "machine": {"cpu_model": "EPYC"}},
            {"label": "c", "map": {"fc7": 0.1}},
        ],
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    rows, commands = kept_rows(path, {"c"})
    assert [r["label"] for r in rows] == ["a", "b"]
    assert rows[0]["machine"] == {"cpu_model": "Xeon"}  # the file's machine
    assert rows[1]["machine"] == {"cpu_model": "EPYC"}  # its own
    assert commands == ["python -m experiments.tap_study --row c"]
    assert kept_rows(None, {"a"}) == ([], [])
