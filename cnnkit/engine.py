"""Training: the loop, validation, metrics, checkpoints and resume.

``train(TrainConfig)`` is the whole of ``cnnkit train``. A run has one or two phases: with a
frozen backbone the head trains first (on cached backbone features when nothing makes them
change: see :mod:`cnnkit.features`), then ``fine_tune`` more epochs train the whole network at a
lower rate; with a trainable backbone there is one phase. Each phase has its own per-step
learning-rate schedule (linear warm-up, then cosine or step decay), AdamW optimizer and
early-stopping count.

Randomness is re-derived from (seed, epoch) at the start of every epoch and the learning rate is
a pure function of the progress through the phase, so a run resumed from ``last.pt`` takes
exactly the path an uninterrupted run takes; what is not a function of the epoch (the phase
switch, the early-stopping count, the optimizer and gradient-scaler state) is saved in
``last.pt``'s training state as plain values and tensors.

Under ``torchrun`` (see :mod:`cnnkit.distributed`) every rank trains on its shard of each epoch
through DistributedDataParallel; metrics are sums reduced over the ranks, and only rank 0 writes
files, logs and draws progress bars.
"""

from __future__ import annotations

import dataclasses
import gc
import glob
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from . import distributed
from .checkpoint import Checkpoint, library_versions, load_checkpoint
from .config import DEFAULT_EPOCHS, TrainConfig
from .data import ImageDataset, collate, load_category_names, load_splits
from .distributed import DistContext, EpochSampler, epoch_seed
from .drift import reference_statistics
from .errors import CheckpointError, ConfigError, DataError, Interrupted, OutputError, WorkerError, worker_death
from .models import build_model, check_arch, head_module
from .transforms import build_transforms, resolve_preprocess

log = logging.getLogger(__name__)

BEST, LAST, METRICS, CURVES = "best.pt", "last.pt", "metrics.jsonl", "curves.png"
# Fields a resumed run may change; everything else is the checkpoint's recipe.
RUN_FIELDS = ("data_dir", "epochs", "workers", "device", "save_dir", "resume", "force", "progress", "nproc")
IMBALANCE_WARNING = 5.0  # warn when the largest class has this many times the smallest's images
PLOT_INTERVAL = 10.0  # seconds between redraws of curves.png (drawing one takes a fraction of one)
HEAD, FINE_TUNE, FULL = "head", "fine-tune", "full"  # phases: frozen backbone, then unfrozen; or all along


