"""The process group of a ``torchrun`` launch, set up by the command line (never the library).

``torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m sppdet_cli.main CMD ...``
starts N processes per machine with ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set; plain
``sppdet CMD`` has none of them and stays one process.
"""

from __future__ import annotations

import atexit
import os
import time
from datetime import timedelta

from sppdet.distributed import SINGLE, Dist

#: How long a rank waits at a barrier for the others: ranks of a sharded stage finish at
#: different times (a 5-scale extraction runs for hours).
BARRIER_TIMEOUT = timedelta(hours=24)


def init_from_env(device: str = "auto") -> Dist:
    """This process's :class:`~sppdet.distributed.Dist`, the process group initialised (gloo
    on CPU, nccl on CUDA, each rank on GPU ``LOCAL_RANK``) when ``torchrun`` launched it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    import torch
    import torch.distributed as tdist

    from sppdet.device import resolve_device

    cuda = resolve_device(device).type == "cuda"
    if not tdist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group("nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)
        atexit.register(shutdown)
    return Dist(tdist.get_rank(), tdist.get_world_size())


#: How long :func:`shutdown` lets gloo's worker threads run after the group is destroyed.
GLOO_DRAIN_S = 0.05


def shutdown() -> None:
    """Destroy the process group, then let gloo's worker threads finish before the interpreter
    finalizes.

    A gloo worker drops its reference to a finished collective's tensors after the caller has
    returned; if Python dropped its own references first, the worker's drop frees the tensor's
    Python object and needs the GIL. When that happens while the interpreter is finalizing, the
    worker thread is made to exit and the process aborts ("terminate called without an active
    exception", SIGABRT after all work is done; a core dump of our two-process test shows it in
    ``ProcessGroupGloo``'s worker, in ``THPVariable_dealloc``). Releasing the GIL for a moment
    lets those drops finish (measured: 2 aborts in 22 runs without, 0 in 30 with 50 ms).
    """
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()
    time.sleep(GLOO_DRAIN_S)  # releases the GIL to the gloo workers


def main_first(dist: Dist, make):
    """``make()`` on rank 0, then (after a barrier) on the others: e.g. creating a run
    directory, which the other ranks then reopen."""
    out = make() if dist.main else None
    dist.barrier()
    return out if dist.main else make()


def single_process_only(command: str) -> None:
    """Refuse a command that does not shard its work yet when ``torchrun`` launched it (every
    rank would train the same run)."""
    import click

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise click.UsageError(
            f"`{command}` runs in one process (docs/distributed.md): run it without torchrun"
        )
