"""Fine-tuning of the fc layers on SPP vectors (paper section 4.1; SPEC section 5).

Only fc6, fc7 and the (K + 1)-way classifier are trained; the conv maps come from the frozen
backbone (cached or computed on the fly). Mini-batches of 128 windows, 25 % foreground
(IoU >= 0.5), background IoU in [0.1, 0.5), drawn from several images per batch (the released
code samples windows across the whole training set; a few images per batch keeps that spirit
while reading only a few cached maps per step). Horizontal flips and a random scale per image
are the augmentation. Sampling at step ``t`` uses ``default_rng((seed, t))`` and the dropout
seed ``seed + t``, so a resumed run repeats an uninterrupted one exactly.

Shape shorthand: ``D`` SPP dims, ``H`` hidden width, ``K`` classes (+1 background).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from sppdet.features import MapProvider, SPPConfig
from sppdet.imageio import load_image
from sppdet.storage import atomic_torch_save, atomic_write_json
from sppdet.windows import label_windows

log = logging.getLogger(__name__)

LAYERS = ("pool5", "fc6", "fc7")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning knobs; defaults from the released solver unless noted."""

    hidden: int = 4096  # fc6/fc7 width (paper: 4096, as ZF-5/AlexNet)
    dropout: float = 0.5  # dropout after fc6 and fc7 (ZF-5 / AlexNet fc layers)
    standardize_batches: int = 20  # mini-batches sampled to standardise fc6's inputs per
    # dimension (FCHead.fit_standardization; ours: the paper's fc6 was pre-trained); 0 = off
    init: str = "he"  # fc6/fc7 initialisation, "he" or "torch" (see FCHead; ours, no ImageNet fc)
    iterations: int = 90000  # released solver: 3 x 30k steps (paper: 250k + 50k)
    lr: float = 1e-3  # released solver base lr (paper: 1e-4)
    lr_steps: tuple[int, ...] = (30000, 60000)  # lr x0.1 at each (released solver: every 30k)
    momentum: float = 0.9  # released solver
    weight_decay: float = 5e-4  # released solver
    batch_size: int = 128  # windows per mini-batch (spp_finetune_voc.m)
    fg_fraction: float = 0.25  # 25 % positives (spp_finetune_voc.m)
    fg_iou: float = 0.5  # foreground: IoU with a GT in [0.5, 1]
    bg_iou_low: float = 0.1  # background: IoU in [0.1, 0.5)
    images_per_batch: int = 8  # images a mini-batch draws from (see module docstring)
    flip: bool = True  # horizontal-flip augmentation (paper 4.1)
    heldout_fraction: float = 0.05  # training images held out for the accuracy in the log
    eval_every: int = 1000  # steps between held-out accuracy measurements
    checkpoint_every: int = 1000  # steps between resumable checkpoints
    seed: int = 0


