"""The split fine-tuning step of :mod:`sppdet.finetune_dist` against one process, in two gloo
processes: the same logits, the same gradients (fc6 units of the rank, fc7, classifier, and the
gradient of each rank's own input rows, which trained conv blocks receive) and, after an SGD step
and :func:`~sppdet.finetune_dist.sync`, the same head on every rank."""

from __future__ import annotations

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch import nn

from sppdet import finetune_dist
from sppdet.distributed import Dist
from sppdet.head import FCHead
from sppdet_cli.distributed import shutdown

D, HIDDEN, K, B = 12, 7, 3, 10  # 7 units over 2 ranks: 4 and 3
ROWS = [torch.tensor([0, 1, 2, 6, 7, 8, 9]), torch.tensor([3, 4, 5])]  # rank 0 holds 2 images


def _head() -> FCHead:
    torch.manual_seed(0)
    model = FCHead(D, HIDDEN, K, dropout=0.5)
    model.fit_standardization(torch.randn(40, D, generator=torch.Generator().manual_seed(1)))
    return model


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(B, D, generator=g), torch.randint(0, K + 1, (B,), generator=g)


def _opt(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)


def _worker(rank: int, world: int, store: str, errors) -> None:
    try:
        tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
        dist = Dist(rank, world)
        x, y = _data()
        ref, model = _head(), _head()
        ref.train(), model.train()
        # one process: two steps (the second with momentum)
        ref_opt, opt = _opt(ref), _opt(model)
        xr = x.clone().requires_grad_()
        for step in range(2):
            torch.manual_seed(10 + step)
            ref_loss = nn.functional.cross_entropy(ref(xr), y)
            ref_opt.zero_grad()
            xr.grad = None
            ref_loss.backward()
            if step == 0:
                ref_grads = {k: p.grad.clone() for k, p in ref.named_parameters()}
                ref_xgrad = xr.grad.clone()
            ref_opt.step()
        # two ranks
        rows = ROWS[rank]
        for step in range(2):
            mine = x[rows].clone().requires_grad_()
            xa, ya = finetune_dist.gather_batch(mine, y[rows], rows, B, dist)
            torch.manual_seed(10 + step)
            logits, units = finetune_dist.forward(model, xa, dist)
            loss = nn.functional.cross_entropy(logits, ya)
            opt.zero_grad()
            loss.backward()
            if step == 0:
                own = finetune_dist.part(HIDDEN, dist)
                torch.testing.assert_close(ya, y, rtol=0, atol=0)
                grads = dict(model.named_parameters())
                for k, p in grads.items():
                    if k.startswith("fc6"):
                        assert p.grad is None  # its units' leaves have the gradients
                        got, want = units[k == "fc6.bias"].grad, ref_grads[k][own]
                    else:
                        got, want = p.grad, ref_grads[k]
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=k)
                torch.testing.assert_close(mine.grad, ref_xgrad[rows], rtol=0, atol=1e-6)
            opt.step()
            finetune_dist.step_units(model, opt, units, dist)
        finetune_dist.sync(model, opt, dist)
        for (k, a), b in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(
                opt.state[p]["momentum_buffer"],
                ref_opt.state[q]["momentum_buffer"],
                atol=1e-6,
                rtol=0,
            )
        shutdown()  # destroys the group; without its pause 10-20 % of runs aborted at exit
    except Exception as exc:  # reported to the test
        errors.put(f"rank {rank}: {exc!r}")
        raise


def test_split_step_equals_one_process(tmp_path):
    errors = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), errors), nprocs=2, join=True)
    assert errors.empty()


def test_parts_cover_the_units_once():
    for hidden, world in ((7, 2), (2048, 3), (3, 4)):
        parts = [finetune_dist.part(hidden, Dist(r, world)) for r in range(world)]
        units = [u for p in parts for u in range(hidden)[p]]
        assert units == list(range(hidden))
        assert max(p.stop - p.start for p in parts) - min(p.stop - p.start for p in parts) <= 1
