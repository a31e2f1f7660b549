"""Worker processes that never outlive the process that started them.

A killed parent (``kill -9``, a timeout's SIGTERM, a closed terminal) must not leave its workers
(about 1 GB each for selective search) and multiprocessing's resource tracker running forever.
Each worker watches its parent twice: Linux's parent-death signal (immediate), and a daemon
thread that polls the parent's pid (any POSIX system, within :data:`POLL_SECONDS`). The resource
tracker exits by itself once every process holding its pipe (the parent and these workers) has
gone. An exception in the parent (Ctrl-C included) cancels the queued tasks and stops the
workers at once instead of waiting for every task to finish.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any

POLL_SECONDS = 1.0  # how often a worker checks that its parent is alive (the portable watch)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """Pool initializer: end this worker as soon as ``parent_pid`` is gone."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(POLL_SECONDS)
        os._exit(1)  # no cleanup: the parent that would use this worker's results is gone

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_in_workers(
    fn: Callable[[Any], Any], tasks: Iterable[Any], workers: int
) -> Iterator[Future]:
    """Run ``fn(task)`` for every task on ``workers`` spawned processes; yield each future as it
    completes (its ``result()`` re-raises the task's exception).

    Spawned, not forked: workers start clean, without threads or locks inherited from torch or
    the caller. ``fn`` must be importable (a module-level function).
    """
    pool = ProcessPoolExecutor(
        workers, mp.get_context("spawn"), initializer=_die_with_parent, initargs=(os.getpid(),)
    )
    try:
        yield from as_completed([pool.submit(fn, t) for t in tasks])
    except BaseException:
        # Ctrl-C or a failed task: do not wait for the queue to drain (the default of `with`)
        procs = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.terminate()
        raise
    pool.shutdown(wait=True)
