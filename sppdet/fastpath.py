"""Test-time speed-ups of the fc stage: truncated SVD of fc6/fc7, int8 matmuls, autocast.

At ~2,000 windows per image the fc layers cost about as much as the conv pass on a CPU, so they
decide SPP-net's speed. Fast R-CNN (Girshick 2015, section 3.1) factorises each fc weight
``W [out, in] ~= U_r S_r V_r^T`` and runs it as two thinner layers, ``x -> (S_r V_r^T) x -> U_r
(.) + b``: ``r (in + out)`` multiply-adds instead of ``in * out``. Whether it is worth its mAP
cost is measured by ``sppdet bench`` / ``eval --ablations`` (docs/fast_path.md).

``fc_dtype="int8"`` runs fc6 and fc7 as int8 x int8 -> int32 matmuls (:class:`Int8Linear`):
weights quantized once per output channel, activations per row at each call. On the 2-core AMD
EPYC (AVX512-VNNI) of docs/fast_path.md the fc stage ran 3.7-4.2x faster than float32 at
no measurable mAP cost, and unlike SVD it keeps every weight direction.

``conv_dtype`` (:class:`AutocastTrunk`) runs the conv trunk itself under autocast: bfloat16 on
CPUs with AVX512-BF16 / AMX (oneDNN) or on CUDA, float16 on CUDA (AMP). On CUDA, float32 convs
already use TF32 tensor cores (PyTorch's default ``torch.backends.cudnn.allow_tf32``).

Shape shorthand: ``N`` windows, ``D`` SPP dims, ``H`` hidden width, ``K`` classes.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from sppdet.errors import ConfigError

FC_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8")
CONV_DTYPES = ("float32", "bfloat16", "float16")
#: Largest int8 magnitude used (symmetric quantization: -127..127, so negation is exact).
INT8_MAX = 127


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


def quantize_symmetric(w: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Symmetric int8 rounding with one scale per slice over ``dims``: int8 ``q`` of ``w``'s
    shape and float32 ``scale`` with size 1 in ``dims``, ``w ~= q * scale`` with
    ``|q| <= INT8_MAX`` (error at most ``scale / 2``)."""
    # the inf-norm is the exact max |w| without an |w| temporary; rounding in place likewise
    amax = torch.linalg.vector_norm(w, float("inf"), dim=dims, keepdim=True)
    scale = amax.clamp_min(torch.finfo(torch.float32).tiny) / INT8_MAX
    return (w / scale).round_().to(torch.int8), scale


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """``Tensor[O, I]`` float -> int8 ``Tensor[O, I]`` and float32 ``Tensor[O]`` scales, one
    per row: symmetric, ``w ~= q * scale[:, None]`` with ``|q| <= INT8_MAX``."""
    q, scale = quantize_symmetric(w, (1,))
    return q, scale[:, 0]


class Int8Linear(nn.Module):
    """``y = x W^T + b`` as an int8 x int8 -> int32 matmul, rescaled to float32.

    ``W`` is quantized once, symmetrically per output channel; each row of ``x`` is quantized
    at call time with its own scale (dynamic quantization), so one outlier window does not
    coarsen the others. Each factor is rounded to 1/254 of its row's (or channel's) range;
    tests/test_fastpath.py bounds the output error at 2 %.

    torch's own dynamic quantization (``torch.ao.quantization.quantize_dynamic``) does the same
    with one activation scale per batch and is deprecated in favour of torchao, which is not a
    dependency; ``torch._int_mm`` is the int8 GEMM that torchao itself calls. CPU only here
    (``_int_mm`` on CUDA has shape constraints, and no GPU run has measured it yet).
    """

    def __init__(self, fc: nn.Linear) -> None:
        super().__init__()
        q, scale = quantize_rows(fc.weight.detach().float())
        self.register_buffer("qweight_t", q.t().contiguous())  # Tensor[in, out] int8
        self.register_buffer("w_scale", scale)  # Tensor[out]
        bias = fc.bias.detach().float().clone() if fc.bias is not None else None
        self.register_buffer("bias", bias)
        self.in_features, self.out_features = fc.in_features, fc.out_features

    def forward(self, x: Tensor) -> Tensor:
        """``Tensor[N, in]`` -> ``Tensor[N, out]`` float32."""
        x = x.float()
        s = x.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        s = s / INT8_MAX
        acc = torch._int_mm(torch.round(x / s).to(torch.int8), self.qweight_t)
        y = acc.float().mul_(s).mul_(self.w_scale)
        return y if self.bias is None else y.add_(self.bias)


class CompressedHead(nn.Module):
    """An eval-only :class:`~sppdet.head.FCHead` with fc6 / fc7 replaced by their truncated
    SVDs (``rank`` 0 keeps a layer exact) and the input standardisation folded into fc6; with
    ``int8`` each fc6 / fc7 matmul (the SVD factors too) runs as :class:`Int8Linear`.

    Same interface as the head: ``forward(Tensor[N, D]) -> Tensor[N, K+1]`` logits and
    ``embed(x, layer)``. The 21-way classifier stays float32 (it is ~1 % of the fc work).
    """

    def __init__(self, head: nn.Module, rank6: int = 0, rank7: int = 0, int8: bool = False) -> None:
        super().__init__()
        self.in_dim, self.hidden, self.num_classes = head.in_dim, head.hidden, head.num_classes
        self.ranks = (rank6, rank7)
        fc6 = _fold_standardization(head)
        self.fc6 = truncated_linear(fc6, rank6) if rank6 else fc6
        self.fc7 = truncated_linear(head.fc7, rank7) if rank7 else _copy_linear(head.fc7)
        if int8:
            check_fc_dtype("int8", fc6.weight.device)
            self.fc6, self.fc7 = _to_int8(self.fc6), _to_int8(self.fc7)
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


