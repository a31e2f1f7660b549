"""Experiment stages as child processes, each timed alone: wall seconds and peak RSS on record.

The experiment scripts (:mod:`experiments.voc07`, :mod:`experiments.mode_compare`) run every
``sppdet`` stage as its own process so that its peak RSS is its own (``wait4``'s ``ru_maxrss``),
and keep the figures in a ``stages.json`` beside the run. A stage that is run again (an interrupted
experiment resumed) adds its seconds to the earlier attempts' and keeps the larger peak.

An attempt that never returns (its session ended and took the experiment with it) cannot write
its record at the end, so while a stage runs its seconds so far go to ``stages.partial.json``
every :data:`HEARTBEAT_S` seconds; the attempt that finally succeeds adds them to its own
(``interrupted_seconds`` in the record: at most a heartbeat short per lost attempt). Without it a
stage resumed over several sessions recorded only its last attempt (the Lite0 VOC07 run's
fine-tuning, SVM and box stages: 5,061 s on record against 18,980 s in their own logs).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sppdet.storage import atomic_write_json, read_json

_LOCK = threading.Lock()  # lanes finish stages concurrently; one writer of a record at a time
#: How often a running stage's seconds so far are saved (seconds).
HEARTBEAT_S = 60.0


@dataclass(frozen=True)
class Stage:
    """One command of an experiment.

    Attributes:
        name: key in the record, e.g. ``extract_train``.
        argv: the command line.
        record: the ``stages.json`` that receives its seconds and peak RSS.
        then: called after the stage succeeded and was recorded (e.g. to rewrite a results
            file as soon as an evaluation is in), in the thread that ran the stage.
    """

    name: str
    argv: Sequence[str]
    record: Path
    then: Callable[[], None] | None = None


def read_record(path: Path) -> dict:
    """A ``stages.json`` as written by :func:`run_stage` (empty when there is none yet)."""
    return read_json(path) if path.exists() else {}


def run_stage(stage: Stage, *, threads: int | None = None) -> float:
    """Run ``stage``; add its wall seconds and peak RSS (GiB) to its record.

    Args:
        stage: the command and where its figures go.
        threads: caps the child's torch/OpenMP threads (``OMP_NUM_THREADS``); None leaves the
            default (every core).

    Returns:
        This attempt's wall seconds.

    Raises:
        SystemExit: the command failed (its exit code in the message); only its seconds are
            kept, in the partial record, for the attempt that succeeds.
    """
    argv = [str(a) for a in stage.argv]
    print(f"\n== {stage.name}: {shlex.join(argv)}", flush=True)
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    partial = partial_path(stage.record)
    with _LOCK:
        before = read_record(partial).get(stage.name, 0.0)  # earlier attempts that never returned
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env)
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT_S):
            _save_partial(partial, stage.name, before + time.perf_counter() - t0)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        done.set()
        beat.join()
    seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        _save_partial(partial, stage.name, before + seconds)  # its work is kept for a rerun
        raise SystemExit(f"stage {stage.name} failed with exit code {code}")
    with _LOCK:
        record = read_record(stage.record)
        prev = record.get(stage.name, {"seconds": 0.0, "peak_rss_gb": 0.0})
        record[stage.name] = {
            "seconds": prev["seconds"] + before + seconds,
            "interrupted_seconds": prev.get("interrupted_seconds", 0.0) + before,
            "peak_rss_gb": max(prev["peak_rss_gb"], usage.ru_maxrss / 2**20),  # KiB on Linux
            "command": shlex.join(argv),
            "threads": threads or _env_threads(),
        }
        stage.record.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(stage.record, record)
    _save_partial(partial, stage.name, None)
    if stage.then is not None:
        stage.then()
    return seconds


def partial_path(record: Path) -> Path:
    """Where the seconds of ``record``'s stages that have not returned yet are kept."""
    return record.with_name(f"{record.stem}.partial.json")


def _save_partial(path: Path, name: str, seconds: float | None) -> None:
    """Set (or with None, drop) one stage's seconds so far in the partial record."""
    with _LOCK:
        rec = read_record(path)
        if seconds is None:
            if name not in rec:
                return
            del rec[name]
        else:
            rec[name] = seconds
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, rec)


def _env_threads() -> int | str:
    """The thread cap set for the whole experiment (``OMP_NUM_THREADS=1`` beside other jobs),
    or "all"."""
    cap = os.environ.get("OMP_NUM_THREADS", "")
    return int(cap) if cap.isdigit() else "all"


def pending(stages: Sequence[Stage]) -> list[Stage]:
    """The stages not yet on their record: a stage is recorded only once it has succeeded, so a
    resumed experiment can leave the recorded ones out (e.g. so that a lane that would have held
    only finished stages does not keep the other lane at one thread)."""
    return [s for s in stages if s.name not in read_record(s.record)]


def run_lanes(lanes: Sequence[Sequence[Stage]]) -> None:
    """Run each lane's stages in order, several lanes side by side with one thread each.

    Why one thread each: on 2 cores a stage that is partly single-threaded (Python, I/O, small
    convs that one thread already keeps busy) leaves a core idle when it runs alone. A single
    lane runs with every thread. After a failed stage the other
    lanes finish the stage they are in (its work is kept for a rerun), start no new one, and the
    failure is raised.
    """
    lanes = [lane for lane in lanes if lane]
    if len(lanes) <= 1:
        for stage in lanes[0] if lanes else []:
            run_stage(stage)
        return
    errors: list[BaseException] = []

    def lane(plan: Sequence[Stage]) -> None:
        try:
            for stage in plan:
                if errors:
                    return
                run_stage(stage, threads=1)
        except BaseException as e:  # a failed stage raises SystemExit
            errors.append(e)

    workers = [threading.Thread(target=lane, args=(plan,)) for plan in lanes]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
