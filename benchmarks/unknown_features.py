"""Features for the open-set studies (issue 15, ``unknown_scores.py`` and ``unknown_select.py``):
the photos of flowers-20's classes, and a resnet18 checkpoint's pooled layer2, layer3 and layer4
outputs and logits for them."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from cnnkit.data.folders import ImageDataset, collate
from cnnkit.data.transforms import build_transforms
from limit import FLOWERS_20

LAYERS = ("layer2", "layer3", "layer4")


def class_split() -> tuple[list[str], list[str]]:
    """The 15 known classes (the first folders, as ``unknown_bench.py`` trains on) and the 5 unseen."""
    classes = sorted(p.name for p in (FLOWERS_20 / "train").iterdir())
    return classes[:15], classes[15:]


def listing(split: str, names: list[str]) -> tuple[list[str], np.ndarray]:
    """The photos of ``names`` in ``split``, and each one's index in ``names``."""
    paths, labels = [], []
    for index, name in enumerate(names):
        for path in sorted((FLOWERS_20 / split / name).iterdir()):
            paths.append(str(path))
            labels.append(index)
    return paths, np.array(labels)


def features(model: torch.nn.Module, ckpt, paths: list[str]) -> dict[str, np.ndarray]:
    """Pooled outputs of :data:`LAYERS` and the logits of ``model`` (a resnet) for ``paths``."""
    out: dict[str, list] = {k: [] for k in [*LAYERS, "logits"]}
    hooks = [getattr(model, k).register_forward_hook(lambda m, i, o, k=k: out[k].append(o.float().mean((2, 3))))
             for k in LAYERS]
    dataset = ImageDataset(paths, build_transforms(ckpt.preprocess, train=False))
    with torch.inference_mode():
        for x, _, _ in DataLoader(dataset, batch_size=32, collate_fn=collate):
            out["logits"].append(model(x).float())
    for hook in hooks:
        hook.remove()
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}
