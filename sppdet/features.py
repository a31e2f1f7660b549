"""One conv pass per image per scale and the fp16 feature-map cache.

This is SPP-net's speed (paper section 4.1): the conv layers run once per image and scale, and
every window is pooled from that map (:mod:`sppdet.window_pool`), instead of R-CNN's ~2,000
warped crops through the net.

Shape shorthand: ``C`` channels, ``h x w`` map cells, ``N`` windows, ``D = C * B`` SPP dims.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from sppdet.backbone_weights import weights_id
from sppdet.backbones import (
    BackboneSpec,
    backbone_spec,
    build_backbone,
    normalize,
    optimize_for_inference,
)
from sppdet.errors import CacheMismatchError, ConfigError
from sppdet.fastpath import CONV_DTYPES, AutocastTrunk, check_conv_dtype
from sppdet.scales import SINGLE_SCALE, resized_size, scale_factor
from sppdet.storage import atomic_save_npy, check_manifest, versions
from sppdet.tiling import stripe_pixels, stripe_trunk

log = logging.getLogger(__name__)


MODES = ("spp", "rcnn")
#: Smallest shorter side (and longer-side cap) a setting may ask for: below it a stride-16 map
#: has a cell or two and every window pools the same cells (``--scales 0`` wrote 1x1 maps).
MIN_SCALE = 32


def _one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"features.{key}: {value!r} is not one of {', '.join(choices)}")


@dataclass(frozen=True)
class FeatureConfig:
    """What determines a conv feature map (all of it goes into the cache manifest)."""

    backbone: str = "efficientnet_lite0_d"  # a key of sppdet.backbones.BACKBONES; the paper
    # uses zf5. EfficientNet-Lite0's MBConv stack dilated to stride 16: the best measured VOC07
    # val rows (docs/results.md; ahead of mobilenet_v2_d17, itself ahead of features[13])
    weights: str | None = None  # None/"random", "imagenet" (torchvision or a package), a PATH
    seed: int = 0  # initialisation seed for random weights
    scales: tuple[int, ...] = SINGLE_SCALE  # shorter-side sizes (paper 4.1: 688; 5-scale preset)
    max_size: int = 2000  # cap on the longer side (Fast R-CNN MAX_SIZE)
    cache: bool = True  # keep maps (R-CNN mode: window vectors, ~15 MB per VOC image) on disk;
    # off -> later stages recompute them on the fly
    dtype: str = "float16"  # cached map dtype (fp16 halves disk; SPP max pooling is exact in it)
    mode: str = "spp"  # "spp": conv once per image (the paper); "rcnn": once per warped window
    # (R-CNN, the baseline of table 10; see sppdet.rcnn)
    context_padding: int = 16  # R-CNN mode: context pixels around each warped window
    rcnn_batch: int = 8  # R-CNN mode: windows per conv forward pass. Small batches keep the
    # activations in cache, so the baseline is not handicapped (benchmarks/rcnn_batch_*.json)
    rcnn_input: int = 0  # R-CNN mode: warp size in pixels; 0 = the backbone's ImageNet input
    # size (224; R-CNN's AlexNet used 227)
    fuse_bn: bool = True  # fold batch norms into convs at load (exact up to float rounding)
    channels_last: bool = True  # NHWC conv layout (faster oneDNN / cuDNN kernels); both modes
    conv_dtype: str = "float32"  # conv trunk autocast: float32 | bfloat16 (CPU AVX512-BF16 /
    # AMX, CUDA) | float16 (CUDA). A test-time speed setting (issue 7, `--conv-dtype`); training
    # maps stay float32 so results do not depend on the machine's bf16 support
    stripe_pixels: int = -1  # the trunk's blocks up to stride 8 run over horizontal stripes of
    # about this many input pixels, so their activations stay in cache (exact: sppdet.tiling);
    # -1 = auto (sppdet.tiling.DEFAULT_STRIPE_PIXELS on a CPU, off on CUDA), 0 = off. Like
    # fuse_bn and channels_last it is not in the cache manifest: same maps up to float rounding
    top_blocks: int = 0  # the last N blocks of the tapped trunk run after the cache, in every
    # stage: the cache holds the map below them, so fine-tuning can train up to N of them
    # through the SPP layer (finetune.conv_blocks; Fast R-CNN 4.5) while the frozen lower part
    # runs once per image, scale and flip. 0: the cache holds the tapped map itself

    def __post_init__(self) -> None:
        # checked when the config is built, before a run directory or a cache is written
        backbone_spec(self.backbone)  # an unknown name raises, listing the known ones
        if not self.scales or min(self.scales) < MIN_SCALE:
            raise ConfigError(
                f"features.scales must be shorter sides of at least {MIN_SCALE} pixels, "
                f"not {list(self.scales)}"
            )
        if self.max_size < MIN_SCALE:
            raise ConfigError(f"features.max_size must be >= {MIN_SCALE}, not {self.max_size}")
        _one_of("mode", self.mode, MODES)
        _one_of("dtype", self.dtype, ("float16", "float32"))
        _one_of("conv_dtype", self.conv_dtype, CONV_DTYPES)
        if min(self.context_padding, self.rcnn_input, self.top_blocks) < 0:
            raise ConfigError("features.context_padding, rcnn_input, top_blocks must be >= 0")
        if self.rcnn_batch < 1 or self.stripe_pixels < -1:
            raise ConfigError("features.rcnn_batch must be >= 1 and stripe_pixels >= -1")


@dataclass(frozen=True)
class SPPConfig:
    """Window mapping and pyramid (paper appendix, section 4)."""

    levels: tuple[int, ...] = (6, 3, 2, 1)  # detection pyramid: 50 bins (paper 4.1); windows
    # map to cells by the paper's rule (floor + 1 / ceil - 1, sppdet.spp.map_windows)

    def __post_init__(self) -> None:
        if not self.levels or min(self.levels) < 1:
            raise ConfigError(f"spp.levels must be positive bin counts, not {list(self.levels)}")


@dataclass(frozen=True)
class ScaleMap:
    """A conv map of one image at one scale: ``fmap`` ``Tensor[C, h, w]``, ``factor`` resize."""

    fmap: Tensor
    factor: float


class FeatureExtractor:
    """A backbone on a device that turns an RGB image into its pyramid of conv maps.

    The tapped trunk is split in two (``features.top_blocks``): ``net`` (frozen, its output is
    what the cache holds) and ``top_module`` (its last ``top_blocks`` blocks, run on the cached
    map by :meth:`apply_top`; ImageNet weights, or fine-tuned ones after :meth:`with_top`).
    ``trunk_id`` says which: "frozen" or the fine-tuned model's id.
    """

    def __init__(
        self,
        config: FeatureConfig,
        device: torch.device | str = "cpu",
        *,
        trunk_state: dict | None = None,
    ) -> None:
        """``trunk_state``: the tapped trunk's weights (a model file's) instead of
        ``config.weights``."""
        if config.mode not in MODES:
            raise ConfigError(f"unknown features.mode {config.mode!r}; expected one of {MODES}")
        self.config = config
        self.device = torch.device(device)
        self.spec: BackboneSpec = backbone_spec(config.backbone)
        net = build_backbone(config.backbone, config.weights, seed=config.seed)
        if trunk_state is not None:
            net.load_state_dict(trunk_state)
        net = net.to(self.device)
        lower, self.top_module = split_top(net, config.top_blocks, config.mode)
        self.net = stripe_trunk(
            lower,
            stripe_pixels(config.stripe_pixels, self.device),
            self._optimized,
        )
        if check_conv_dtype(config.conv_dtype, self.device) != "float32":
            self.net = AutocastTrunk(self.net, self.device.type, config.conv_dtype)
        self.trunk_id = "frozen"
        self._store_dtype = getattr(torch, config.dtype)
        self._top = self._inference_top(self.top_module)

    def _optimized(self, module: nn.Module) -> nn.Module:
        c = self.config
        return optimize_for_inference(module, fuse_bn=c.fuse_bn, channels_last=c.channels_last)

    def _inference_top(self, top: nn.Module | None) -> nn.Module | None:
        if top is None:
            return None
        out = self._optimized(top)
        if self.config.conv_dtype != "float32":
            out = AutocastTrunk(out, self.device.type, self.config.conv_dtype)
        return out

    def with_top(self, state: dict, trunk_id: str) -> FeatureExtractor:
        """This extractor with fine-tuned weights ``state`` in its top blocks (same cache)."""
        if self.top_module is None:
            raise ConfigError("the model has fine-tuned conv blocks but features.top_blocks is 0")
        top = copy.deepcopy(self.top_module)
        top.load_state_dict(state)
        out = copy.copy(self)
        out.top_module, out._top, out.trunk_id = top.eval(), out._inference_top(top), trunk_id
        return out

    @property
    def dim(self) -> int:
        return self.spec.channels

    @torch.inference_mode()
    def apply_top(self, m: ScaleMap) -> ScaleMap:
        """The tapped map from a cached one: ``top_module`` on ``m.fmap`` (identity if none)."""
        if self._top is None:
            return m
        x = m.fmap.unsqueeze(0)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return ScaleMap(self._top(x)[0].float().contiguous(), m.factor)

    def factors(self, height: int, width: int) -> list[float]:
        """Resize factor of each configured scale for an image of this size."""
        return [scale_factor(height, width, s, self.config.max_size) for s in self.config.scales]

    def compute(
        self, image: np.ndarray, *, flip: bool = False, scales: Sequence[int] | None = None
    ) -> list[ScaleMap]:
        """Conv maps of ``image`` (uint8 ``[H, W, 3]`` RGB) at every configured scale (or at
        the subset ``scales``, in configured order), float32 on the device."""
        lower = self.compute_lower(image, flip=flip, scales=scales)
        return [self.apply_top(m) for m in lower]

    @torch.inference_mode()
    def compute_lower(
        self, image: np.ndarray, *, flip: bool = False, scales: Sequence[int] | None = None
    ) -> list[ScaleMap]:
        """What the cache holds: :meth:`compute` without the top blocks, rounded to the cache's
        dtype (``features.dtype``) whether or not a cache is used, so a run's first pass over
        a split, later cached passes and a model file's detections see the same maps."""
        if flip:
            image = image[:, ::-1]
        h, w = image.shape[:2]
        out = []
        factors = self.factors(h, w)
        if scales is not None:
            factors = [f for s, f in zip(self.config.scales, factors, strict=True) if s in scales]
        for f in factors:
            nh, nw = resized_size(h, w, f)
            interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
            resized = cv2.resize(np.ascontiguousarray(image), (nw, nh), interpolation=interp)
            x = torch.from_numpy(resized).to(self.device).permute(2, 0, 1).unsqueeze(0)
            x = normalize(x, self.spec)
            if self.config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            fmap = self.net(x)[0].to(self._store_dtype).float().contiguous()
            out.append(ScaleMap(fmap, f))
        return out

    def manifest(self) -> dict:
        """Everything that determines the maps' content, for cache manifests."""
        c = self.config
        rcnn = (
            {"mode": "rcnn", "context_padding": c.context_padding, "rcnn_input": c.rcnn_input}
            if c.mode == "rcnn"
            else {}
        )
        # absent at float32, so caches made before the setting existed stay valid
        conv = {"conv_dtype": c.conv_dtype} if c.conv_dtype != "float32" else {}
        # the cache holds the frozen map below the top blocks, never a fine-tuned trunk's
        top = {"top_blocks": c.top_blocks, "cached": "frozen trunk"} if c.top_blocks else {}
        return {
            **top,
            **rcnn,  # absent in SPP mode, so SPP caches made before R-CNN mode stay valid
            **conv,
            "kind": "conv_feature_maps",
            "backbone": c.backbone,
            "weights": weights_id(c.weights, c.seed, self.spec),
            "scales": list(c.scales),
            "max_size": c.max_size,
            "dtype": c.dtype,
            "tap": self.spec.tap,
            "versions": {k: v for k, v in versions().items() if k in ("torch", "torchvision")},
        }


