"""The configs of ``cnnkit train`` and ``cnnkit lr-find``."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ConfigError
from .base import AUGMENT_POLICIES, Serializable, check, check_common


SCHEDULERS = ("none", "cosine", "step")
CLASS_WEIGHTS = ("none", "balanced")
DEFAULT_EPOCHS = 5
BUDGET_EPOCHS = 10_000  # a time-budget run's epochs until its first epochs are timed (then planned)
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``90s``, ``25m`` or ``1h30m``; raises ConfigError."""
    match = _DURATION.match(text.strip().lower()) if text else None
    if not match or not any(match.groups()):
        raise ConfigError(f"--time-budget must be a duration such as 90s, 25m or 1h30m, got {text!r}")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


SAMPLERS = ("shuffle", "balanced")
# The training recipes (``--recipe``): what each sets where the run's flags leave a field unset
# (None). plain: light augmentation only (the recipe before issue 12); scratch: the default from
# random weights, transfer: the default from pretrained weights, each the best measured for its case
# (benchmarks/RESULTS.md, "Training recipes"). From scratch on flowers-20 in 15 minutes on 2 CPU
# cores (12-68 epochs), TrivialAugment with label smoothing lost 6-8 points to light augmentation
# alone (strong augmentation pays over longer schedules than that); what paid was more epochs in
# the time: bfloat16 (a precision default: training/recipe.default_amp), and training crops at
# 0.75 of the eval size (FixRes) with gentler crops (at least a quarter of the image): +13 points
# of test accuracy (mean of 3 seeds) over full-size light augmentation in bfloat16.
LIGHT = {"augment": None, "train_size_ratio": 1.0, "min_scale": 0.08, "random_erase": 0.0, "mixup": 0.0, "cutmix": 0.0,
         "label_smoothing": 0.0, "ema": 0.0}
RECIPES: dict[str, dict[str, Any]] = {
    "plain": LIGHT,
    "scratch": {**LIGHT, "train_size_ratio": 0.75, "min_scale": 0.25},
    "transfer": {**LIGHT, "label_smoothing": 0.1},
}


def default_recipe(weights: str) -> str:
    """The recipe of a run without ``--recipe``: ``scratch`` from random weights, else ``transfer``."""
    return "scratch" if weights.lower() == "none" else "transfer"