class FCHead(nn.Module):
    """fc6 -> fc7 -> (K + 1)-way classifier on SPP vectors: ``Tensor[N, D] -> Tensor[N, K+1]``.

    No ImageNet fc layers exist for our backbones, so fc6/fc7 start from scratch: ``init="he"``
    draws them from N(0, 2 / fan_in) (He et al. 2015, for ReLU layers), ``"torch"`` keeps
    PyTorch's default (uniform, about 2.4x smaller: on MobileNetV2 SPP vectors the logits then
    start near 0.03 and a 300-image run stayed at the all-background accuracy for 1,000 steps).
    The classifier is Gaussian with sigma 0.01 as SPEC section 5 says for fc8.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        num_classes: int,
        dropout: float = 0.5,
        init: str = "he",
    ) -> None:
        super().__init__()
        if init not in ("he", "torch"):
            raise ValueError(f"unknown fc init {init!r}; expected 'he' or 'torch'")
        self.in_dim, self.hidden, self.num_classes = in_dim, hidden, num_classes
        self.fc6 = nn.Linear(in_dim, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.cls = nn.Linear(hidden, num_classes + 1)
        self.drop = nn.Dropout(dropout)
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        if init == "he":
            for fc in (self.fc6, self.fc7):
                nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
                nn.init.zeros_(fc.bias)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.zeros_(self.cls.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(torch.relu(self.fc6(self.standardize(x))))
        x = self.drop(torch.relu(self.fc7(x)))
        return self.cls(x)

    def embed(self, x: Tensor, layer: str) -> Tensor:
        """Activations (after ReLU) of ``layer`` in :data:`LAYERS`; dropout is not applied."""
        if layer == "pool5":
            return x
        x = torch.relu(self.fc6(self.standardize(x)))
        return x if layer == "fc6" else torch.relu(self.fc7(x))

    def standardize(self, x: Tensor) -> Tensor:
        """``(x - in_mean) / in_std``: per-dimension input scaling (identity until fitted)."""
        return (x - self.in_mean) / self.in_std

    @torch.no_grad()
    def fit_standardization(self, x: Tensor) -> None:
        """Set ``in_mean`` / ``in_std`` from sample SPP vectors ``Tensor[N, D]``.

        Why: SPP vectors are max-pooled, so every dimension is mostly positive (MobileNetV2
        features[13]: mean 0.69, std 0.53). Uncentred inputs make fc6's gradients share one sign
        and SGD at lr 0.01 sent the from-scratch head to "all background" on a 300-image VOC run;
        with standardised inputs it fit (train accuracy 0.88 vs 0.76 in the same 300 steps).
        """
        self.in_mean.copy_(x.mean(0))
        self.in_std.copy_(x.std(0).clamp(min=1e-3))  # constant dims (e.g. always 0) stay finite

    def config(self) -> dict:
        return {"in_dim": self.in_dim, "hidden": self.hidden, "num_classes": self.num_classes}


@dataclass(frozen=True)
class _ImageWindows:
    index: int  # position in the record list
    boxes: np.ndarray  # [M, 4] fg then bg candidates
    labels: np.ndarray  # [M] 0 = background, k + 1 = class k
    num_fg: int


def _candidates(record, proposals: np.ndarray, index: int, cfg: FinetuneConfig) -> _ImageWindows:
    keep = ~record.difficult
    gt_boxes, gt_labels = record.boxes[keep], record.labels[keep]
    lw = label_windows(proposals, gt_boxes, gt_labels, int(gt_labels.max(initial=0)) + 1)
    fg = lw.max_iou >= cfg.fg_iou
    bg = (lw.max_iou >= cfg.bg_iou_low) & (lw.max_iou < cfg.fg_iou)
    labels = np.zeros(len(lw.boxes), dtype=np.int64)
    if len(gt_labels):
        labels[fg] = gt_labels[lw.gt_index[fg]] + 1
    order = np.concatenate([np.flatnonzero(fg), np.flatnonzero(bg)])
    return _ImageWindows(index, lw.boxes[order], labels[order], int(fg.sum()))


def _sample(rng: np.random.Generator, w: _ImageWindows, n: int, n_fg: int) -> np.ndarray:
    """Indices of ``n`` windows with up to ``n_fg`` foreground ones (rest background)."""
    fg = min(n_fg, w.num_fg)
    n_bg_avail = len(w.boxes) - w.num_fg
    fg_idx = rng.choice(w.num_fg, fg, replace=False) if fg else np.zeros(0, np.int64)
    bg_n = min(n - fg, n_bg_avail)
    bg_idx = w.num_fg + rng.choice(n_bg_avail, bg_n, replace=False) if bg_n else fg_idx[:0]
    return np.concatenate([fg_idx, bg_idx]).astype(np.int64)


class _Batcher:
    """Pools sampled windows of a few images into an ``(X [B, D], y [B])`` mini-batch."""

    def __init__(self, records, windows, provider: MapProvider, spp: SPPConfig, cfg) -> None:
        self.records, self.windows, self.provider, self.spp, self.cfg = (
            records,
            windows,
            provider,
            spp,
            cfg,
        )

    def batch(self, rng: np.random.Generator, pool: Sequence[int]) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        chosen = rng.choice(len(pool), min(cfg.images_per_batch, len(pool)), replace=False)
        per_img = math.ceil(cfg.batch_size / len(chosen))
        fg_img = math.ceil(cfg.batch_size * cfg.fg_fraction / len(chosen))
        xs, ys = [], []
        for j in chosen:
            w = self.windows[pool[j]]
            idx = _sample(rng, w, per_img, fg_img)
            flip = bool(cfg.flip and rng.random() < 0.5)
            xs.append(self._pool(w, idx, flip, rng))
            ys.append(torch.from_numpy(w.labels[idx]))
        x, y = torch.cat(xs)[: cfg.batch_size], torch.cat(ys)[: cfg.batch_size]
        return x, y.to(x.device)

    def _pool(self, w: _ImageWindows, idx: np.ndarray, flip: bool, rng) -> Tensor:
        rec = self.records[w.index]
        scales = self.provider.extractor.config.scales
        scale = scales[int(rng.integers(len(scales)))]  # random scale (paper 4.1)
        return self.provider.pool5(
            rec.image_id,
            (rec.height, rec.width),
            lambda: load_image(rec.path),
            w.boxes[idx],
            flip=flip,
            scales=(scale,),
        )


def _lr(cfg: FinetuneConfig, step: int) -> float:
    return cfg.lr * 0.1 ** sum(step >= s for s in cfg.lr_steps)


def finetune(
    records: Sequence,
    proposals,
    provider: MapProvider,
    spp: SPPConfig,
    num_classes: int,
    cfg: FinetuneConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
) -> dict:
    """Train the fc head; resumable from ``out_dir/checkpoint.pt``; writes ``out_dir/model.pt``.

    Args:
        records: training :class:`~sppdet.datasets.ImageRecord` s.
        proposals: object with ``boxes_for(image_id) -> Array[N, 4]``.
        provider: conv maps (cached or on the fly).
        num_classes: ``K`` object classes.

    Returns:
        Summary metrics (final loss, held-out accuracy, seconds).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = provider.extractor.device
    windows = [
        _candidates(r, proposals.boxes_for(r.image_id), i, cfg) for i, r in enumerate(records)
    ]
    usable = [i for i, w in enumerate(windows) if len(w.boxes)]
    rng0 = np.random.default_rng(cfg.seed)
    n_held = int(round(len(usable) * cfg.heldout_fraction)) if len(usable) > 20 else 0
    perm = rng0.permutation(usable)
    held, train = sorted(perm[:n_held].tolist()), sorted(perm[n_held:].tolist())
    dim = provider.extractor.spec.channels * sum(n * n for n in spp.levels)
    torch.manual_seed(cfg.seed)
    model = FCHead(dim, cfg.hidden, num_classes, cfg.dropout, cfg.init).to(device)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    batcher = _Batcher(records, windows, provider, spp, cfg)
    start, resumed = _resume(out / "checkpoint.pt", model, opt)
    if start == 0 and cfg.standardize_batches:
        rng = np.random.default_rng((cfg.seed, 1 << 41))  # own stream, apart from the steps
        sample = [batcher.batch(rng, train)[0] for _ in range(cfg.standardize_batches)]
        model.fit_standardization(torch.cat(sample))
    held_x, held_y = _heldout(batcher, held, cfg)
    return _train_loop(
        model, opt, batcher, train, held_x, held_y, cfg, out, (start, resumed), progress
    )


