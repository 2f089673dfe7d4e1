"""``cnnkit train`` as a library function: :func:`train` and its :class:`TrainResult`."""

from __future__ import annotations

import os

from .. import distributed
from ..config import TrainConfig
from ..errors import ConfigError
from ..runtime import resolve_device
from .callbacks import Curves, default_callbacks
from .loop import Trainer
from .result import TrainResult
from .rundir import BEST, CURVES, LAST, METRICS
from .prepare import prepare_run


def train(cfg: TrainConfig) -> TrainResult:
    """Train a classifier as ``cfg`` says; write best.pt, last.pt, metrics.jsonl and curves.png
    to its save dir.

    A run has one or two phases: with a frozen backbone the head trains first (on cached backbone
    features when nothing makes them change: see :mod:`cnnkit.data.features`), then ``fine_tune``
    more epochs train the whole network at a lower rate; with a trainable backbone there is one
    phase. Under torchrun this process trains its share of the job (DistributedDataParallel;
    metrics are sums over the ranks; only rank 0 writes files and logs); with ``cfg.nproc`` > 1
    it starts torchrun itself on this machine and returns rank 0's result.
    """
    if cfg.nproc > 1:
        if distributed.under_torchrun():
            raise ConfigError(
                "--nproc starts torchrun itself; under torchrun leave it out (--nproc-per-node sets the processes)"
            )
        from .launch import launch

        return launch(cfg)
    ctx = distributed.init(resolve_device(cfg.device))
    try:
        run = prepare_run(cfg, ctx)
        trainer = Trainer(run, default_callbacks(run.cfg))
        trainer.fit()
    finally:
        distributed.shutdown(ctx)
    paths, state = run.paths, run.state
    curves = trainer.callback(Curves)
    return TrainResult(
        best_checkpoint=paths[BEST],
        last_checkpoint=paths[LAST],
        metrics_file=paths[METRICS],
        best_val_acc=state.best_val_acc,
        best_epoch=state.best_epoch,
        epochs=trainer.epoch,
        history=trainer.history,
        stopped_early=state.stopped_early,
        fine_tune_from=state.fine_tune_from,
        curves=paths[CURVES] if curves is not None and curves.available and os.path.exists(paths[CURVES]) else None,
    )
