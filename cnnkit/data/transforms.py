"""The one place images become tensors, for training and inference alike.

``load_image`` decodes a file the same way everywhere (EXIF orientation, colour modes, size
limit); ``build_transforms`` builds the train (augmenting) or eval (deterministic) pipeline from a
:class:`~cnnkit.config.PreprocessConfig`. The config is stored in every checkpoint, and inference
rebuilds its pipeline from it, so the two can never diverge. The eval pipeline is torchvision's
Resize, CenterCrop, ToTensor and Normalize on PIL images, value for value (tests compare them),
done with PIL and numpy so that scoring an exported model never imports torchvision or torch
(``arrays=True``: numpy out), whose imports are seconds of every short ``cnnkit predict``
(benchmarks/RESULTS.md, Quantization); torch is imported by the functions that need it.
``build_batch_mix`` is the training batches' augmentation (MixUp, CutMix): torchvision.transforms.v2's.
"""

from __future__ import annotations

import os
import stat
import warnings
from typing import TYPE_CHECKING, Any, BinaryIO, Callable

import numpy as np
from PIL import Image, ImageOps

from ..config import PreprocessConfig
from ..errors import ImageError

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm",
)

# PreprocessConfig.interpolation -> PIL's filter: what torchvision's InterpolationMode of that name uses on PIL images.
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def is_image_file(path: str | os.PathLike[str]) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def resolve_preprocess(
    arch: str, image_size: int | None = None, resize_size: int | None = None
) -> PreprocessConfig:
    """The preprocessing an architecture's pretrained weights expect, with user overrides.

    Like timm's ``resolve_data_config``: sizes and interpolation come from torchvision's weights
    metadata for ``arch`` (whether or not those weights are used, since they describe what the
    architecture was designed for); an explicit ``image_size`` keeps the usual 0.875 crop ratio.
    """
    from torchvision.models import get_model_weights

    defaults: dict = {}
    try:
        defaults = dict(get_model_weights(arch).DEFAULT.transforms.keywords)
    except (ValueError, AttributeError, KeyError):
        pass  # unknown arch: models.build_model reports it with the list of valid names
    interpolation = defaults["interpolation"].value if "interpolation" in defaults else "bilinear"
    crop = image_size or int(defaults.get("crop_size", 224))
    if resize_size is None:
        resize_size = int(defaults.get("resize_size", 256)) if image_size is None else round(crop / 0.875)
    return PreprocessConfig(image_size=crop, resize_size=resize_size, interpolation=interpolation)


def build_transforms(cfg: PreprocessConfig, train: bool, arrays: bool = False) -> Callable[[Image.Image], Any]:
    """The train (``cfg.policy``: random crop, flips, ...) or eval (resize + centre crop) pipeline,
    giving a float32 (C, H, W) tensor, or with ``arrays`` (eval only) the same values as a numpy array."""
    if not train or cfg.policy == "none":
        return Pipeline([
            _RefuseElongated(cfg.resize_size, cfg.max_pixels),
            ResizeShortSide(cfg.resize_size, cfg.interpolation),
            CenterCrop(cfg.image_size),
            NormalizedTensor(cfg.mean, cfg.std, as_array=arrays),
        ])
    if arrays:
        raise ValueError("the train pipeline gives tensors only")
    from torchvision import transforms as T

    interpolation = T.InterpolationMode(cfg.interpolation)
    steps: list = [
        T.RandomResizedCrop(cfg.train_size or cfg.image_size, scale=(cfg.min_scale, 1.0), interpolation=interpolation),
        T.RandomHorizontalFlip(cfg.hflip),
    ]
    if cfg.vflip:
        steps.append(T.RandomVerticalFlip(cfg.vflip))
    if cfg.rot90:
        steps.append(RandomRot90())
    if cfg.policy == "trivial":
        steps.append(T.TrivialAugmentWide(interpolation=interpolation))
    elif cfg.policy == "rand":
        steps.append(T.RandAugment(interpolation=interpolation))
    steps.append(NormalizedTensor(cfg.mean, cfg.std))
    if cfg.random_erase:
        steps.append(T.RandomErasing(cfg.random_erase, value=0))  # (0: the mean colour, after normalising)
    return T.Compose(steps)