def _heldout(batcher: _Batcher, held: list[int], cfg) -> tuple[Tensor | None, Tensor | None]:
    if not held:
        return None, None
    rng = np.random.default_rng((cfg.seed, 1 << 40))  # own stream, apart from steps
    xs, ys = [], []
    for i in held:
        x, y = batcher.batch(rng, [i])
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _resume(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> tuple[int, dict]:
    """Load a checkpoint; returns its step and the loop's running values (loss, acc, seconds)."""
    if not path.exists():
        return 0, {}
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    log.info("resuming fine-tuning at step %d from %s", state["step"], path)
    return int(state["step"]), {k: state.get(k) for k in ("loss_avg", "acc", "seconds")}


@torch.no_grad()
def _accuracy(model: FCHead, x: Tensor | None, y: Tensor | None) -> float | None:
    if x is None or y is None:
        return None
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def _train_loop(model, opt, batcher, train, held_x, held_y, cfg, out: Path, start, progress):
    log_path = out / "log.jsonl"
    start, resumed = start
    # The running loss, last accuracy and elapsed time continue across a resume, so the log
    # and metrics of a resumed run equal an uninterrupted one's (bar the seconds).
    loss_avg, acc = resumed.get("loss_avg"), resumed.get("acc")
    t0 = time.perf_counter() - (resumed.get("seconds") or 0.0)
    model.train()
    bar = tqdm(range(start, cfg.iterations), desc="finetune", disable=not progress, initial=start)
    bar.total = cfg.iterations
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        x, y = batcher.batch(np.random.default_rng((cfg.seed, step)), train)
        torch.manual_seed(cfg.seed + step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = loss.item()
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.iterations:
            acc = _accuracy(model, held_x, held_y)
            _append_log(log_path, {"step": done, "loss": loss_avg, "heldout_acc": acc})
            bar.set_postfix(loss=f"{loss_avg:.3f}", acc=acc if acc is None else f"{acc:.3f}")
        if done % cfg.checkpoint_every == 0 and done < cfg.iterations:
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": done,
                "loss_avg": loss_avg,
                "acc": acc,
                "seconds": time.perf_counter() - t0,
            }
            atomic_torch_save(state, out / "checkpoint.pt")
    model.eval()
    atomic_torch_save({"model": model.state_dict(), "config": model.config()}, out / "model.pt")
    metrics = {
        "final_loss": loss_avg,
        "heldout_accuracy": acc,
        "iterations": cfg.iterations,
        "seconds": time.perf_counter() - t0,
        "config": asdict(cfg),
    }
    atomic_write_json(out / "metrics.json", metrics)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    return metrics


def _append_log(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def load_head(path: str | Path, device: torch.device | str = "cpu") -> FCHead:
    """Load a fine-tuned head saved by :func:`finetune` (``weights_only=True``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    cfg = state["config"]
    head = FCHead(cfg["in_dim"], cfg["hidden"], cfg["num_classes"])
    head.load_state_dict(state["model"])
    return head.to(device).eval()
