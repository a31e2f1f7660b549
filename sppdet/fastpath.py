"""Test-time speed-ups of the fc stage: truncated SVD of fc6/fc7, reduced-precision autocast.

At ~2,000 windows per image the fc layers cost about as much as the conv pass on a CPU, so they
decide SPP-net's speed. Fast R-CNN (Girshick 2015, section 3.1) factorises each fc weight
``W [out, in] ~= U_r S_r V_r^T`` and runs it as two thinner layers, ``x -> (S_r V_r^T) x -> U_r
(.) + b``: ``r (in + out)`` multiply-adds instead of ``in * out``. Whether it is worth its mAP
cost is measured by ``sppdet bench`` / ``eval --ablations`` (README, issue 7).

Shape shorthand: ``N`` windows, ``D`` SPP dims, ``H`` hidden width, ``K`` classes.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from sppdet.errors import ConfigError

FC_DTYPES = ("float32", "bfloat16", "float16")


def truncated_linear(fc: nn.Linear, rank: int) -> nn.Sequential:
    """Two linear layers computing ``fc`` with its weight truncated to ``rank`` singular values.

    ``rank >= min(out, in)`` gives ``fc`` itself (up to rounding). The SVD runs in float64.
    """
    w = fc.weight.detach().double()
    if rank <= 0:
        raise ConfigError(f"SVD rank must be positive, got {rank}")
    rank = min(rank, *w.shape)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    first = nn.Linear(w.shape[1], rank, bias=False)
    second = nn.Linear(rank, w.shape[0], bias=fc.bias is not None)
    dtype, device = fc.weight.dtype, fc.weight.device
    first.weight.data = (s[:rank, None] * vh[:rank]).to(dtype=dtype, device=device)
    second.weight.data = u[:, :rank].contiguous().to(dtype=dtype, device=device)
    if fc.bias is not None:
        second.bias.data = fc.bias.detach().clone()
    return nn.Sequential(first, second)


class CompressedHead(nn.Module):
    """An eval-only :class:`~sppdet.finetune.FCHead` with fc6 / fc7 replaced by their truncated
    SVDs (``rank`` 0 keeps a layer exact) and the input standardisation folded into fc6.

    Same interface as the head: ``forward(Tensor[N, D]) -> Tensor[N, K+1]`` logits and
    ``embed(x, layer)``.
    """

    def __init__(self, head: nn.Module, rank6: int = 0, rank7: int = 0) -> None:
        super().__init__()
        self.in_dim, self.hidden, self.num_classes = head.in_dim, head.hidden, head.num_classes
        self.ranks = (rank6, rank7)
        fc6 = _fold_standardization(head)
        self.fc6 = truncated_linear(fc6, rank6) if rank6 else fc6
        self.fc7 = truncated_linear(head.fc7, rank7) if rank7 else _copy_linear(head.fc7)
        self.cls = _copy_linear(head.cls)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.cls(self.embed(x, "fc7"))

    def embed(self, x: Tensor, layer: str) -> Tensor:
        """Activations of ``layer`` (``pool5``, ``fc6`` or ``fc7``), as ``FCHead.embed``."""
        if layer == "pool5":
            return x
        x = torch.relu(self.fc6(x))
        return x if layer == "fc6" else torch.relu(self.fc7(x))


def _copy_linear(fc: nn.Linear) -> nn.Linear:
    out = nn.Linear(fc.in_features, fc.out_features, bias=fc.bias is not None)
    out.load_state_dict(fc.state_dict())
    return out.to(fc.weight.device)


def _fold_standardization(head: nn.Module) -> nn.Linear:
    """fc6 applied to ``(x - mean) / std`` as one linear layer: ``W' = W / std``,
    ``b' = b - W' mean`` (saves a pass over the ``[N, D]`` input)."""
    w = head.fc6.weight.detach().double() / head.in_std.double()[None, :]
    b = head.fc6.bias.detach().double() - w @ head.in_mean.double()
    fc = nn.Linear(head.in_dim, head.hidden)
    fc.weight.data, fc.bias.data = w.float(), b.float()
    return fc.to(head.fc6.weight.device)


def fc_autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast for the fc stage in ``dtype`` (``float32`` = no autocast).

    bfloat16 runs on CPUs through oneDNN (fast with AVX512-BF16 / AMX) and on CUDA; float16 is
    CUDA only (AMP).
    """
    if dtype not in FC_DTYPES:
        raise ConfigError(f"unknown fc dtype {dtype!r}; expected one of {FC_DTYPES}")
    if dtype == "float32":
        return contextlib.nullcontext()
    if dtype == "float16" and device.type != "cuda":
        raise ConfigError("fc dtype float16 needs CUDA; use bfloat16 on a CPU")
    return torch.autocast(device.type, dtype=getattr(torch, dtype))