class Pipeline:
    """Steps applied in turn (``torchvision.transforms.Compose``, without importing torchvision)."""

    def __init__(self, transforms: list[Callable]):
        self.transforms = transforms

    def __call__(self, image: Any) -> Any:
        for step in self.transforms:
            image = step(image)
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.transforms))})"


class ResizeShortSide:
    """``T.Resize(size, interpolation)`` of a PIL image: the shorter side to ``size``, the longer
    in proportion (rounded down), unchanged when already that size."""

    def __init__(self, size: int, interpolation: str):
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.size * long / short)
        size = (self.size, new_long) if width <= height else (new_long, self.size)
        return image if size == image.size else image.resize(size, _RESAMPLE[self.interpolation])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size}, {self.interpolation})"


class CenterCrop:
    """``T.CenterCrop(size)`` of a PIL image: a centred square, padded with black (torchvision's
    split: the odd pixel right and bottom) where the image is smaller."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if self.size > width or self.size > height:
            pad_w, pad_h = max(self.size - width, 0), max(self.size - height, 0)
            image = ImageOps.expand(image, (pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2), fill=0)
            width, height = image.size
            if (width, height) == (self.size, self.size):
                return image
        top, left = int(round((height - self.size) / 2.0)), int(round((width - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size})"


class NormalizedTensor:
    """``T.ToTensor()`` then ``T.Normalize(mean, std)`` of an RGB image in one step, with the same
    values bit for bit: each channel's 256 possible results are computed once, in float32 and in
    the same order (x / 255, - mean, / std), and looked up per pixel.

    Faster than the two torchvision steps, and numpy is single-threaded: it runs beside the model
    (in the decoding thread of ``inference.predictor``) without waking torch's thread pool.
    ``as_array``: the numpy array itself, not a tensor sharing its memory.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], as_array: bool = False):
        self.mean, self.std, self.as_array = tuple(mean), tuple(std), as_array
        levels = np.arange(256, dtype=np.float32).reshape(1, 256) / np.float32(255)
        self._table = (levels - np.asarray(mean, np.float32).reshape(-1, 1)) / np.asarray(std, np.float32).reshape(-1, 1)

    def __call__(self, image: Image.Image) -> Any:
        if image.mode != "RGB" or len(self.mean) != 3:  # (load_image gives RGB; the rest goes the general way)
            from torchvision.transforms import functional as F

            tensor = F.normalize(F.to_tensor(image), list(self.mean), list(self.std))
            return tensor.numpy() if self.as_array else tensor
        pixels = np.asarray(image)
        out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
        for channel in range(3):
            np.take(self._table[channel], pixels[..., channel], out=out[channel])
        if self.as_array:
            return out
        import torch

        return torch.from_numpy(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


class RandomRot90:
    """A rotation by a random multiple of 90 degrees (lossless: no interpolation, no corners)."""

    _TURNS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)

    def __call__(self, image: Image.Image) -> Image.Image:
        import torch  # (its generator: seeded with the rest of training's randomness)

        turn = self._TURNS[int(torch.randint(4, ()))]
        return image if turn is None else image.transpose(turn)


def build_batch_mix(num_classes: int, mixup: float, cutmix: float) -> Callable[..., tuple[torch.Tensor, torch.Tensor]] | None:
    """``mix(images, targets) -> (mixed images, soft targets)`` for a training batch: MixUp with
    ``mixup`` (its Beta's alpha), CutMix with ``cutmix``, one of the two per batch when both are
    given (torchvision.transforms.v2); None when both are 0."""
    from torchvision.transforms import v2

    mixes = [mix(alpha=alpha, num_classes=num_classes) for mix, alpha in ((v2.MixUp, mixup), (v2.CutMix, cutmix)) if alpha > 0]
    if not mixes:
        return None
    return mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)


def tta_views(batch: np.ndarray, mode: str) -> list[np.ndarray]:
    """The views of a preprocessed batch (N, C, H, W) that test-time augmentation scores: the
    batch itself; with ``flip`` its mirror image too; with ``flip+rot90`` each of the 8 flips and
    quarter turns (square crops keep their shape). Views are numpy views, not copies."""
    if mode == "none":
        return [batch]
    mirrored = np.flip(batch, 3)
    if mode == "flip":
        return [batch, mirrored]
    return [np.rot90(view, k, axes=(2, 3)) for view in (batch, mirrored) for k in range(4)]


