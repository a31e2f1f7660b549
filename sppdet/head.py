"""The fine-tuned head on SPP vectors: fc6 -> fc7 -> classifier (:class:`FCHead`), the trunk's
top blocks as fine-tuning trains them (:class:`ConvTop`), and how the fine-tuning stage's files
are read back (:func:`load_head`, :func:`load_trunk_top`).
Training it is :mod:`sppdet.finetune`."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sppdet.bbox_reg import BBoxRegressor
from sppdet.depthwise import use_fast_depthwise
from sppdet.errors import ConfigError

#: The features the SVMs and box regressors can use: the SPP vector, or a head layer.
LAYERS = ("pool5", "fc6", "fc7")

#: Scale of the box layer's targets: R-CNN deltas divided by these (py-faster-rcnn
#: ``BBOX_NORMALIZE_STDS``; means 0), so that the four are of comparable size in the loss.
BBOX_TARGET_STD = (0.1, 0.1, 0.2, 0.2)


class FCHead(nn.Module):
    """fc6 -> fc7 -> (K + 1)-way classifier on SPP vectors: ``Tensor[N, D] -> Tensor[N, K+1]``.

    No ImageNet fc layers exist for our backbones, so fc6/fc7 start from scratch, drawn from
    N(0, 2 / fan_in) (He et al. 2015, for ReLU layers). PyTorch's default (uniform, about 2.4x
    smaller) was measured worse: on MobileNetV2 SPP vectors the logits then started near 0.03
    and a 300-image run stayed at the all-background accuracy for 1,000 steps.
    The classifier is Gaussian with sigma 0.01 as SPEC section 5 says for fc8.

    With ``bbox_head`` it also has Fast R-CNN's box-regression layer (section 2.2): fc7 ->
    ``Tensor[N, 4K]`` class-specific deltas, normalised by :data:`BBOX_TARGET_STD`, Gaussian
    with sigma 0.001 as in Fast R-CNN; trained with the classifier by
    ``finetune.bbox_loss_weight``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        num_classes: int,
        dropout: float = 0.5,
        bbox_head: bool = False,
    ) -> None:
        super().__init__()
        self.in_dim, self.hidden, self.num_classes = in_dim, hidden, num_classes
        self.fc6 = nn.Linear(in_dim, hidden)
        self.fc7 = nn.Linear(hidden, hidden)
        self.cls = nn.Linear(hidden, num_classes + 1)
        self.bbox_pred = nn.Linear(hidden, 4 * num_classes) if bbox_head else None
        self.drop = nn.Dropout(dropout)
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))
        for fc in (self.fc6, self.fc7):
            nn.init.kaiming_normal_(fc.weight, nonlinearity="relu")
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.cls.weight, std=0.01)
        nn.init.zeros_(self.cls.bias)
        if self.bbox_pred is not None:
            nn.init.normal_(self.bbox_pred.weight, std=0.001)
            nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (with several processes: :func:`sppdet.finetune_dist.forward`)."""
        return self.from_fc6(self.fc6(self.standardize(x)))

    def from_fc6(self, h: Tensor) -> Tensor:
        """Class logits from fc6's pre-activations ``h [N, hidden]`` (dropout as in training)."""
        return self.cls(self._fc7_out(h))

    def forward_multi(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [N, K+1], deltas [N, 4K])``: the classifier's and the box layer's outputs
        (the deltas normalised by :data:`BBOX_TARGET_STD`); needs ``bbox_head``."""
        if self.bbox_pred is None:
            raise ConfigError("this head has no box-regression layer (finetune.bbox_loss_weight)")
        h = self._fc7_out(self.fc6(self.standardize(x)))
        return self.cls(h), self.bbox_pred(h)

    def _fc7_out(self, h: Tensor) -> Tensor:
        """fc7's output (dropout as in training) from fc6's pre-activations."""
        h = self.drop(torch.relu(h))
        return self.drop(torch.relu(self.fc7(h)))

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
        out = {"in_dim": self.in_dim, "hidden": self.hidden, "num_classes": self.num_classes}
        if self.bbox_pred is not None:  # absent otherwise: the files of heads without one
            out["bbox_head"] = True
        return out


def load_trunk_top(path: str | Path) -> dict | None:
    """The fine-tuned top blocks' state saved by :func:`~sppdet.finetune.finetune` (None: conv
    was frozen)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("trunk_top")


