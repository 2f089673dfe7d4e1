"""One pass over the data: the batch step shared by training, validation and ``lr-find``."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..errors import DataError


@dataclass
class EpochStats:
    loss: float
    acc: float
    top5: float
    images: int
    seconds: float


def raise_bad_images(errors: list[tuple[str, str] | None]) -> None:
    """Training needs every image: the first unreadable one of a batch is a DataError."""
    bad = [e for e in errors if e]
    if bad:
        path, reason = bad[0]
        raise DataError(f"cannot read image {path}: {reason}; remove or fix the file")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


FUSED_DEVICES = ("cpu", "cuda")  # where torch.optim.AdamW(fused=True) runs
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def make_optimizer(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, with weight decay on weight matrices and kernels only (as timm and most recipes):
    decaying biases and normalisation scales hurts more than it regularises."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel updates every parameter in one pass where the default loops over small ops
    # per tensor: 5x faster a step for resnet18 on a 2-core CPU, where a small batch's step cost as
    # much as its backward pass (benchmarks/RESULTS.md). CPU and CUDA have it.
    fused = all(p.device.type in FUSED_DEVICES and p.dtype in FUSED_DTYPES for p in params) or None
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused)


def forward(model: nn.Module, inputs: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Log-probabilities (float32) of ``model`` for a batch, in mixed precision if asked."""
    if autocast_dtype is not None:
        with torch.autocast(inputs.device.type, dtype=autocast_dtype):
            return model(inputs).float()
    return model(inputs).float()


def training_objective(
    log_probs: torch.Tensor,
    targets: torch.Tensor,
    class_weights: torch.Tensor | None,
    soft_targets: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """The loss that is optimised, averaged over the batch: per-image cross-entropy against the
    targets (``soft_targets`` when images were mixed), with ``label_smoothing`` of each target
    spread evenly over the classes, class-weighted if asked (a mixed image by its mix)."""
    if soft_targets is None and not label_smoothing:
        nll = F.nll_loss(log_probs, targets, reduction="none")  # (the plain path: bit-identical to before)
        weights = class_weights[targets] if class_weights is not None else None
    else:
        classes = log_probs.shape[1]
        target = soft_targets if soft_targets is not None else F.one_hot(targets, classes).to(log_probs.dtype)
        if label_smoothing:
            target = target * (1 - label_smoothing) + label_smoothing / classes
        nll = -(target * log_probs).sum(dim=1)
        weights = target @ class_weights if class_weights is not None else None
    if weights is not None:
        nll = nll * weights
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
    before_step: Callable[[int, int], None] | None = None,
    after_step: Callable[[torch.Tensor], None] | None = None,
    clip_grad: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    scaler: Any = None,
    channels_last: bool = False,
    reduce: Callable[[list[float]], list[float]] | None = None,
    mix: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    label_smoothing: float = 0.0,
) -> EpochStats:
    """Train (with ``optimizer``) or evaluate (without) over ``loader``.

    Loss and accuracy are totals over images divided by the image count, never a mean of
    per-batch means (which over-weights a short last batch); with ``reduce`` (a sum over
    processes) the totals are those of every process. The reported loss is the plain NLL;
    ``class_weights`` weight only the loss that is optimised. ``before_step(step, steps)`` runs
    before each optimizer step (it sets the learning rate), ``after_step(objective)`` after it;
    ``autocast_dtype`` runs the forward pass in mixed precision (``scaler``: a GradScaler for
    float16). In training, ``mix(images, targets)`` (MixUp, CutMix) mixes each batch into soft
    targets and ``label_smoothing`` smooths them, for the objective only: the reported loss and
    accuracy stay those of each image's own label, so that epochs compare.
    """
    loss_sum, correct, top5, seen = 0.0, 0, 0, 0
    start = time.perf_counter()
    steps = len(loader) if hasattr(loader, "__len__") else 0
    params = [p for group in optimizer.param_groups for p in group["params"]] if optimizer is not None else []
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress, unit="batch", dynamic_ncols=True)
    with torch.set_grad_enabled(optimizer is not None):
        for step, (inputs, targets, errors) in enumerate(bar):
            raise_bad_images(errors)
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            soft_targets = None
            if optimizer is not None and mix is not None:
                inputs, soft_targets = mix(inputs, targets)
            if channels_last and inputs.dim() == 4:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            if optimizer is not None and before_step is not None:
                before_step(step, steps)
            log_probs = forward(model, inputs, autocast_dtype)
            nll = F.nll_loss(log_probs, targets, reduction="none")
            loss = nll.sum()
            if optimizer is not None:
                objective = training_objective(log_probs, targets, class_weights, soft_targets, label_smoothing)
                optimise(objective, optimizer, params, clip_grad, scaler)
                if after_step is not None:
                    after_step(objective.detach())
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
