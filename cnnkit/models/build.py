"""Backbones from torchvision with a new classifier head.

``build_model`` goes through ``torchvision.models.get_model`` and then one head replacer per
head type. The registry below maps architecture families to their head type; an architecture is
supported when its family is listed and torchvision knows it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlparse

import torch
from torch import nn

from ..config import Serializable
from ..errors import ConfigError, WeightsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadSpec(Serializable):
    """The classifier head that replaces a backbone's: stored in checkpoints to rebuild it."""

    in_features: int
    num_classes: int
    hidden_units: int = 512
    dropout: float = 0.2


def build_head(spec: HeadSpec) -> nn.Sequential:
    """Linear → ReLU → Dropout → Linear → LogSoftmax, or Linear → LogSoftmax with no hidden units."""
    if spec.hidden_units == 0:
        return nn.Sequential(nn.Linear(spec.in_features, spec.num_classes), nn.LogSoftmax(dim=1))
    return nn.Sequential(
        nn.Linear(spec.in_features, spec.hidden_units),
        nn.ReLU(inplace=True),
        nn.Dropout(spec.dropout),
        nn.Linear(spec.hidden_units, spec.num_classes),
        nn.LogSoftmax(dim=1),
    )


# Head types: where each family keeps the classifier that the new head replaces. The head's
# in_features are those of the first Linear found there.
_HEAD_PATHS: dict[str, str] = {
    "resnet": "fc",  # ResNet, ResNeXt, Wide ResNet, RegNet, ShuffleNet: a Linear
    "resnext": "fc",
    "wide_resnet": "fc",
    "regnet": "fc",
    "shufflenet": "fc",
    "vgg": "classifier",  # VGG, AlexNet, MobileNet, EfficientNet, MNASNet: a Sequential ending
    "alexnet": "classifier",  # in a Linear; DenseNet: a Linear. The whole of it is replaced.
    "densenet": "classifier",
    "mobilenet": "classifier",
    "efficientnet": "classifier",
    "mnasnet": "classifier",
    "convnext": "classifier.2",  # ConvNeXt: keep the LayerNorm2d and Flatten, replace the Linear
}


# Grad-CAM's target layer per family: the last convolutional feature block, whose maps the
# global pooling reads. A trailing max-pool (VGG, AlexNet) is skipped by cam_layer: it only
# halves the map that Grad-CAM then upsamples (to 1x1 on small inputs, which shows nothing).
_CAM_PATHS: dict[str, str] = {
    "resnet": "layer4",
    "resnext": "layer4",
    "wide_resnet": "layer4",
    "regnet": "trunk_output",
    "shufflenet": "conv5",
    "vgg": "features",
    "alexnet": "features",
    "densenet": "features",  # ends in norm5; the forward's ReLU follows in place
    "mobilenet": "features",
    "efficientnet": "features",
    "mnasnet": "layers",
    "convnext": "features",
}


def arch_families() -> tuple[str, ...]:
    """The architecture families cnnkit knows (an arch belongs to the longest prefix listed)."""
    return tuple(sorted(_HEAD_PATHS))


def _family(arch: str) -> str | None:
    return next((f for f in sorted(_HEAD_PATHS, key=len, reverse=True) if arch.startswith(f)), None)


@lru_cache(maxsize=None)
def list_archs() -> tuple[str, ...]:
    """Every torchvision classification model cnnkit can put a new head on."""
    from torchvision import models

    return tuple(a for a in models.list_models(module=models) if _family(a) is not None)


def check_arch(arch: str) -> None:
    if arch not in list_archs():
        raise ConfigError(f"unknown --arch {arch!r}; valid: {', '.join(list_archs())}")


def head_path(arch: str) -> str:
    """Where :func:`build_model` puts the new head in a model of ``arch`` (a submodule path)."""
    return _HEAD_PATHS[_family(arch)]  # type: ignore[index]


def head_module(model: nn.Module, arch: str) -> nn.Module:
    """The new head inside a model built by :func:`build_model`."""
    return model.get_submodule(head_path(arch))


def cam_layer(model: nn.Module, arch: str) -> nn.Module:
    """The layer whose activations and gradients Grad-CAM weighs, in a model of ``arch``."""
    layer = model.get_submodule(_CAM_PATHS[_family(arch)])  # type: ignore[index]
    if isinstance(layer, nn.Sequential) and len(layer) > 1 and isinstance(layer[-1], nn.MaxPool2d):
        layer = layer[-2]
    return layer


