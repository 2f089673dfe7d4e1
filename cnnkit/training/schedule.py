"""Learning-rate schedules: pure functions of the progress through a phase, so a resumed run
needs no scheduler state (as timm's schedulers, which take the step count instead of keeping it)."""

from __future__ import annotations

import math


def lr_factor(epoch: float, epochs: int, scheduler: str, warmup: float = 0.0) -> float:
    """The learning-rate multiplier after ``epoch`` epochs (fractional within an epoch) of a
    phase of ``epochs``.

    ``cosine`` decays from 1 to 0 over the phase, ``step`` divides by 10 at each third of it; both
    start with a linear warm-up from 1% over the first ``warmup`` epochs. ``none`` is constant.
    """
    if scheduler == "none":
        return 1.0
    if warmup > 0 and epoch < warmup:
        return 0.01 + 0.99 * epoch / warmup
    if scheduler == "cosine":
        progress = (epoch - warmup) / max(epochs - warmup, 1e-9)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    if scheduler == "step":
        return 0.1 ** (int(epoch) // max(1, math.ceil(epochs / 3)))
    return 1.0


def default_warmup(epochs: int) -> float:
    """Warm-up epochs when none are given: a tenth of the phase, at most one epoch."""
    return min(1.0, 0.1 * epochs)
