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

_T = TypeVar("_T")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[_T], values: Mapping[str, Any]) -> _T:
        """Rebuild from ``to_dict`` output; keys this version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class PreprocessConfig(_Serializable):
    """Everything that turns a decoded image into the model's input tensor.

    Eval: resize the short side to ``resize_size``, centre-crop ``image_size``, normalise.
    Train: random-resized crop of ``image_size`` (area ``min_scale``..1), horizontal flip with
    probability ``hflip``, normalise.
    """

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    min_scale: float = 0.08
    hflip: float = 0.5
    max_pixels: int = 89_478_485  # PIL's own decompression-bomb threshold

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


def _check_common(batch_size: int, workers: int | None, device: str) -> None:
    _check(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}")
    _check(workers is None or workers >= 0, f"--workers must be 0 or more, got {workers}")
    _check(
        bool(DEVICE_PATTERN.match(device)),
        f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}",
    )


@dataclass(frozen=True)
class TrainConfig(_Serializable):
    """Options of ``cnnkit train``; ``None`` means "choose for me" (documented per field)."""

    data_dir: str
    arch: str = "densenet121"
    weights: str = "DEFAULT"  # DEFAULT | a torchvision weights name | path to a .pth | none
    hidden_units: int = 512
    dropout: float = 0.2
    learning_rate: float = 1e-3
    epochs: int = 5
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

    def __post_init__(self) -> None:
        _check(bool(self.data_dir), "DATA_DIR must not be empty")
        _check(bool(self.weights), "--weights must be DEFAULT, a weights name, a file path, or none")
        _check(self.hidden_units >= 0, f"--hidden-units must be 0 (one Linear layer) or more, got {self.hidden_units}")
        _check(0 <= self.dropout < 1, f"--dropout must be in [0, 1), got {self.dropout}")
        _check(self.learning_rate > 0, f"--learning-rate must be positive, got {self.learning_rate}")
        _check(self.epochs >= 1, f"--epochs must be at least 1, got {self.epochs}")
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

    @property
    def pretrained(self) -> bool:
        return self.weights.lower() != "none"


@dataclass(frozen=True)
class PredictConfig(_Serializable):
    """Options of ``cnnkit predict``."""

    inputs: tuple[str, ...]
    checkpoint: str
    top_k: int = 1
    category_names: str | None = None
    batch_size: int = 32
    workers: int | None = None  # None: as many as the machine has cores, up to 4
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(str(p) for p in self.inputs))
        _check(len(self.inputs) > 0, "give at least one INPUT: an image, a folder, or - for paths on stdin")
        _check(bool(self.checkpoint), "give a checkpoint with --checkpoint CKPT")
        _check(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        _check_common(self.batch_size, self.workers, self.device)