def _to_int8(layer: nn.Module) -> nn.Module:
    """``layer`` (a Linear, or the two Linears of a truncated SVD) with int8 matmuls."""
    if isinstance(layer, nn.Linear):
        return Int8Linear(layer)
    return nn.Sequential(*(_to_int8(m) for m in layer))


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` ``Tensor[O, I]`` and ``bias`` ``Tensor[O]`` (built on
    the meta device: no random initialisation of weights that are replaced anyway, which took
    ~0.1 s for a 16000 x 2048 fc6 when loading a model)."""
    fc = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fc.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fc.bias = nn.Parameter(bias, requires_grad=False)
    return fc


def _copy_linear(fc: nn.Linear) -> nn.Linear:
    bias = fc.bias.detach().clone() if fc.bias is not None else None
    return _linear(fc.weight.detach().clone(), bias)


def _fold_standardization(head: nn.Module) -> nn.Linear:
    """fc6 applied to ``(x - mean) / std`` as one linear layer: ``W' = W / std``,
    ``b' = b - W' mean`` (saves a pass over the ``[N, D]`` input)."""
    # float32 division is correctly rounded, as float64 division rounded to float32 is, so W'
    # is the same without a float64 copy of the weights; the bias's dot products sum in float64
    w = head.fc6.weight.detach().float() / head.in_std.float()[None, :]
    b = head.fc6.bias.detach().double() - w.double() @ head.in_mean.double()
    return _linear(w, b.float())


def resolve_fc_dtype(dtype: str, device: torch.device) -> str:
    """``auto`` -> the fastest fc setting measured within 0.3 mAP points of the exact path on
    that device: ``int8`` on a CPU with int8 dot-product instructions (:func:`cpu_has_int8_dot`;
    docs/fast_path.md), ``float32`` elsewhere: on a CPU without them ``torch._int_mm`` has no
    fast kernel (128x slower than float32 on an AVX2-only AMD EPYC,
    ``benchmarks/int8_matmul_*.json``), and no GPU setting has been measured for its mAP yet.
    Other values are returned as they are."""
    if dtype != "auto":
        return dtype
    return "int8" if device.type == "cpu" and cpu_has_int8_dot() else "float32"


def check_fc_dtype(dtype: str, device: torch.device) -> str:
    """``dtype`` resolved for ``device`` (:func:`resolve_fc_dtype`), or a ConfigError if the
    device cannot run it: bfloat16 runs on CPUs through oneDNN (fast with AVX512-BF16 / AMX)
    and on CUDA; float16 is CUDA only (AMP); int8 is CPU only (:class:`Int8Linear`)."""
    dtype = _check_dtype("fc", resolve_fc_dtype(dtype, device), FC_DTYPES, device)
    if dtype == "int8" and device.type != "cpu":
        raise ConfigError("fc dtype int8 is CPU only; use float16 or bfloat16 on CUDA")
    return dtype


def fc_autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast for the fc stage in ``dtype`` (checked by :func:`check_fc_dtype`); ``float32``
    and ``int8`` run without autocast (int8 changes the layers instead: :class:`CompressedHead`).
    """
    dtype = check_fc_dtype(dtype, device)
    if dtype in ("float32", "int8"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX-BF16, Linux ``/proc/cpuinfo``):
    without them oneDNN emulates bf16 and a bf16 conv is no faster than float32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8),
    which ``torch._int_mm`` needs to beat a float32 matmul."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_conv_dtype(dtype: str, device: torch.device) -> str:
    """``auto`` (test time only) -> ``bfloat16`` on a CPU with native bf16
    (:func:`cpu_has_native_bf16`; within 0.3 mAP points of float32 on VOC07 val with the
    MobileNetV2 ``features[13]`` trunk, but -0.44 with the EfficientNet-Lite0 model,
    docs/fast_path.md), ``float32`` elsewhere (CUDA's float32 convs already use TF32; fp16 is
    unmeasured there)."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"


def check_conv_dtype(dtype: str, device: torch.device) -> str:
    """``dtype`` if the conv trunk can run in it on ``device``, else a ConfigError."""
    return _check_dtype("conv", dtype, CONV_DTYPES, device)


def _check_dtype(stage: str, dtype: str, allowed: tuple[str, ...], device: torch.device) -> str:
    """``dtype`` if it is one of ``allowed`` and not float16 off CUDA (AMP is CUDA only)."""
    if dtype not in allowed:
        raise ConfigError(f"unknown {stage} dtype {dtype!r}; expected one of {allowed}")
    if dtype == "float16" and device.type != "cuda":
        raise ConfigError(f"{stage} dtype float16 needs CUDA; use bfloat16 on a CPU")
    return dtype


class AutocastTrunk(nn.Module):
    """A conv trunk run under ``torch.autocast`` in ``dtype`` (its output stays in ``dtype``;
    callers cast the maps to float32). Weights keep their float32 copy: autocast casts them
    once per call, which is small next to the activations of a whole image."""

    def __init__(self, trunk: nn.Module, device_type: str, dtype: str) -> None:
        super().__init__()
        self.trunk, self.device_type, self.dtype = trunk, device_type, getattr(torch, dtype)

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.trunk(x)
