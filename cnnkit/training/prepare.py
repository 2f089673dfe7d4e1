"""Everything a run resolves before its first epoch: the resumed checkpoint and its recipe, the
data, the save dir, the model and the loop's saved state (:func:`prepare_run`)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..config import BUDGET_EPOCHS, DEFAULT_EPOCHS, PreprocessConfig, TrainConfig
from ..data.folders import Splits, load_category_names, load_splits
from ..distributed import DistContext
from ..errors import ConfigError, DataError
from ..models.build import HeadSpec, build_model, check_arch, head_module
from ..models.checkpoint import Checkpoint, load_checkpoint
from ..runtime import seed_everything
from .loaders import RunLoaders
from .recipe import FINE_TUNE, FULL, HEAD, Recipe, balanced_class_weights, imbalance_warning, resolve_recipe, resume_config
from .rundir import BEST, METRICS, check_resume_path, load_history, prepare_save_dir, run_paths, same_dir

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What the loop keeps that is not a function of the epoch (saved in ``last.pt``, flat, beside
    the callbacks' own state)."""

    epoch: int = 0
    best_val_acc: float = -1.0
    best_epoch: int = 0
    fine_tune_from: int | None = None  # the last head-only epoch, once the fine-tuning phase is set
    stopped_early: int | None = None
    optimizer_phase: str | None = None  # the phase the saved optimizer state belongs to
    optimizer: dict[str, Any] | None = None  # loaded once, into the phase it belongs to
    scaler: dict[str, Any] | None = None

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any], freeze: bool) -> "TrainState":
        state = cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if saved.get(f.name) is not None})
        if state.optimizer_phase is None and state.optimizer is not None:
            state.optimizer_phase = HEAD if freeze else FULL  # a last.pt of the first format
        return state

    def saved_fields(self) -> dict[str, Any]:
        """The fields saved in every ``last.pt`` (the optimizer's are added by the trainer)."""
        return {k: getattr(self, k) for k in ("best_val_acc", "best_epoch", "fine_tune_from", "stopped_early")}


@dataclass
class Run:
    """One call of ``cnnkit train`` (or ``lr-find``), resolved: what the Trainer trains."""

    recipe: Recipe
    ctx: DistContext
    splits: Splits
    class_names: dict[str, str]
    model: nn.Module
    head_spec: HeadSpec
    preprocess: PreprocessConfig
    loaders: RunLoaders
    state: TrainState
    paths: dict[str, str]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed: Checkpoint | None = None
    finishing: bool = False  # a finished run whose best.pt lacks its drift statistics: only complete it
    recipe_reason: str = ""  # why the run has its recipe (logged)

    @property
    def cfg(self) -> TrainConfig:
        return self.recipe.cfg

    @property
    def head(self) -> nn.Module:
        return head_module(self.model, self.cfg.arch)

    @property
    def start_epoch(self) -> int:
        return int(self.state.epoch)