class FeatureCache:
    """fp16 conv maps on disk, one ``.npy`` per (image, scale, flip), under a manifest.

    Layout: ``<root>/manifest.json`` and ``<root>/s<scale>[_flip]/<image_id>.npy``. Files are
    written atomically, so an interrupted extraction resumes by skipping existing files.
    """

    def __init__(self, root: str | Path, manifest: dict) -> None:
        self.root = Path(root)
        check_manifest(self.root, manifest)
        self.dtype = np.dtype(manifest["dtype"])

    def path(self, image_id: str, scale: int, flip: bool) -> Path:
        return self.root / f"s{scale}{'_flip' if flip else ''}" / f"{image_id}.npy"

    def has(self, image_id: str, scales: Sequence[int], flip: bool = False) -> bool:
        return all(self.path(image_id, s, flip).exists() for s in scales)

    def load(self, image_id: str, scale: int, flip: bool = False) -> np.ndarray:
        path = self.path(image_id, scale, flip)
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise CacheMismatchError(f"corrupt cached map {path} ({exc}); delete it") from exc

    def save(self, image_id: str, scale: int, flip: bool, fmap: Tensor) -> None:
        arr = fmap.detach().to("cpu").numpy().astype(self.dtype)
        atomic_save_npy(self.path(image_id, scale, flip), arr)


def split_top(trunk: nn.Module, n: int, mode: str = "spp") -> tuple[nn.Module, nn.Module | None]:
    """``(lower, top)``: the trunk without its last ``n`` blocks, and those blocks (or None)."""
    blocks = list(trunk.children())
    if n < 0 or n >= len(blocks):
        raise ConfigError(f"features.top_blocks must be in [0, {len(blocks) - 1}], not {n}")
    if n and mode != "spp":
        raise ConfigError("features.top_blocks needs SPP mode (R-CNN mode caches window vectors)")
    if n == 0:
        return trunk, None
    return nn.Sequential(*blocks[:-n]), nn.Sequential(*blocks[-n:]).eval()
