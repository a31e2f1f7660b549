"""Tests of sppdet.finetune: the fc head's shapes and layers, and resumable fine-tuning.

Fine-tuning runs on a fake map provider (deterministic random 4-channel conv maps per image,
scale and flip), so no image or backbone is needed and a run of a few steps takes milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import sppdet.finetune as ft
from sppdet.backbones import BackboneSpec
from sppdet.datasets import ImageRecord
from sppdet.features import ScaleMap, SPPConfig
from sppdet.finetune import FinetuneConfig, finetune
from sppdet.head import LAYERS, FCHead, load_head
from sppdet.window_features import MapProvider

SPEC = BackboneSpec("test", stride=16, channels=4, offset=0.0, tap="test", torchvision_model=None)
SPP = SPPConfig()
DIM = SPEC.channels * sum(n * n for n in SPP.levels)  # 200
K = 3
H, W = 96, 128


# ----------------------------------------------------------------------------- FCHead


def test_fc_head_shapes_and_config():
    head = FCHead(DIM, 16, K)
    x = torch.rand(5, DIM)
    assert head(x).shape == (5, K + 1)
    assert head.embed(x, "fc6").shape == (5, 16)
    assert head.embed(x, "fc7").shape == (5, 16)
    assert head.config() == {"in_dim": DIM, "hidden": 16, "num_classes": K}
    assert LAYERS == ("pool5", "fc6", "fc7")
    # classifier: Gaussian sigma 0.01, zero bias (SPEC section 5)
    big = FCHead(DIM, 256, 20)
    assert torch.count_nonzero(big.cls.bias) == 0
    assert big.cls.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_embed_layers_are_the_relu_activations_without_dropout():
    torch.manual_seed(0)
    head = FCHead(DIM, 16, K, dropout=0.9).train()  # dropout active in train mode
    x = torch.randn(7, DIM)
    assert head.embed(x, "pool5") is x
    fc6 = torch.relu(head.fc6(x))
    fc7 = torch.relu(head.fc7(fc6))
    torch.testing.assert_close(head.embed(x, "fc6"), fc6)
    torch.testing.assert_close(head.embed(x, "fc7"), fc7)
    assert (fc7 >= 0).all() and (fc7 == 0).any() and (fc7 > 0).any()
    # embed ignores dropout; forward uses it in train mode and not in eval mode
    torch.testing.assert_close(head.embed(x, "fc7"), head.embed(x, "fc7"))
    assert not torch.equal(head(x), head(x))
    head.eval()
    torch.testing.assert_close(head(x), head.cls(fc7))


def test_load_head_round_trips(tmp_path):
    torch.manual_seed(1)
    head = FCHead(DIM, 12, K)
    torch.save({"model": head.state_dict(), "config": head.config()}, tmp_path / "model.pt")
    loaded = load_head(tmp_path / "model.pt")
    assert not loaded.training
    assert loaded.config() == head.config()
    for (name, a), (name2, b) in zip(
        head.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert name == name2
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = torch.rand(3, DIM)
    torch.testing.assert_close(loaded(x), head.eval()(x))


# -------------------------------------------------------------------------- fine-tuning


class FakeProvider:
    """Conv maps that depend only on (image, flip, scale): what a feature cache would return."""

    def __init__(self, scales=(64, 96)) -> None:
        self.extractor = SimpleNamespace(
            device=torch.device("cpu"), spec=SPEC, config=SimpleNamespace(scales=scales)
        )
        self.calls = 0
        self.spp = SPP

    pool5 = MapProvider.pool5  # the real window pooling over these maps

    def maps(self, image_id, size, load_image, *, flip=False, scales=None, top=None):
        assert top is None  # no conv blocks are trained here (tests/test_conv_finetune.py)
        self.calls += 1
        out = []
        for s in scales if scales is not None else self.extractor.config.scales:
            factor = s / min(size)
            g = torch.Generator().manual_seed(zlib.crc32(f"{image_id}/{flip}/{s}".encode()))
            h, w = max(1, round(size[0] * factor / 16)), max(1, round(size[1] * factor / 16))
            out.append(ScaleMap(torch.rand(SPEC.channels, h, w, generator=g), factor))
        return out


class Proposals:
    def __init__(self, by_id: dict[str, np.ndarray]) -> None:
        self.by_id = by_id

    def boxes_for(self, image_id: str) -> np.ndarray:
        return self.by_id[image_id]


def dataset(n: int = 6, seed: int = 0):
    """``n`` records with 1-2 objects each, and proposals jittered around them plus clutter."""
    rng = np.random.default_rng(seed)
    records, props = [], {}
    for i in range(n):
        g = int(rng.integers(1, 3))
        xy = rng.uniform(0, [W - 50, H - 50], size=(g, 2))
        wh = rng.uniform(25, 50, size=(g, 2))
        gt = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
        labels = rng.integers(0, K, g)
        image_id = f"{i:06d}"
        records.append(
            ImageRecord(
                image_id, Path(f"/nonexistent/{image_id}.jpg"), W, H, gt, labels, [False] * g
            )
        )
        jitter = np.repeat(gt, 8, axis=0) + rng.normal(0, 6, (8 * g, 4))
        clutter = np.sort(rng.uniform(0, [W, H, W, H], (20, 4)).reshape(20, 2, 2), axis=1)
        clutter = clutter.transpose(0, 2, 1).reshape(20, 4)[:, [0, 2, 1, 3]]
        boxes = np.concatenate([jitter, clutter]).clip(0, [W, H, W, H]).round()
        keep = (boxes[:, 2] - boxes[:, 0] >= 4) & (boxes[:, 3] - boxes[:, 1] >= 4)
        props[image_id] = boxes[keep].astype(np.float32)
    return records, Proposals(props)


CFG = FinetuneConfig(
    hidden=16,
    iterations=8,
    lr=0.01,
    lr_steps=(6,),
    batch_size=16,
    images_per_batch=2,
    eval_every=4,
    checkpoint_every=4,
)


class SimulatedKillError(Exception):
    pass


def run_finetune(out: Path, cfg: FinetuneConfig = CFG) -> dict:
    records, props = dataset()
    return finetune(records, props, FakeProvider(), SPP, K, cfg, out, progress=False)


def saved_state(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", map_location="cpu", weights_only=True)["model"]


def test_finetune_trains_and_writes_its_outputs(tmp_path):
    metrics = run_finetune(tmp_path)
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "metrics.json").is_file()
    assert not (tmp_path / "checkpoint.pt").exists()
    assert metrics["iterations"] == 8 and np.isfinite(metrics["final_loss"])
    log = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and '"step": 4' in log[0] and '"step": 8' in log[1]
    head = load_head(tmp_path / "model.pt")
    assert head.config() == {"in_dim": DIM, "hidden": 16, "num_classes": K}
    # training moved the weights away from the seeded initialisation
    torch.manual_seed(CFG.seed)
    init = FCHead(DIM, CFG.hidden, K, CFG.dropout)
    assert not torch.equal(init.cls.weight, head.cls.weight)
    assert not torch.equal(init.fc6.weight, head.fc6.weight)


def test_interrupted_finetune_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    run_finetune(whole)

    resumed = tmp_path / "resumed"
    real_save = ft.atomic_torch_save
    saved_steps = []

    def save_then_die(obj, path):
        real_save(obj, path)
        if Path(path).name == "checkpoint.pt":
            saved_steps.append(obj["step"])
            raise SimulatedKillError  # killed right after the step-4 checkpoint reached the disk

    monkeypatch.setattr(ft, "atomic_torch_save", save_then_die)
    with pytest.raises(SimulatedKillError):
        run_finetune(resumed)
    monkeypatch.setattr(ft, "atomic_torch_save", real_save)
    assert saved_steps == [4]
    assert (resumed / "checkpoint.pt").exists() and not (resumed / "model.pt").exists()

    resumed_steps = []
    real_loop = ft._train_loop

    def spy_loop(*args):
        resumed_steps.append(args[7][0])  # (start step, running values)
        return real_loop(*args)

    monkeypatch.setattr(ft, "_train_loop", spy_loop)
    run_finetune(resumed)
    assert resumed_steps == [4]  # it really resumed, not restarted
    assert not (resumed / "checkpoint.pt").exists()

    a, b = saved_state(whole), saved_state(resumed)
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    # The running loss and the log carry over the interruption too.
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (whole, resumed))
    assert ma["final_loss"] == mb["final_loss"]
    assert (whole / "log.jsonl").read_text() == (resumed / "log.jsonl").read_text()


@pytest.mark.parametrize("half", [False, True])
def test_a_kill_between_a_log_row_and_its_checkpoint_leaves_no_extra_row(
    tmp_path, monkeypatch, half
):
    # At step 4 the log row is written before the checkpoint: a kill in between (or in the
    # middle of the row) resumes from step 0, which writes the row again. The resumed log must
    # still equal the uninterrupted one (the fault-injection test caught a duplicated row).
    whole = tmp_path / "whole"
    run_finetune(whole)
    killed = tmp_path / "killed"
    real_append = ft._append_log

    def append_then_die(path, row):
        if half:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row)[:9])
        else:
            real_append(path, row)
        raise SimulatedKillError

    monkeypatch.setattr(ft, "_append_log", append_then_die)
    with pytest.raises(SimulatedKillError):
        run_finetune(killed)
    monkeypatch.setattr(ft, "_append_log", real_append)
    assert not (killed / "checkpoint.pt").exists() and (killed / "log.jsonl").read_text()
    run_finetune(killed)
    assert (killed / "log.jsonl").read_text() == (whole / "log.jsonl").read_text()


def test_a_different_seed_gives_a_different_model(tmp_path):
    run_finetune(tmp_path / "a")
    run_finetune(tmp_path / "b", dataclasses.replace(CFG, seed=1))
    a, b = saved_state(tmp_path / "a"), saved_state(tmp_path / "b")
    assert not torch.equal(a["cls.weight"], b["cls.weight"])


def test_he_init_of_fc6_fc7():
    torch.manual_seed(0)
    he = FCHead(400, 300, 5).requires_grad_(False)
    for fc in (he.fc6, he.fc7):
        expected = (2.0 / fc.in_features) ** 0.5
        assert abs(float(fc.weight.std()) - expected) < 0.05 * expected
        assert float(fc.bias.abs().max()) == 0.0
    # PyTorch's default (measured worse, see FCHead) is much smaller
    default = torch.nn.Linear(400, 300).requires_grad_(False)
    assert float(default.weight.std()) < 0.5 * float(he.fc6.weight.std())


def test_standardization_is_fitted_saved_and_applied(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(500, 40) * 3 + 2  # uncentred, like max-pooled SPP vectors
    head = FCHead(40, 16, 3).eval()
    head.fit_standardization(x)
    z = head.standardize(x)
    assert torch.allclose(z.mean(0), torch.zeros(40), atol=1e-5)
    assert torch.allclose(z.std(0), torch.ones(40), atol=1e-4)
    expected = torch.relu(head.fc6((x - x.mean(0)) / x.std(0)))
    torch.testing.assert_close(head.embed(x, "fc6"), expected)
    torch.testing.assert_close(head.embed(x, "pool5"), x)  # pool5 stays the raw SPP vector
    path = tmp_path / "model.pt"
    torch.save({"model": head.state_dict(), "config": head.config()}, path)
    torch.testing.assert_close(load_head(path)(x), head(x))
