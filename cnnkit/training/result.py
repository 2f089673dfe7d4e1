"""What :func:`cnnkit.training.train` returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainResult:
    best_checkpoint: str
    last_checkpoint: str
    metrics_file: str
    best_val_acc: float
    best_epoch: int
    epochs: int  # epochs trained in all (the last epoch's number)
    history: list[dict[str, Any]]
    stopped_early: int | None = None  # the epoch after which early stopping ended the run
    fine_tune_from: int | None = None  # the last head-only epoch, when the backbone was fine-tuned
    curves: str | None = None  # curves.png, when matplotlib is installed
