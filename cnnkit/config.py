"""Frozen, validated configuration objects.

Each CLI flag maps one-to-one to a field here. Configs are saved in checkpoints as plain dicts
(``to_dict``) and rebuilt with ``from_dict``. This module must stay free of heavy imports:
the CLI imports it to build configs before anything touches torch.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
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
PREDICT_FORMATS = ("table", "json", "jsonl", "csv")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Training-time augmentation policies (data/transforms.py builds them): none; light = random
# resized crop + horizontal flip; trivial / rand = light + torchvision's TrivialAugmentWide / RandAugment.
AUGMENT_POLICIES = ("none", "light", "trivial", "rand")
# The training recipes (``--recipe``): what each sets where the run's flags leave a field unset
# (None). plain: light augmentation only (the recipe before issue 12); scratch: the default from
# random weights, transfer: the default from pretrained ones, each the best measured for its case
# (benchmarks/RESULTS.md, "Training recipes": flowers-20 under a 15-minute budget, and flowers-mini
# from a backbone trained on flowers-20).
RECIPES: dict[str, dict[str, Any]] = {
    "plain": {"augment": None, "random_erase": 0.0, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0, "ema": 0.0},
    "scratch": {"augment": "trivial", "random_erase": 0.0, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.1,
                "ema": 0.0},
    "transfer": {"augment": None, "random_erase": 0.0, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.1, "ema": 0.0},
}
# Test-time augmentation (data/transforms.tta_views): the image as is and flipped; or every flip
# and quarter turn of it (for images with no natural orientation).
TTA_MODES = ("none", "flip", "flip+rot90")
EXPLAIN_METHODS = ("gradcam", "gradcam++")

_T = TypeVar("_T")


def default_recipe(weights: str) -> str:
    """The recipe of a run without ``--recipe``: ``scratch`` from random weights, else ``transfer``."""
    return "scratch" if weights.lower() == "none" else "transfer"


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class Serializable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_T], values: Mapping[str, Any]) -> _T:
        """Rebuild from ``to_dict`` output; keys this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class PreprocessConfig(Serializable):
    """Everything that turns a decoded image into the model's input tensor.

    Eval: resize the short side to ``resize_size``, centre-crop ``image_size``, normalise.
    Train (``policy`` light, trivial or rand; none is the eval pipeline): random-resized crop of ``image_size`` (area
    ``min_scale``..1), horizontal flip with probability ``hflip``, vertical flip with ``vflip``,
    a random multiple of 90° with ``rot90`` (for images with no natural orientation), then
    TrivialAugmentWide (trivial) or RandAugment (rand), normalise, and random erasing with
    probability ``random_erase``. The train-time fields never change the eval pipeline.
    """

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    min_scale: float = 0.08
    hflip: float = 0.5
    max_pixels: int = 89_478_485  # PIL's own decompression-bomb threshold
    policy: str = "light"  # the training pipeline, AUGMENT_POLICIES (none: the eval pipeline)
    vflip: float = 0.0
    rot90: bool = False
    random_erase: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        _check(self.image_size >= 16, f"image_size must be at least 16 pixels, got {self.image_size}")
        _check(
            self.resize_size >= self.image_size,
            f"resize_size ({self.resize_size}) must be at least image_size ({self.image_size})",
        )
        _check(len(self.mean) == 3 and len(self.std) == 3, "mean and std need 3 values (R, G, B)")
        _check(all(s > 0 for s in self.std), f"std values must be positive, got {self.std}")
        _check(
            self.interpolation in INTERPOLATIONS,
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}",
        )
        _check(0 < self.min_scale <= 1, f"min_scale must be in (0, 1], got {self.min_scale}")
        _check(0 <= self.hflip <= 1, f"hflip must be a probability in [0, 1], got {self.hflip}")
        _check(self.max_pixels > 0, f"max_pixels must be positive, got {self.max_pixels}")
        _check(self.policy in AUGMENT_POLICIES, f"policy must be one of {', '.join(AUGMENT_POLICIES)}, got {self.policy!r}")
        _check(0 <= self.vflip <= 1, f"vflip must be a probability in [0, 1], got {self.vflip}")
        _check(0 <= self.random_erase <= 1, f"random_erase must be a probability in [0, 1], got {self.random_erase}")


