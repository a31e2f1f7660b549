"""experiments.stages: experiment stages as timed child processes, alone or in lanes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from experiments import stages
from experiments.stages import Stage, partial_path, pending, read_record, run_lanes, run_stage

PY = sys.executable


def _py(code: str) -> list[str]:
    return [PY, "-c", code]


def test_run_stage_records_and_adds_up_attempts(tmp_path: Path) -> None:
    rec = tmp_path / "run" / "stages.json"
    calls = []
    stage = Stage("s", _py("import time; time.sleep(0.2)"), rec, then=lambda: calls.append(1))
    first = run_stage(stage)
    second = run_stage(stage, threads=3)
    got = read_record(rec)["s"]
    assert first >= 0.2 and second >= 0.2
    assert got["seconds"] == pytest.approx(first + second)
    assert 0 < got["peak_rss_gb"] < 64
    assert got["threads"] == 3 and got["command"].endswith("time.sleep(0.2)'")
    assert calls == [1, 1]


def test_run_stage_failure_records_nothing(tmp_path: Path) -> None:
    rec = tmp_path / "stages.json"
    called = []
    with pytest.raises(SystemExit, match="stage bad failed with exit code 3"):
        run_stage(Stage("bad", _py("raise SystemExit(3)"), rec, then=lambda: called.append(1)))
    assert read_record(rec) == {} and not called
    assert read_record(partial_path(rec))["bad"] > 0  # its seconds, for the attempt that succeeds


def test_seconds_of_attempts_that_never_returned_are_counted(tmp_path, monkeypatch) -> None:
    rec = tmp_path / "stages.json"
    partial = partial_path(rec)
    monkeypatch.setattr(stages, "HEARTBEAT_S", 0.05)
    # an earlier attempt was killed with its experiment after 100 s (its last heartbeat)
    partial.write_text('{"s": 100.0, "other": 7.0}')
    # while this attempt runs, the heartbeat saves 100 s + its seconds so far
    check = (
        "import json, time; time.sleep(0.5); "
        f"s = json.load(open({str(partial)!r}))['s']; assert 100.3 < s < 110, s"
    )
    seconds = run_stage(Stage("s", _py(check), rec))
    got = read_record(rec)["s"]
    assert got["seconds"] == pytest.approx(100.0 + seconds)
    assert got["interrupted_seconds"] == 100.0
    assert read_record(partial) == {"other": 7.0}  # the stage is on record: dropped from it


def test_lanes_run_side_by_side_with_one_thread_each(tmp_path: Path) -> None:
    rec = tmp_path / "stages.json"
    # each lane writes its flag and waits for the other's: this only finishes if both run at once
    wait = (
        "import os, pathlib, time; d = pathlib.Path({d!r}); (d / {me!r}).write_text("
        "os.environ['OMP_NUM_THREADS']); t = time.time()\n"
        "while not (d / {other!r}).exists():\n"
        "    assert time.time() - t < 20, 'the other lane never ran'; time.sleep(0.01)"
    )
    a = Stage("a", _py(wait.format(d=str(tmp_path), me="a", other="b")), rec)
    b = Stage("b", _py(wait.format(d=str(tmp_path), me="b", other="a")), rec)
    run_lanes([[a], [b], []])
    assert (tmp_path / "a").read_text() == (tmp_path / "b").read_text() == "1"
    assert set(read_record(rec)) == {"a", "b"}


def test_a_failed_lane_stops_the_others_next_stages(tmp_path: Path) -> None:
    rec = tmp_path / "stages.json"
    slow = Stage("slow", _py("import time; time.sleep(1.0)"), rec)
    never = Stage("never", _py(f"open({str(tmp_path / 'ran')!r}, 'w')"), rec)
    bad = Stage("bad", _py("raise SystemExit(2)"), rec)
    with pytest.raises(SystemExit, match="bad failed"):
        run_lanes([[slow, never], [bad]])
    assert not (tmp_path / "ran").exists()
    assert set(read_record(rec)) == {"slow"}  # the stage in progress finished and counts


def test_one_lane_runs_in_order_with_every_thread(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    rec = tmp_path / "stages.json"
    log = tmp_path / "log"
    code = "import os; open({!r}, 'a').write('{}' + os.environ.get('OMP_NUM_THREADS', '-'))"
    run_lanes([[Stage(n, _py(code.format(str(log), n)), rec) for n in "xyz"]])
    assert log.read_text() == "x-y-z-"
    assert {v["threads"] for v in read_record(rec).values()} == {"all"}


def test_a_thread_cap_of_the_whole_experiment_is_recorded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rec = tmp_path / "stages.json"
    run_lanes([[Stage("x", _py("pass"), rec)]])
    assert read_record(rec)["x"]["threads"] == 1


def test_pending_leaves_out_the_stages_that_succeeded(tmp_path: Path) -> None:
    rec = tmp_path / "stages.json"
    ok = Stage("ok", _py("pass"), rec)
    bad = Stage("bad", _py("raise SystemExit(1)"), rec)
    todo = Stage("todo", _py("pass"), rec)
    assert pending([ok, bad, todo]) == [ok, bad, todo]  # no record yet
    run_stage(ok)
    with pytest.raises(SystemExit):
        run_stage(bad)
    assert pending([ok, bad, todo]) == [bad, todo]  # a failed stage is still to run
