"""What a run's configuration means on this machine, resolved once before the loop: whether the
backbone is frozen, the phases and their epochs and learning rates, precision and memory layout,
the feature cache, class weights; and the recipe a resumed run keeps."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from ..config import PreprocessConfig, TrainConfig
from ..data.transforms import resolve_preprocess
from ..errors import CheckpointError, ConfigError
from ..models.checkpoint import Checkpoint
from ..runtime import has_native_bfloat16

HEAD, FINE_TUNE, FULL = "head", "fine-tune", "full"  # phases: frozen backbone, then unfrozen; or all along
# Fields a resumed run may change; everything else is the checkpoint's recipe.
RUN_FIELDS = ("data_dir", "epochs", "workers", "device", "save_dir", "resume", "force", "progress", "nproc")
IMBALANCE_WARNING = 5.0  # warn when the largest class has this many times the smallest's images


@dataclass(frozen=True)
class Recipe:
    """The resolved recipe: the config's "choose for me" values decided for this run and device."""

    cfg: TrainConfig
    freeze: bool  # the backbone is frozen in the first phase
    amp: bool
    autocast_dtype: torch.dtype | None
    channels_last: bool
    preprocess: PreprocessConfig  # a new run's: the architecture's eval preprocessing with the training augmentation

    def augment(self, phase: str) -> bool:
        """Whether ``phase`` trains on augmented images (by default: while the backbone trains)."""
        return self.cfg.augment != "none" if self.cfg.augment is not None else phase != HEAD

    @property
    def caches_features(self) -> bool:
        """Whether the head phase trains on cached backbone features: frozen, and nothing
        changes its input (no augmentation, no mixing)."""
        return self.freeze and not self.augment(HEAD) and not self.cfg.mixes and self.cfg.cache_features is not False

    def phase(self, epoch: int, fine_tune_from: int | None) -> str:
        """The phase epoch ``epoch`` belongs to."""
        if not self.freeze:
            return FULL
        return HEAD if fine_tune_from is None or epoch <= fine_tune_from else FINE_TUNE

    def end_epoch(self, fine_tune_from: int | None) -> int:
        """The last epoch of the run as far as it is known now."""
        if fine_tune_from is not None:
            return int(fine_tune_from) + self.cfg.fine_tune
        return self.cfg.epochs + (self.cfg.fine_tune if self.freeze else 0)

    def phase_plan(self, phase: str, fine_tune_from: int | None) -> tuple[int, int, float]:
        """(epochs before the phase, epochs in it, base learning rate)."""
        if phase == FINE_TUNE:
            return int(fine_tune_from or 0), self.cfg.fine_tune, self.cfg.resolved_fine_tune_lr
        return 0, self.cfg.epochs, self.cfg.learning_rate


def train_size(image_size: int, ratio: float) -> int | None:
    """The training crops' side for ``ratio`` of ``image_size`` (None: the same size), at least 16 px."""
    return None if ratio == 1 else max(16, round(image_size * ratio))


def default_amp(cfg: TrainConfig, device: torch.device) -> bool:
    """Mixed precision unless ``--amp``/``--no-amp`` says: on CUDA; and on a CPU with native
    bfloat16 under ``--time-budget``, where the images trained in the time are what counts (1.8x
    the steps of float32 there: benchmarks/RESULTS.md); otherwise float32, as reproducible as before."""
    return device.type == "cuda" or (device.type == "cpu" and bool(cfg.time_budget) and has_native_bfloat16())


def resolve_recipe(cfg: TrainConfig, device: torch.device, log: logging.Logger | None) -> Recipe:
    """Decide freezing, precision, memory layout and a new run's preprocessing for ``cfg`` (its
    recipe filled in: ``TrainConfig.with_recipe``) on ``device``; refuse combinations that cannot
    work with this backbone. ``log`` (None off rank 0) says what was chosen."""
    freeze = cfg.freeze if cfg.freeze is not None else cfg.pretrained
    if log is not None:
        if freeze and not cfg.pretrained:
            log.warning("--freeze with --weights none: a frozen random backbone learns nothing useful")
        elif cfg.freeze is None and not cfg.pretrained:
            log.info("--weights none: training the whole network (the backbone too)")
    if cfg.fine_tune and not freeze:
        raise ConfigError(
            "--fine-tune trains the whole network after a frozen-backbone head phase, but here the "
            "backbone trains from the start (--weights none): drop --fine-tune, or add --freeze"
        )
    if cfg.cache_features and not freeze:
        raise ConfigError(
            "--cache-features needs a frozen backbone, and this one trains (--weights none): "
            "drop --cache-features, or add --freeze"
        )
    amp = cfg.amp if cfg.amp is not None else default_amp(cfg, device)
    if amp and device.type not in ("cuda", "cpu"):
        raise ConfigError(f"--amp runs on CUDA (float16) or the CPU (bfloat16), not on {device.type}: drop --amp")
    autocast_dtype = (torch.float16 if device.type == "cuda" else torch.bfloat16) if amp else None
    if amp and log is not None:
        chosen = cfg.amp is None and device.type == "cpu"  # (the time budget's default)
        log.info("mixed precision: %s autocast%s", str(autocast_dtype).replace("torch.", ""),
                 " with gradient scaling" if device.type == "cuda" else
                 " (--time-budget on a CPU with native bfloat16: more steps in the time; --no-amp for float32)"
                 if chosen else "")
    preprocess = training_preprocess(cfg, resolve_preprocess(cfg.arch, cfg.image_size, cfg.resize_size))
    crop = preprocess.train_size or preprocess.image_size
    return Recipe(cfg, freeze, amp, autocast_dtype, prefers_channels_last(cfg.arch, crop, device), preprocess)