def model_view(tensor: torch.Tensor, cfg: PreprocessConfig) -> Image.Image:
    """The image as the model saw it: an eval pipeline's output (C, H, W), un-normalised."""
    import torch

    mean = torch.tensor(cfg.mean).view(3, 1, 1)
    std = torch.tensor(cfg.std).view(3, 1, 1)
    pixels = (tensor.detach().float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), mode="RGB")


class _RefuseElongated:
    """Resizing the short side of a very elongated image (say 1x80000) can make it enormous."""

    def __init__(self, resize_size: int, max_pixels: int):
        self.resize_size, self.max_pixels = resize_size, max_pixels

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if self.resize_size**2 * max(width, height) / max(min(width, height), 1) > self.max_pixels:
            raise ImageError(
                f"image too elongated ({width}x{height}): it would exceed {self.max_pixels:,} pixels once resized"
            )
        return image


def load_image(path: str | os.PathLike[str], max_pixels: int | None = None) -> Image.Image:
    """Decode ``path`` as an upright RGB image, or raise :class:`ImageError` with the reason.

    Grayscale, palette, alpha, CMYK and 16-bit images are converted, not rejected; EXIF
    orientation is applied; images over ``max_pixels`` (decompression bombs) are refused before
    their pixels are decoded.
    """
    limit = max_pixels or PreprocessConfig().max_pixels
    handle = _open_file(path) if isinstance(path, (str, bytes, os.PathLike)) else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # PIL's complaints about damaged metadata ("Corrupt EXIF data"): the image is scored,
            # or refused with its reason, either way; a bare warning naming no file helps nobody.
            warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
            with Image.open(path if handle is None else handle) as image:
                width, height = image.size
                if width * height > limit:
                    raise ImageError(f"image too large: {width}x{height} pixels (limit {limit:,})")
                image.load()
                image = _upright(image)
                return _to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"image too large: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"corrupt or truncated image: {exc}") from None
    except Exception as exc:  # PIL's parsers, fed a damaged file, raise TypeError, IndexError...
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise ImageError(f"corrupt image ({type(exc).__name__}{': ' + detail if detail else ''})") from None
    finally:
        if handle is not None:
            handle.close()


def _open_file(path: str | bytes | os.PathLike) -> BinaryIO:
    """Open ``path`` for reading without blocking on a named pipe that has no writer (one in a
    folder of images would hang the whole run; opened this way it reads as empty, and is refused
    as not an image), while a pipe that has one (``<(curl ...)``) is read as before."""
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise _open_error(exc) from None
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise ImageError("is a directory, not an image")
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_OPEN_ERRORS = {
    FileNotFoundError: "file not found",
    IsADirectoryError: "is a directory, not an image",
    PermissionError: "permission denied",
}


def _open_error(exc: OSError) -> ImageError:
    reason = next((text for kind, text in _OPEN_ERRORS.items() if isinstance(exc, kind)), None)
    return ImageError(reason or f"cannot open: {exc.strerror or exc}")  # a symlink loop, a name too long...


def _upright(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF must not cost the user an otherwise good image
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        # PIL's convert() would clip everything above 255 to white. Integer modes come from 16-bit
        # PNG/TIFF files (PIL opens many as plain "I"), so their range is 0..65535 whatever the
        # content: a fixed scale keeps brightness from depending on the brightest pixel.
        # One float32 working copy, scaled in place: at the pixel limit each float64 copy of the
        # image would cost 716 MB.
        pixels = np.array(image, dtype=np.float32)
        np.nan_to_num(pixels, copy=False)  # NaN (a damaged float image) is black, not undefined
        if image.mode == "F":
            scale = 255.0 if pixels.max(initial=0.0) <= 1.0 else 1.0  # float images: [0, 1] or [0, 255]
        else:
            scale = 255.0 / 65535.0
        pixels *= scale
        np.clip(pixels, 0, 255, out=pixels)
        return Image.fromarray(pixels.astype(np.uint8), mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
