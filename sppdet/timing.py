"""Stage hooks of the detection path: profiler labels (default) and a per-stage wall clock.

:class:`~sppdet.detect.Detector` names its stages (``proposals``, ``conv``, ``spp``, ``fc``,
``svm``, ``bbox``, ``nms``; R-CNN mode adds ``warp``) by entering ``hook(stage)`` around each
one; it measures nothing itself. The default hook, :data:`PROFILER_LABELS`, only labels the
stages for ``torch.profiler`` traces; :class:`StageTimer` (used by ``sppdet bench`` and by the
evaluation pass) adds up wall seconds per stage.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import torch

T = TypeVar("T")


class StageHook(Protocol):
    """Entered around each stage of a detection: ``with hook("fc"): ...``.

    ``record(stage, seconds)`` reports work a callee timed itself inside the current stage
    (R-CNN mode's warping and per-window conv passes happen inside its pooling call).
    """

    def __call__(self, stage: str) -> contextlib.AbstractContextManager: ...

    def record(self, stage: str, seconds: float) -> None: ...


class ProfilerLabels:
    """A hook that labels each stage ``sppdet::<stage>`` for ``torch.profiler`` and times
    nothing (``record_function`` costs microseconds when no profiler is running)."""

    def __call__(self, stage: str) -> contextlib.AbstractContextManager:
        return torch.profiler.record_function(f"sppdet::{stage}")

    def record(self, stage: str, seconds: float) -> None:
        pass


#: The detector's default hook.
PROFILER_LABELS = ProfilerLabels()


def synchronize(device: torch.device | None) -> None:
    """Wait for queued CUDA work, so wall time is charged to the stage that queued it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class StageTimer:
    """Wall seconds per stage, added up over every call (``seconds``: stage -> seconds).

    A stage entered inside another is not counted twice: the outer stage is charged its own
    time only (e.g. R-CNN mode's ``warp`` and ``conv`` inside ``spp``).
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self._inner: list[float] = []  # per open stage: seconds charged to stages inside it

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        synchronize(self.device)
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            synchronize(self.device)
            elapsed = time.perf_counter() - t0
            inner = self._inner.pop()
            self.seconds[stage] += elapsed - inner
            if self._inner:
                self._inner[-1] += elapsed

    def record(self, stage: str, seconds: float) -> None:
        """Charge ``seconds`` to ``stage`` (and take them off the enclosing stage, if any)."""
        self.seconds[stage] += seconds
        if self._inner:
            self._inner[-1] += seconds

    def timed(self, stage: str, compute: Callable[[], T]) -> tuple[T, float]:
        """``(compute(), seconds)``, the seconds also charged to ``stage``."""
        before = self.seconds[stage]
        with self(stage):
            value = compute()
        return value, self.seconds[stage] - before
