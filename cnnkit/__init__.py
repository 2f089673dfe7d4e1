"""cnnkit: transfer-learning image classification with torchvision CNNs.

The package root stays free of heavy imports so that ``cnnkit --help`` is instant; the
library's entry points are imported lazily::

    from cnnkit import train, TrainConfig
    from cnnkit.predict import predict, Predictor
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "TrainConfig": "cnnkit.config",
    "PredictConfig": "cnnkit.config",
    "PreprocessConfig": "cnnkit.config",
    "CnnkitError": "cnnkit.errors",
    "train": "cnnkit.engine",
    "Predictor": "cnnkit.predict",
    "load_checkpoint": "cnnkit.checkpoint",
    "build_model": "cnnkit.models",
    "build_transforms": "cnnkit.transforms",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")
