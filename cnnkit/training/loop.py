"""The training loop: phases → epochs → batches, firing events to callbacks.

The :class:`Trainer` keeps only the core of training: switching phases (a frozen backbone's
head, then ``--fine-tune`` epochs of the whole network; or the whole network all along), the
optimizer and DDP wrapping of each phase, per-epoch seeding, the train and validation passes and
the metrics row. Everything else (early stopping, the metrics log, best/last checkpoints, curves,
MLflow, lr-find) is a callback (:mod:`cnnkit.training.callbacks`).

Randomness is re-derived from (seed, epoch) at the start of every epoch and the learning rate is
a pure function of the progress through the phase, so a run resumed from ``last.pt`` takes
exactly the path an uninterrupted run takes; what is not a function of the epoch (the phase
switch, the best epoch, the optimizer and gradient-scaler state, the callbacks' state) is saved
in ``last.pt``'s training state as plain values and tensors.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from typing import Any, Sequence

import torch
from torch import nn

from ..data.samplers import epoch_seed
from ..data.transforms import build_batch_mix
from ..distributed import wrap_ddp
from ..errors import Interrupted, WorkerError, worker_death
from ..models.checkpoint import Checkpoint, library_versions
from ..runtime import seed_everything
from .callbacks.base import EVENTS, Callback, CancelFit
from .recipe import FINE_TUNE, HEAD
from .rundir import BEST, LAST
from .schedule import default_warmup, lr_factor
from .prepare import Run, class_weights, describe, run_summary
from .steps import EpochStats, make_optimizer, run_epoch, set_lr

log = logging.getLogger(__name__)


class Trainer:
    """Trains ``run`` (see :func:`~cnnkit.training.prepare.prepare_run`) with ``callbacks``."""

    def __init__(self, run: Run, callbacks: Sequence[Callback] = ()):
        self.run, self.cfg, self.recipe, self.ctx = run, run.cfg, run.recipe, run.ctx
        self.device, self.state, self.history = run.ctx.device, run.state, run.history
        self.callbacks = list(callbacks)
        if run.resumed is not None:
            for callback in self.callbacks:
                callback.load_state_dict(run.resumed.training_state or {})
        self._local = [cb for cb in self.callbacks if not cb.main_only]
        self._main = [cb for cb in self.callbacks if cb.main_only]
        # The same on every rank (all build the same list), so every rank joins the same syncs.
        self._main_events = {event for cb in self._main for event in EVENTS if cb.handles(event)}
        self._step_events = any(cb.handles("after_step") for cb in self.callbacks)
        self.class_weights = class_weights(run)
        self.mix = build_batch_mix(len(run.splits.classes), run.cfg.mixup, run.cfg.cutmix)  # (the training objective's)
        self.phase, self.epoch = "", run.start_epoch
        self.optimizer: torch.optim.Optimizer | None = None
        self.scaler: Any = None
        self.net: nn.Module | None = None  # what a batch goes through: the model, or the head on cached features
        self.train_net: nn.Module | None = None  # the same, in DistributedDataParallel under torchrun
        self.validated: nn.Module | None = None  # validated instead of `net`, if a callback sets it (the EMA)
        self.deployed_weights: Any = None  # best.pt's weights instead of the model's, if a callback sets it
        # What callbacks read: the current step's learning rate (a callback may set it in
        # before_step) and objective, and the epoch's results.
        self.lr = 0.0
        self.objective: torch.Tensor | None = None
        self.train_stats: EpochStats | None = None
        self.val_stats: EpochStats | None = None
        self.row: dict[str, Any] = {}
        self.improved = False
        self.stop_reason: str | None = None  # set by a callback (early stopping) to end the phase
        self.notes: list[str] = []  # for the epoch's log line

    def callback(self, kind: type) -> Any:
        """The first callback of type ``kind``, or None."""
        return next((cb for cb in self.callbacks if isinstance(cb, kind)), None)

    def fire(self, event: str, *args: Any) -> None:
        for callback in self._local:
            getattr(callback, event)(self, *args)
        if event in self._main_events:
            self.ctx.on_main(lambda: [getattr(cb, event)(self, *args) for cb in self._main])

    def _fire_unsynced(self, event: str, *args: Any) -> None:
        """Fire ``event`` without a sync between ranks (the run is being stopped)."""
        for callback in self._local + (self._main if self.ctx.is_main else []):
            getattr(callback, event)(self, *args)

    def replan(self, **fields: Any) -> None:
        """Change the run's config (a time budget's planned epochs and warm-up): it is what
        ``last.pt`` saves, so a resumed run keeps the plan."""
        self.cfg = dataclasses.replace(self.cfg, **fields)
        self.run.recipe = self.recipe = dataclasses.replace(self.recipe, cfg=self.cfg)

    def request_stop(self, reason: str) -> None:
        """End the current phase after this epoch (the run, unless fine-tuning comes next)."""
        self.stop_reason = reason

    # --- the loop -----------------------------------------------------------------------

    def fit(self) -> None:
        run, state = self.run, self.state
        describe(run)
        self.fire("before_fit")
        epoch = run.start_epoch
        try:  # (self.recipe, not a local: a callback may replan the run)
            while not run.finishing and epoch < self.recipe.end_epoch(state.fine_tune_from):
                epoch += 1
                if self.recipe.freeze and self.cfg.fine_tune and state.fine_tune_from is None and epoch > self.cfg.epochs:
                    state.fine_tune_from = epoch - 1  # resumed with a shorter --epochs
                phase = self.recipe.phase(epoch, state.fine_tune_from)
                if phase != self.phase:
                    self._enter_phase(phase)
                self._epoch(epoch)
                if state.stopped_early is not None:
                    break
        except CancelFit:
            pass
        except KeyboardInterrupt:
            self._fire_unsynced("on_interrupt")
            raise Interrupted(stopped_message(self.run, epoch, f"interrupted in epoch {epoch}")) from None
        except BaseException as exc:
            self._fire_unsynced("on_error", exc)
            died = worker_death(exc)
            if died is None:
                raise
            raise worker_stopped(self.run, epoch, f"{died}, in epoch {epoch}") from None
        try:
            self.fire("after_fit")
        except RuntimeError as exc:  # a worker of the statistics' pass over the images: the epochs are saved
            died = worker_death(exc)
            if died is None:
                raise
            raise worker_stopped(self.run, epoch + 1, f"{died}, while completing {self.run.paths[BEST]}") from None

    def _enter_phase(self, phase: str) -> None:
        cfg, run, state = self.cfg, self.run, self.state
        if phase == FINE_TUNE:
            for param in run.model.parameters():
                param.requires_grad_(True)
        trainable = [p for p in run.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(trainable, self.recipe.phase_plan(phase, state.fine_tune_from)[2],
                                        cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.recipe.autocast_dtype == torch.float16 else None
        if state.optimizer_phase == phase and state.optimizer is not None:
            try:
                self.optimizer.load_state_dict(state.optimizer)
            except (ValueError, KeyError) as exc:
                self._info("the optimizer state in %s does not fit (%s); starting it afresh", cfg.resume, exc,
                           warning=True)
            if self.scaler is not None and state.scaler:
                self.scaler.load_state_dict(state.scaler)
        state.optimizer = None  # loaded once, into the phase it belongs to
        self.train_loader, self.valid_loader = run.loaders.for_phase(phase, run.model, run.head_spec)
        self.net = run.head if phase == HEAD and self.recipe.caches_features else run.model
        if self.ctx.enabled:  # the previous phase's DDP hooks must go before new ones are made
            self.train_net = None
            gc.collect()
        self.train_net = wrap_ddp(self.net, self.ctx)
        self.phase = phase
        if phase == FINE_TUNE:
            self._info(
                "fine-tuning the whole network for %d epochs at learning rate %.2g (%d trainable parameters)%s",
                cfg.fine_tune, cfg.resolved_fine_tune_lr, sum(p.numel() for p in trainable),
                ", with augmentation" if self.recipe.augment(phase) else "",
            )
        self.fire("before_phase")

    def set_modes(self) -> None:
        """Train mode for what trains: a frozen backbone stays in eval mode, so its BatchNorm
        statistics are not overwritten by the new data's (only the head's Dropout trains); this is
        also what makes cached features exact."""
        model, head = self.run.model, self.run.head
        if self.net is head or self.phase == HEAD:
            model.eval()
            head.train()
        else:
            model.train()

    def _epoch(self, epoch: int) -> None:
        cfg, ctx, state = self.cfg, self.ctx, self.state
        self.epoch = epoch
        seed = epoch_seed(cfg.seed, epoch)
        seed_everything(seed)
        self.run.loaders.set_epoch(epoch, seed)
        before, phase_epochs, base_lr = self.recipe.phase_plan(self.phase, state.fine_tune_from)
        warmup = cfg.warmup if cfg.warmup is not None else default_warmup(phase_epochs)

        def lr_at(step: int, steps: int) -> float:
            return base_lr * lr_factor(epoch - 1 - before + step / max(steps, 1), phase_epochs, cfg.scheduler, warmup)

        def before_step(step: int, steps: int) -> None:
            self.lr = lr_at(step, steps)
            self.fire("before_step")
            set_lr(self.optimizer, self.lr)

        def after_step(objective: torch.Tensor) -> None:
            self.objective = objective
            self.fire("after_step")

        reduce = ctx.all_reduce_sum if ctx.enabled else None
        bars = cfg.progress and ctx.is_main
        end = self.recipe.end_epoch(state.fine_tune_from)
        common = dict(autocast_dtype=self.recipe.autocast_dtype, channels_last=self.recipe.channels_last, reduce=reduce)
        self.set_modes()
        fit = run_epoch(
            self.train_net, self.train_loader, self.device, self.optimizer, f"epoch {epoch}/{end} train", bars,
            class_weights=self.class_weights, before_step=before_step,
            after_step=after_step if self._step_events else None, clip_grad=cfg.clip_grad, scaler=self.scaler,
            mix=self.mix, label_smoothing=cfg.label_smoothing, **common,
        )
        validated = self.validated or self.net
        validated.eval()
        val = run_epoch(validated, self.valid_loader, self.device, None, f"epoch {epoch}/{end} valid", bars, **common)
        self.train_stats, self.val_stats = fit, val
        self.row = {
            "epoch": epoch,
            "train_loss": round(fit.loss, 6),
            "train_acc": round(fit.acc, 6),
            "val_loss": round(val.loss, 6),
            "val_acc": round(val.acc, 6),
            "val_top5": round(val.top5, 6),
            "lr": lr_at(0, 1),
            "seconds": round(fit.seconds + val.seconds + self.run.loaders.take_cache_seconds(), 3),
            "images_per_s": round(fit.images / max(fit.seconds, 1e-9), 2),
        }
        self.history.append(self.row)
        self.improved = val.acc > state.best_val_acc
        if self.improved:
            state.best_val_acc, state.best_epoch = val.acc, epoch
        self.stop_reason, self.notes = None, []
        self.fire("after_validate")
        self._end_phase(epoch)
        self.fire("after_epoch")
        self._info(
            "epoch %d/%d%s  train loss %.4f acc %.1f%%  val loss %.4f acc %.1f%% top-5 %.1f%%  "
            "lr %.2g  %.1fs  %.1f img/s%s%s",
            epoch, end, f" ({self.phase})" if self.phase == FINE_TUNE else "", fit.loss, 100 * fit.acc, val.loss,
            100 * val.acc, 100 * val.top5, self.row["lr"], self.row["seconds"], self.row["images_per_s"],
            "  *best" if self.improved else "", "".join(f"  ({note})" for note in self.notes),
        )

    def _end_phase(self, epoch: int) -> None:
        """The switch to fine-tuning after the head phase's epochs (or its early stop), or the
        end of the run on an early stop."""
        cfg, state = self.cfg, self.state
        if self.phase == HEAD and cfg.fine_tune and (self.stop_reason or epoch >= cfg.epochs):
            state.fine_tune_from = epoch
            if self.stop_reason:
                self.notes = [f"early stop of the head phase: {self.stop_reason}"]
            self.fire("after_phase")
        elif self.stop_reason:
            state.stopped_early = epoch
            self.notes = [f"early stop: {self.stop_reason}"]

    # --- what callbacks save ------------------------------------------------------------

    def checkpoint(self, with_state: bool) -> Checkpoint:
        """The model as it is now; ``with_state``: with what resuming needs (``last.pt``)."""
        run, training_state = self.run, None
        if with_state:
            training_state = self.state.saved_fields()
            for callback in self.callbacks:
                training_state.update(callback.state_dict())
            training_state.update(
                epoch=self.epoch,
                optimizer=self.optimizer.state_dict() if self.optimizer is not None else None,
                optimizer_phase=self.phase,
                scaler=self.scaler.state_dict() if self.scaler is not None else None,
            )
        return Checkpoint(
            arch=self.cfg.arch,
            head=run.head_spec,
            state_dict={k: v.detach().cpu() for k, v in (
                run.model.state_dict() if with_state or self.deployed_weights is None else self.deployed_weights()).items()},
            classes=run.splits.classes,
            preprocess=run.preprocess,
            class_names=run.class_names,
            train_config=self.cfg.to_dict(),
            summary=run_summary(run, self.epoch),
            versions=library_versions(),
            training_state=training_state,
        )

    def _info(self, *args: Any, warning: bool = False) -> None:
        if self.ctx.is_main:
            (log.warning if warning else log.info)(*args)


def worker_stopped(run: Run, epoch: int, what: str) -> WorkerError:
    """The error of a run stopped in ``epoch`` by a dead data-loading worker (``what`` says which)."""
    return WorkerError(stopped_message(run, epoch, what) + " (--workers 0 loads images in the main process)")


def stopped_message(run: Run, epoch: int, what: str) -> str:
    """What a run stopped in ``epoch`` says: where to resume from, or that nothing was saved."""
    done, last = epoch - 1, run.paths[LAST]
    if done > run.start_epoch or run.resumed is not None:
        return f"{what}; {last} holds epoch {done}: continue with --resume {last}"
    if what.startswith("interrupted"):
        return f"{what}, before any epoch finished; nothing was saved"
    return f"{what}; no epoch had finished; nothing was saved"
