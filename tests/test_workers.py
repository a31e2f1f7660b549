"""Worker processes die with their parent, whatever kills it (sppdet.workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sppdet.workers import run_in_workers

ROOT = Path(__file__).resolve().parents[1]


def sleep_after_writing_pid(folder: str) -> int:
    """A task that marks its worker's pid in ``folder`` and then blocks."""
    (Path(folder) / str(os.getpid())).write_text("")
    time.sleep(120)
    return 0


def _sleep_or_fail(task: str) -> int:
    if task == "fail":
        time.sleep(1.0)  # let the other worker start its task first
        raise ValueError("task failed")
    return sleep_after_writing_pid(task)


def _children(pid: int) -> set[int]:
    """Every live (not zombie) descendant of ``pid``, from /proc."""
    parent_of, alive = {}, set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        p = int(stat.parent.name)
        parent_of[p] = int(fields[1])
        if fields[0] != "Z":
            alive.add(p)
    out, frontier = set(), {pid}
    while frontier:
        frontier = {c for c, pp in parent_of.items() if pp in frontier} - out
        out |= frontier
    return out & alive


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait(cond, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the workers")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_no_worker_outlives_a_killed_parent(tmp_path, sig):
    code = (
        "from sppdet.workers import run_in_workers\n"
        "from tests.test_workers import sleep_after_writing_pid\n"
        f"for f in run_in_workers(sleep_after_writing_pid, [{str(tmp_path)!r}] * 2, 2):\n"
        "    f.result()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
    family: set[int] = set()
    try:
        assert _wait(lambda: len(list(tmp_path.iterdir())) == 2, 120), "workers did not start"
        workers = {int(p.name) for p in tmp_path.iterdir()}
        family = _children(parent.pid)
        assert workers <= family  # the workers, and multiprocessing's resource tracker
        parent.send_signal(sig)
        parent.wait(30)
        survivors = lambda: {p for p in family if _alive(p)}  # noqa: E731
        assert _wait(lambda: not survivors(), 30), f"alive after the parent died: {survivors()}"
    finally:
        for p in [parent.pid, *family]:  # leave nothing behind when the test fails
            if _alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the workers")
def test_a_failed_task_stops_the_other_workers_at_once(tmp_path):
    start = time.monotonic()
    with pytest.raises(ValueError, match="task failed"):
        for f in run_in_workers(_sleep_or_fail, [str(tmp_path), "fail"], 2):
            f.result()
    # `with ProcessPoolExecutor` would have waited for the sleeping task (120 s)
    assert time.monotonic() - start < 60
    assert _wait(lambda: not any(_alive(int(p.name)) for p in tmp_path.iterdir()), 10)


def test_results_come_back(tmp_path):
    got = sorted(f.result() for f in run_in_workers(abs, [-1, -2, 3], 2))
    assert got == [1, 2, 3]
