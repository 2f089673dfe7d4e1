"""Training: the loop, validation, metrics, checkpoints and resume.

``train(TrainConfig)`` is the whole of ``cnnkit train``. Randomness is re-derived from
(seed, epoch) at the start of every epoch, so a run resumed from ``last.pt`` takes exactly the
path an uninterrupted run takes, with no RNG state to save or restore.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import Checkpoint, library_versions, load_checkpoint
from .config import TrainConfig
from .data import ImageDataset, Splits, collate, load_category_names, load_splits
from .errors import CheckpointError, ConfigError, DataError, Interrupted, OutputError
from .models import build_model, check_arch, head_module
from .transforms import build_transforms, resolve_preprocess

log = logging.getLogger(__name__)

BEST, LAST, METRICS = "best.pt", "last.pt", "metrics.jsonl"
# Fields a resumed run may change; everything else is the checkpoint's recipe.
RUN_FIELDS = ("data_dir", "epochs", "workers", "device", "save_dir", "resume", "force", "progress")


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


def lr_factor(epoch: int, epochs: int, scheduler: str) -> float:
    """The learning-rate multiplier for (0-based) ``epoch`` of ``epochs``: a pure function of the
    epoch, so a resumed run needs no scheduler state."""
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if scheduler == "step":
        return 0.1 ** (epoch // max(1, math.ceil(epochs / 3)))
    return 1.0


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


def run_epoch(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    optimizer: torch.optim.Optimizer | None = None,
    desc: str = "",
    progress: bool = True,
) -> EpochStats:
    """Train (with ``optimizer``) or evaluate (without) over ``loader``.

    Loss and accuracy are totals over images divided by the image count, never a mean of
    per-batch means (which over-weights a short last batch).
    """
    criterion = nn.NLLLoss(reduction="sum")
    loss_sum, correct, top5, seen = 0.0, 0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch", dynamic_ncols=True)
    with torch.set_grad_enabled(optimizer is not None):
        for images, targets, errors in bar:
            _raise_bad_images(errors)
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            log_probs = model(images)
            loss = criterion(log_probs, targets)
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
                (loss / len(targets)).backward()
                optimizer.step()
            k = min(5, log_probs.shape[1])
            best_k = log_probs.topk(k, dim=1).indices
            loss_sum += loss.item()
            correct += (best_k[:, 0] == targets).sum().item()
            top5 += (best_k == targets[:, None]).any(dim=1).sum().item()
            seen += len(targets)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.1%}")
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
    epochs: int
    history: list[dict[str, Any]]


def train(cfg: TrainConfig) -> TrainResult:
    """Train a classifier as ``cfg`` says; write best.pt, last.pt and metrics.jsonl to its save dir."""
    resumed = load_checkpoint(cfg.resume) if cfg.resume else None
    if resumed is not None:
        cfg = _resume_config(cfg, resumed)
    check_arch(cfg.arch)
    device = resolve_device(cfg.device)
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
    _prepare_save_dir(cfg, continuing=run_dir is not None and _same_dir(run_dir, cfg.save_dir))

    freeze = cfg.freeze if cfg.freeze is not None else cfg.pretrained
    if freeze and not cfg.pretrained:
        log.warning("--freeze with --weights none: a frozen random backbone learns nothing useful")
    elif cfg.freeze is None and not cfg.pretrained:
        log.info("--weights none: training the whole network (the backbone too)")
    model, head = build_model(
        cfg.arch,
        len(splits.classes),
        "none" if resumed is not None else cfg.weights,
        cfg.hidden_units,
        cfg.dropout,
        freeze=freeze,
    )
    preprocess = resumed.preprocess if resumed else resolve_preprocess(cfg.arch, cfg.image_size, cfg.resize_size)
    if resumed is not None:
        model.load_state_dict(resumed.state_dict)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=cfg.learning_rate)

    state = dict(resumed.training_state) if resumed else {"epoch": 0, "best_val_acc": -1.0, "best_epoch": 0}
    if resumed is not None:
        optimizer.load_state_dict(state["optimizer"])
    start_epoch = int(state["epoch"])
    if start_epoch >= cfg.epochs:
        raise ConfigError(
            f"{cfg.resume} has already trained {start_epoch} epochs; pass a larger --epochs to extend it"
        )

    workers = default_workers(cfg.workers)
    generator = torch.Generator()
    loader_args = dict(
        batch_size=cfg.batch_size, num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda"
    )
    train_loader = DataLoader(
        ImageDataset.from_samples(splits.train, build_transforms(preprocess, train=True), preprocess.max_pixels),
        shuffle=True, generator=generator, **loader_args,
    )
    valid_loader = DataLoader(
        ImageDataset.from_samples(splits.valid, build_transforms(preprocess, train=False), preprocess.max_pixels),
        shuffle=False, **loader_args,
    )
    log.info(
        "training %s on %s: %d classes, %d train / %d validation images (%s); %s backbone, "
        "%d trainable parameters; %d epochs from epoch %d",
        cfg.arch, device, len(splits.classes), len(splits.train), len(splits.valid), splits.description,
        "frozen" if freeze else "trainable", sum(p.numel() for p in trainable), cfg.epochs, start_epoch + 1,
    )

    paths = {name: os.path.join(cfg.save_dir, name) for name in (BEST, LAST, METRICS)}
    history = _load_history(os.path.join(run_dir, METRICS), start_epoch) if run_dir else []
    _write_history(paths[METRICS], history)

    def checkpoint(epoch: int, with_state: bool) -> Checkpoint:
        training_state = None
        if with_state:
            training_state = {
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "best_val_acc": state["best_val_acc"],
                "best_epoch": state["best_epoch"],
            }
        return Checkpoint(
            arch=cfg.arch,
            head=head,
            state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()},
            classes=splits.classes,
            preprocess=preprocess,
            class_names=class_names,
            train_config=cfg.to_dict(),
            summary=_summary(cfg, splits, epoch, state, freeze),
            versions=library_versions(),
            training_state=training_state,
        )

    epoch = start_epoch
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            seed_everything(cfg.seed * 100_003 + epoch)
            generator.manual_seed(cfg.seed * 100_003 + epoch)
            lr = cfg.learning_rate * lr_factor(epoch - 1, cfg.epochs, cfg.scheduler)
            for group in optimizer.param_groups:
                group["lr"] = lr
            _set_train_mode(model, cfg.arch, freeze)
            fit = run_epoch(model, train_loader, device, optimizer, f"epoch {epoch}/{cfg.epochs} train", cfg.progress)
            model.eval()
            val = run_epoch(model, valid_loader, device, None, f"epoch {epoch}/{cfg.epochs} valid", cfg.progress)
            row = {
                "epoch": epoch,
                "train_loss": round(fit.loss, 6),
                "train_acc": round(fit.acc, 6),
                "val_loss": round(val.loss, 6),
                "val_acc": round(val.acc, 6),
                "val_top5": round(val.top5, 6),
                "lr": lr,
                "seconds": round(fit.seconds + val.seconds, 3),
                "images_per_s": round(fit.images / max(fit.seconds, 1e-9), 2),
            }
            history.append(row)
            _append_history(paths[METRICS], row)
            improved = val.acc > state["best_val_acc"]
            if improved:
                state["best_val_acc"], state["best_epoch"] = val.acc, epoch
                checkpoint(epoch, with_state=False).save(paths[BEST])
            checkpoint(epoch, with_state=True).save(paths[LAST])
            log.info(
                "epoch %d/%d  train loss %.4f acc %.1f%%  val loss %.4f acc %.1f%% top-5 %.1f%%  "
                "lr %.2g  %.1fs  %.1f img/s%s",
                epoch, cfg.epochs, fit.loss, 100 * fit.acc, val.loss, 100 * val.acc, 100 * val.top5,
                lr, row["seconds"], row["images_per_s"], "  *best" if improved else "",
            )
    except KeyboardInterrupt:
        done = epoch - 1
        if done > start_epoch or resumed is not None:
            raise Interrupted(
                f"interrupted in epoch {epoch}; {paths[LAST]} holds epoch {done}: continue with "
                f"--resume {paths[LAST]}"
            ) from None
        raise Interrupted(f"interrupted in epoch {epoch}, before any epoch finished; nothing was saved") from None

    log.info("best validation accuracy %.1f%% at epoch %d; saved %s", 100 * state["best_val_acc"],
             state["best_epoch"], paths[BEST])
    return TrainResult(
        best_checkpoint=paths[BEST],
        last_checkpoint=paths[LAST],
        metrics_file=paths[METRICS],
        best_val_acc=state["best_val_acc"],
        best_epoch=state["best_epoch"],
        epochs=cfg.epochs,
        history=history,
    )


def _set_train_mode(model: nn.Module, arch: str, freeze: bool) -> None:
    # A frozen backbone stays in eval mode, so its BatchNorm statistics are not overwritten by
    # the new data's: only the head (its Dropout) trains.
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
    return dataclasses.replace(recipe, **{name: getattr(cfg, name) for name in RUN_FIELDS})


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


def _summary(cfg: TrainConfig, splits: Splits, epoch: int, state: dict, freeze: bool) -> dict[str, Any]:
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
        "frozen_backbone": freeze,
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


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
