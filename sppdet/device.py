"""Device selection (``--device auto|cpu|cuda|cuda:N``)."""

from __future__ import annotations

import torch

from sppdet.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; an unavailable CUDA request is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    return dev


def set_threads(threads: int | None = None) -> int:
    """Set the process's intra-op threads of torch and of numba (the CPU SPP kernel), once,
    before work starts: the CLI and scripts call this; library calls never change them.

    ``threads``: ``None`` keeps torch's current count and gives numba the same. Returns the
    count set. numba's threads are launched first: launching its OpenMP pool resets torch's
    (they share one libgomp), so a process limited to fewer threads would go back to all cores.
    """
    threads = torch.get_num_threads() if threads is None else threads
    try:
        import numba
    except ImportError:  # the torch fallback of sppdet.spp_cpu needs no numba
        numba = None
    if numba is not None:
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    torch.set_num_threads(threads)
    return threads
