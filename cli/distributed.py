"""The process group of a ``torchrun`` launch, set up by the command line (never the library).

``torchrun --nproc-per-node N [--nnodes M --rdzv-endpoint HOST:PORT] -m sppdet_cli.main CMD ...``
starts N processes per machine with ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set; plain
``sppdet CMD`` has none of them and stays one process.
"""

from __future__ import annotations

import atexit
import os
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
        atexit.register(tdist.destroy_process_group)
    return Dist(tdist.get_rank(), tdist.get_world_size())


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
