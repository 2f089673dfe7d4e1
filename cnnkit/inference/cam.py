"""Grad-CAM and Grad-CAM++: where in an image a trained model found its evidence for a class.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of the target layer (``cam_layer``: the
last convolutional block of the architecture's family) by the spatial mean of the class score's
gradient, sums them and keeps the positive part; captum's ``LayerGradCam`` computes it.
Grad-CAM++ (Chattopadhay et al., 2018) weighs each position's positive gradient instead, by a
closed form of the second and third derivatives of exp(score); captum has no Grad-CAM++, so
:func:`grad_cam_pp` computes it from the activations and gradients that captum gives. The score
is the class's logit (the head's LogSoftmax is bypassed): the gradient of a log-probability
vanishes as the probability nears 1.

Maps are upsampled to the model's input, the resized and centre-cropped image, and scaled to
[0, 1]. Needs the 'explain' extra (captum).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from ..config import EXPLAIN_METHODS
from ..errors import ConfigError, require_extra
from ..models.build import cam_layer, head_module


METHOD_NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}  # EXPLAIN_METHODS as pictures name them


def caption(label: str, name: str, probability: float, method: str) -> str:
    """The line under an explanation picture: the class, its probability and the method."""
    shown = name if name == label else f"{name} ({label})"
    return f"{shown}  {probability:.1%}  {METHOD_NAMES[method]}"


def grad_cam_pp(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ maps (N, 1, h, w) from a layer's activations and the score's gradients, both
    (N, K, h, w): alpha = g² / (2g² + ΣA·g³) per position (0 where that is 0/0), channel weights
    Σ alpha·relu(g), and the positive part of the weighted sum of the channels."""
    g2, g3 = gradients.pow(2), gradients.pow(3)
    denominator = 2 * g2 + activations.sum(dim=(2, 3), keepdim=True) * g3
    nonzero = denominator != 0
    alpha = torch.where(nonzero, g2 / torch.where(nonzero, denominator, torch.ones_like(denominator)), 0.0)
    weights = (alpha * gradients.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
    return (weights * activations).sum(dim=1, keepdim=True).clamp(min=0)


def scale_maps(maps: torch.Tensor) -> torch.Tensor:
    """Each map of ``maps`` (N, H, W) min-max scaled to [0, 1]; a flat one (no evidence) is all 0."""
    flat = maps.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1)
    span = (flat.max(dim=1).values.view(-1, 1, 1) - low)
    return torch.where(span > 0, (maps - low) / torch.where(span > 0, span, 1.0), 0.0).clamp(0, 1)


class HeatMapper:
    """Grad-CAM (or Grad-CAM++) heat maps of a model built by cnnkit, for chosen classes."""

    def __init__(self, model: nn.Module, arch: str, method: str = "gradcam"):
        require_extra("explain", "captum")
        if method not in EXPLAIN_METHODS:
            raise ConfigError(f"unknown Grad-CAM method {method!r}; valid: {', '.join(EXPLAIN_METHODS)}")
        self.model, self.method = model, method
        self.layer = cam_layer(model, arch)
        self.log_softmax = head_module(model, arch)[-1]  # build_head's last module

    def maps(self, batch: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
        """Heat maps (N, H, W) in [0, 1] on the CPU: image i of ``batch`` (N, 3, H, W, as the eval
        transform makes them) for class ``classes[i]``."""
        from captum.attr import LayerActivation, LayerAttribution, LayerGradCam, LayerGradientXActivation

        parameter = next(self.model.parameters())
        batch = batch.to(parameter.device, dtype=parameter.dtype)
        target = [int(c) for c in classes]
        with self._logits(), torch.enable_grad():
            if self.method == "gradcam":
                raw = LayerGradCam(self.model, self.layer).attribute(batch, target=target, relu_attributions=True)
            else:
                gradients = LayerGradientXActivation(self.model, self.layer, multiply_by_inputs=False).attribute(
                    batch, target=target)
                activations = LayerActivation(self.model, self.layer).attribute(batch)
                raw = grad_cam_pp(activations, gradients)
        upsampled = LayerAttribution.interpolate(raw.detach().float(), tuple(batch.shape[-2:]), "bilinear")
        return scale_maps(upsampled[:, 0].cpu())

    @contextmanager
    def _logits(self) -> Iterator[None]:
        """Meanwhile the model outputs logits: the head's LogSoftmax passes its input through."""
        if not isinstance(self.log_softmax, nn.LogSoftmax):  # not a head of build_head's
            yield
            return
        handle = self.log_softmax.register_forward_hook(lambda module, args, output: args[0])
        try:
            yield
        finally:
            handle.remove()