def training_preprocess(cfg: TrainConfig, base: PreprocessConfig) -> PreprocessConfig:
    """``base`` (the architecture's eval preprocessing) with ``cfg``'s training augmentation."""
    return dataclasses.replace(base, policy=cfg.augment or "light", vflip=0.5 if cfg.vflip else 0.0,
                               rot90=cfg.rot90, random_erase=cfg.random_erase, min_scale=cfg.min_scale,
                               train_size=train_size(base.image_size, cfg.train_size_ratio))


# Below this training crop a ResNet trains faster in NCHW on the CPU (benchmarks/RESULTS.md).
RESNET_NHWC_FROM = 112


def prefers_channels_last(arch: str, crop: int, device: torch.device) -> bool:
    """Whether training ``arch`` on ``crop``-pixel crops runs in NHWC (channels-last) tensors.

    On CUDA, what tensor cores want. On the CPU, oneDNN's NHWC kernels train most families
    faster (mobilenet, efficientnet, densenet, vgg, shufflenet: 1.06-1.6x at 64 and 128 px),
    but a ResNet trains faster in NCHW on small crops (resnet18 1.16-1.35x at 32-64 px, resnet34
    1.2x, resnet50 1.07x at 64 px) and in NHWC from 128 px (1.08-1.16x).
    """
    if device.type == "cuda":
        return True
    return device.type == "cpu" and not (arch.startswith("resnet") and crop < RESNET_NHWC_FROM)


def resume_config(cfg: TrainConfig, resumed: Checkpoint) -> TrainConfig:
    """The config of a resumed run: the checkpoint's recipe, with the run fields (``RUN_FIELDS``)
    from ``cfg``; any other flag that differs from the recipe is refused."""
    if not resumed.training_state:
        raise CheckpointError(f"{cfg.resume} cannot be resumed (it holds no training state; use last.pt)")
    saved = dict(resumed.train_config)
    saved.setdefault("recipe", "plain")  # a run from before the recipes trained with none of them
    # A run from before the crop fields trained on full-size crops at its preprocessing's min_scale,
    # whatever its recipe sets today.
    saved.setdefault("train_size_ratio", 1.0)
    saved.setdefault("min_scale", resumed.preprocess.min_scale)
    recipe = TrainConfig.from_dict(saved).with_recipe()
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


def balanced_class_weights(targets: Iterable[int], num_classes: int) -> torch.Tensor:
    """``n / (k * count[c])`` per class (scikit-learn's "balanced"): the loss weight of a sample
    is inversely proportional to its class's frequency, and averages 1 over the training set."""
    counts = torch.bincount(torch.as_tensor(list(targets), dtype=torch.int64), minlength=num_classes).double()
    weights = counts.sum() / (num_classes * counts.clamp(min=1))
    return weights.float()


def imbalance_warning(targets: Sequence[int], classes: Sequence[str], cfg: TrainConfig) -> str | None:
    """A warning when the largest class has IMBALANCE_WARNING times the smallest's images."""
    counts = np.bincount(list(targets), minlength=len(classes))
    largest, smallest = int(counts.argmax()), int(counts.argmin())
    if not (counts[smallest] and counts[largest] >= IMBALANCE_WARNING * counts[smallest]):
        return None
    remedy = (
        "" if cfg.class_weights == "balanced" or cfg.sampler == "balanced"
        else "; consider --class-weights balanced or --sampler balanced"
    )
    return (
        f"class imbalance: {classes[largest]} has {counts[largest]} training images, {classes[smallest]} only "
        f"{counts[smallest]} ({counts[largest] / counts[smallest]:.0f}x){remedy}"
    )
