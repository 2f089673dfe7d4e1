"""The Trainer's callbacks: one module each (see :mod:`.base` for the events and how to add one)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Callback, CancelFit
from .checkpoints import Checkpoints
from .curves import Curves
from .early_stop import EarlyStopping
from .ema import ModelEma
from .metrics_log import MetricsLog
from .time_budget import TimeBudget

if TYPE_CHECKING:
    from ...config import TrainConfig

__all__ = ["Callback", "CancelFit", "Checkpoints", "Curves", "EarlyStopping", "MetricsLog", "ModelEma", "TimeBudget", "default_callbacks"]


def default_callbacks(cfg: TrainConfig) -> list[Callback]:
    """The callbacks of ``cnnkit train``, in the order the kill -9 tests rely on: the weights'
    average, the time budget's plan, the early-stop decision, then the writes (metrics row → best.pt → last.pt →
    curves.png → MLflow)."""
    callbacks: list[Callback] = [ModelEma(cfg.ema)] if cfg.ema else []
    if cfg.time_budget:  # (before the writes: last.pt saves the plan made after this epoch)
        callbacks.append(TimeBudget(cfg.time_budget))
    if cfg.early_stop is not None:
        callbacks.append(EarlyStopping(cfg.early_stop))
    callbacks += [MetricsLog(), Checkpoints(), Curves()]
    if cfg.mlflow:
        from .mlflow import MlflowCallback  # mlflow itself is imported only when the run starts

        callbacks.append(MlflowCallback())
    return callbacks
