"""The callback interface of the :class:`~cnnkit.training.loop.Trainer` (fastai's and
Ultralytics' shape): the loop fires events, callbacks do everything that is not the loop itself.

Events, in the order a run fires them::

    before_fit
      before_phase                      (head, fine-tune or full: when the phase changes)
        before_step / after_step        (each training batch; after_step gets the objective)
        after_validate                  (decisions: early stopping asks the phase to end)
        after_phase                     (the phase has ended; the next one starts next epoch)
        after_epoch                     (outputs: metrics row, best.pt, last.pt, curves, MLflow)
    after_fit
    on_interrupt / on_error             (instead of after_fit, when the run is stopped)

Callbacks run in list order for each event. ``main_only`` callbacks (outputs: files, tracking)
run on rank 0 alone under torchrun; an error they raise reaches every rank. A stateful callback
returns its state from ``state_dict`` (plain values, saved in ``last.pt``'s training state) and
gets it back from ``load_state_dict`` when a run resumes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from ..loop import Trainer

EVENTS = (
    "before_fit", "before_phase", "before_step", "after_step", "after_validate", "after_phase", "after_epoch",
    "after_fit", "on_interrupt", "on_error",
)


class CancelFit(Exception):
    """Raised by a callback to end the run at once (lr-find, when its range is done)."""


class Callback:
    main_only = False  # True: runs on rank 0 only (it writes files or talks to a tracker)

    def before_fit(self, trainer: Trainer) -> None: ...
    def before_phase(self, trainer: Trainer) -> None: ...
    def before_step(self, trainer: Trainer) -> None: ...
    def after_step(self, trainer: Trainer) -> None: ...
    def after_validate(self, trainer: Trainer) -> None: ...
    def after_phase(self, trainer: Trainer) -> None: ...
    def after_epoch(self, trainer: Trainer) -> None: ...
    def after_fit(self, trainer: Trainer) -> None: ...
    def on_interrupt(self, trainer: Trainer) -> None: ...
    def on_error(self, trainer: Trainer, error: BaseException) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take this callback's values from a resumed run's training state (missing keys keep
        their defaults: the run may predate the callback)."""

    def handles(self, event: str) -> bool:
        """Whether this callback does anything on ``event`` (it overrides the method)."""
        return getattr(type(self), event) is not getattr(Callback, event)
