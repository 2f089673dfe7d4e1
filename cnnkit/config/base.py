"""What every config shares: ``Serializable``, the checks, the preprocessing config and the
constants the CLI offers as choices."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Mapping, TypeVar

from ..errors import ConfigError


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
PREDICT_FORMATS = ("table", "json", "jsonl", "csv")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Training-time augmentation policies (data/transforms.py builds them): none; light = random
# resized crop + horizontal flip; trivial / rand = light + torchvision's TrivialAugmentWide / RandAugment.
AUGMENT_POLICIES = ("none", "light", "trivial", "rand")
# Test-time augmentation (data/transforms.tta_views): the image as is and flipped; or every flip
# and quarter turn of it (for images with no natural orientation).
TTA_MODES = ("none", "flip", "flip+rot90")
EXPLAIN_METHODS = ("gradcam", "gradcam++")

_T = TypeVar("_T")


def check(condition: bool, message: str) -> None:
    """ConfigError(``message``) unless ``condition``: the configs' ``__post_init__`` checks."""
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
    Train (``policy`` light, trivial or rand; none is the eval pipeline): a random-resized crop of
    area ``min_scale``..1 at ``train_size`` (None: ``image_size``; smaller trains faster, and the
    eval crop then shows objects at about the size the random crops' zoom gave them: FixRes,
    Touvron et al. 2019), horizontal flip with probability ``hflip``, vertical flip with ``vflip``,
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
    train_size: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        check(self.image_size >= 16, f"image_size must be at least 16 pixels, got {self.image_size}")
        check(
            self.resize_size >= self.image_size,
            f"resize_size ({self.resize_size}) must be at least image_size ({self.image_size})",
        )
        check(len(self.mean) == 3 and len(self.std) == 3, "mean and std need 3 values (R, G, B)")
        check(all(s > 0 for s in self.std), f"std values must be positive, got {self.std}")
        check(
            self.interpolation in INTERPOLATIONS,
            f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}",
        )
        check(0 < self.min_scale <= 1, f"min_scale must be in (0, 1], got {self.min_scale}")
        check(0 <= self.hflip <= 1, f"hflip must be a probability in [0, 1], got {self.hflip}")
        check(self.max_pixels > 0, f"max_pixels must be positive, got {self.max_pixels}")
        check(self.policy in AUGMENT_POLICIES, f"policy must be one of {', '.join(AUGMENT_POLICIES)}, got {self.policy!r}")
        check(0 <= self.vflip <= 1, f"vflip must be a probability in [0, 1], got {self.vflip}")
        check(0 <= self.random_erase <= 1, f"random_erase must be a probability in [0, 1], got {self.random_erase}")
        check(self.train_size is None or self.train_size >= 16, f"train_size must be at least 16 pixels, got {self.train_size}")


EVAL_FIELDS = ("image_size", "resize_size", "mean", "std", "interpolation", "max_pixels")  # what inference uses


def check_common(batch_size: int | None, workers: int | None, device: str) -> None:
    check(batch_size is None or batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}")
    check(workers is None or workers >= 0, f"--workers must be 0 or more, got {workers}")
    check(
        bool(DEVICE_PATTERN.match(device)),
        f"--device must be auto, cpu, cuda, cuda:N or mps, got {device!r}",
    )