def prepare_run(cfg: TrainConfig, ctx: DistContext, outputs: bool = True) -> Run:
    """Resolve ``cfg`` into a :class:`Run`. ``outputs=False`` (lr-find): no checkpoints or metrics
    are written, so the save dir is not checked."""
    if cfg.resume:
        check_resume_path(cfg.resume)
    resumed = load_checkpoint(cfg.resume) if cfg.resume else None
    if resumed is not None:
        cfg = resume_config(cfg, resumed)
    reason = recipe_reason(cfg)
    cfg = cfg.with_recipe()
    if cfg.epochs is None:  # (a time budget plans its epochs once the first ones are timed)
        cfg = dataclasses.replace(cfg, epochs=BUDGET_EPOCHS if cfg.time_budget else DEFAULT_EPOCHS)
    check_arch(cfg.arch)
    splits = load_splits(cfg.data_dir, cfg.val_split, cfg.seed)
    class_names = load_category_names(cfg.category_names, splits.classes) if cfg.category_names else {}
    if resumed is not None:
        if resumed.classes != splits.classes:
            raise DataError(
                f"the classes in {cfg.data_dir} differ from those of {cfg.resume}; "
                "resume with the data the run started with"
            )
        class_names = class_names or resumed.class_names
    # Resuming into the run's own folder continues it; any other folder must not hold a run.
    run_dir = os.path.dirname(os.path.abspath(cfg.resume)) if cfg.resume else None
    continuing = run_dir is not None and same_dir(run_dir, cfg.save_dir)
    if outputs:
        ctx.on_main(lambda: prepare_save_dir(cfg, continuing=continuing))
    main_log = log if ctx.is_main else None
    recipe = resolve_recipe(cfg, ctx.device, main_log)
    warning = imbalance_warning([t for _, t in splits.train], splits.classes, cfg)
    if warning and main_log:
        main_log.warning("%s", warning)
    if cfg.mlflow and ctx.is_main and outputs:
        from .callbacks.mlflow import check_available

        check_available()

    model, head_spec, preprocess = _build_model(recipe, ctx.device, len(splits.classes), resumed)
    state = TrainState.from_saved(resumed.training_state, recipe.freeze) if resumed else TrainState()
    run = Run(
        recipe, ctx, splits, class_names, model, head_spec, preprocess,
        loaders=RunLoaders(recipe, ctx, splits, preprocess),
        state=state,
        paths=run_paths(cfg.save_dir),
        history=load_history(os.path.join(run_dir, METRICS), state.epoch) if run_dir else [],
        resumed=resumed,
        recipe_reason=reason,
    )
    run.finishing = bool(outputs and continuing and _is_finished(run) and _best_incomplete(run.paths[BEST]))
    _check_resumable(run)
    if recipe.caches_features and state.fine_tune_from is None and main_log:
        main_log.info(
            "feature caching on: the backbone is frozen and the head trains without augmentation, so "
            "each image's backbone features are computed once (in %s) and later epochs train on them; "
            "--augment, --mixup, --cutmix or --no-cache-features turns this off",
            run.loaders.cache_dir,
        )
    weights = class_weights(run)
    if weights is not None and main_log:
        main_log.info("class weights (balanced): %s", ", ".join(
            f"{c} {w:.2f}" for c, w in zip(splits.classes, weights.tolist())))
    return run


def class_weights(run: Run) -> torch.Tensor | None:
    """The loss's per-class weights (``--class-weights balanced``), on the run's device."""
    if run.cfg.class_weights != "balanced":
        return None
    return balanced_class_weights([t for _, t in run.splits.train], len(run.splits.classes)).to(run.ctx.device)


def _build_model(
    recipe: Recipe, device: torch.device, classes: int, resumed: Checkpoint | None
) -> tuple[nn.Module, HeadSpec, PreprocessConfig]:
    cfg = recipe.cfg
    seed_everything(cfg.seed)  # the new head's initial weights
    model, head_spec = build_model(
        cfg.arch, classes, "none" if resumed is not None else cfg.weights, cfg.hidden_units, cfg.dropout,
        freeze=recipe.freeze,
    )
    preprocess = resumed.preprocess if resumed else recipe.preprocess
    if resumed is not None:
        model.load_state_dict(resumed.state_dict)
    model.to(device)
    if recipe.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, head_spec, preprocess


def _is_finished(run: Run) -> bool:
    state = run.state
    return state.stopped_early is not None or run.start_epoch >= run.recipe.end_epoch(state.fine_tune_from)


def _best_incomplete(path: str) -> bool:
    """best.pt exists without the drift statistics a finished run adds to it."""
    return os.path.exists(path) and load_checkpoint(path).reference_stats is None