def load_head(path: str | Path, device: torch.device | str = "cpu") -> FCHead:
    """Load a fine-tuned head saved by :func:`~sppdet.finetune.finetune` (``weights_only=True``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    return head_from_state(state["config"], state["model"], device)


def head_from_state(
    config: dict, state: dict[str, Tensor], device: torch.device | str = "cpu"
) -> FCHead:
    """An eval-mode :class:`FCHead` of ``config`` (``in_dim``, ``hidden``, ``num_classes``)
    holding the tensors of ``state`` (its state_dict)."""
    # built on the meta device: no random init of the weights replaced next (~0.3 s for fc6)
    with torch.device("meta"):
        head = FCHead(
            config["in_dim"],
            config["hidden"],
            config["num_classes"],
            bbox_head=config.get("bbox_head", False),
        )
    head.load_state_dict(state, assign=True)
    return head.to(device).eval()


class ConvTop(nn.Module):
    """The trunk's top blocks during fine-tuning: ``frozen`` ones, then ``trained`` ones.

    ``forward(Tensor[1, C, h, w]) -> Tensor[1, C', h, w]`` from a cached map. Batch norms stay
    in eval mode with their ImageNet statistics and affine terms fixed (2 images per step are
    too few for batch statistics; detectron2's FrozenBatchNorm), so only conv weights move.
    """

    def __init__(self, top: nn.Module, conv_blocks: int) -> None:
        super().__init__()
        blocks = list(copy.deepcopy(top).children())
        if not 0 < conv_blocks <= len(blocks):
            raise ConfigError(
                f"finetune.conv_blocks={conv_blocks} but only features.top_blocks="
                f"{len(blocks)} blocks run after the cache: raise features.top_blocks"
            )
        self.frozen = nn.Sequential(*blocks[: len(blocks) - conv_blocks])
        self.trained = nn.Sequential(*blocks[len(blocks) - conv_blocks :])
        # oneDNN's CPU backward of (dilated) depthwise convs dominated a step: sppdet.depthwise
        use_fast_depthwise(self.trained)
        for p in self.frozen.parameters():
            p.requires_grad_(False)
        for m in self.trained.modules():
            for p in m.parameters(recurse=False):
                p.requires_grad_(not isinstance(m, nn.modules.batchnorm._BatchNorm))

    def train(self, mode: bool = True) -> ConvTop:
        super().train(mode)
        for m in self.modules():  # frozen statistics, whatever the mode (see class docstring)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            x = self.frozen(x)
        return self.trained(x)

    def top_state(self) -> dict:
        """State of all top blocks, keyed as the extractor's ``top_module``."""
        blocks = [*self.frozen.children(), *self.trained.children()]
        return nn.Sequential(*blocks).state_dict()


def head_box_regressor(head: FCHead) -> BBoxRegressor:
    """The fine-tuned head's box layer as :class:`~sppdet.bbox_reg.BBoxRegressor` s on fc7
    (``bbox.method: finetuned``): the same linear map, so detection, evaluation and the model
    file apply it as they apply ridge regressors.

    Raises:
        ConfigError: the head was fine-tuned without a box layer.
    """
    if head.bbox_pred is None:
        raise ConfigError(
            "bbox.method: finetuned needs a head fine-tuned with its box layer "
            "(finetune.bbox_loss_weight > 0); this run's has none: use bbox.method: ridge"
        )
    k, h = head.num_classes, head.hidden
    w = head.bbox_pred.weight.detach().float().cpu().reshape(k, 4, h).permute(0, 2, 1)
    std = np.tile(np.asarray(BBOX_TARGET_STD, np.float32), (k, 1))
    return BBoxRegressor(
        weights=np.ascontiguousarray(w.numpy()),
        bias=head.bbox_pred.bias.detach().float().cpu().numpy().reshape(k, 4),
        target_mean=np.zeros((k, 4), np.float32),
        target_std=std,
        num_samples=np.zeros(k, np.int64),  # trained in fine-tuning: no reservoir
        feature_scale=1.0,
        layer="fc7",
    )