EVAL_FIELDS = ("image_size", "resize_size", "mean", "std", "interpolation", "max_pixels")  # what inference uses


def _check_common(batch_size: int | None, workers: int | None, device: str) -> None:
    _check(batch_size is None or batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}")
    _check(workers is None or workers >= 0, f"--workers must be 0 or more, got {workers}")
    _check(
        bool(DEVICE_PATTERN.match(device)),
        f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}",
    )


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
        _check(bool(self.data_dir), "DATA_DIR must not be empty")
        _check(bool(self.weights), "--weights must be DEFAULT, a weights name, a file path, or none")
        _check(self.hidden_units >= 0, f"--hidden-units must be 0 (one Linear layer) or more, got {self.hidden_units}")
        _check(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        _check(self.learning_rate > 0, f"--learning-rate must be positive, got {self.learning_rate}")
        _check(self.epochs is None or self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
        _check_common(self.batch_size, self.workers, self.device)
        _check(0 < self.val_split < 1, f"--val-split must be between 0 and 1 (exclusive), got {self.val_split}")
        _check(
            self.image_size is None or self.image_size >= 16,
            f"--image-size must be at least 16, got {self.image_size}",
        )
        _check(
            self.scheduler in SCHEDULERS,
            f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}",
        )
        self._check_recipe()

    def _check_recipe(self) -> None:
        _check(self.warmup is None or self.warmup >= 0, f"--warmup must be 0 or more epochs, got {self.warmup}")
        _check(self.weight_decay >= 0, f"--weight-decay must be 0 or more, got {self.weight_decay}")
        _check(
            self.early_stop is None or self.early_stop >= 1,
            f"--early-stop PATIENCE must be at least 1 epoch, got {self.early_stop}",
        )
        _check(self.clip_grad is None or self.clip_grad > 0, f"--clip-grad must be positive, got {self.clip_grad}")
        _check(
            self.class_weights in CLASS_WEIGHTS,
            f"--class-weights must be one of {', '.join(CLASS_WEIGHTS)}, got {self.class_weights!r}",
        )
        _check(self.sampler in SAMPLERS, f"--sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        _check(
            not (self.class_weights == "balanced" and self.sampler == "balanced"),
            "--class-weights balanced and --sampler balanced both correct the same imbalance: choose one",
        )
        _check(
            self.augment is None or self.augment in AUGMENT_POLICIES,
            f"--augment must be one of {', '.join(AUGMENT_POLICIES)}, got {self.augment!r}",
        )
        _check(self.recipe is None or self.recipe in RECIPES, f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        _check(self.random_erase is None or 0 <= self.random_erase <= 1,
               f"--random-erase must be a probability in [0, 1], got {self.random_erase}")
        _check((self.mixup or 0) >= 0 and (self.cutmix or 0) >= 0,
               f"--mixup and --cutmix must be 0 (off) or positive alphas, got {self.mixup} and {self.cutmix}")
        _check(self.label_smoothing is None or 0 <= self.label_smoothing < 1,
               f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.time_budget is not None:
            _check(parse_duration(self.time_budget) >= 1, f"--time-budget must be at least 1s, got {self.time_budget}")
            _check(not self.fine_tune, "--time-budget plans the epochs of one phase: drop --fine-tune (or use --epochs "
                   "and --fine-tune without a budget)")
        _check(not self.ema or 0 < self.ema < 1, f"--ema DECAY must be 0 (off) or in (0, 1), such as 0.999; got {self.ema}")
        _check(
            not (self.cache_features and (self.augment not in (None, "none") or self.mixes)),
            "--cache-features computes each image's features once, so it cannot be combined with "
            "--augment (new random crops every epoch) or --mixup/--cutmix (new mixes): drop one of them",
        )
        _check(
            not (self.cache_features and self.freeze is False),
            "--cache-features needs a frozen backbone (features of a training backbone change every step): "
            "drop --no-freeze or --cache-features",
        )
        _check(self.fine_tune >= 0, f"--fine-tune must be 0 or more epochs, got {self.fine_tune}")
        _check(
            self.fine_tune_lr is None or self.fine_tune_lr > 0,
            f"--fine-tune-lr must be positive, got {self.fine_tune_lr}",
        )
        _check(
            not (self.fine_tune and self.freeze is False),
            "--fine-tune unfreezes a frozen backbone after the head has trained; with --no-freeze the "
            "whole network trains from the start: drop one of them",
        )
        _check(self.nproc >= 1, f"--nproc must be at least 1, got {self.nproc}")

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
class PredictConfig(Serializable):
    """Options of ``cnnkit predict``."""

    inputs: tuple[str, ...]
    checkpoint: str
    top_k: int = 1
    category_names: str | None = None
    batch_size: int | None = None  # None: cnnkit.inference.predictor.scoring_defaults
    workers: int | None = None
    device: str = "auto"
    progress: bool = True
    format: str | None = None  # None: from --output's extension, else table
    output: str | None = None  # a CSV/JSONL/JSON file written as results arrive; None: stdout
    resume: bool = False  # skip inputs already in --output and append to it
    force: bool = False  # overwrite an existing --output
    shard: str | None = None  # "K/N": score only the K-th (0-based) of N hash slices
    abstain: bool = False  # label images below the checkpoint's abstain threshold "unknown"
    tta: str | None = None  # TTA_MODES; None: the checkpoint's (what it was calibrated with), else none

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(str(p) for p in self.inputs))
        _check(self.tta is None or self.tta in TTA_MODES, f"--tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
        _check(len(self.inputs) > 0, "give at least one INPUT: an image, a folder, or - for paths on stdin")
        _check(bool(self.checkpoint), "give a checkpoint with --checkpoint CKPT")
        _check(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        _check_common(self.batch_size, self.workers, self.device)
        _check(
            self.format is None or self.format in PREDICT_FORMATS,
            f"--format must be one of {', '.join(PREDICT_FORMATS)}, got {self.format!r}",
        )
        _check(not (self.resume and self.output is None), "--resume needs --output FILE to continue")
        _check(not (self.resume and self.force), "--resume appends to --output and --force overwrites it: choose one")
        _check(
            not (self.resume and self.output_format == "json"),
            "--resume needs a CSV or JSONL --output (a JSON array cannot be appended to)",
        )
        self.output_format, self.shard_spec  # validate --output's extension and --shard

    @property
    def output_format(self) -> str:
        if self.format is not None:
            return self.format
        if self.output is not None:
            ext = self.output.lower().rsplit(".", 1)[-1]
            _check(
                ext in ("csv", "jsonl", "ndjson", "json"),
                f"cannot tell the format of --output {self.output} from its extension: give --format csv, jsonl or json",
            )
            return "jsonl" if ext == "ndjson" else ext
        return "table"

    @property
    def shard_spec(self) -> tuple[int, int] | None:
        """(K, N) from ``--shard K/N``."""
        if self.shard is None:
            return None
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", self.shard)
        _check(match is not None, f"--shard must look like K/N (e.g. 0/4), got {self.shard!r}")
        k, n = int(match.group(1)), int(match.group(2))  # type: ignore[union-attr]
        _check(n >= 1 and 0 <= k < n, f"--shard K/N needs 0 <= K < N, got {self.shard!r}")
        return k, n


@dataclass(frozen=True)
class EvaluateConfig(Serializable):
    """Options of ``cnnkit evaluate``."""

    checkpoint: str
    data_dir: str
    split: str | None = None  # None: DATA_DIR/test when it exists, else DATA_DIR itself
    top_k: int = 5
    category_names: str | None = None
    ignore_unknown: bool = False
    calibrate: bool = False
    target_coverage: float | None = None
    unknown: str | None = None  # a folder of images of classes the model never saw: AUROC, FPR@95
    output: str | None = None
    worst: int = 12
    force: bool = False
    batch_size: int | None = None  # None: cnnkit.inference.predictor.scoring_defaults
    workers: int | None = None
    device: str = "auto"
    progress: bool = True
    tta: str | None = None  # TTA_MODES; None: the checkpoint's, else none; stored with --calibrate/--target-coverage

    def __post_init__(self) -> None:
        _check(bool(self.checkpoint), "give the checkpoint to evaluate")
        _check(self.tta is None or self.tta in TTA_MODES, f"--tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")
        _check(bool(self.data_dir), "give DATA_DIR, a labelled ImageFolder")
        _check(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        _check(
            self.target_coverage is None or 0 < self.target_coverage <= 1,
            f"--target-coverage must be in (0, 1], got {self.target_coverage}",
        )
        _check(self.worst >= 0, f"--worst must be 0 or more, got {self.worst}")
        _check(self.unknown is None or bool(self.unknown), "--unknown needs a folder of images of classes the model never saw")
        _check_common(self.batch_size, self.workers, self.device)


@dataclass(frozen=True)
class ExplainConfig(Serializable):
    """Options of ``cnnkit explain``."""

    inputs: tuple[str, ...]
    checkpoint: str
    output: str  # the folder the PNG overlays go to
    top_k: int = 1  # explain the K most probable classes of each image
    target: str | None = None  # or this class (a label, or its name), whatever its rank
    method: str = "gradcam"  # gradcam | gradcam++
    category_names: str | None = None
    force: bool = False  # overwrite the overlays of the same images already in --output
    device: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(str(p) for p in self.inputs))
        _check(len(self.inputs) > 0, "give at least one IMAGE: an image, a folder, or - for paths on stdin")
        _check(bool(self.checkpoint), "give a checkpoint with --checkpoint CKPT")
        _check(bool(self.output), "give the folder for the pictures with --output DIR")
        _check(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        _check(self.target is None or bool(self.target), "--target must name a class")
        _check(not (self.target is not None and self.top_k != 1),
               "--target explains one given class and --top-k the most probable ones: choose one")
        _check(self.method in EXPLAIN_METHODS,
               f"--method must be one of {', '.join(EXPLAIN_METHODS)}, got {self.method!r}")
        _check_common(None, None, self.device)


@dataclass(frozen=True)
class InspectConfig(Serializable):
    """Options of ``cnnkit inspect``."""

    data_dir: str
    phash_distance: int = 6  # near-duplicates: at most this many of the 64 pHash bits differ
    output: str | None = None  # a folder for inspect.json, pairs.csv, inspect.html (and label_issues.*)
    force: bool = False  # overwrite them
    # Label issues (cnnkit.label_issues): out-of-fold probabilities of k-fold logistic-regression
    # heads on a frozen backbone's features, fed to cleanlab. The backbone: a checkpoint's (with its
    # preprocessing), or a torchvision arch with weights (DEFAULT, a name, a file, none).
    label_issues: bool = False
    checkpoint: str | None = None
    arch: str | None = None
    weights: str | None = None
    image_size: int | None = None  # with arch: the crop; None: the architecture's
    folds: int = 5  # fewer when a class has fewer readable images
    seed: int = 0  # the folds' shuffle
    category_names: str | None = None  # label → name for the summary, gallery and page
    batch_size: int | None = None  # None: cnnkit.inference.predictor.scoring_defaults
    workers: int | None = None
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        _check(bool(self.data_dir), "give DATA_DIR, a folder of class folders (or of train/, valid/, test/)")
        _check(0 <= self.phash_distance <= 32,
               f"--phash-distance must be 0 to 32 (of the 64 bits; 0: identical hashes only), got {self.phash_distance}")
        _check(self.output is None or bool(self.output), "--output must not be empty")
        given = [flag for flag, value in (("--checkpoint", self.checkpoint), ("--arch", self.arch), ("--weights", self.weights),
                                          ("--image-size", self.image_size), ("--category-names", self.category_names))
                 if value is not None]
        _check(self.label_issues or not given, f"{', '.join(given)}: only used with --label-issues; add it, or drop them")
        _check(not self.label_issues or bool(self.checkpoint or self.arch or self.weights),
               "--label-issues needs a backbone: --checkpoint CKPT, or --arch ARCH and --weights W "
               "(DEFAULT, a weights name, a .pth file, or none)")
        _check(not (self.checkpoint and (self.arch or self.weights or self.image_size)),
               "--checkpoint brings its own backbone and preprocessing: drop --arch, --weights and --image-size")
        _check(self.checkpoint is not None or bool(self.arch) == bool(self.weights),
               "--arch and --weights go together: the architecture, and DEFAULT, a weights name, a .pth file or none")
        _check(self.image_size is None or self.image_size >= 16, f"--image-size must be at least 16 pixels, got {self.image_size}")
        _check(self.folds >= 2, f"--folds must be at least 2, got {self.folds}")
        _check_common(self.batch_size, self.workers, self.device)


SERVE_HOST_PATTERN = re.compile(r"^[A-Za-z0-9.:\-\[\]]+$")
HEADER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # an HTTP header name (RFC 9110 token)
EXPORT_FORMATS = ("onnx", "torchscript")


@dataclass(frozen=True)
class ServeConfig(Serializable):
    """Options of ``cnnkit serve``: the model, gunicorn's processes, micro-batching and limits."""

    checkpoint: str  # a cnnkit checkpoint, or a model exported with ``cnnkit export --format onnx``
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int | None = None  # gunicorn worker processes (a model copy each); None: one per core, up to 4
    threads: int = 64  # request threads per worker: enough to refuse the excess at once when --max-queue is reached
    max_batch: int = 16  # images per forward pass
    max_wait_ms: float = 5.0  # how long a batch waits for requests still being decoded
    max_bytes: int = 10 * 1024 * 1024  # request body limit (413 above it)
    max_images: int = 32  # images per request
    max_pixels: int = 25_000_000  # per image, decoded and after resizing (capped by the model's own limit)
    timeout: float = 30.0  # seconds a request may take to arrive (408 after) and to wait for its result (503 after)
    top_k: int = 1  # when a request gives no top_k
    torch_threads: int | None = None  # None: the machine's cores divided among the workers, at least 1
    drift_window: int = 1000  # recent images the drift PSI is computed over
    category_names: str | None = None
    device: str = "auto"
    max_queue: int | None = None  # images a worker holds at most (decoding, queued, scoring); None: from queue_target_ms
    queue_target_ms: float = 500.0  # with max_queue None: the queue a worker can clear in this time, measured at warm-up
    api_key_file: str | None = None  # keys for /predict, /invocations, /metadata and /admin/* (one per line)
    protect_metrics: bool = False  # /metrics needs a key too
    canary: str | None = None  # a candidate model answering canary_percent % of requests
    canary_percent: float = 10.0  # the canary's share of requests (of each sticky key's, by a stable hash)
    canary_header: str = "X-Client-Id"  # a request carrying it is routed by its value: the same client, the same model
    shadow: str | None = None  # a candidate model scoring copies of the primary's requests, off the request path
    shadow_share: float = 0.1  # the most of a worker's time the shadow may take, and only while it holds no request
    shadow_queue: int = 32  # copies waiting for the shadow, at most (more are dropped and counted)
    tta: str | None = None  # TTA_MODES; None: the checkpoint's, else none

    def __post_init__(self) -> None:
        _check(bool(self.checkpoint), "give the model to serve: a checkpoint or an exported .onnx")
        _check(bool(SERVE_HOST_PATTERN.match(self.host)), f"--host must be an address such as 127.0.0.1 or 0.0.0.0, got {self.host!r}")
        _check(1 <= self.port <= 65535, f"--port must be between 1 and 65535, got {self.port}")
        _check(self.workers is None or self.workers >= 1, f"--workers must be at least 1, got {self.workers}")
        _check(self.threads >= 1, f"--threads must be at least 1, got {self.threads}")
        _check(self.max_batch >= 1, f"--max-batch must be at least 1, got {self.max_batch}")
        _check(0 <= self.max_wait_ms <= 10_000, f"--max-wait-ms must be between 0 and 10000, got {self.max_wait_ms}")
        _check(self.max_bytes >= 1024, f"--max-bytes must be at least 1024, got {self.max_bytes}")
        _check(self.max_images >= 1, f"--max-images must be at least 1, got {self.max_images}")
        _check(self.max_pixels > 0, f"--max-pixels must be positive, got {self.max_pixels}")
        _check(self.timeout > 0, f"--timeout must be positive (seconds), got {self.timeout}")
        _check(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        _check(
            self.torch_threads is None or self.torch_threads >= 1,
            f"--torch-threads must be at least 1, got {self.torch_threads}",
        )
        _check(self.drift_window >= 10, f"--drift-window must be at least 10 images, got {self.drift_window}")
        _check(bool(DEVICE_PATTERN.match(self.device)), f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        _check(self.max_queue is None or self.max_queue >= 1, f"--max-queue must be at least 1 image, got {self.max_queue}")
        _check(1 <= self.queue_target_ms <= 600_000,
               f"--queue-target-ms must be between 1 and 600000 (milliseconds), got {self.queue_target_ms}")
        _check(self.api_key_file is None or bool(self.api_key_file), "--api-key-file must not be empty")
        _check(not self.protect_metrics or bool(self.api_key_file), "--protect-metrics needs --api-key-file")
        for flag, path in (("--canary", self.canary), ("--shadow", self.shadow)):
            _check(path is None or bool(path), f"{flag} must not be empty: give a checkpoint or an exported .onnx")
        _check(0 < self.canary_percent <= 100, f"--canary-percent must be above 0 and at most 100, got {self.canary_percent}")
        _check(bool(HEADER_NAME_PATTERN.match(self.canary_header)),
               f"--canary-header must be an HTTP header name such as X-Client-Id, got {self.canary_header!r}")
        _check(0 < self.shadow_share <= 1, f"--shadow-share must be above 0 and at most 1 (a share of time), got {self.shadow_share}")
        _check(self.shadow_queue >= 1, f"--shadow-queue must be at least 1 image, got {self.shadow_queue}")
        _check(self.tta is None or self.tta in TTA_MODES, f"--tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")


@dataclass(frozen=True)
class ExportConfig(Serializable):
    """Options of ``cnnkit export``."""

    checkpoint: str
    format: str = "onnx"  # onnx | torchscript
    output: str | None = None  # None: the checkpoint's path with .onnx / .torchscript.pt
    opset: int = 17  # ONNX opset
    check: bool = True  # verify parity with PyTorch after export
    force: bool = False  # overwrite an existing output
    int8: bool = False  # static int8 quantization (ONNX Runtime, QDQ), kept only if it passes the gate
    ignore_gate: bool = False  # keep the int8 model even when it fails the gate (its figures say so)
    calibration_data: str | None = None  # images to calibrate and gate on (a folder or a data root)
    calibration_images: int = 300  # at most this many calibrate the activation ranges
    gate_images: int = 500  # at most this many held-out images measure the gate
    calibration_method: str = "minmax"
    max_accuracy_drop: float = 1.0  # percentage points of top-1 accuracy the int8 model may lose
    min_speedup: float = 1.2  # the int8 model must be this many times faster than the faster float one
    seed: int = 0  # which images calibrate and which are held out

    def __post_init__(self) -> None:
        _check(bool(self.checkpoint), "give the checkpoint to export")
        _check(
            self.format in EXPORT_FORMATS,
            f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}",
        )
        _check(self.output is None or bool(self.output), "--output must not be empty")
        _check(11 <= self.opset <= 20, f"--opset must be between 11 and 20, got {self.opset}")
        if self.int8:
            _check(self.format == "onnx", "--int8 needs --format onnx (TorchScript is exported as float32 only)")
            _check(bool(self.calibration_data), "--int8 needs --calibration-data DIR: images like the training data")
            _check(self.check, "--int8 needs the parity check of the float export: drop --no-check")
        else:
            _check(self.calibration_data is None, "--calibration-data is only used with --int8")
            _check(not self.ignore_gate, "--ignore-gate is only used with --int8")
        _check(self.calibration_images >= 1, f"--calibration-images must be at least 1, got {self.calibration_images}")
        _check(self.gate_images >= 1, f"--gate-images must be at least 1, got {self.gate_images}")
        _check(
            self.calibration_method in CALIBRATION_METHODS,
            f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.calibration_method!r}",
        )
        _check(0 <= self.max_accuracy_drop <= 100,
               f"--max-accuracy-drop is in percentage points, 0 to 100, got {self.max_accuracy_drop}")
        _check(self.min_speedup >= 0, f"--min-speedup must be 0 or more, got {self.min_speedup}")


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
        _check(0 < self.start_lr < self.end_lr, f"need 0 < --start-lr < --end-lr, got {self.start_lr} and {self.end_lr}")
        _check(self.steps >= 10, f"--steps must be at least 10, got {self.steps}")
