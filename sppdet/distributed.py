"""Several processes (``torchrun``) sharing one run: who does which images, and when to wait.

A :class:`Dist` is passed down to the per-image stages (proposals, extraction, evaluation), as
any other setting is, never read from a global. Its ranks take disjoint, deterministic shards
(``items[rank::world]``): image ``k`` of a split goes to rank ``k % world``, whatever the
machine, so a resumed run finds each rank's finished files where it left them. Every rank writes
its own files (atomically, as one process does); rank 0 alone writes what the ranks share
(manifests, merged stores, comp4 files, ``eval.json``) after a barrier, so the outputs are those
of one process. The process group itself is set up by the command line
(:func:`sppdet_cli.distributed.init_from_env`): library code never touches process-wide state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch.distributed as tdist

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place among ``world`` processes (one process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world})")

    @property
    def main(self) -> bool:
        """Whether this process writes what all ranks share."""
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every ``world``-th from ``rank`` (disjoint, order kept)."""
        return list(items[self.rank :: self.world])

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        if self.world > 1:
            tdist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out


SINGLE = Dist()


def unshard(parts: Sequence[Sequence[T]]) -> list[T]:
    """The items of :meth:`Dist.shard`'s shards (``parts[r]`` from rank ``r``) in their order
    before sharding: item ``k`` is the ``k // world``-th of rank ``k % world``."""
    world, n = len(parts), sum(len(p) for p in parts)
    return [parts[k % world][k // world] for k in range(n)]
