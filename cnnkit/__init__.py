"""cnnkit: transfer-learning image classification with torchvision CNNs.

The package root stays free of heavy imports so that ``cnnkit --help`` is instant; the
library's entry points are imported lazily::

    from cnnkit import TrainConfig, train
    result = train(TrainConfig(data_dir="data/flowers-mini", arch="resnet18"))

The other stages are functions of the modules named after them (``cnnkit.inference.predict.predict``,
``cnnkit.evaluate.evaluate``, ``cnnkit.export.export``, ``cnnkit.training.lr_find.lr_find``); they
are not re-exported here because each would shadow its own module. docs/ARCHITECTURE.md maps the
package.
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(
        ["PreprocessConfig", "TrainConfig", "PredictConfig", "EvaluateConfig", "ServeConfig", "ExportConfig",
         "LRFindConfig"],
        "cnnkit.config",
    ),
    "CnnkitError": "cnnkit.errors",
    "train": "cnnkit.training",
    "Predictor": "cnnkit.inference.predictor",
    "create_app": "cnnkit.serve",
    "load_checkpoint": "cnnkit.models.checkpoint",
    "build_model": "cnnkit.models.build",
    "build_transforms": "cnnkit.data.transforms",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")
