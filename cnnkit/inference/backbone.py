"""A frozen backbone's features of a data set's images, for ``cnnkit inspect``: near-duplicates
by feature similarity and label issues both read them, computed once (and cached with
``cache_dir``, as training caches a frozen backbone's features)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from torch import nn

from ..config import InspectConfig, PreprocessConfig
from ..data.features import load_or_build
from ..data.transforms import resolve_preprocess
from ..distributed import DistContext
from ..models.build import build_model
from ..models.checkpoint import load_checkpoint
from ..runtime import resolve_device
from .predictor import scoring_defaults


@dataclass
class Backbone:
    """A frozen feature extractor and what its features need: the eval preprocessing, the width
    of the features (what its classifier head receives), default class names."""

    model: nn.Module
    arch: str
    preprocess: PreprocessConfig
    in_features: int
    names: dict[str, str]
    source: str  # what it is, for the report

    def features(self, paths: Sequence[str], cfg: InspectConfig) -> np.ndarray:
        """(N, D) float32: each image's features, eval preprocessing; from ``cfg.cache_dir``
        when they were computed there before for the same files and weights."""
        device = next(self.model.parameters()).device
        batch_size, workers = scoring_defaults(device.type, cfg.batch_size, cfg.workers)
        found = load_or_build("inspect", self.model, self.arch, [(p, 0) for p in paths], self.preprocess,
                              self.in_features, cfg.cache_dir, device=device, batch_size=batch_size,
                              workers=workers, ctx=DistContext(device=device), progress=cfg.progress)
        return found.features.numpy()


def load_backbone(cfg: InspectConfig) -> Backbone:
    """The backbone ``cfg`` names (a checkpoint's, or an architecture with weights), on its
    device, in eval mode; raises the one-line errors of a bad checkpoint, architecture or weights."""
    device = resolve_device(cfg.device)
    if cfg.checkpoint:
        ckpt = load_checkpoint(cfg.checkpoint)
        model = ckpt.build_model(device)
        return Backbone(model, ckpt.arch, ckpt.preprocess, ckpt.head.in_features, dict(ckpt.class_names),
                        f"{ckpt.arch} (checkpoint {cfg.checkpoint})")
    model, head = build_model(str(cfg.arch), 2, cfg.weights, hidden_units=0)  # the head is never used
    return Backbone(model.to(device).eval(), str(cfg.arch), resolve_preprocess(str(cfg.arch), cfg.image_size),
                    head.in_features, {}, f"{cfg.arch} (weights {cfg.weights})")
