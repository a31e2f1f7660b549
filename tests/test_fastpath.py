"""Tests of the fast test path: truncated SVD of the fc layers, folded input standardisation,
int8 fc matmuls, fc autocast, window dedup, and the SPP kernel leaving torch's thread setting
alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from sppdet.backbones import backbone_spec
from sppdet.errors import ConfigError
from sppdet.fastpath import (
    INT8_MAX,
    AutocastTrunk,
    CompressedHead,
    Int8Linear,
    check_conv_dtype,
    cpu_has_int8_dot,
    cpu_has_native_bf16,
    fc_autocast,
    resolve_conv_dtype,
    resolve_fc_dtype,
    truncated_linear,
)
from sppdet.features import FeatureConfig, FeatureExtractor, ScaleMap, SPPConfig
from sppdet.head import FCHead
from sppdet.spp import spp_pool
from sppdet.window_pool import pool_distinct_windows, pool_windows, unique_windows


@pytest.fixture(scope="module")
def head() -> FCHead:
    torch.manual_seed(0)
    h = FCHead(40, 24, 3).eval()
    h.fit_standardization(torch.rand(200, 40) * 3 + 1)
    return h


def test_full_rank_svd_reproduces_the_layer():
    torch.manual_seed(1)
    fc = nn.Linear(30, 20)
    x = torch.randn(7, 30)
    two = truncated_linear(fc, 20)
    torch.testing.assert_close(two(x), fc(x), atol=1e-5, rtol=1e-5)
    assert [m.weight.shape for m in two] == [(20, 30), (20, 20)]


def test_svd_error_falls_with_rank_and_matches_the_eckart_young_bound():
    torch.manual_seed(2)
    fc = nn.Linear(50, 40, bias=False)
    s = torch.linalg.svdvals(fc.weight.double()).detach()
    errors = []
    for r in (5, 10, 20, 40):
        w = truncated_linear(fc, r)[1].weight.double() @ truncated_linear(fc, r)[0].weight.double()
        err = torch.linalg.matrix_norm(fc.weight.double() - w, ord=2).detach()
        # the best rank-r approximation's spectral error is the (r+1)-th singular value
        expected = s[r] if r < len(s) else torch.tensor(0.0, dtype=torch.float64)
        assert float(err) == pytest.approx(float(expected), abs=1e-5)
        errors.append(float(err))
    assert errors == sorted(errors, reverse=True)
    with pytest.raises(ConfigError):
        truncated_linear(fc, 0)


def test_compressed_head_without_truncation_equals_the_head(head):
    x = torch.rand(9, 40) * 3
    fast = CompressedHead(head, 0, 0)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), head(x), atol=1e-4, rtol=1e-4)
        for layer in ("pool5", "fc6", "fc7"):
            torch.testing.assert_close(
                fast.embed(x, layer), head.embed(x, layer), atol=1e-4, rtol=1e-4
            )
        low = CompressedHead(head, 4, 4)
        assert not torch.allclose(low(x), head(x), atol=1e-3)  # rank 4 of 24 does lose detail


def test_fc_autocast_checks_the_dtype():
    with fc_autocast(torch.device("cpu"), "bfloat16"):
        y = nn.Linear(4, 4)(torch.rand(2, 4))
    assert y.dtype == torch.bfloat16
    with fc_autocast(torch.device("cpu"), "float32"):
        assert nn.Linear(4, 4)(torch.rand(2, 4)).dtype == torch.float32
    with pytest.raises(ConfigError, match="CUDA"):
        fc_autocast(torch.device("cpu"), "float16")
    with fc_autocast(torch.device("cpu"), "int8"):  # int8 swaps layers, it does not autocast
        assert nn.Linear(4, 4)(torch.rand(2, 4)).dtype == torch.float32
    with pytest.raises(ConfigError, match="CPU only"):
        fc_autocast(torch.device("cuda"), "int8")
    with pytest.raises(ConfigError):
        fc_autocast(torch.device("cpu"), "int4")


def test_auto_fc_dtype_is_int8_on_cpus_with_int8_dot_products_only(monkeypatch):
    import sppdet.fastpath as fp

    int8 = "int8" if cpu_has_int8_dot() else "float32"  # no fast int8 kernel without VNNI / AMX
    assert resolve_fc_dtype("auto", torch.device("cpu")) == int8
    monkeypatch.setattr(fp, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert resolve_fc_dtype("auto", torch.device("cpu")) == "int8"
    monkeypatch.setattr(fp, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert resolve_fc_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_fc_dtype("auto", torch.device("cuda")) == "float32"
    assert resolve_fc_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
    with fc_autocast(torch.device("cpu"), "auto"):
        assert nn.Linear(4, 4)(torch.rand(2, 4)).dtype == torch.float32


def _int8_reference(fc: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Naive float64 model of Int8Linear: per-channel weight and per-row input quantization."""
    w, x = fc.weight.detach().double(), x.double()
    sw = w.abs().amax(1) / INT8_MAX
    sx = x.abs().amax(1) / INT8_MAX
    qw, qx = torch.round(w / sw[:, None]), torch.round(x / sx[:, None])
    return (qx @ qw.T) * sx[:, None] * sw[None, :] + fc.bias.detach().double()


