"""Fine-tuning of the fc layers on SPP vectors (paper section 4.1; SPEC section 5).

fc6, fc7 and the (K + 1)-way classifier are trained, and with ``conv_blocks`` the trunk's top
conv blocks too, through the SPP layer (Fast R-CNN section 4.5; the paper keeps conv frozen):
their input, the frozen map below them, comes from the cache. Mini-batches of 128 windows,
25 % foreground (IoU >= 0.5), background IoU in [0.1, 0.5), drawn from several images per batch
(the released code samples windows across the whole training set; a few images per batch keeps
that spirit while reading only a few cached maps per step). Horizontal flips and a random scale
per image are the augmentation. Sampling at step ``t`` uses ``default_rng((seed, t))`` and the
dropout seed ``seed + t``, so a resumed run repeats an uninterrupted one exactly.

Shape shorthand: ``D`` SPP dims, ``H`` hidden width, ``K`` classes (+1 background).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from torch import Tensor, nn
from tqdm import tqdm

from sppdet import finetune_dist
from sppdet.distributed import SINGLE, Dist
from sppdet.errors import ConfigError
from sppdet.features import SPPConfig
from sppdet.finetune_batch import Batcher, candidates
from sppdet.head import BBOX_TARGET_STD, ConvTop, FCHead
from sppdet.storage import atomic_torch_save, atomic_write_json, atomic_write_text
from sppdet.window_features import WindowFeatures

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning knobs; defaults from the released solver unless noted."""

    # Defaults: the recipe of the committed VOC07 results (configs/voc07_*.yaml), each with the
    # paper's value and why ours differs: the paper's solver runs no recipe that fits a CPU.
    hidden: int = 2048  # fc6/fc7 width (paper 4096, as ZF-5/AlexNet; half the fc cost here)
    dropout: float = 0.5  # dropout after fc6 and fc7 (ZF-5 / AlexNet fc layers)
    standardize_batches: int = 20  # mini-batches sampled to standardise fc6's inputs per
    # dimension (FCHead.fit_standardization; ours: the paper's fc6 was pre-trained); 0 = off
    iterations: int = 12000  # released solver 3 x 30k GPU steps (paper 250k + 50k); 12k x 128
    # windows fits a CPU session
    lr: float = 0.01  # released solver 1e-3 (paper 1e-4) for ImageNet fc layers; ours start
    # from scratch (no ImageNet fc exists for our backbones)
    lr_steps: tuple[int, ...] = (8000,)  # lr x0.1 at each (released solver: every 30k)
    momentum: float = 0.9  # released solver
    weight_decay: float = 5e-4  # released solver
    batch_size: int = 128  # windows per mini-batch (spp_finetune_voc.m)
    fg_fraction: float = 0.25  # 25 % positives (spp_finetune_voc.m)
    fg_iou: float = 0.5  # foreground: IoU with a GT in [0.5, 1]
    bg_iou_low: float = 0.1  # background: IoU in [0.1, 0.5)
    images_per_batch: int = 2  # images a mini-batch draws from (Fast R-CNN: 2 x 64 windows;
    # 4x fewer SPP tables per step than 8; see module docstring)
    flip: bool = True  # horizontal-flip augmentation (paper 4.1)
    heldout_fraction: float = 0.05  # training images held out for the accuracy in the log
    eval_every: int = 500  # steps between held-out accuracy measurements
    checkpoint_every: int = 500  # steps between resumable checkpoints
    seed: int = 0
    conv_blocks: int = 0  # top conv blocks trained through the SPP layer with the fc layers
    # (Fast R-CNN 4.5: the largest single gain); at most features.top_blocks. 0 = frozen (SPP)
    conv_lr: float = 0.001  # their learning rate (ImageNet-trained, so below the new fc's lr);
    # x0.1 at the same lr_steps
    bbox_loss_weight: float = 0.0  # > 0: the head also learns box regression from fc7, its
    # smooth-L1 loss weighted by this beside the classifier's (Fast R-CNN section 2.3:
    # multi-task training, lambda 1); 0 = the classifier alone (SPP-net, R-CNN). Its box layer
    # is what `bbox.method: finetuned` applies at test time


def _lr_factor(cfg: FinetuneConfig, step: int) -> float:
    return 0.1 ** sum(step >= s for s in cfg.lr_steps)


def _lr(cfg: FinetuneConfig, step: int) -> float:
    return cfg.lr * _lr_factor(cfg, step)


