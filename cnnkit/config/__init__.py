"""Frozen, validated configuration objects.

Each CLI flag maps one-to-one to a field here. Configs are saved in checkpoints as plain dicts
(``to_dict``) and rebuilt with ``from_dict``. This module must stay free of heavy imports:
the CLI imports it to build configs before anything touches torch.
"""

from .base import (
    AUGMENT_POLICIES,
    CALIBRATION_METHODS,
    DEVICE_PATTERN,
    EVAL_FIELDS,
    EXPLAIN_METHODS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERPOLATIONS,
    PREDICT_FORMATS,
    TTA_MODES,
    PreprocessConfig,
    Serializable,
    check,
    check_common,
)
from .scoring import EvaluateConfig, ExplainConfig, InspectConfig, PredictConfig
from .serving import (
    DEFAULT_SMOOTH_QUANT,
    EXPORT_FORMATS,
    HEADER_NAME_PATTERN,
    SERVE_HOST_PATTERN,
    ExportConfig,
    ServeConfig,
)
from .training import (
    BUDGET_EPOCHS,
    CLASS_WEIGHTS,
    DEFAULT_EPOCHS,
    RECIPES,
    SAMPLERS,
    SCHEDULERS,
    LRFindConfig,
    TrainConfig,
    default_recipe,
    parse_duration,
)

__all__ = [
    "AUGMENT_POLICIES", "BUDGET_EPOCHS", "CALIBRATION_METHODS", "CLASS_WEIGHTS", "DEFAULT_EPOCHS",
    "DEFAULT_SMOOTH_QUANT", "DEVICE_PATTERN",
    "EVAL_FIELDS", "EXPLAIN_METHODS", "EXPORT_FORMATS", "HEADER_NAME_PATTERN", "IMAGENET_MEAN", "IMAGENET_STD",
    "INTERPOLATIONS", "PREDICT_FORMATS", "RECIPES", "SAMPLERS", "SCHEDULERS", "SERVE_HOST_PATTERN", "TTA_MODES",
    "EvaluateConfig", "ExplainConfig", "ExportConfig", "InspectConfig", "LRFindConfig", "PredictConfig",
    "PreprocessConfig", "Serializable", "ServeConfig", "TrainConfig", "check", "check_common", "default_recipe",
    "parse_duration",
]