def test_int8_linear_equals_its_float64_model_and_is_close_to_fp32():
    torch.manual_seed(5)
    fc = nn.Linear(300, 70)
    x = torch.randn(33, 300) * torch.rand(33, 1) * 10  # rows of very different scales
    x[0] = 0.0  # an all-zero row (zero scale) must give the bias, not NaN
    y = Int8Linear(fc)(x)
    assert y.dtype == torch.float32 and y.shape == (33, 70)
    torch.testing.assert_close(y[1:].double(), _int8_reference(fc, x[1:]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(y[0], fc.bias.detach())
    exact = fc(x).detach().double()
    rel = (y.double() - exact).norm(dim=1) / exact.norm(dim=1)
    assert float(rel[1:].max()) < 0.02  # 8 bits on both factors: about 1 % per output
    assert float(rel[1:].max()) > 1e-5  # and it does quantize (not a float passthrough)


def test_int8_head_tracks_the_fp32_head(head):
    x = torch.rand(64, 40) * 3
    with torch.no_grad():
        ref = head.embed(x, "fc7")
        for ranks in ((0, 0), (40, 24)):  # int8 on the exact layers and on full-rank SVD factors
            q = CompressedHead(head, *ranks, int8=True)
            assert isinstance(q.fc7 if ranks[1] == 0 else q.fc7[0], Int8Linear)
            got = q.embed(x, "fc7")
            assert float((got - ref).norm() / ref.norm()) < 0.03
            assert q(x).argmax(1).eq(head(x).argmax(1)).float().mean() > 0.9


def test_unique_windows_pool_the_same_vectors():
    spec, spp = backbone_spec("zf5"), SPPConfig()
    g = torch.Generator().manual_seed(3)
    maps = [ScaleMap(torch.rand(8, 12, 15, generator=g), 1.0), ScaleMap(torch.rand(8, 6, 8), 0.5)]
    rng = np.random.default_rng(4)
    xy = rng.uniform(0, 150, size=(300, 2))
    wh = rng.uniform(5, 100, size=(300, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, [240, 190])], axis=1).astype(np.float32)
    first, inverse = unique_windows(maps, boxes, spec)
    assert len(first) < len(boxes)  # 300 random boxes on small maps share cells
    every = pool_windows(maps, boxes, spec, spp)
    distinct = pool_windows(maps, boxes[first], spec, spp)
    torch.testing.assert_close(distinct[torch.from_numpy(inverse)], every, atol=0, rtol=0)
    pooled, inverse2 = pool_distinct_windows(maps, boxes, spec, spp)
    np.testing.assert_array_equal(inverse2, inverse)
    torch.testing.assert_close(pooled, distinct, atol=0, rtol=0)


def test_spp_kernel_keeps_the_callers_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        fmap = torch.rand(4, 10, 10)
        spp_pool(fmap, torch.tensor([[0, 0, 5, 5]] * 20), method="kernel")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_conv_dtype_is_checked_for_the_device():
    assert check_conv_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
    assert check_conv_dtype("float16", torch.device("cuda")) == "float16"
    with pytest.raises(ConfigError, match="CUDA"):
        check_conv_dtype("float16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="unknown conv dtype"):
        check_conv_dtype("int8", torch.device("cpu"))
    with pytest.raises(ConfigError, match="CUDA"):
        FeatureExtractor(FeatureConfig(backbone="zf5", scales=(64,), conv_dtype="float16"))


def test_bf16_conv_trunk_runs_in_bf16_and_tracks_float32():
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        y = AutocastTrunk(conv, "cpu", "bfloat16")(x)
        ref = conv(x)
    assert y.dtype == torch.bfloat16
    # bf16 keeps 8 mantissa bits: ~0.4 % per rounding, a few roundings deep here
    assert (y.float() - ref).abs().max() <= 0.03 * ref.abs().max()
    assert not (y.float() == ref).all()  # it really ran in bf16


def test_bf16_conv_maps_track_float32_and_are_fingerprinted():
    img = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    base = FeatureConfig(backbone="zf5", scales=(64,), max_size=128)
    fp32 = FeatureExtractor(base)
    bf16 = FeatureExtractor(dataclasses.replace(base, conv_dtype="bfloat16"))
    a, b = fp32.compute(img)[0].fmap, bf16.compute(img)[0].fmap
    assert a.shape == b.shape and b.dtype == torch.float32
    assert (a - b).abs().max() <= 0.05 * a.abs().max()
    # float32 caches made before the setting existed keep their fingerprint
    assert "conv_dtype" not in fp32.manifest()
    assert bf16.manifest()["conv_dtype"] == "bfloat16"


def test_auto_conv_dtype_is_bf16_only_on_cpus_with_native_bf16(monkeypatch):
    import sppdet.fastpath as fp

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_conv_dtype("auto", cpu) == ("bfloat16" if cpu_has_native_bf16() else "float32")
    monkeypatch.setattr(fp, "cpu_has_native_bf16", lambda: True)
    assert resolve_conv_dtype("auto", cpu) == "bfloat16"
    assert resolve_conv_dtype("auto", cuda) == "float32"
    assert resolve_conv_dtype("float16", cuda) == "float16"
    monkeypatch.setattr(fp, "cpu_has_native_bf16", lambda: False)
    assert resolve_conv_dtype("auto", cpu) == "float32"