def finetune(
    records: Sequence,
    proposals,
    provider: WindowFeatures,
    spp: SPPConfig,
    num_classes: int,
    cfg: FinetuneConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    dist: Dist = SINGLE,
) -> dict:
    """Train the fc head; resumable from ``out_dir/checkpoint.pt``; writes ``out_dir/model.pt``.

    With several ranks (``dist``, :mod:`sppdet.distributed`) each step's images are split over
    them and their gradients summed: the steps of one process, up to float rounding. Every
    rank holds the model; rank 0 writes the log, checkpoints and model (the others return
    ``{}``).

    Args:
        records: training :class:`~sppdet.datasets.ImageRecord` s.
        proposals: object with ``boxes_for(image_id) -> Array[N, 4]``.
        provider: conv maps (cached or on the fly).
        num_classes: ``K`` object classes.

    Returns:
        Summary metrics (final loss, held-out accuracy, seconds).
    """
    if cfg.bbox_loss_weight and dist.world > 1:
        raise ConfigError(
            "finetune.bbox_loss_weight > 0 runs in one process only (not yet under torchrun)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = provider.extractor.device
    windows = [
        candidates(r, proposals.boxes_for(r.image_id), i, cfg) for i, r in enumerate(records)
    ]
    usable = [i for i, w in enumerate(windows) if len(w.boxes)]
    rng0 = np.random.default_rng(cfg.seed)
    n_held = int(round(len(usable) * cfg.heldout_fraction)) if len(usable) > 20 else 0
    perm = rng0.permutation(usable)
    held, train = sorted(perm[:n_held].tolist()), sorted(perm[n_held:].tolist())
    dim = provider.extractor.spec.channels * sum(n * n for n in spp.levels)
    torch.manual_seed(cfg.seed)
    multi = cfg.bbox_loss_weight > 0
    model = FCHead(dim, cfg.hidden, num_classes, cfg.dropout, bbox_head=multi).to(device)
    top = None
    groups = [{"params": list(model.parameters()), "base_lr": cfg.lr}]
    if cfg.conv_blocks:
        if provider.extractor.top_module is None:
            raise ConfigError(
                f"finetune.conv_blocks={cfg.conv_blocks} needs features.top_blocks >= it "
                "(the cache must hold the map below the trained blocks)"
            )
        top = ConvTop(provider.extractor.top_module, cfg.conv_blocks).to(device)
        trained = [p for p in top.parameters() if p.requires_grad]
        groups.append({"params": trained, "base_lr": cfg.conv_lr})
    # fused: one pass over fc6's weights, gradients and momentum (4x faster than torch's default
    # per-tensor loop on a CPU, whose five passes over 131 MB cost a tenth of a step)
    fused = device.type in ("cpu", "cuda")
    opt = torch.optim.SGD(
        groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused
    )
    batcher = Batcher(records, windows, provider, spp, cfg, top)
    start, resumed = _resume(out / "checkpoint.pt", model, opt, top)
    if start == 0 and cfg.standardize_batches:
        rng = np.random.default_rng((cfg.seed, 1 << 41))  # own stream, apart from the steps
        with torch.no_grad():
            sample = [batcher.batch(rng, train)[0] for _ in range(cfg.standardize_batches)]
        model.fit_standardization(torch.cat(sample))
    heldout = _heldout_source(batcher, held, cfg)
    return _train_loop(
        model,
        opt,
        batcher,
        train,
        heldout,
        cfg,
        out,
        (start, resumed),
        progress and dist.main,
        dist,
    )


def _heldout_source(batcher: Batcher, held: list[int], cfg):
    """``() -> (X, y)`` of the held-out windows: pooled once with a frozen trunk, but pooled
    again at every measurement when conv blocks train (features made by the initial blocks
    would no longer be what the head sees: the log showed all-background accuracy)."""
    with torch.no_grad():
        fixed = _heldout(batcher, held, cfg)
    if batcher.top is None:
        return lambda: fixed

    def again():
        with torch.no_grad():
            return _heldout(batcher, held, cfg)

    return again


def _heldout(batcher: Batcher, held: list[int], cfg) -> tuple[Tensor | None, Tensor | None]:
    if not held:
        return None, None
    rng = np.random.default_rng((cfg.seed, 1 << 40))  # own stream, apart from steps
    xs, ys = [], []
    for i in held:
        x, y = batcher.batch(rng, [i])
        xs.append(x)
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def _resume(path: Path, model: nn.Module, opt: torch.optim.Optimizer, top=None) -> tuple:
    """Load a checkpoint; returns its step and the loop's running values (loss, acc, seconds)."""
    if not path.exists():
        return 0, {}
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    if top is not None:
        top.load_state_dict(state["conv"])
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


def _train_loop(model, opt, batcher, train, heldout, cfg, out: Path, start, progress, dist):
    log_path = out / "log.jsonl"
    start, resumed = start
    # The running loss, last accuracy and elapsed time continue across a resume, so the log
    # and metrics of a resumed run equal an uninterrupted one's (bar the seconds).
    loss_avg, acc = resumed.get("loss_avg"), resumed.get("acc")
    t0 = time.perf_counter() - (resumed.get("seconds") or 0.0)
    if dist.main:
        _trim_log(log_path, start)
    top = batcher.top
    model.train()
    if top is not None:
        top.train()
    bar = tqdm(range(start, cfg.iterations), desc="finetune", disable=not progress, initial=start)
    bar.total = cfg.iterations
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * _lr_factor(cfg, step)
        rng = np.random.default_rng((cfg.seed, step))
        value = _step(model, opt, batcher, rng, train, cfg.seed + step, dist)
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        done = step + 1
        measure = done % cfg.eval_every == 0 or done == cfg.iterations
        save = done % cfg.checkpoint_every == 0 and done < cfg.iterations
        if dist.world > 1 and (measure or save):
            finetune_dist.sync(model, opt, dist)  # the whole head on every rank
        if measure:
            acc = _accuracy(model, *heldout())  # every rank: the same value, no collective
            if dist.main:
                _append_log(log_path, {"step": done, "loss": loss_avg, "heldout_acc": acc})
            bar.set_postfix(loss=f"{loss_avg:.3f}", acc=acc if acc is None else f"{acc:.3f}")
        if save and dist.main:
            state = {
                "model": model.state_dict(),
                **({"conv": top.state_dict()} if top is not None else {}),
                "optimizer": opt.state_dict(),
                "step": done,
                "loss_avg": loss_avg,
                "acc": acc,
                "seconds": time.perf_counter() - t0,
            }
            atomic_torch_save(state, out / "checkpoint.pt")
    model.eval()
    if not dist.main:  # rank 0 saves the model every rank holds
        dist.barrier()
        return {}
    saved = {"model": model.state_dict(), "config": model.config()}
    if top is not None:
        # every top block (trained or not), keyed as the extractor's top_module
        saved.update(trunk_top=top.top_state(), conv_blocks=cfg.conv_blocks)
    atomic_torch_save(saved, out / "model.pt")
    metrics = {
        "final_loss": loss_avg,
        "heldout_accuracy": acc,
        "iterations": cfg.iterations,
        "seconds": time.perf_counter() - t0,
        "config": asdict(cfg),
    }
    atomic_write_json(out / "metrics.json", metrics)
    (out / "checkpoint.pt").unlink(missing_ok=True)
    dist.barrier()
    return metrics


def _step(model, opt, batcher: Batcher, rng, train, seed: int, dist: Dist) -> float:
    """One SGD step; returns its loss. With several ranks each pools its images' windows and
    the ranks split fc6 by units (:mod:`sppdet.finetune_dist`): the step of one process."""
    weight, boxes = batcher.cfg.bbox_loss_weight, None
    if dist.world == 1 and weight:  # multi-task (one process only: see finetune)
        x, y, t = batcher.batch_targets(rng, train)
        torch.manual_seed(seed)
        (logits, deltas), units = model.forward_multi(x), None
        boxes = weight * box_loss(deltas, y, t)
    elif dist.world == 1:
        x, y = batcher.batch(rng, train)
        torch.manual_seed(seed)
        logits, units = model(x), None
    else:
        x, y, rows, total = batcher.batch_rows(rng, train, dist)
        if batcher.top is not None and not x.requires_grad:  # no rows here: still collective
            x.requires_grad_()
        x, y = finetune_dist.gather_batch(x, y, rows, total, dist)
        torch.manual_seed(seed)  # dropout: the same masks on every rank, as in one process
        logits, units = finetune_dist.forward(model, x, dist)
    loss = nn.functional.cross_entropy(logits, y)
    if boxes is not None:
        loss = loss + boxes
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for group in opt.param_groups[1:] if dist.world > 1 else ():
        for p in group["params"]:  # trained conv blocks: gradients of the rank's images summed
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            tdist.all_reduce(p.grad)
    opt.step()
    if units is not None:  # the rank's fc6 units (fc6 has no gradient: opt.step skipped it)
        finetune_dist.step_units(model, opt, units, dist)
    return loss.item()


def box_loss(deltas: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """Fast R-CNN's box loss (section 2.3, py-faster-rcnn's ``SmoothL1Loss``).

    Args:
        deltas: ``Tensor[B, 4K]`` the box layer's outputs (normalised deltas, class ``k`` at
            columns ``4k..4k+3``).
        labels: ``Tensor[B]`` 0 = background, ``k + 1`` = class ``k``.
        targets: ``Tensor[B, 4]`` R-CNN deltas to the ground truth (unnormalised).

    Returns:
        The smooth-L1 (beta 1) of each foreground window's own class's deltas against its
        targets divided by :data:`~sppdet.head.BBOX_TARGET_STD`, summed and divided by ``B``
        (background windows count in ``B`` but add no loss).
    """
    fg = torch.nonzero(labels > 0).flatten()
    if len(fg) == 0:
        return deltas.sum() * 0.0  # keeps the graph (and the step's collective shape)
    cols = (labels[fg] - 1).unsqueeze(1) * 4 + torch.arange(4, device=deltas.device)
    pred = deltas[fg.unsqueeze(1), cols]
    std = torch.tensor(BBOX_TARGET_STD, dtype=deltas.dtype, device=deltas.device)
    loss = nn.functional.smooth_l1_loss(pred, targets[fg] / std, beta=1.0, reduction="sum")
    return loss / len(labels)


def _trim_log(path: Path, start: int) -> None:
    """Keep the log rows of steps up to ``start`` (the checkpoint resumed from).

    A run killed between a log row and the next checkpoint wrote rows that the resumed run
    writes again; a kill in the middle of a row leaves half a line. Both go.
    """
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", start + 1) <= start:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


def _append_log(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