@dataclass(frozen=True)
class TrainConfig(Serializable):
    """Options of ``cnnkit train``; ``None`` means "choose for me" (documented per field)."""

    data_dir: str
    arch: str = "densenet121"
    weights: str = "DEFAULT"  # DEFAULT | a torchvision weights name | path to a .pth | none
    hidden_units: int = 512
    dropout: float = 0.2
    learning_rate: float = 1e-3
    epochs: int | None = None  # None: DEFAULT_EPOCHS for a new run, the run's own when resuming
    batch_size: int = 32
    workers: int | None = None  # None: as many as the machine has cores, up to 4
    seed: int = 0
    device: str = "auto"
    save_dir: str = "checkpoints"
    category_names: str | None = None
    freeze: bool | None = None  # None: freeze the backbone iff it is pretrained
    val_split: float = 0.2
    image_size: int | None = None  # None: the architecture's pretrained crop size
    resize_size: int | None = None  # None: the architecture's pretrained resize size
    # None in these two: the recipe's value
    train_size_ratio: float | None = None  # the training crops' side over image_size (below 1: faster epochs, FixRes)
    min_scale: float | None = None  # the smallest share of an image's area a training crop takes
    scheduler: str = "cosine"
    resume: str | None = None
    force: bool = False
    progress: bool = True
    # Training recipe (issue 4). LR schedules are per step, with a linear warm-up.
    warmup: float | None = None  # warm-up epochs; None: 10% of each phase's epochs, at most 1
    weight_decay: float = 0.05  # AdamW's decoupled decay (not on biases and norm weights)
    early_stop: int | None = None  # stop a phase after this many epochs without a lower val loss
    clip_grad: float | None = None  # clip the gradients' global L2 norm to this
    class_weights: str = "none"  # none | balanced: weight the loss by inverse class frequency
    sampler: str = "shuffle"  # shuffle | balanced: draw classes equally often
    augment: str | None = None  # AUGMENT_POLICIES; None: light while the backbone trains, none while it is frozen
    recipe: str | None = None  # RECIPES; None: default_recipe(weights)
    # None in the five below: the recipe's value (with_recipe fills them in)
    random_erase: float | None = None  # probability of erasing a random rectangle of a training image
    vflip: bool = False  # vertical flips too (images with no natural orientation: cells, satellites, scans)
    rot90: bool = False  # random multiples of 90 degrees too (the same)
    mixup: float | None = None  # MixUp's alpha (0: off)
    cutmix: float | None = None  # CutMix's alpha (0: off); with mixup too, each batch gets one of the two
    label_smoothing: float | None = None  # the share of each target spread over all classes
    ema: float | None = None  # decay of an exponential moving average of the weights, validated and saved (0: off)
    time_budget: str | None = None  # "25m", "1h30m": the epochs are planned from the first ones' speed to fit it
    cache_features: bool | None = None  # None: whenever valid (frozen backbone, no augmentation)
    fine_tune: int = 0  # epochs of training the whole network after the head phase
    fine_tune_lr: float | None = None  # None: learning_rate / 10
    amp: bool | None = None  # mixed precision; None: on with CUDA only
    mlflow: bool = False  # log params, metrics and the checkpoint to MLflow
    nproc: int = 1  # processes on this machine (launches torchrun when more than 1)

    def __post_init__(self) -> None:
        if isinstance(self.augment, bool):  # checkpoints before the policies: --augment / --no-augment
            object.__setattr__(self, "augment", "light" if self.augment else "none")
        check(bool(self.data_dir), "DATA_DIR must not be empty")
        check(bool(self.weights), "--weights must be DEFAULT, a weights name, a file path, or none")
        check(self.hidden_units >= 0, f"--hidden-units must be 0 (one Linear layer) or more, got {self.hidden_units}")
        check(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        check(self.learning_rate > 0, f"--learning-rate must be positive, got {self.learning_rate}")
        check(self.epochs is None or self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        check_common(self.batch_size, self.workers, self.device)
        check(0 < self.val_split < 1, f"--val-split must be between 0 and 1 (exclusive), got {self.val_split}")
        check(
            self.image_size is None or self.image_size >= 16,
            f"--image-size must be at least 16, got {self.image_size}",
        )
        check(
            self.train_size_ratio is None or 0 < self.train_size_ratio <= 1,
            f"--train-size-ratio must be in (0, 1] (the training crops' side over --image-size), got {self.train_size_ratio}",
        )
        check(self.min_scale is None or 0 < self.min_scale <= 1, f"--min-scale must be in (0, 1], got {self.min_scale}")
        check(
            self.scheduler in SCHEDULERS,
            f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}",
        )
        self._check_recipe()

    def _check_recipe(self) -> None:
        check(self.warmup is None or self.warmup >= 0, f"--warmup must be 0 or more epochs, got {self.warmup}")
        check(self.weight_decay >= 0, f"--weight-decay must be 0 or more, got {self.weight_decay}")
        check(
            self.early_stop is None or self.early_stop >= 1,
            f"--early-stop PATIENCE must be at least 1 epoch, got {self.early_stop}",
        )
        check(self.clip_grad is None or self.clip_grad > 0, f"--clip-grad must be positive, got {self.clip_grad}")
        check(
            self.class_weights in CLASS_WEIGHTS,
            f"--class-weights must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights!r}",
        )
        check(self.sampler in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        check(
            not (self.class_weights == "balanced" and self.sampler == "balanced"),
            "--class-weights balanced and --sampler balanced both correct the same imbalance: choose one",
        )
        check(
            self.augment is None or self.augment in AUGMENT_POLICIES,
            f"--augment must be one of {', '.join(AUGMENT_POLICIES)}, got {self.augment!r}",
        )
        check(self.recipe is None or self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        check(self.random_erase is None or 0 <= self.random_erase <= 1,
               f"--random-erase must be a probability in [0, 1], got {self.random_erase}")
        check((self.mixup or 0) >= 0 and (self.cutmix or 0) >= 0,
               f"--mixup and --cutmix must be 0 (off) or positive alphas, got {self.mixup} and {self.cutmix}")
        check(self.label_smoothing is None or 0 <= self.label_smoothing < 1,
               f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.time_budget is not None:
            check(parse_duration(self.time_budget) >= 1, f"--time-budget must be at least 1s, got {self.time_budget}")
            check(not self.fine_tune, "--time-budget plans the epochs of one phase: drop --fine-tune (or use --epochs "
                   "and --fine-tune without a budget)")
        check(not self.ema or 0 < self.ema < 1, f"--ema DECAY must be 0 (off) or in (0, 1), such as 0.999; got {self.ema}")
        check(
            not (self.cache_features and (self.augment not in (None, "none") or self.mixes)),
            "--cache-features computes each image's features once, so it cannot be combined with "
            "--augment (new random crops every epoch) or --mixup/--cutmix (new mixes): drop one of them",
        )
        check(
            not (self.cache_features and self.freeze is False),
            "--cache-features needs a frozen backbone (features of a training backbone change every step): "
            "drop --no-freeze or --cache-features",
        )
        check(self.fine_tune >= 0, f"--fine-tune must be 0 or more epochs, got {self.fine_tune}")
        check(
            self.fine_tune_lr is None or self.fine_tune_lr > 0,
            f"--fine-tune-lr must be positive, got {self.fine_tune_lr}",
        )
        check(
            not (self.fine_tune and self.freeze is False),
            "--fine-tune unfreezes a frozen backbone after the head has trained; with --no-freeze the "
            "whole network trains from the start: drop one of them",
        )
        check(self.nproc >= 1, f"--nproc must be at least 1, got {self.nproc}")

    @property
    def pretrained(self) -> bool:
        return self.weights.lower() != "none"

    @property
    def mixes(self) -> bool:
        """Whether training images are mixed in pairs (MixUp or CutMix)."""
        return (self.mixup or 0) > 0 or (self.cutmix or 0) > 0

    def with_recipe(self) -> "TrainConfig":
        """This config with its recipe named (``default_recipe`` unless ``recipe`` says) and the
        recipe's value in every field the flags left unset."""
        name = self.recipe or default_recipe(self.weights)
        unset = {field: value for field, value in RECIPES[name].items() if getattr(self, field) is None}
        return dataclasses.replace(self, recipe=name, **unset)

    @property
    def resolved_fine_tune_lr(self) -> float:
        return self.fine_tune_lr if self.fine_tune_lr is not None else self.learning_rate / 10



@dataclass(frozen=True)
class LRFindConfig(Serializable):
    """Options of ``cnnkit lr-find``: the model and data options of a training run (``train``)
    and the range of the test. ``plot`` writes ``lr_find.png`` into ``train.save_dir``."""

    train: TrainConfig
    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 100
    plot: bool = True
    force: bool = False  # overwrite an existing lr_find.png

    def __post_init__(self) -> None:
        if isinstance(self.train, Mapping):
            object.__setattr__(self, "train", TrainConfig.from_dict(self.train))
        check(0 < self.start_lr < self.end_lr, f"need 0 < --start-lr < --end-lr, got {self.start_lr} and {self.end_lr}")
        check(self.steps >= 10, f"--steps must be at least 10, got {self.steps}")