def build_model(
    arch: str,
    num_classes: int,
    weights: str | None = "none",
    hidden_units: int = 512,
    dropout: float = 0.2,
    freeze: bool = False,
) -> tuple[nn.Module, HeadSpec]:
    """A torchvision backbone (pretrained per ``weights``) with a new head for ``num_classes``.

    ``weights``: ``"DEFAULT"`` or a torchvision weights name (downloaded to, or read from, the
    torch hub cache), a path to a local ``.pth`` state_dict of the model (its classifier is
    ignored) or to a cnnkit checkpoint (its backbone), or ``"none"``/None.
    With ``freeze`` only the head is trainable.
    """
    from torchvision.models import get_model

    check_arch(arch)
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, got {num_classes}")
    model = get_model(arch, weights=None)
    state_dict = load_backbone_weights(arch, weights)
    if state_dict is not None:
        _load_backbone(model, arch, state_dict, str(weights))
    if freeze:
        for param in model.parameters():
            param.requires_grad_(False)
    path = head_path(arch)
    in_features = next(m for m in model.get_submodule(path).modules() if isinstance(m, nn.Linear)).in_features
    spec = HeadSpec(in_features, num_classes, hidden_units, dropout)
    model.set_submodule(path, build_head(spec))
    return model, spec


def _load_backbone(model: nn.Module, arch: str, state_dict: dict[str, torch.Tensor], weights: str) -> None:
    """Every backbone tensor of ``model`` from ``state_dict``. Its classifier is not needed (a new
    head replaces it), so one for other classes fits too: a torchvision file fine-tuned elsewhere,
    or a cnnkit checkpoint trained on other data (its backbone, transferred)."""
    head = head_path(arch)

    def in_head(key: str) -> bool:
        return key == head or key.startswith(head + ".")

    backbone = {key: value for key, value in state_dict.items() if not in_head(key)}
    try:
        missing, unexpected = model.load_state_dict(backbone, strict=False)
    except RuntimeError as exc:  # a tensor of another shape
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise WeightsError(f"--weights {weights} does not fit {arch}: {first}") from None
    missing = [key for key in missing if not in_head(key)]
    if missing or unexpected:
        keys = ", ".join((missing or unexpected)[:3]) + (", ..." if len(missing or unexpected) > 3 else "")
        raise WeightsError(f"--weights {weights} does not fit {arch}: "
                           f"{'missing' if missing else 'unexpected'} key(s) {keys}")


def model_from_spec(arch: str, head: HeadSpec) -> nn.Module:
    """An untrained model with the architecture and head of a checkpoint, to load its state into."""
    model, _ = build_model(arch, head.num_classes, "none", head.hidden_units, head.dropout)
    return model


# --- pretrained weights -------------------------------------------------------------------

_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def hub_cache_path(url: str) -> str:
    """Where torch hub keeps (or would keep) the file downloaded from ``url``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(url).path))


def load_backbone_weights(arch: str, weights: str | None) -> dict[str, torch.Tensor] | None:
    """The backbone state_dict named by ``weights`` (see :func:`build_model`), or None."""
    if weights is None or weights.lower() == "none":
        return None
    if os.path.isfile(weights) or weights.endswith((".pth", ".pt", ".bin")) or os.sep in weights:
        state_dict = _load_weights_file(weights)
    else:
        state_dict = _load_torchvision_weights(arch, weights)
    # Old torchvision DenseNet files use 'norm.1'-style keys; torchvision renames them the same way.
    for key in list(state_dict):
        match = _DENSENET_OLD_KEY.match(key)
        if match:
            state_dict[match.group(1) + match.group(2)] = state_dict.pop(key)
    return state_dict


def _load_weights_file(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise WeightsError(f"weights file not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):  # common wrappers around a state_dict
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise WeightsError(f"{path} is not a state_dict (a dict of parameter name to tensor)")
    return dict(loaded)


def _load_torchvision_weights(arch: str, name: str) -> dict[str, torch.Tensor]:
    from torchvision.models import get_model_weights

    enum = get_model_weights(arch)
    try:
        weights = enum.DEFAULT if name.upper() == "DEFAULT" else enum[name.split(".")[-1]]
    except KeyError:
        valid = ", ".join(["DEFAULT", *(m for m in enum.__members__ if m != "DEFAULT")])
        raise ConfigError(f"unknown --weights {name!r} for {arch}; valid: {valid}, a file path, or none") from None
    cached = hub_cache_path(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # offline, proxy, partial download, hash mismatch...
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(
            f"pretrained weights for {arch} are not in the cache ({cached}) and could not be "
            f"downloaded ({reason}); put the file there, or use --weights PATH to a local .pth, "
            "or --weights none to train from scratch"
        ) from None