# --- runtime ------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; an unavailable device is a ConfigError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("--device mps: Apple MPS is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def default_workers(requested: int | None) -> int:
    """DataLoader worker processes: as asked, else one per core up to 4."""
    if requested is not None:
        return requested
    return min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(epoch: float, epochs: int, scheduler: str, warmup: float = 0.0) -> float:
    """The learning-rate multiplier after ``epoch`` epochs (fractional within an epoch) of a
    phase of ``epochs``: a pure function of the progress, so a resumed run needs no scheduler state.

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


def balanced_class_weights(targets: Iterable[int], num_classes: int) -> torch.Tensor:
    """``n / (k * count[c])`` per class (scikit-learn's "balanced"): the loss weight of a sample
    is inversely proportional to its class's frequency, and averages 1 over the training set."""
    counts = torch.bincount(torch.as_tensor(list(targets), dtype=torch.int64), minlength=num_classes).double()
    weights = counts.sum() / (num_classes * counts.clamp(min=1))
    return weights.float()


def make_optimizer(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, with weight decay on weight matrices and kernels only (as timm and most recipes):
    decaying biases and normalisation scales hurts more than it regularises."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


# --- one pass over the data ---------------------------------------------------------------


@dataclass
class EpochStats:
    loss: float
    acc: float
    top5: float
    images: int
    seconds: float


def _raise_bad_images(errors: list[tuple[str, str] | None]) -> None:
    bad = [e for e in errors if e]
    if bad:
        path, reason = bad[0]
        raise DataError(f"cannot read image {path}: {reason}; remove or fix the file")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def forward(model: nn.Module, inputs: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Log-probabilities (float32) of ``model`` for a batch, in mixed precision if asked."""
    if autocast_dtype is not None:
        with torch.autocast(inputs.device.type, dtype=autocast_dtype):
            return model(inputs).float()
    return model(inputs).float()


def training_objective(nll: torch.Tensor, targets: torch.Tensor, class_weights: torch.Tensor | None) -> torch.Tensor:
    """The loss that is optimised: per-image NLL, class-weighted if asked, averaged over the batch."""
    if class_weights is not None:
        nll = nll * class_weights[targets]
    return nll.sum() / len(targets)


def optimise(
    objective: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    clip_grad: float | None = None,
    scaler: Any = None,
) -> None:
    """One optimizer step on ``objective``: backward (scaled for float16), clip, step."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(objective).backward()
        if clip_grad is not None:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(params, clip_grad)
        scaler.step(optimizer)
        scaler.update()
        return
    objective.backward()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    optimizer.step()


def run_epoch(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    desc: str = "",
    progress: bool = True,
    *,
    class_weights: torch.Tensor | None = None,
    lr_at: Callable[[int, int], float] | None = None,
    clip_grad: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler: Any = None,
    channels_last: bool = False,
    reduce: Callable[[list[float]], list[float]] | None = None,
) -> EpochStats:
    """Train (with ``optimizer``) or evaluate (without) over ``loader``.

    Loss and accuracy are totals over images divided by the image count, never a mean of
    per-batch means (which over-weights a short last batch); with ``reduce`` (a sum over
    processes) the totals are those of every process. The reported loss is the plain NLL;
    ``class_weights`` weight only the loss that is optimised. ``lr_at(step, steps)`` sets the
    learning rate before each step; ``autocast_dtype`` runs the forward pass in mixed
    precision (``scaler``: a GradScaler for float16).
    """
    loss_sum, correct, top5, seen = 0.0, 0, 0, 0
    start = time.perf_counter()
    steps = len(loader) if hasattr(loader, "__len__") else 0
    params = [p for group in optimizer.param_groups for p in group["params"]] if optimizer is not None else []
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch", dynamic_ncols=True)
    with torch.set_grad_enabled(optimizer is not None):
        for step, (inputs, targets, errors) in enumerate(bar):
            _raise_bad_images(errors)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            if optimizer is not None and lr_at is not None:
                set_lr(optimizer, lr_at(step, steps))
            log_probs = forward(model, inputs, autocast_dtype)
            nll = F.nll_loss(log_probs, targets, reduction="none")
            loss = nll.sum()
            if optimizer is not None:
                optimise(training_objective(nll, targets, class_weights), optimizer, params, clip_grad, scaler)
            k = min(5, log_probs.shape[1])
            best_k = log_probs.topk(k, dim=1).indices
            loss_sum += loss.item()
            correct += (best_k[:, 0] == targets).sum().item()
            top5 += (best_k == targets[:, None]).any(dim=1).sum().item()
            seen += len(targets)
            bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.3f}", acc=f"{correct / max(seen, 1):.1%}")
    if reduce is not None:
        loss_sum, correct, top5, seen = reduce([loss_sum, correct, top5, seen])
        correct, top5, seen = int(round(correct)), int(round(top5)), int(round(seen))
    seconds = time.perf_counter() - start
    n = max(seen, 1)
    return EpochStats(loss_sum / n, correct / n, top5 / n, seen, seconds)


# --- training -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainResult:
    best_checkpoint: str
    last_checkpoint: str
    metrics_file: str
    best_val_acc: float
    best_epoch: int
    epochs: int  # epochs trained in all (the last epoch's number)
    history: list[dict[str, Any]]
    stopped_early: int | None = None  # the epoch after which early stopping ended the run
    fine_tune_from: int | None = None  # the last head-only epoch, when the backbone was fine-tuned
    curves: str | None = None  # curves.png, when matplotlib is installed


def train(cfg: TrainConfig) -> TrainResult:
    """Train a classifier as ``cfg`` says; write best.pt, last.pt, metrics.jsonl and curves.png
    to its save dir.

    Under torchrun this process trains its share of the job; with ``cfg.nproc`` > 1 it starts
    torchrun itself on this machine and returns rank 0's result.
    """
    if cfg.nproc > 1:
        if distributed.under_torchrun():
            raise ConfigError(
                "--nproc starts torchrun itself; under torchrun leave it out (--nproc-per-node sets the processes)"
            )
        return distributed.launch(cfg)
    ctx = distributed.init(resolve_device(cfg.device))
    try:
        return _Training(cfg, ctx).run()
    finally:
        distributed.shutdown(ctx)


class _MainLog:
    """The module logger on rank 0, silent elsewhere (N copies of each line help nobody)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def info(self, *args: Any) -> None:
        if self.enabled:
            log.info(*args)

    def warning(self, *args: Any) -> None:
        if self.enabled:
            log.warning(*args)


class _Training:
    """One call of :func:`train`: the set-up, then the epoch loop (:meth:`run`)."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, outputs: bool = True):
        """``outputs=False`` (lr-find): no checkpoints, metrics or tracking, so no save-dir check."""
        self.ctx, self.device = ctx, ctx.device
        self.log = _MainLog(ctx.is_main)
        if cfg.resume:
            _check_resume_path(cfg.resume)
        self.resumed = load_checkpoint(cfg.resume) if cfg.resume else None
        if self.resumed is not None:
            cfg = _resume_config(cfg, self.resumed)
        if cfg.epochs is None:
            cfg = dataclasses.replace(cfg, epochs=DEFAULT_EPOCHS)
        check_arch(cfg.arch)
        self.cfg = cfg
        self.splits = splits = load_splits(cfg.data_dir, cfg.val_split, cfg.seed)
        self.class_names = load_category_names(cfg.category_names, splits.classes) if cfg.category_names else {}
        if self.resumed is not None:
            if self.resumed.classes != splits.classes:
                raise DataError(
                    f"the classes in {cfg.data_dir} differ from those of {cfg.resume}; "
                    "resume with the data the run started with"
                )
            self.class_names = self.class_names or self.resumed.class_names
        # Resuming into the run's own folder continues it; any other folder must not hold a run.
        self.run_dir = os.path.dirname(os.path.abspath(cfg.resume)) if cfg.resume else None
        continuing = self.run_dir is not None and _same_dir(self.run_dir, cfg.save_dir)
        if outputs:
            ctx.on_main(lambda: _prepare_save_dir(cfg, continuing=continuing))
        self.paths = {name: os.path.join(cfg.save_dir, name) for name in (BEST, LAST, METRICS, CURVES)}

        self.freeze = cfg.freeze if cfg.freeze is not None else cfg.pretrained
        if self.freeze and not cfg.pretrained:
            self.log.warning("--freeze with --weights none: a frozen random backbone learns nothing useful")
        elif cfg.freeze is None and not cfg.pretrained:
            self.log.info("--weights none: training the whole network (the backbone too)")
        if cfg.fine_tune and not self.freeze:
            raise ConfigError(
                "--fine-tune trains the whole network after a frozen-backbone head phase, but here the "
                "backbone trains from the start (--weights none): drop --fine-tune, or add --freeze"
            )
        if cfg.cache_features and not self.freeze:
            raise ConfigError(
                "--cache-features needs a frozen backbone, and this one trains (--weights none): "
                "drop --cache-features, or add --freeze"
            )
        self._resolve_precision()
        self._check_imbalance()
        if cfg.mlflow and ctx.is_main and outputs:
            from .tracking import check_available

            check_available()

        seed_everything(cfg.seed)  # the new head's initial weights
        self.model, self.head_spec = build_model(
            cfg.arch,
            len(splits.classes),
            "none" if self.resumed is not None else cfg.weights,
            cfg.hidden_units,
            cfg.dropout,
            freeze=self.freeze,
        )
        self.head = head_module(self.model, cfg.arch)
        self.preprocess = (
            self.resumed.preprocess if self.resumed else resolve_preprocess(cfg.arch, cfg.image_size, cfg.resize_size)
        )
        if self.resumed is not None:
            self.model.load_state_dict(self.resumed.state_dict)
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)

        self.state: dict[str, Any] = dict(self.resumed.training_state) if self.resumed else {}
        for key, value in {
            "epoch": 0, "best_val_acc": -1.0, "best_epoch": 0, "fine_tune_from": None, "stopped_early": None,
            "best_val_loss": math.inf, "bad_epochs": 0, "optimizer_phase": None, "mlflow_run_id": None,
        }.items():
            self.state.setdefault(key, value)
        if self.state["optimizer_phase"] is None and "optimizer" in self.state:
            self.state["optimizer_phase"] = FULL if not self.freeze else HEAD  # a core-era last.pt
        self.start_epoch = int(self.state["epoch"])
        # A finished run killed while it completed best.pt (its drift statistics) is completed by
        # --resume into its own folder; any other finished run is refused.
        self.finishing = bool(
            outputs and continuing
            and (self.state["stopped_early"] is not None or self.start_epoch >= self._end_epoch())
            and _best_incomplete(os.path.join(cfg.save_dir, BEST))
        )
        if self.state["stopped_early"] is not None and not self.finishing:
            raise ConfigError(
                f"{cfg.resume} stopped early after epoch {self.state['stopped_early']} (no lower validation "
                "loss for --early-stop epochs): it is finished; start a new run to train more"
            )
        if self.start_epoch >= self._end_epoch() and not self.finishing:
            if self.state["fine_tune_from"] is not None:
                raise ConfigError(
                    f"{cfg.resume} has already trained {self.start_epoch} epochs, its fine-tuning included; "
                    "start a new run to train more"
                )
            raise ConfigError(
                f"{cfg.resume} has already trained {self.start_epoch} epochs; pass a larger --epochs to extend it"
            )

        self.workers = default_workers(cfg.workers)
        self.generator = torch.Generator()
        self.targets = [t for _, t in splits.train]
        weights = None
        if cfg.sampler == "balanced":
            per_class = balanced_class_weights(self.targets, len(splits.classes))
            weights = per_class[torch.as_tensor(self.targets)]
        self.train_sampler = EpochSampler(
            len(splits.train), shuffle=True, seed=cfg.seed, weights=weights, rank=ctx.rank, world_size=ctx.world_size
        )
        self.valid_sampler = EpochSampler(
            len(splits.valid), shuffle=False, rank=ctx.rank, world_size=ctx.world_size, pad=False
        )
        self.class_weights = (
            balanced_class_weights(self.targets, len(splits.classes)).to(self.device)
            if cfg.class_weights == "balanced" else None
        )
        if self.class_weights is not None:
            self.log.info("class weights (balanced): %s", ", ".join(
                f"{c} {w:.2f}" for c, w in zip(splits.classes, self.class_weights.tolist())))
        self.cache = self._resolve_cache()
        self.features: dict[str, Any] = {}
        self.history = _load_history(os.path.join(self.run_dir, METRICS), self.start_epoch) if self.run_dir else []
        self.tracker = None
        self._plots_ok = True
        self._stats_loader: DataLoader | None = None
        self._cache_seconds = 0.0
        self._plotted_at, self._plot_pending = -math.inf, False
        self.phase = ""
        self.train_net: nn.Module | None = None
        self.net: nn.Module | None = None

    # --- resolved recipe ----------------------------------------------------------------

    def _resolve_precision(self) -> None:
        cfg, device = self.cfg, self.device
        self.amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
        if self.amp and device.type not in ("cuda", "cpu"):
            raise ConfigError(f"--amp runs on CUDA (float16) or the CPU (bfloat16), not on {device.type}: drop --amp")
        self.autocast_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if self.amp else None
        # NHWC tensors: what tensor cores want, and 1.3-2x faster with oneDNN on the CPU (training
        # and inference of resnet18, densenet121, mobilenet, efficientnet, vgg: benchmarks/RESULTS.md).
        self.channels_last = device.type in ("cuda", "cpu")
        if self.amp:
            self.log.info("mixed precision: %s autocast%s", str(self.autocast_dtype).replace("torch.", ""),
                          " with gradient scaling" if device.type == "cuda" else "")

    def _check_imbalance(self) -> None:
        counts = np.bincount([t for _, t in self.splits.train], minlength=len(self.splits.classes))
        largest, smallest = int(counts.argmax()), int(counts.argmin())
        if counts[smallest] and counts[largest] >= IMBALANCE_WARNING * counts[smallest]:
            remedy = (
                "" if self.cfg.class_weights == "balanced" or self.cfg.sampler == "balanced"
                else "; consider --class-weights balanced or --sampler balanced"
            )
            self.log.warning(
                "class imbalance: %s has %d training images, %s only %d (%.0fx)%s",
                self.splits.classes[largest], counts[largest], self.splits.classes[smallest], counts[smallest],
                counts[largest] / counts[smallest], remedy,
            )

    def _augment(self, phase: str) -> bool:
        return self.cfg.augment if self.cfg.augment is not None else phase != HEAD

    def _resolve_cache(self) -> bool:
        cfg = self.cfg
        if not self.freeze or self._augment(HEAD):
            return False
        if cfg.cache_features is False:
            return False
        if self.state["fine_tune_from"] is None:
            self.log.info(
                "feature caching on: the backbone is frozen and the head trains without augmentation, so "
                "each image's backbone features are computed once (in %s) and later epochs train on them; "
                "--augment or --no-cache-features turns this off",
                os.path.join(cfg.save_dir, _features().CACHE_DIR),
            )
        return True

    def _phase(self, epoch: int) -> str:
        if not self.freeze:
            return FULL
        return HEAD if self.state["fine_tune_from"] is None or epoch <= self.state["fine_tune_from"] else FINE_TUNE

    def _end_epoch(self) -> int:
        """The last epoch of the run as far as it is known now."""
        if self.state["fine_tune_from"] is not None:
            return int(self.state["fine_tune_from"]) + self.cfg.fine_tune
        return self.cfg.epochs + (self.cfg.fine_tune if self.freeze else 0)

    def _phase_plan(self, phase: str) -> tuple[int, int, float]:
        """(epochs before the phase, epochs in it, base learning rate)."""
        if phase == FINE_TUNE:
            return int(self.state["fine_tune_from"]), self.cfg.fine_tune, self.cfg.resolved_fine_tune_lr
        return 0, self.cfg.epochs, self.cfg.learning_rate

    # --- data ---------------------------------------------------------------------------

    def _image_loader(
        self, samples: list, sampler: EpochSampler, augment: bool, generator: torch.Generator | None = None
    ) -> DataLoader:
        transform = build_transforms(self.preprocess, train=augment)
        return DataLoader(
            ImageDataset.from_samples(samples, transform, self.preprocess.max_pixels),
            batch_size=self.cfg.batch_size, sampler=sampler, num_workers=self.workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda", generator=generator,  # seeds the workers' RNGs
        )

    def _cached_features(self) -> None:
        features = _features()
        cache_dir = os.path.join(self.cfg.save_dir, features.CACHE_DIR)
        digest = features.backbone_digest(self.model, self.cfg.arch)
        start = time.perf_counter()
        for name, samples in (("train", self.splits.train), ("valid", self.splits.valid)):
            self.features[name] = features.load_or_build(
                name, self.model, self.cfg.arch, samples, self.preprocess, self.head_spec.in_features, cache_dir,
                device=self.device, batch_size=self.cfg.batch_size, workers=self.workers, ctx=self.ctx,
                autocast_dtype=self.autocast_dtype, channels_last=self.channels_last,
                progress=self.cfg.progress, digest=digest,
            )
        built = [n for n, f in self.features.items() if f.built]
        self._cache_seconds = time.perf_counter() - start
        self.log.info(
            "backbone features: %s%s in %.1fs",
            f"computed and cached ({', '.join(built)})" if built else "read from the cache",
            f", reused ({', '.join(n for n in self.features if n not in built)})" if built and len(built) < 2 else "",
            self._cache_seconds,
        )

    def _loaders(self, phase: str) -> tuple[DataLoader, DataLoader]:
        if phase == HEAD and self.cache:
            if not self.features:
                self._cached_features()
            features = _features()
            return (
                features.feature_loader(self.features["train"], self.train_sampler, self.cfg.batch_size, self.generator),
                features.feature_loader(self.features["valid"], self.valid_sampler, self.cfg.batch_size),
            )
        self.features.clear()  # fine-tuning changes the backbone: the cached features are stale
        return (
            self._image_loader(self.splits.train, self.train_sampler, self._augment(phase), self.generator),
            self._image_loader(self.splits.valid, self.valid_sampler, augment=False),
        )

    # --- the loop -----------------------------------------------------------------------

    def _enter_phase(self, phase: str) -> None:
        cfg = self.cfg
        if phase == FINE_TUNE:
            for param in self.model.parameters():
                param.requires_grad_(True)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(trainable, self._phase_plan(phase)[2], cfg.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda") if self.autocast_dtype == torch.float16 else None
        if self.state.get("optimizer_phase") == phase and "optimizer" in self.state:
            try:
                self.optimizer.load_state_dict(self.state["optimizer"])
            except (ValueError, KeyError) as exc:
                self.log.warning("the optimizer state in %s does not fit (%s); starting it afresh", cfg.resume, exc)
            if self.scaler is not None and self.state.get("scaler"):
                self.scaler.load_state_dict(self.state["scaler"])
        self.state.pop("optimizer", None)  # loaded once, into the phase it belongs to
        self.train_loader, self.valid_loader = self._loaders(phase)
        cached = phase == HEAD and self.cache
        self.net = self.head if cached else self.model  # what a batch goes through
        if self.ctx.enabled:  # the previous phase's DDP hooks must go before new ones are made
            self.train_net = None
            gc.collect()
        self.train_net = distributed.wrap_ddp(self.net, self.ctx)
        self.phase = phase
        if phase == FINE_TUNE:
            self.log.info(
                "fine-tuning the whole network for %d epochs at learning rate %.2g (%d trainable parameters)%s",
                cfg.fine_tune, cfg.resolved_fine_tune_lr, sum(p.numel() for p in trainable),
                ", with augmentation" if self._augment(phase) else "",
            )

    def _set_modes(self) -> None:
        if self.net is self.head:
            self.head.train()
        else:
            _set_train_mode(self.model, self.cfg.arch, self.phase == HEAD)

    def run(self) -> TrainResult:
        cfg, ctx, splits, state = self.cfg, self.ctx, self.splits, self.state
        if ctx.is_main:
            _write_history(self.paths[METRICS], self.history)
        first_phase = self._phase(self.start_epoch + 1)
        if self.finishing:
            self.log.info("%s has trained all its epochs, but its run stopped before best.pt was complete: "
                          "completing it", cfg.resume)
            self._plot_pending = True  # curves.png may predate the last epochs
        else:
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad or first_phase == FINE_TUNE)
            self.log.info(
                "training %s on %s%s: %d classes, %d train / %d validation images (%s); %s backbone, "
                "%d trainable parameters; epochs %d to %d%s",
                cfg.arch, self.device, f" x {ctx.world_size} processes" if ctx.enabled else "", len(splits.classes),
                len(splits.train), len(splits.valid), splits.description,
                "frozen" if self.freeze else "trainable", trainable, self.start_epoch + 1, self._end_epoch(),
                f" (the last {cfg.fine_tune} fine-tuning the backbone)" if cfg.fine_tune else "",
            )
        if cfg.mlflow:
            self.tracker = ctx.on_main(self._start_tracker)
        epoch = self.start_epoch
        self.phase = ""
        try:
            while not self.finishing and epoch < self._end_epoch():
                epoch += 1
                if self.freeze and cfg.fine_tune and state["fine_tune_from"] is None and epoch > cfg.epochs:
                    state["fine_tune_from"] = epoch - 1  # resumed with a shorter --epochs
                phase = self._phase(epoch)
                if phase != self.phase:
                    self._enter_phase(phase)
                self._epoch(epoch)
                if state["stopped_early"] is not None:
                    break
        except KeyboardInterrupt:
            if ctx.is_main and self._plot_pending:
                self._plot(final=True)
            if self.tracker is not None:
                self.tracker.finish("KILLED")
            done = epoch - 1
            if done > self.start_epoch or self.resumed is not None:
                raise Interrupted(
                    f"interrupted in epoch {epoch}; {self.paths[LAST]} holds epoch {done}: continue with "
                    f"--resume {self.paths[LAST]}"
                ) from None
            raise Interrupted(f"interrupted in epoch {epoch}, before any epoch finished; nothing was saved") from None
        except BaseException as exc:
            if self.tracker is not None:
                self.tracker.finish("FAILED")
            died = worker_death(exc)
            if died is None:
                raise
            done = epoch - 1
            hint = (
                f"{self.paths[LAST]} holds epoch {done}: continue with --resume {self.paths[LAST]}"
                if done > self.start_epoch or self.resumed is not None
                else "no epoch had finished; nothing was saved"
            )
            raise WorkerError(
                f"{died}, in epoch {epoch}; {hint} (--workers 0 loads images in the main process)"
            ) from None
        ctx.on_main(self._finish_best_stats)
        if ctx.is_main and self._plot_pending:
            self._plot(final=True)
        if self.tracker is not None:
            self.tracker.log_artifacts([self.paths[BEST], self.paths[METRICS], self.paths[CURVES]])
            self.tracker.finish()
        return TrainResult(
            best_checkpoint=self.paths[BEST],
            last_checkpoint=self.paths[LAST],
            metrics_file=self.paths[METRICS],
            best_val_acc=state["best_val_acc"],
            best_epoch=state["best_epoch"],
            epochs=epoch,
            history=self.history,
            stopped_early=state["stopped_early"],
            fine_tune_from=state["fine_tune_from"],
            curves=self.paths[CURVES] if self._plots_ok and os.path.exists(self.paths[CURVES]) else None,
        )

    def _epoch(self, epoch: int) -> None:
        cfg, ctx, state = self.cfg, self.ctx, self.state
        seed = epoch_seed(cfg.seed, epoch)
        seed_everything(seed)
        self.generator.manual_seed(seed)
        self.train_sampler.set_epoch(epoch)
        before, phase_epochs, base_lr = self._phase_plan(self.phase)
        warmup = cfg.warmup if cfg.warmup is not None else default_warmup(phase_epochs)

        def lr_at(step: int, steps: int) -> float:
            return base_lr * lr_factor(epoch - 1 - before + step / max(steps, 1), phase_epochs, cfg.scheduler, warmup)

        reduce = ctx.all_reduce_sum if ctx.enabled else None
        bars = cfg.progress and ctx.is_main
        end = self._end_epoch()
        self._set_modes()
        fit = run_epoch(
            self.train_net, self.train_loader, self.device, self.optimizer, f"epoch {epoch}/{end} train", bars,
            class_weights=self.class_weights, lr_at=lr_at, clip_grad=cfg.clip_grad,
            autocast_dtype=self.autocast_dtype, scaler=self.scaler, channels_last=self.channels_last, reduce=reduce,
        )
        self.net.eval()
        val = run_epoch(
            self.net, self.valid_loader, self.device, None, f"epoch {epoch}/{end} valid", bars,
            autocast_dtype=self.autocast_dtype, channels_last=self.channels_last, reduce=reduce,
        )
        row = {
            "epoch": epoch,
            "train_loss": round(fit.loss, 6),
            "train_acc": round(fit.acc, 6),
            "val_loss": round(val.loss, 6),
            "val_acc": round(val.acc, 6),
            "val_top5": round(val.top5, 6),
            "lr": lr_at(0, 1),
            "seconds": round(fit.seconds + val.seconds + self._take_cache_seconds(), 3),
            "images_per_s": round(fit.images / max(fit.seconds, 1e-9), 2),
        }
        self.history.append(row)
        improved = val.acc > state["best_val_acc"]
        if improved:
            state["best_val_acc"], state["best_epoch"] = val.acc, epoch
        note = self._after_epoch(epoch, val.loss)
        if ctx.is_main:
            _append_history(self.paths[METRICS], row)
            if improved:
                self._save_best(epoch)
            self._checkpoint(epoch, with_state=True).save(self.paths[LAST])
            self._plot()
            if self.tracker is not None:
                self.tracker.log_epoch(row)
        self.log.info(
            "epoch %d/%d%s  train loss %.4f acc %.1f%%  val loss %.4f acc %.1f%% top-5 %.1f%%  "
            "lr %.2g  %.1fs  %.1f img/s%s%s",
            epoch, end, f" ({self.phase})" if self.phase == FINE_TUNE else "", fit.loss, 100 * fit.acc, val.loss,
            100 * val.acc, 100 * val.top5, row["lr"], row["seconds"], row["images_per_s"],
            "  *best" if improved else "", note,
        )

    def _take_cache_seconds(self) -> float:
        # The one-off feature computation is part of the first epoch's cost.
        seconds, self._cache_seconds = self._cache_seconds, 0.0
        return seconds

    def _after_epoch(self, epoch: int, val_loss: float) -> str:
        """Early stopping (``early_stop`` epochs without a lower validation loss end the phase)
        and the switch to fine-tuning; returns a note for the epoch's log line."""
        cfg, state = self.cfg, self.state
        stop, note = False, ""
        if cfg.early_stop is not None:
            if val_loss < state["best_val_loss"]:
                state["best_val_loss"], state["bad_epochs"] = val_loss, 0
            else:
                state["bad_epochs"] += 1
                stop = state["bad_epochs"] >= cfg.early_stop
                note = f"  (no lower val loss for {state['bad_epochs']} of {cfg.early_stop} epochs)"
        if self.phase == HEAD and cfg.fine_tune and (stop or epoch >= cfg.epochs):
            state["fine_tune_from"] = epoch
            state["best_val_loss"], state["bad_epochs"] = math.inf, 0
            if stop:
                note = f"  (early stop of the head phase after {cfg.early_stop} epochs without a lower val loss)"
        elif stop:
            state["stopped_early"] = epoch
            note = f"  (early stop: no lower val loss for {cfg.early_stop} epochs)"
        return note

    # --- outputs ------------------------------------------------------------------------

    def _checkpoint(self, epoch: int, with_state: bool, reference_stats: dict | None = None) -> Checkpoint:
        training_state = None
        if with_state:
            training_state = {
                key: self.state[key]
                for key in ("best_val_acc", "best_epoch", "fine_tune_from", "stopped_early", "best_val_loss",
                            "bad_epochs", "mlflow_run_id")
            }
            training_state.update(
                epoch=epoch,
                optimizer=self.optimizer.state_dict(),
                optimizer_phase=self.phase,
                scaler=self.scaler.state_dict() if self.scaler is not None else None,
            )
        return Checkpoint(
            arch=self.cfg.arch,
            head=self.head_spec,
            state_dict={k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            classes=self.splits.classes,
            preprocess=self.preprocess,
            class_names=self.class_names,
            train_config=self.cfg.to_dict(),
            summary=self._summary(epoch),
            versions=library_versions(),
            training_state=training_state,
            reference_stats=reference_stats,
        )

    def _save_best(self, epoch: int) -> None:
        self._checkpoint(epoch, with_state=False).save(self.paths[BEST])

    def _reference_loader(self) -> DataLoader:
        """The whole validation set as images (every rank's shard: rank 0 computes alone)."""
        if not self.ctx.enabled and self.net is self.model:
            return self.valid_loader
        if self._stats_loader is None:
            whole = EpochSampler(len(self.splits.valid), shuffle=False)
            self._stats_loader = self._image_loader(self.splits.valid, whole, augment=False)
        return self._stats_loader

    def _finish_best_stats(self) -> None:
        """Give best.pt (the file to deploy) its validation statistics for drift monitoring.

        They take a pass over the validation images with the best weights: done once, at the
        end of the run, rather than at every improvement (which would cost cached epochs most
        of their speed-up).
        """
        if not (self.ctx.is_main and os.path.exists(self.paths[BEST])):
            return
        best = load_checkpoint(self.paths[BEST])
        if best.reference_stats is not None:
            return
        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(best.state_dict)
        try:
            best.reference_stats = reference_statistics(self.model, self._reference_loader(), self.device)
        finally:
            self.model.load_state_dict(current)
        best.save(self.paths[BEST])

    def _plot(self, final: bool = False) -> None:
        """Redraw curves.png: after an epoch when the last drawing is PLOT_INTERVAL old (short
        cached epochs must not wait for matplotlib), and at the end."""
        if not self._plots_ok or not self.history:
            return
        if not final and time.monotonic() - self._plotted_at < PLOT_INTERVAL:
            self._plot_pending = True
            return
        self._plotted_at, self._plot_pending = time.monotonic(), False
        try:
            from .plots import training_curves_png
        except ImportError:
            self._plots_ok = False
            log.warning("curves.png is not written: matplotlib is not installed (pip install 'cnnkit[plot]')")
            return
        try:
            training_curves_png(self.history, self.paths[CURVES], fine_tune_from=self.state["fine_tune_from"])
        except OSError as exc:  # a full disk, say: the checkpoints of this epoch are saved already
            raise OutputError(f"cannot write {self.paths[CURVES]}: {exc.strerror or exc}") from None

    def _start_tracker(self):
        from .tracking import MlflowTracker

        cfg = self.cfg
        params = {
            **cfg.to_dict(),
            "classes": len(self.splits.classes),
            "train_images": len(self.splits.train),
            "valid_images": len(self.splits.valid),
            "frozen_backbone": self.freeze,
            "feature_cache": self.cache,
            "amp": self.amp,
            "world_size": self.ctx.world_size,
        }
        name = f"{cfg.arch} {os.path.basename(os.path.abspath(cfg.save_dir))}"
        tracker = MlflowTracker.start(params, name, run_id=self.state["mlflow_run_id"])
        self.state["mlflow_run_id"] = tracker.run_id
        return tracker

    def _summary(self, epoch: int) -> dict[str, Any]:
        cfg, splits, state = self.cfg, self.splits, self.state
        return {
            "epochs": epoch,
            "best_val_acc": state["best_val_acc"],
            "best_epoch": state["best_epoch"],
            "data_dir": os.path.abspath(cfg.data_dir),
            "validation": splits.description,
            "train_images": len(splits.train),
            "valid_images": len(splits.valid),
            "seed": cfg.seed,
            "weights": cfg.weights,
            "frozen_backbone": self.freeze,
            "fine_tune_from": state["fine_tune_from"],
            "stopped_early": state["stopped_early"],
            "feature_cache": self.cache,
            "processes": self.ctx.world_size,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def _features():
    from . import features

    return features


def _set_train_mode(model: nn.Module, arch: str, freeze: bool) -> None:
    # A frozen backbone stays in eval mode, so its BatchNorm statistics are not overwritten by
    # the new data's: only the head (its Dropout) trains. This is also what makes cached
    # features exact: the backbone computes the same function in every epoch.
    if freeze:
        model.eval()
        head_module(model, arch).train()
    else:
        model.train()


def _resume_config(cfg: TrainConfig, resumed: Checkpoint) -> TrainConfig:
    if not resumed.training_state:
        raise CheckpointError(f"{cfg.resume} cannot be resumed (it holds no training state; use last.pt)")
    recipe = TrainConfig.from_dict(resumed.train_config)
    defaults = TrainConfig(data_dir=cfg.data_dir)
    conflicts = [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.name not in RUN_FIELDS
        and getattr(cfg, f.name) != getattr(defaults, f.name)
        and getattr(cfg, f.name) != getattr(recipe, f.name)
    ]
    if conflicts:
        flags = ", ".join("--" + name.replace("_", "-") for name in conflicts)
        raise ConfigError(
            f"{flags} differ from the run being resumed; a resumed run keeps its recipe "
            "(drop these flags, or start a new run)"
        )
    run = {name: getattr(cfg, name) for name in RUN_FIELDS}
    if run["epochs"] is None:  # not given: finish the run as it was planned
        run["epochs"] = recipe.epochs
    return dataclasses.replace(recipe, **run)


def _same_dir(a: str, b: str) -> bool:
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def _prepare_save_dir(cfg: TrainConfig, continuing: bool) -> None:
    try:
        os.makedirs(cfg.save_dir, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --save-dir {cfg.save_dir}: {exc.strerror or exc}") from None
    if not os.access(cfg.save_dir, os.W_OK | os.X_OK):
        raise OutputError(f"--save-dir {cfg.save_dir} is not writable")
    existing = [n for n in (BEST, LAST, METRICS) if os.path.exists(os.path.join(cfg.save_dir, n))]
    if existing and not continuing and not cfg.force:
        raise OutputError(
            f"{cfg.save_dir} already holds {', '.join(existing)} from another run; use --force to "
            "overwrite, another --save-dir, or --resume to continue it"
        )
    _remove_stray_temporaries(cfg.save_dir)


def _remove_stray_temporaries(save_dir: str) -> None:
    """Delete the partial files of a run killed mid-write (writes are atomic: temporary, then
    rename; only a kill -9 or a crash leaves the temporary), which could be as large as a
    checkpoint or the feature cache. Feature-cache temporaries are named by their writer's pid:
    only those of processes no longer running go."""
    folder = glob.escape(save_dir)
    strays = [path for pattern in (f".{BEST}.*.tmp", f".{LAST}.*.tmp", f"{METRICS}.tmp", f"{CURVES}.*.tmp")
              for path in glob.glob(os.path.join(folder, pattern))]
    for path in glob.glob(os.path.join(folder, _features().CACHE_DIR, "*.npy.*.tmp")):
        pid = path.rsplit(".", 2)[-2]
        if pid.isdigit() and not _running(int(pid)):
            strays.append(path)
    for path in strays:
        try:
            os.unlink(path)
        except OSError:
            pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists (another user's)
        return True
    return True


def _check_resume_path(path: str) -> None:
    """A run killed before its first epoch finished has no last.pt: say so, and what to do."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) == LAST and not os.path.exists(path) and os.path.exists(os.path.join(folder, METRICS)):
        raise CheckpointError(
            f"checkpoint not found: {path}: the run in {folder} stopped before its first epoch finished, so there "
            "is nothing to resume; start it again (without --resume, with --force to replace its files)"
        )


def _best_incomplete(path: str) -> bool:
    """best.pt exists without the drift statistics a finished run adds to it."""
    return os.path.exists(path) and load_checkpoint(path).reference_stats is None


def _load_history(path: str, upto: int) -> list[dict[str, Any]]:
    """The metrics rows of epochs up to ``upto``: rows a killed run wrote past its checkpoint go."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= upto:
                rows.append(row)
    return rows


def _write_history(path: str, rows: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def _append_history(path: str, row: dict[str, Any]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
