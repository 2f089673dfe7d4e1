"""``--time-budget 25m``: the run's epochs are planned so that its schedule (warm-up, then
cosine decay to zero) ends inside the budget, rather than being cut off mid-way (Ultralytics'
``time=`` stops; here the schedule adapts).

The first epoch is the warm-up (whatever the number of epochs, so nothing is wasted while it is
unknown); at its end, the epochs are planned from its measured time, and planned again after the
second (the first pays one-off costs: worker start-up, allocations), before the cosine decay
has moved. After that the plan is checked at every epoch's end against the pace of the last
few epochs (a machine whose speed changes: a busy neighbour, a clock that drops): when the
epochs left would end past the budget, or leave more than an epoch of it unused (give or take
1 % of it, so that noise does not churn the plan), the epochs are planned again from that pace,
and the cosine decay, a function of the progress through the planned epochs, steepens or eases
to end at zero on the new last epoch. A reserve for what follows the last epoch (best.pt's
validation statistics) is kept. The plan goes into the run's config, which ``last.pt`` saves:
a resumed run keeps it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping

from ...config import parse_duration
from .base import Callback

if TYPE_CHECKING:
    from ..loop import Trainer

log = logging.getLogger(__name__)

PLANNED_AFTER = (1, 2)  # the epochs at whose end the plan is made; then it is only checked
PACE_EPOCHS = 3  # the pace that checks the plan: the mean time of this many latest epochs
SLACK = 0.01  # of the budget: a plan projected to end this close to its window is kept (no churn)


def plan_epochs(budget: float, elapsed: float, epoch_seconds: float, done: int, reserve: float) -> int:
    """Total epochs that end within ``budget`` seconds: ``done`` taken ``elapsed`` seconds, each
    further one ``epoch_seconds``, and ``reserve`` more after the last; at least ``done``."""
    left = budget - elapsed - reserve
    return done + max(0, math.floor(left / max(epoch_seconds, 1e-9)))


class TimeBudget(Callback):
    def __init__(self, budget: str, clock: Callable[[], float] | None = None):
        self.budget = parse_duration(budget)
        self.clock = clock or time.monotonic
        self.started = self.clock()
        self.epoch_started = self.started
        self.planned: int | None = None
        self.recent: list[float] = []  # the latest epochs' seconds

    def before_fit(self, trainer: Trainer) -> None:
        if self.planned is None and trainer.cfg.warmup is None:
            trainer.replan(warmup=1.0)  # the first epoch warms up, however many follow
        self.epoch_started = self.clock()

    def after_epoch(self, trainer: Trainer) -> None:
        now = self.clock()
        took, self.epoch_started = now - self.epoch_started, now
        self.recent = [*self.recent, took][-PACE_EPOCHS:]
        planning = trainer.epoch in PLANNED_AFTER and (self.planned is None or trainer.epoch <= self.planned)
        if not planning and (self.planned is None or trainer.epoch >= self.planned):
            return
        pace = took if planning else sum(self.recent) / len(self.recent)
        measured = [pace, now - self.started, trainer.val_stats.seconds if trainer.val_stats is not None else 0.0]
        if trainer.ctx.enabled:  # every process plans from the same figures (their mean), so they agree
            measured = [value / trainer.ctx.world_size for value in trainer.ctx.all_reduce_sum(measured)]
        pace, elapsed, reserve = measured
        if not planning and self.on_course(elapsed + (self.planned - trainer.epoch) * pace + reserve, pace):
            return
        epochs = max(1, plan_epochs(self.budget, elapsed, pace, trainer.epoch, reserve))
        if epochs != trainer.cfg.epochs:
            trainer.replan(epochs=epochs)
        self.planned = epochs
        if trainer.ctx.is_main:
            log.info("--time-budget %s: %.1fs an epoch%s, %.0fs left: %d epochs%s", trainer.cfg.time_budget, pace,
                     "" if planning else f" lately (planned again after epoch {trainer.epoch})",
                     self.budget - elapsed, epochs,
                     "" if epochs > trainer.epoch else " (the budget allows no more; the schedule is cut short)")

    def on_course(self, projected_end: float, pace: float) -> bool:
        """Whether a plan ending at ``projected_end`` (seconds from the start) ends inside the
        budget, less than an epoch early, give or take ``SLACK`` of it."""
        slack = SLACK * self.budget
        return self.budget - pace - slack <= projected_end <= self.budget + slack

    def state_dict(self) -> dict[str, Any]:
        return {"budget_planned": self.planned}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.planned = state.get("budget_planned")
