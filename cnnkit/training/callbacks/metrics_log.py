"""metrics.jsonl: one JSON row per epoch, appended as the epoch ends."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..rundir import METRICS, append_history, write_history
from .base import Callback

if TYPE_CHECKING:
    from ..loop import Trainer


class MetricsLog(Callback):
    main_only = True

    def before_fit(self, trainer: Trainer) -> None:
        # A resumed run keeps the rows up to its checkpoint's epoch (a killed run may have
        # written rows past it).
        write_history(trainer.run.paths[METRICS], trainer.history)

    def after_epoch(self, trainer: Trainer) -> None:
        append_history(trainer.run.paths[METRICS], trainer.row)
