"""One writer per part of a run directory: advisory file locks.

Each stage that writes into a run holds an exclusive ``flock`` on ``RUN/.locks/<part>.lock``
while it writes: ``proposals-<split>``, ``features-<split>``, ``finetune``, ``svm_<layer>``,
``bbox``, ``eval-<name>``. A second command that would write the same part stops at once with a
one-line message naming the holder (its pid and command line), instead of racing it (two
extractions of one new run used to fail with a misleading "proposal file not found").

Why parts and not the whole run: the experiment driver (``experiments/voc07.py``) trains
beside the val extraction in one run on purpose; they write different parts. The kernel drops
a lock when its holder dies, however it dies, so a killed command never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import os
import re
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sppdet.errors import SppdetError

LOCK_DIR = ".locks"


class RunBusyError(SppdetError):
    """Another command is writing the same part of a run directory."""


@contextmanager
def writing(run_dir: str | os.PathLike, part: str) -> Iterator[None]:
    """Hold the write lock of ``part`` of ``run_dir`` for the ``with`` block.

    Raises:
        RunBusyError: another process holds it (the message names that process).
    """
    path = Path(run_dir) / LOCK_DIR / (re.sub(r"[^\w.-]", "_", part) + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            raise RunBusyError(
                f"another command is writing {part} in {run_dir} ({holder}); wait for it to "
                "finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {shlex.join(sys.argv)}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (the file stays: deleting it would race a new holder)
