"""One fine-tuning step over several processes, equal to the step of one process.

Each rank pools the windows of its images of the step (image ``k`` of the step on rank
``k % world``, :meth:`sppdet.finetune_batch.Batcher.batch_rows`); the ranks then exchange those
pooled rows, so that every rank holds the whole batch, and split fc6 by its output units:

- fc6 (``D x hidden``, 33 million weights at the d17 recipe's 16,000 x 2,048: nine tenths of
  the head) is computed and trained by unit: rank ``r`` computes units ``part(r)`` for every
  row of the batch and updates only their weights; the ranks exchange those activations
  (``B x hidden``, about 1 MB) instead of fc6's gradients (130 MB);
- fc7 and the classifier are small: every rank computes them for the whole batch, with the same
  dropout masks as one process (the same seed, the same full-batch draws), so their gradients
  and updates are the same on every rank and need no exchange;
- trained conv blocks (``finetune.conv_blocks``) see only the rank's images: their gradients
  are summed over the ranks as DistributedDataParallel sums them.

Each rank also steps only its fc6 units (:func:`step_units`, torch's SGD update on those rows):
stepping all of fc6 on every rank moved as many bytes as the matmuls. So a step sends about
``B x (D + hidden)`` floats (10 MB at 128 windows) where summing the
gradients (what DistributedDataParallel does) sends the whole head (150 MB): on CPUs over gloo
that exchange took longer than the step itself. The fc6 units of other ranks are stale between
:func:`sync` calls (made before every evaluation, checkpoint and the final save).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import Tensor, nn
from torch.optim.sgd import sgd

from sppdet.distributed import Dist
from sppdet.head import FCHead


def part(hidden: int, dist: Dist) -> slice:
    """The fc6 units rank ``dist.rank`` computes and trains (contiguous, sizes differ by <= 1)."""
    base, extra = divmod(hidden, dist.world)
    start = dist.rank * base + min(dist.rank, extra)
    return slice(start, start + base + (dist.rank < extra))


def _all_gather_padded(x: Tensor, world: int) -> list[Tensor]:
    """Every rank's ``x`` (same trailing shape, any first size), in rank order."""
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    tdist.all_gather(sizes, n)
    sizes_ = [int(s) for s in sizes]
    pad = x.new_zeros((max(sizes_), *x.shape[1:]))
    pad[: x.shape[0]] = x
    out = [torch.empty_like(pad) for _ in range(world)]
    tdist.all_gather(out, pad.contiguous())
    return [o[:s] for o, s in zip(out, sizes_, strict=True)]


class _GatherRows(torch.autograd.Function):
    """``x [n_r, D]`` of each rank -> the batch ``[B, D]`` on every rank, rows in batch order.
    Backward: every rank's gradient of the batch is partial (its fc6 units): summed over the
    ranks, each keeps its own rows."""

    @staticmethod
    def forward(ctx, x: Tensor, rows: Tensor, idx: Tensor, total: int, world: int) -> Tensor:
        xs = _all_gather_padded(x.detach(), world)
        batch = x.new_empty((total, *x.shape[1:]))
        batch[idx] = torch.cat(xs)
        ctx.save_for_backward(rows)
        return batch

    @staticmethod
    def backward(ctx, grad: Tensor):
        (rows,) = ctx.saved_tensors
        grad = grad.contiguous()
        tdist.all_reduce(grad)
        return grad[rows], None, None, None, None


class _GatherUnits(torch.autograd.Function):
    """``h [B, part]`` of each rank -> ``[B, hidden]`` on every rank. Backward: what follows is
    the same on every rank, so each keeps the gradient of its own units (no exchange)."""

    @staticmethod
    def forward(ctx, h: Tensor, world: int, own: slice) -> Tensor:
        parts = _all_gather_padded(h.detach().t().contiguous(), world)
        ctx.own = own
        return torch.cat(parts).t().contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad[:, ctx.own], None, None


def gather_batch(x: Tensor, y: Tensor, rows: Tensor, total: int, dist: Dist) -> tuple:
    """``(X [B, D], y [B])`` of the whole batch on every rank from each rank's rows."""
    idx = torch.cat(_all_gather_padded(rows, dist.world))  # every rank's rows, in rank order
    x_all = _GatherRows.apply(x, rows, idx, total, dist.world)
    y_all = y.new_empty(total)
    y_all[idx] = torch.cat(_all_gather_padded(y, dist.world))
    return x_all, y_all


def forward(model: FCHead, x: Tensor, dist: Dist) -> tuple[Tensor, list[Tensor]]:
    """:meth:`FCHead.forward` on the whole batch ``x [B, D]``, fc6 split by units: the logits
    ``Tensor[B, K + 1]`` (the same, with the same dropout draws, on every rank) and the rank's
    fc6 units as leaves ``[weight [part, D], bias [part]]``, whose gradients
    :func:`step_units` applies (fc6 itself gets none, so the optimizer's step skips it)."""
    own = part(model.hidden, dist)
    units = [p.detach()[own].requires_grad_() for p in (model.fc6.weight, model.fc6.bias)]
    h = nn.functional.linear(model.standardize(x), units[0], units[1])
    return model.from_fc6(_GatherUnits.apply(h, dist.world, own)), units


@torch.no_grad()
def step_units(model: FCHead, opt: torch.optim.SGD, units: list[Tensor], dist: Dist) -> None:
    """``opt``'s SGD update (torch's functional ``sgd``, fused like ``opt`` where it is) on the
    rank's fc6 units only: half the weights' memory traffic per rank with two ranks, where
    stepping the whole of fc6 on every rank cost as much as the matmuls. The full-size momentum
    buffers stay in ``opt.state`` (checkpoints keep one process's layout; :func:`sync` fills in
    the other ranks' rows)."""
    own = part(model.hidden, dist)
    params = (model.fc6.weight, model.fc6.bias)
    group = next(g for g in opt.param_groups if any(q is params[0] for q in g["params"]))
    states = [opt.state[p] for p in params]
    bufs = [s["momentum_buffer"][own] if "momentum_buffer" in s else None for s in states]
    sgd(
        [p[own] for p in params],  # row views: the update lands in fc6 itself
        [leaf.grad for leaf in units],
        bufs,  # first step: sgd makes each buffer (= the gradient), kept below
        fused=group.get("fused"),
        foreach=group.get("foreach"),
        weight_decay=group["weight_decay"],
        momentum=group["momentum"],
        lr=group["lr"],
        dampening=group["dampening"],
        nesterov=group["nesterov"],
        maximize=group["maximize"],
    )
    for p, s, buf in zip(params, states, bufs, strict=True):
        if buf is not None and "momentum_buffer" not in s:
            s["momentum_buffer"] = torch.zeros_like(p)
            s["momentum_buffer"][own] = buf


@torch.no_grad()
def sync(model: FCHead, opt: torch.optim.Optimizer, dist: Dist) -> None:
    """Make every rank's head (and its SGD momentum) whole and equal: fc6's units from the
    ranks that train them, fc7 and the classifier from rank 0 (equal already on one machine
    type; a broadcast keeps ranks on different CPUs from drifting apart by rounding)."""
    own = part(model.hidden, dist)
    for p in (model.fc6.weight, model.fc6.bias):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        for t in (p,) if buf is None else (p, buf):
            parts = _all_gather_padded(t[own].contiguous(), dist.world)
            t.copy_(torch.cat(parts))
    for module in (model.fc7, model.cls):
        for p in module.parameters():
            tdist.broadcast(p, 0)
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tdist.broadcast(buf, 0)
