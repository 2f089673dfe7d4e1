"""Early stopping: ``--early-stop N`` epochs without a lower validation loss end the phase."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping

from .base import Callback

if TYPE_CHECKING:
    from ..loop import Trainer


class EarlyStopping(Callback):
    """Counts epochs without a lower validation loss; at ``patience`` it asks the trainer to end
    the phase (the head phase then gives way to fine-tuning; any other ends the run)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_val_loss = math.inf
        self.bad_epochs = 0

    def after_validate(self, trainer: Trainer) -> None:
        val_loss = trainer.val_stats.loss
        if val_loss < self.best_val_loss:
            self.best_val_loss, self.bad_epochs = val_loss, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            trainer.request_stop(f"no lower val loss for {self.patience} epochs")
        else:
            trainer.notes.append(f"no lower val loss for {self.bad_epochs} of {self.patience} epochs")

    def after_phase(self, trainer: Trainer) -> None:
        self.best_val_loss, self.bad_epochs = math.inf, 0  # the next phase counts afresh

    def state_dict(self) -> dict[str, Any]:
        return {"best_val_loss": self.best_val_loss, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_val_loss = float(state.get("best_val_loss", math.inf))
        self.bad_epochs = int(state.get("bad_epochs", 0))
