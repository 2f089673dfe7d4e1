"""The learning-rate range test (``cnnkit lr-find``), as fastai's ``lr_find`` and Leslie Smith's
"Cyclical Learning Rates" (2017) describe it.

Train the model a training run would build, from its initial weights, for ``steps`` batches while
the learning rate grows exponentially from ``start_lr`` to ``end_lr``; record each batch's loss,
smooth it (an exponential moving average, bias-corrected) and stop once it diverges (four times
its minimum). The suggestion is the learning rate where the smoothed loss falls fastest (its
steepest slope against log-lr), before the minimum. Nothing is saved but the plot (and, with a
frozen backbone, the feature cache that ``cnnkit train`` with the same ``--save-dir`` reuses).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from .. import distributed
from ..config import LRFindConfig
from ..data.samplers import RepeatedSampler
from ..errors import ConfigError, OutputError
from ..runtime import resolve_device
from .callbacks.base import Callback, CancelFit
from .loop import Trainer
from .prepare import prepare_run

log = logging.getLogger(__name__)

PLOT = "lr_find.png"
SMOOTHING = 0.98  # the EMA's beta, as fastai's
DIVERGENCE = 4.0  # stop when the smoothed loss exceeds this many times its minimum


@dataclass(frozen=True)
class LRFindResult:
    lrs: list[float]  # the learning rate of each step taken
    losses: list[float]  # each step's batch loss
    smoothed: list[float]
    suggestion: float | None  # None when the loss never fell
    diverged: bool  # stopped early because the loss exploded
    plot: str | None  # lr_find.png, when written


def lr_schedule(start_lr: float, end_lr: float, steps: int) -> list[float]:
    """``steps`` learning rates growing exponentially from ``start_lr`` to ``end_lr``."""
    ratio = end_lr / start_lr
    return [start_lr * ratio ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: list[float], beta: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (so the first values are not pulled to 0)."""
    out, average = [], 0.0
    for i, loss in enumerate(losses, 1):
        average = beta * average + (1 - beta) * loss
        out.append(average / (1 - beta**i))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> float | None:
    """The learning rate at the steepest descent of ``smoothed`` against log10(lr), looked for
    between the first tenth of the steps (noisy, EMA warming up) and the loss's minimum."""
    values = np.asarray(smoothed, dtype=np.float64)
    if len(values) < 5 or not np.isfinite(values).any():
        return None
    finite = np.where(np.isfinite(values), values, np.inf)
    lowest = int(np.argmin(finite))
    start = min(len(values) // 10, 10)
    if lowest - start < 3:
        return None
    slopes = np.gradient(values[start : lowest + 1], np.log10(np.asarray(lrs[start : lowest + 1])))
    steepest = int(np.argmin(slopes))
    if slopes[steepest] >= 0:
        return None
    return float(lrs[start + steepest])


class LRFinder(Callback):
    """Sets each step's learning rate from ``lrs`` and records the loss; ends the run when the
    range is done or the smoothed loss diverges (fastai's LRFinder callback)."""

    def __init__(self, lrs: list[float], progress: bool):
        self.lrs = lrs
        self.losses: list[float] = []
        self.smoothed: list[float] = []
        self.diverged = False
        self._bar = tqdm(total=len(lrs), desc="lr-find", leave=False, disable=not progress, unit="step",
                         dynamic_ncols=True)

    def before_step(self, trainer: Trainer) -> None:
        trainer.lr = self.lrs[len(self.losses)]

    def after_step(self, trainer: Trainer) -> None:
        self.losses.append(float(trainer.objective.item()))
        self.smoothed = smooth(self.losses)
        self._bar.update(1)
        self._bar.set_postfix(lr=f"{self.lrs[len(self.losses) - 1]:.1e}", loss=f"{self.smoothed[-1]:.3f}")
        steps = len(self.lrs)
        if not math.isfinite(self.smoothed[-1]) or (
            len(self.losses) > steps // 10 and self.smoothed[-1] > DIVERGENCE * min(self.smoothed)
        ):
            self.diverged = True
        if self.diverged or len(self.losses) >= steps:
            raise CancelFit

    def after_fit(self, trainer: Trainer) -> None:
        self._bar.close()

    on_interrupt = after_fit

    def on_error(self, trainer: Trainer, error: BaseException) -> None:
        self._bar.close()


def lr_find(cfg: LRFindConfig) -> LRFindResult:
    """Run the range test with the model, data and recipe of ``cfg.train`` (see module doc): the
    Trainer of one long first epoch (the training set repeated until ``cfg.steps`` batches, so
    one iterator, and its workers, serve every step), driven by an :class:`LRFinder`."""
    tcfg = cfg.train
    if distributed.under_torchrun():
        raise ConfigError("lr-find runs in one process: start it without torchrun")
    plot_path = os.path.join(tcfg.save_dir, PLOT) if cfg.plot else None
    if plot_path and os.path.exists(plot_path) and not cfg.force:
        raise OutputError(f"{plot_path} exists; use --force to overwrite it, or another --save-dir")
    one_phase = dataclasses.replace(tcfg, epochs=1, fine_tune=0, early_stop=None, mlflow=False, resume=None)
    run = prepare_run(one_phase, distributed.init(resolve_device(tcfg.device)), outputs=False)
    per_epoch = math.ceil(len(run.splits.train) / tcfg.batch_size)
    run.loaders.train_sampler = RepeatedSampler(run.loaders.train_sampler, math.ceil(cfg.steps / per_epoch))
    log.info(
        "learning-rate range test: %d steps from %.1e to %.1e, %s", cfg.steps, cfg.start_lr, cfg.end_lr,
        "training the head on cached features" if run.recipe.caches_features else
        "training the head (frozen backbone)" if run.recipe.freeze else "training the whole network",
    )
    finder = LRFinder(lr_schedule(cfg.start_lr, cfg.end_lr, cfg.steps), tcfg.progress)
    Trainer(run, [finder]).fit()
    taken = finder.lrs[: len(finder.losses)]
    suggestion = suggest(taken, finder.smoothed)
    if plot_path:
        try:
            from ..plots import lr_find_png
        except ImportError:
            log.warning("%s is not written: matplotlib is not installed (pip install 'cnnkit[plot]')", PLOT)
            plot_path = None
        else:
            os.makedirs(tcfg.save_dir, exist_ok=True)
            lr_find_png(taken, finder.losses, finder.smoothed, suggestion, plot_path)
    return LRFindResult(taken, finder.losses, finder.smoothed, suggestion, finder.diverged, plot_path)


def format_result(result: LRFindResult, rows: int = 12) -> str:
    """A short table of the smoothed loss over the range, and the suggestion."""
    lines = [f"{'learning rate':>14}  {'smoothed loss':>13}"]
    n = len(result.lrs)
    for i in sorted({round(k * (n - 1) / max(rows - 1, 1)) for k in range(rows)}) if n else []:
        lines.append(f"{result.lrs[i]:>14.2e}  {result.smoothed[i]:>13.4f}")
    if result.diverged:
        lines.append(f"stopped at {result.lrs[-1]:.2e}: the loss diverged")
    if result.suggestion is not None:
        lines.append(
            f"suggested learning rate: {result.suggestion:.2e} (steepest descent of the smoothed loss); "
            f"use it as --learning-rate"
        )
    else:
        lines.append("no suggestion: the loss did not fall over this range (try a lower --start-lr or more --steps)")
    if result.plot:
        lines.append(f"plot: {result.plot}")
    return "\n".join(lines)
