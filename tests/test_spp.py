"""Tests of sppdet.spp: window mapping (hand-worked paper cases) and SPP pooling vs naive loops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sppdet.spp import SpatialPyramidPool, map_windows, spp_dim, spp_pool

LEVEL_SETS = [(6, 3, 2, 1), (4, 3, 2, 1)]


# ---------------------------------------------------------------- references


def naive_spp(fmap: torch.Tensor, windows: torch.Tensor, levels) -> torch.Tensor:
    """Float64 loop over windows, levels and bins: bin ``i`` of ``n`` over ``w`` cells covers
    ``[floor(i w / n), ceil((i + 1) w / n))`` (SPEC 4); layout ``[C, n, n]`` per level."""
    f = fmap.detach().to(torch.float64)
    c = f.shape[0]
    rows = []
    for x1, y1, x2, y2 in windows.tolist():
        w, h = x2 - x1 + 1, y2 - y1 + 1
        parts = []
        for n in levels:
            grid = torch.empty(c, n, n, dtype=torch.float64)
            for i in range(n):
                ys, ye = y1 + math.floor(i * h / n), y1 + math.ceil((i + 1) * h / n)
                for j in range(n):
                    xs, xe = x1 + math.floor(j * w / n), x1 + math.ceil((j + 1) * w / n)
                    grid[:, i, j] = f[:, ys:ye, xs:xe].amax(dim=(1, 2))
            parts.append(grid.reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows) if rows else torch.zeros(0, c * sum(n * n for n in levels))


def adaptive_reference(fmap: torch.Tensor, windows: torch.Tensor, levels) -> torch.Tensor:
    """``adaptive_max_pool2d`` of each cropped window, levels concatenated."""
    rows = []
    for x1, y1, x2, y2 in windows.tolist():
        crop = fmap[:, y1 : y2 + 1, x1 : x2 + 1].unsqueeze(0)
        rows.append(torch.cat([F.adaptive_max_pool2d(crop, n).reshape(-1) for n in levels]))
    return torch.stack(rows)


def random_windows(gen: torch.Generator, h: int, w: int, n: int) -> torch.Tensor:
    """``n`` random inclusive cell windows plus the special ones: 1-cell, full map, borders."""
    xs = torch.randint(0, w, (n, 2), generator=gen).sort(dim=1).values
    ys = torch.randint(0, h, (n, 2), generator=gen).sort(dim=1).values
    rand = torch.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], dim=1)
    special = torch.tensor(
        [
            [0, 0, 0, 0],  # 1 cell, top-left corner
            [w - 1, h - 1, w - 1, h - 1],  # 1 cell, bottom-right corner
            [w // 2, h // 2, w // 2, h // 2],  # 1 cell inside
            [0, 0, w - 1, h - 1],  # the full map
            [0, 0, w - 1, 0],  # top row
            [w - 1, 0, w - 1, h - 1],  # right column
            [0, h - 1, w - 1, h - 1],  # bottom row
            [0, 0, 0, h - 1],  # left column
        ]
    )
    return torch.cat([rand, special])


# ---------------------------------------------------------------- map_windows by hand


def _map(box, **kw):
    kw.setdefault("stride", 16)
    kw.setdefault("offset", 0.0)
    kw.setdefault("fmap_size", (40, 40))
    return map_windows(torch.tensor([box], dtype=torch.float32), **kw)[0].tolist()


def test_map_windows_paper_rule_hand_cases():
    # Paper appendix, S = 16, offset 0. Internal box (0, 0, 32, 32) covers pixels 0..31:
    # left/top floor(0 / 16) + 1 = 1, right/bottom ceil(31 / 16) - 1 = 2 - 1 = 1.
    assert _map([0, 0, 32, 32]) == [1, 1, 1, 1]
    # Pixels 0..32: the last pixel is cell 2's centre, which is not strictly inside:
    # right ceil(32/16)-1 = 1 (not floor(32/16) = 2).
    assert _map([0, 0, 33, 33]) == [1, 1, 1, 1]
    # Pixels 0..33: right ceil(33/16)-1 = 2.
    assert _map([0, 0, 34, 34]) == [1, 1, 2, 2]
    # Pixels x 16..79, y 8..71: left floor(16/16)+1 = 2, right ceil(79/16)-1 = 5-1 = 4;
    # top floor(8/16)+1 = 1, bottom ceil(71/16)-1 = 5-1 = 4.
    assert _map([16, 8, 80, 72]) == [2, 1, 4, 4]
    # Pixels 0..159 (the whole of a 160-pixel image, a 10-cell map): 1 .. ceil(159/16)-1 = 9.
    assert _map([0, 0, 160, 160], fmap_size=(10, 10)) == [1, 1, 9, 9]
    # Fractional edges (boxes scaled by a resize factor): x pixels 33.5..100.25:
    # left floor(33.5/16)+1 = 3, right ceil(100.25/16)-1 = 7-1 = 6.
    assert _map([33.5, 0, 101.25, 32]) == [3, 1, 6, 1]


def test_map_windows_paper_rule_with_offset():
    # AlexNet-like trunk: cell j centred on pixel 16 j + 15, so subtract 15 first.
    # x pixels 15..78 -> 0..63: left floor(0/16)+1 = 1, right ceil(63/16)-1 = 4-1 = 3.
    # y pixels 31..95 -> 16..80: top floor(16/16)+1 = 2, bottom ceil(80/16)-1 = 5-1 = 4.
    assert _map([15, 31, 79, 96], offset=15.0) == [1, 2, 3, 4]
    # VGG16 (offset 7.5): x pixels 0..63 -> -7.5..55.5: floor(-7.5/16)+1 = -1+1 = 0,
    # ceil(55.5/16)-1 = 4-1 = 3.
    assert _map([0, 0, 64, 64], offset=7.5) == [0, 0, 3, 3]


def test_map_windows_round_rule_hand_cases():
    # Released spm_response_boxes.m: left floor((x + shrink)/S + 0.5), right
    # ceil((x - shrink)/S - 0.5) (0-based), x the first/last pixel after subtracting the offset.
    # Box (10, 0, 100, 40): x pixels 10..99, y pixels 0..39.
    # shrink 0: x: floor(10/16+.5) = floor(1.125) = 1, ceil(99/16-.5) = ceil(5.6875) = 6;
    #           y: floor(0+.5) = 0, ceil(39/16-.5) = ceil(1.9375) = 2.
    assert _map([10, 0, 100, 40], rule="round") == [1, 0, 6, 2]
    # shrink 12: x: floor(22/16+.5) = floor(1.875) = 1, ceil(87/16-.5) = ceil(4.9375) = 5;
    #            y: floor(12/16+.5) = floor(1.25) = 1, ceil(27/16-.5) = ceil(1.1875) = 2.
    assert _map([10, 0, 100, 40], rule="round", shrink=12.0) == [1, 1, 5, 2]
    # Same box with offset 15 and shrink 0: x 10..99 -> -5..84:
    # floor(-5/16+.5) = floor(0.1875) = 0, ceil(84/16-.5) = ceil(4.75) = 5;
    # y 0..39 -> -15..24: floor(-15/16+.5) = floor(-0.4375) = -1 -> clamped 0,
    # ceil(24/16-.5) = ceil(1.0) = 1.
    assert _map([10, 0, 100, 40], rule="round", offset=15.0) == [0, 0, 5, 1]


def test_map_windows_small_window_gets_nearest_cell():
    # Pixels 20..27 (smaller than a cell): paper rule gives 2 > 1 (inverted), so the cell
    # nearest the window centre 23.5 is used: cell 1 (centre 16, 7.5 away), not 2 (8.5 away).
    assert _map([20, 20, 28, 28]) == [1, 1, 1, 1]
    # Pixels 40..46: left 3 > right ceil(46/16)-1 = 2; centre 43 is nearest cell 3 (48).
    assert _map([40, 40, 47, 47]) == [3, 3, 3, 3]
    # Zero-size and inverted boxes still get one cell.
    assert _map([50, 50, 50, 50]) == [3, 3, 3, 3]  # pixels 50..49: centre 49.5 -> cell 3
    assert _map([60, 60, 40, 40]) == [3, 3, 3, 3]  # centre (60 + 39) / 2 = 49.5 -> cell 3
    # Inverted in one axis only: x is a normal range, y smaller than a cell.
    assert _map([0, 20, 64, 28]) == [1, 1, 3, 1]


def test_map_windows_border_clamping():
    size = (10, 12)  # H = 10, W = 12
    # Over every border: left floor(-50/16)+1 = -3 -> 0; right ceil(399/16)-1 = 24 -> W-1 / H-1.
    assert _map([-50, -50, 400, 400], fmap_size=size) == [0, 0, 11, 9]
    # Wholly right of the map (x pixels 500..599: 32..37 -> the last column 11);
    # y pixels 0..49: 1 .. ceil(49/16)-1 = 3.
    assert _map([500, 0, 600, 50], fmap_size=size) == [11, 1, 11, 3]
    # Wholly above-left of the map -> cell (0, 0).
    assert _map([-100, -100, -50, -50], fmap_size=size) == [0, 0, 0, 0]
    # A 1 x 1 map takes everything.
    assert _map([5, 5, 300, 300], fmap_size=(1, 1)) == [0, 0, 0, 0]


def _strictly_inside_reference(lo: float, hi: float, stride: float, n_cells: int) -> tuple:
    """Paper rule by brute force: cells whose centre lies strictly inside (lo, hi), else the
    cell nearest the middle; clamped to the map."""
    inside = [j for j in range(-200, 200) if lo < stride * j < hi]
    if inside:
        a, b = min(inside), max(inside)
    else:
        mid = (lo + hi) / 2
        a = b = min(range(-200, 200), key=lambda j: abs(stride * j - mid))
    a = min(max(a, 0), n_cells - 1)
    b = min(max(b, 0), n_cells - 1)
    return a, max(a, b)


def test_map_windows_paper_rule_is_centres_strictly_inside():
    gen = torch.Generator().manual_seed(0)
    boxes = torch.rand(300, 4, generator=gen, dtype=torch.float64) * 400 - 60
    boxes[:, 2:] = boxes[:, :2] + torch.rand(300, 2, generator=gen, dtype=torch.float64) * 150
    stride, offset, (h, w) = 16, 7.25, (17, 23)
    got = map_windows(boxes, stride=stride, offset=offset, fmap_size=(h, w))
    for box, cells in zip(boxes.tolist(), got.tolist(), strict=True):
        for axis, n_cells in ((0, w), (1, h)):
            lo, hi = box[axis] - offset, box[axis + 2] - 1 - offset
            expected = _strictly_inside_reference(lo, hi, stride, n_cells)
            assert (cells[axis], cells[axis + 2]) == expected, (box, cells)


@pytest.mark.parametrize("rule,shrink", [("paper", 0.0), ("round", 0.0), ("round", 10.0)])
def test_map_windows_always_inside_the_map(rule, shrink):
    gen = torch.Generator().manual_seed(1)
    # Arbitrary boxes: outside the image, degenerate, inverted, tiny, huge.
    boxes = torch.rand(500, 4, generator=gen) * 1200 - 300
    boxes[:50, 2:] = boxes[:50, :2]  # zero size
    for h, w in [(1, 1), (1, 9), (9, 1), (13, 21)]:
        out = map_windows(boxes, stride=16, offset=15.0, fmap_size=(h, w), rule=rule, shrink=shrink)
        assert out.dtype == torch.long
        assert out.shape == (500, 4)
        x1, y1, x2, y2 = out.unbind(1)
        assert bool(((x1 >= 0) & (x1 <= x2) & (x2 < w)).all())
        assert bool(((y1 >= 0) & (y1 <= y2) & (y2 < h)).all())
        spp_pool(torch.zeros(2, h, w), out)  # accepted by the pooling


def test_map_windows_empty_and_bad_rule():
    out = map_windows(torch.zeros(0, 4), stride=16, offset=0, fmap_size=(3, 3))
    assert out.shape == (0, 4)
    assert out.dtype == torch.long
    with pytest.raises(ValueError, match="rule"):
        map_windows(torch.zeros(1, 4), stride=16, offset=0, fmap_size=(3, 3), rule="nearest")


# ---------------------------------------------------------------- spp_pool


@pytest.mark.parametrize("levels", LEVEL_SETS)
@pytest.mark.parametrize("shape", [(3, 13, 17), (2, 1, 9), (2, 9, 1), (2, 1, 1), (4, 6, 6)])
def test_spp_pool_equals_naive_loop(levels, shape):
    gen = torch.Generator().manual_seed(sum(shape) + levels[0])
    fmap = torch.randn(*shape, generator=gen)
    windows = random_windows(gen, shape[1], shape[2], 40)
    got = spp_pool(fmap, windows, levels)
    assert got.shape == (len(windows), spp_dim(shape[0], levels))
    assert got.dtype == fmap.dtype
    # Max pooling selects values, so the fp32 result is exactly the float64 reference.
    torch.testing.assert_close(got.double(), naive_spp(fmap, windows, levels), rtol=0, atol=0)


@pytest.mark.parametrize("method", ["loop", "table", "kernel"])
@pytest.mark.parametrize("levels", [*LEVEL_SETS, (5, 2), (1,), (2, 4, 8), (6, 4, 3, 2)])
def test_every_method_equals_the_naive_loop(method, levels):
    # (2, 4, 8) checks nesting in any order; (5, 2) has no nested level (the kernel scans both)
    gen = torch.Generator().manual_seed(11)
    fmap = torch.randn(6, 21, 30, generator=gen)
    windows = torch.cat([random_windows(gen, 21, 30, 60), torch.tensor([[0, 0, 29, 20]])])
    got = spp_pool(fmap, windows, levels, method=method)
    torch.testing.assert_close(got.double(), naive_spp(fmap, windows, levels), rtol=0, atol=0)


def test_kernel_method_refuses_what_it_cannot_do():
    fmap = torch.randn(2, 5, 5, requires_grad=True)
    with pytest.raises(ValueError, match="kernel"):
        spp_pool(fmap, torch.tensor([[0, 0, 4, 4]]), method="kernel")


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_spp_pool_equals_adaptive_max_pool_of_the_crop(levels):
    gen = torch.Generator().manual_seed(7)
    fmap = torch.randn(5, 20, 31, generator=gen)
    windows = random_windows(gen, 20, 31, 30)
    torch.testing.assert_close(
        spp_pool(fmap, windows, levels), adaptive_reference(fmap, windows, levels), rtol=0, atol=0
    )


def test_window_equals_pooling_the_cropped_region():
    gen = torch.Generator().manual_seed(8)
    fmap = torch.randn(4, 15, 22, generator=gen)
    windows = random_windows(gen, 15, 22, 30)
    got = spp_pool(fmap, windows)
    for row, (x1, y1, x2, y2) in zip(got, windows.tolist(), strict=True):
        crop = fmap[:, y1 : y2 + 1, x1 : x2 + 1]
        full = torch.tensor([[0, 0, x2 - x1, y2 - y1]])
        torch.testing.assert_close(row, spp_pool(crop, full)[0], rtol=0, atol=0)


def test_spp_pool_output_layout():
    # A 6x6 map with distinct values, full window, levels (3, 1): level 3 bins are the 2x2
    # blocks (no overlap) in row-major order per channel, then the 1x1 level.
    fmap = torch.arange(2 * 36, dtype=torch.float32).reshape(2, 6, 6)
    out = spp_pool(fmap, torch.tensor([[0, 0, 5, 5]]), levels=(3, 1))[0]
    blocks = fmap.reshape(2, 3, 2, 3, 2).amax(dim=(2, 4))  # [C, 3, 3]
    expected = torch.cat([blocks.reshape(-1), fmap.amax(dim=(1, 2))])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.shape == (spp_dim(2, (3, 1)),) == (2 * 10,)
    # Level order follows the argument: (1, 3) puts the global max first.
    out2 = spp_pool(fmap, torch.tensor([[0, 0, 5, 5]]), levels=(1, 3))[0]
    torch.testing.assert_close(out2, torch.cat([fmap.amax(dim=(1, 2)), blocks.reshape(-1)]))


def test_spp_dim():
    assert spp_dim(256, (6, 3, 2, 1)) == 256 * 50 == 12800
    assert spp_dim(96, (4, 3, 2, 1)) == 96 * 30


def test_spp_pool_chunking_does_not_change_the_result():
    gen = torch.Generator().manual_seed(9)
    fmap = torch.randn(3, 11, 14, generator=gen)
    windows = random_windows(gen, 11, 14, 25)
    torch.testing.assert_close(spp_pool(fmap, windows, chunk=4), spp_pool(fmap, windows))


def test_spp_pool_empty_window_set():
    fmap = torch.randn(7, 5, 5)
    for windows in (torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4)):
        out = spp_pool(fmap, windows)
        assert out.shape == (0, 7 * 50)
        assert out.dtype == fmap.dtype
    assert spp_pool(fmap, torch.zeros(0, 4), levels=(4, 3, 2, 1)).shape == (0, 7 * 30)


@pytest.mark.parametrize(
    "window",
    [
        [-1, 0, 2, 2],  # x1 < 0
        [0, -1, 2, 2],  # y1 < 0
        [3, 0, 2, 2],  # x1 > x2
        [0, 3, 2, 2],  # y1 > y2
        [0, 0, 5, 2],  # x2 == W
        [0, 0, 2, 4],  # y2 == H
    ],
)
def test_spp_pool_rejects_invalid_windows(window):
    fmap = torch.randn(2, 4, 5)  # H = 4, W = 5
    with pytest.raises(ValueError, match="window"):
        spp_pool(fmap, torch.tensor([[0, 0, 1, 1], window]))


def test_spp_pool_rejects_batched_maps():
    with pytest.raises(ValueError, match="C, H, W"):
        spp_pool(torch.randn(1, 2, 4, 5), torch.tensor([[0, 0, 1, 1]]))


def test_spp_pool_gradcheck():
    # Distinct values (a permutation) so every max is unique and the gradient well defined.
    gen = torch.Generator().manual_seed(10)
    fmap = (torch.randperm(2 * 5 * 6, generator=gen).double() / 7.0).reshape(2, 5, 6)
    fmap.requires_grad_(True)
    windows = torch.tensor([[0, 0, 5, 4], [1, 1, 3, 2], [2, 3, 2, 3], [0, 2, 5, 2]])
    assert torch.autograd.gradcheck(
        lambda f: spp_pool(f, windows, (3, 2, 1)), (fmap,), eps=1e-6, atol=1e-8
    )


def test_spp_pool_gradient_equals_adaptive_pool_gradient():
    gen = torch.Generator().manual_seed(11)
    base = torch.randperm(3 * 9 * 8, generator=gen).double().reshape(3, 9, 8)
    windows = random_windows(gen, 9, 8, 10)
    weights = torch.randn(len(windows), spp_dim(3, (6, 3, 2, 1)), generator=gen).double()
    grads = []
    for fn in (spp_pool, adaptive_reference):
        f = base.clone().requires_grad_(True)
        (fn(f, windows, (6, 3, 2, 1)) * weights).sum().backward()
        grads.append(f.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_spp_pool_with_gradients_equals_naive_on_channels_last_maps():
    # Fine-tuning pools the output of channels-last conv blocks, with gradients on: values
    # equal the float64 reference, and the gradient of each output lands on its arg-max cell.
    gen = torch.Generator().manual_seed(13)
    c, h, w = 4, 9, 11
    base = torch.randperm(c * h * w, generator=gen).double().reshape(1, c, h, w)
    fmap = base.contiguous(memory_format=torch.channels_last)[0].requires_grad_(True)
    windows = random_windows(gen, h, w, 12)
    out = spp_pool(fmap, windows, (6, 3, 2, 1))
    assert out.grad_fn is not None
    torch.testing.assert_close(out.detach(), naive_spp(base[0], windows, (6, 3, 2, 1)))
    pick = torch.zeros_like(out)
    pick[3, 7] = 1.0  # one output value: its gradient is a single 1 on the max cell
    (grad,) = torch.autograd.grad(out, fmap, pick)
    assert grad.sum() == 1.0 and grad.max() == 1.0
    assert fmap.detach().flatten()[grad.flatten().argmax()] == out[3, 7]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_float32_gradient_path_equals_the_float64_loop(ties, channels_last):
    # A float32 CPU map with gradients (conv fine-tuning) pools in the compiled arg-max scan;
    # a float64 one in the loop of adaptive max poolings. Same values, and each output's
    # gradient on the same cell, ties included (a map of a few integers: many equal maxima,
    # where both keep the first in row-major order). Integer gradients keep the sums exact.
    gen = torch.Generator().manual_seed(14)
    c, h, w = 5, 9, 12
    if ties:
        base = torch.randint(0, 4, (1, c, h, w), generator=gen).double()
    else:
        base = torch.randperm(c * h * w, generator=gen).double().reshape(1, c, h, w)
    if channels_last:
        base = base.contiguous(memory_format=torch.channels_last)
    windows = random_windows(gen, h, w, 15)
    levels = (6, 3, 2, 1)
    up = torch.randint(-3, 4, (len(windows), spp_dim(c, levels)), generator=gen).double()
    outs, grads = [], []
    for dtype in (torch.float64, torch.float32):
        f = base[0].to(dtype).requires_grad_(True)
        out = spp_pool(f, windows, levels)
        (out * up.to(dtype)).sum().backward()
        outs.append(out.detach().double())
        grads.append(f.grad.double())
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0], grads[1])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_spp_pool_cuda_equals_cpu():
    gen = torch.Generator().manual_seed(12)
    fmap = torch.randn(16, 23, 31, generator=gen)
    windows = random_windows(gen, 23, 31, 200)
    cpu = spp_pool(fmap, windows)
    gpu = spp_pool(fmap.cuda(), windows.cuda())
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=0)
    # Windows on the CPU are moved to the map's device.
    torch.testing.assert_close(spp_pool(fmap.cuda(), windows).cpu(), cpu, rtol=0, atol=0)


# ---------------------------------------------------------------- SpatialPyramidPool


@pytest.mark.parametrize("levels", LEVEL_SETS)
@pytest.mark.parametrize("hw", [(1, 1), (5, 7), (13, 4), (32, 32), (1, 40)])
def test_spatial_pyramid_pool_any_input_size(levels, hw):
    gen = torch.Generator().manual_seed(hw[0] * 100 + hw[1])
    x = torch.randn(2, 3, *hw, generator=gen)
    layer = SpatialPyramidPool(levels)
    out = layer(x)
    assert out.shape == (2, spp_dim(3, levels))
    full = torch.tensor([[0, 0, hw[1] - 1, hw[0] - 1]])
    for i in range(2):
        torch.testing.assert_close(out[i], spp_pool(x[i], full, levels)[0], rtol=0, atol=0)


def test_spatial_pyramid_pool_repr_and_default():
    layer = SpatialPyramidPool()
    assert layer.levels == (6, 3, 2, 1)
    assert "levels=(6, 3, 2, 1)" in repr(layer)