def _check_resumable(run: Run) -> None:
    """A finished run is refused (unless only its best.pt is left to complete)."""
    cfg, state = run.cfg, run.state
    if run.finishing:
        return
    if state.stopped_early is not None:
        raise ConfigError(
            f"{cfg.resume} stopped early after epoch {state.stopped_early} (no lower validation "
            "loss for --early-stop epochs): it is finished; start a new run to train more"
        )
    if run.start_epoch >= run.recipe.end_epoch(state.fine_tune_from):
        if state.fine_tune_from is not None:
            raise ConfigError(
                f"{cfg.resume} has already trained {run.start_epoch} epochs, its fine-tuning included; "
                "start a new run to train more"
            )
        raise ConfigError(
            f"{cfg.resume} has already trained {run.start_epoch} epochs; pass a larger --epochs to extend it"
        )


def run_summary(run: Run, epoch: int) -> dict[str, Any]:
    """The training summary every checkpoint of ``run`` carries, as of ``epoch``."""
    cfg, splits, state = run.cfg, run.splits, run.state
    return {
        "epochs": epoch,
        "best_val_acc": state.best_val_acc,
        "best_epoch": state.best_epoch,
        "data_dir": os.path.abspath(cfg.data_dir),
        "validation": splits.description,
        "train_images": len(splits.train),
        "valid_images": len(splits.valid),
        "seed": cfg.seed,
        "weights": cfg.weights,
        "frozen_backbone": run.recipe.freeze,
        "fine_tune_from": state.fine_tune_from,
        "stopped_early": state.stopped_early,
        "feature_cache": run.recipe.caches_features,
        "processes": run.ctx.world_size,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def describe(run: Run) -> None:
    """Log what the run is about to do (rank 0)."""
    cfg, ctx, state = run.cfg, run.ctx, run.state
    if not ctx.is_main:
        return
    if run.finishing:
        log.info("%s has trained all its epochs, but its run stopped before best.pt was complete: "
                 "completing it", cfg.resume)
        return
    first_phase = run.recipe.phase(run.start_epoch + 1, state.fine_tune_from)
    trainable = sum(p.numel() for p in run.model.parameters() if p.requires_grad or first_phase == FINE_TUNE)
    log.info(
        "training %s on %s%s: %d classes, %d train / %d validation images (%s); %s backbone, "
        "%d trainable parameters; epochs %d to %d%s",
        cfg.arch, ctx.device, f" x {ctx.world_size} processes" if ctx.enabled else "", len(run.splits.classes),
        len(run.splits.train), len(run.splits.valid), run.splits.description,
        "frozen" if run.recipe.freeze else "trainable", trainable, run.start_epoch + 1,
        run.recipe.end_epoch(state.fine_tune_from),
        f" (the last {cfg.fine_tune} fine-tuning the backbone)" if cfg.fine_tune else "",
    )
    log.info("recipe %s (%s): %s", cfg.recipe, run.recipe_reason, ", ".join(recipe_settings(cfg)))


def recipe_reason(cfg: TrainConfig) -> str:
    """Why a run gets its recipe, from its config before ``with_recipe`` fills it in."""
    if cfg.resume:
        return "the resumed run's"
    if cfg.recipe:
        return "--recipe"
    if cfg.weights.lower() == "none":
        return "the default from scratch (--weights none): the best measured from random weights (benchmarks/RESULTS.md)"
    return ("the default from pretrained weights: the best measured for transfer (benchmarks/RESULTS.md); "
            "--recipe plain for no label smoothing")


def recipe_settings(cfg: TrainConfig) -> list[str]:
    """The recipe's fields as this run has them, flags over the recipe's values."""
    settings = [f"augment {cfg.augment or 'light while the backbone trains'}", f"crops of {cfg.min_scale:g}..1 of the area"]
    if cfg.train_size_ratio != 1:
        settings.append(f"training crops at {cfg.train_size_ratio:g} of the image size")
    for name in ("random_erase", "mixup", "cutmix", "label_smoothing", "ema"):
        value = getattr(cfg, name)
        settings.append(f"{name.replace('_', ' ')} {value:g}" if value else f"no {name.replace('_', ' ')}")
    return settings
