"""One writer per part of a run directory (sppdet.locks)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sppdet.locks import RunBusyError, writing
from sppdet_cli.main import cli

ROOT = Path(__file__).resolve().parents[1]


def _hold(run: Path, part: str) -> subprocess.Popen:
    """Another process that holds ``part``'s lock until killed."""
    code = (
        "import sys, time\n"
        "from sppdet.locks import writing\n"
        f"with writing({str(run)!r}, {part!r}):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(300)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_a_second_writer_of_a_part_stops_and_names_the_first(tmp_path):
    holder = _hold(tmp_path, "finetune")
    try:
        busy = pytest.raises(RunBusyError, match=rf"writing finetune in .*pid {holder.pid}: ")
        with busy, writing(tmp_path, "finetune"):
            pass
        with writing(tmp_path, "svm_fc7"):  # another part of the same run is free
            pass
    finally:
        holder.kill()
        holder.wait()
    with writing(tmp_path, "finetune"):  # a killed holder leaves no stale lock
        pass


def test_the_lock_is_released_after_an_error(tmp_path):
    with pytest.raises(KeyError), writing(tmp_path, "bbox"):
        raise KeyError("x")
    with writing(tmp_path, "bbox"):
        pass


def test_commands_refuse_a_run_part_another_command_writes(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    runner = CliRunner()
    made = runner.invoke(cli, ["make-synthetic", str(data), "--images", "4", "--size", "64x64"])
    assert made.exit_code == 0, made.output
    holder = _hold(run, "proposals-train")
    try:
        start = time.monotonic()
        args = ["extract", "--devkit", str(data), "--split", "train", "--out", str(run)]
        res = runner.invoke(cli, [*args, "--backbone", "zf5", "--weights", "random"])
        assert res.exit_code != 0
        assert "another command is writing proposals-train" in res.output
        assert f"pid {holder.pid}" in res.output
        assert "Traceback" not in res.output
        assert time.monotonic() - start < 60  # stopped, not waiting for the holder
    finally:
        holder.kill()
        holder.wait()
