"""Conv fine-tuning through the SPP layer (issue 17): the trunk's top blocks trained with the fc
head from cached lower maps, exactly resumable, saved with the model, and refused when the
cache does not leave those blocks out.

A tiny conv "top" (two blocks with batch norm) on deterministic random 4-channel lower maps
stands in for MobileNetV2's dilated blocks, so a run of a few steps takes milliseconds.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import sppdet.finetune as ft
from sppdet.backbones import BackboneSpec
from sppdet.errors import ConfigError
from sppdet.features import ScaleMap, SPPConfig
from sppdet.finetune import ConvTop, FinetuneConfig, finetune
from sppdet.head import load_trunk_top
from sppdet.window_features import MapProvider
from tests.test_finetune import SimulatedKillError, dataset

SPEC = BackboneSpec("test", stride=16, channels=5, offset=0.0, tap="test", torchvision_model=None)
SPP = SPPConfig()
K = 3
CFG = FinetuneConfig(
    hidden=16,
    iterations=8,
    lr=0.01,
    lr_steps=(6,),
    batch_size=16,
    images_per_batch=2,
    eval_every=4,
    checkpoint_every=4,
    conv_blocks=1,
    conv_lr=0.05,
)


def make_top() -> nn.Sequential:
    torch.manual_seed(3)
    top = nn.Sequential(
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
        nn.Sequential(nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU()),
    )
    with torch.no_grad():  # non-trivial statistics, so a BN update would show
        for m in top.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return top.eval()


class LowerProvider:
    """Cached lower maps (4 channels) that depend only on (image, flip, scale)."""

    def __init__(self, top: nn.Module | None, scales=(64, 96)) -> None:
        self.extractor = SimpleNamespace(
            device=torch.device("cpu"),
            spec=SPEC,
            config=SimpleNamespace(scales=scales),
            top_module=top,
        )
        self.spp = SPP

    def lower_maps(self, image_id, size, load_image, *, flip=False, scales=None):
        out = []
        for s in scales if scales is not None else self.extractor.config.scales:
            factor = s / min(size)
            g = torch.Generator().manual_seed(zlib.crc32(f"{image_id}/{flip}/{s}".encode()))
            h, w = max(1, round(size[0] * factor / 16)), max(1, round(size[1] * factor / 16))
            out.append(ScaleMap(torch.rand(4, h, w, generator=g), factor))
        return out

    def maps(self, image_id, size, load_image, *, flip=False, scales=None, top=None):
        lower = self.lower_maps(image_id, size, load_image, flip=flip, scales=scales)
        if top is not None:  # the blocks being trained, with gradients
            return [ScaleMap(top(m.fmap[None])[0], m.factor) for m in lower]
        with torch.no_grad():
            frozen = self.extractor.top_module
            return [ScaleMap(frozen(m.fmap[None])[0], m.factor) for m in lower]

    pool5 = MapProvider.pool5


def run(out: Path, cfg: FinetuneConfig = CFG, top: nn.Module | None = None) -> dict:
    records, props = dataset()
    provider = LowerProvider(make_top() if top is None else top)
    return finetune(records, props, provider, SPP, K, cfg, out, progress=False)


def test_only_the_trained_blocks_conv_weights_move(tmp_path):
    top = make_top()
    before = {k: v.clone() for k, v in top.state_dict().items()}
    run(tmp_path, top=top)
    after = load_trunk_top(tmp_path / "model.pt")
    assert list(after) == list(before)  # every top block, keyed as the extractor's top_module
    assert torch.equal(top.state_dict()["1.0.weight"], before["1.0.weight"])  # a copy trained
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {"1.0.weight", "1.0.bias"}  # block 0 frozen, batch norms frozen
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["conv_blocks"] == 1


def test_frozen_run_saves_no_trunk(tmp_path):
    run(tmp_path, FinetuneConfig(**{**CFG.__dict__, "conv_blocks": 0}))
    assert load_trunk_top(tmp_path / "model.pt") is None


def test_conv_finetune_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    run(tmp_path / "whole")
    real_save = ft.atomic_torch_save

    def save_then_die(obj, path):
        real_save(obj, path)
        if Path(path).name == "checkpoint.pt":
            raise SimulatedKillError

    monkeypatch.setattr(ft, "atomic_torch_save", save_then_die)
    with pytest.raises(SimulatedKillError):
        run(tmp_path / "resumed")
    monkeypatch.setattr(ft, "atomic_torch_save", real_save)
    run(tmp_path / "resumed")
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("whole", "resumed"))
    for part in ("model", "trunk_top"):
        for name in a[part]:
            torch.testing.assert_close(a[part][name], b[part][name], rtol=0, atol=0, msg=name)


def test_gradients_reach_the_trained_block_through_spp():
    top = ConvTop(make_top(), 1).train()
    assert not top.trained[0][1].training  # batch norm statistics stay frozen in train mode
    x = torch.rand(1, 4, 6, 8)
    fmap = top(x)[0]
    from sppdet.spp import spp_pool

    out = spp_pool(fmap, torch.tensor([[0, 0, 7, 5], [2, 1, 4, 3]]), SPP.levels)
    out.sum().backward()
    conv = top.trained[0][0]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in top.frozen.parameters())


def test_conv_blocks_must_fit_the_cache_split(tmp_path):
    with pytest.raises(ConfigError, match="top_blocks"):
        run(tmp_path / "a", FinetuneConfig(**{**CFG.__dict__, "conv_blocks": 3}))
    records, props = dataset()
    with pytest.raises(ConfigError, match="top_blocks"):
        finetune(records, props, LowerProvider(None), SPP, K, CFG, tmp_path / "b", progress=False)


def test_heldout_windows_are_pooled_again_when_conv_blocks_train(tmp_path, monkeypatch):
    # With a frozen trunk the held-out vectors are pooled once; with trained conv blocks they
    # are pooled with the current blocks at every measurement (eval_every=4 -> steps 4 and 8).
    calls = []
    real = ft._heldout
    monkeypatch.setattr(ft, "_heldout", lambda *a: calls.append(1) or real(*a))
    run(tmp_path / "conv")
    assert len(calls) == 1 + 2
    calls.clear()
    run(tmp_path / "frozen", FinetuneConfig(**{**CFG.__dict__, "conv_blocks": 0}))
    assert len(calls) == 1
