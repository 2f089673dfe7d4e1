"""curves.png: loss and accuracy per epoch, redrawn as the run goes (matplotlib, the plot extra)."""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

from ...errors import OutputError
from ..rundir import CURVES
from .base import Callback

if TYPE_CHECKING:
    from ..loop import Trainer

log = logging.getLogger(__name__)

PLOT_INTERVAL = 30.0  # seconds between redraws (one takes a third of a second: a short run must not wait for them)


class Curves(Callback):
    """Redraws after an epoch when the last drawing is PLOT_INTERVAL old (short cached epochs must
    not wait for matplotlib), and at the end, or when the run is interrupted."""

    main_only = True

    def __init__(self) -> None:
        self.available = True  # matplotlib is installed
        self._drawn_at, self._pending = -math.inf, False

    def before_fit(self, trainer: Trainer) -> None:
        self._pending = trainer.run.finishing  # curves.png may predate the last epochs

    def after_epoch(self, trainer: Trainer) -> None:
        self._draw(trainer, final=False)

    def after_fit(self, trainer: Trainer) -> None:
        if self._pending:
            self._draw(trainer, final=True)

    def on_interrupt(self, trainer: Trainer) -> None:
        self.after_fit(trainer)

    def _draw(self, trainer: Trainer, final: bool) -> None:
        if not self.available or not trainer.history:
            return
        if not final and time.monotonic() - self._drawn_at < PLOT_INTERVAL:
            self._pending = True
            return
        self._drawn_at, self._pending = time.monotonic(), False
        try:
            from ...plots import training_curves_png
        except ImportError:
            self.available = False
            log.warning("curves.png is not written: matplotlib is not installed (pip install 'cnnkit[plot]')")
            return
        path = trainer.run.paths[CURVES]
        try:
            training_curves_png(trainer.history, path, fine_tune_from=trainer.state.fine_tune_from)
        except OSError as exc:  # a full disk, say: the checkpoints of this epoch are saved already
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
