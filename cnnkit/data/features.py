"""Backbone features computed once, for training a head on a frozen backbone.

A frozen backbone in eval mode is a fixed function of its input, and without augmentation its
input is fixed too (the deterministic eval transform), so its output for an image never changes:
computing it every epoch is waste. :func:`load_or_build` computes the features of a list of
images once and keeps them in a ``.npy`` file (read back memory-mapped) whose name is a hash of
everything they depend on: the backbone's actual weights, the preprocessing, the numeric mode,
and every file's path, size and modification time. A changed, added or removed image, other
weights or another crop size give another key, so stale features are never served.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import EVAL_FIELDS, PreprocessConfig
from ..distributed import DistContext
from ..errors import DataError, OutputError
from ..models.build import head_module
from .folders import ImageDataset, Sample, collate
from .samplers import EpochSampler
from .transforms import build_transforms

log = logging.getLogger(__name__)

CACHE_DIR = "feature_cache"  # inside the run's save dir


@dataclass
class FeatureSet:
    """Features (N, D) of N images in sample order, with their targets."""

    features: torch.Tensor  # float32; memory-mapped when it was read from a cache file
    targets: torch.Tensor  # int64 class indices
    key: str
    path: str | None  # the cache file, when there is one
    built: bool  # computed by this call (False: read from the cache)

    def __len__(self) -> int:
        return len(self.targets)


def file_fingerprint(paths: Sequence[str]) -> list[tuple[str, int, int]]:
    """(absolute path, size, mtime in ns) of each file; (path, -1, -1) for a missing one."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((os.path.abspath(path), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((os.path.abspath(path), -1, -1))
    return out


def backbone_digest(model: nn.Module, arch: str) -> str:
    """SHA-256 of every backbone parameter and buffer (the head excluded), names and bytes."""
    head_tensors = {id(t) for t in head_module(model, arch).state_dict(keep_vars=True).values()}
    digest = hashlib.sha256()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in head_tensors:
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(arch: str, backbone: str, preprocess: PreprocessConfig, files: Sequence[tuple], mode: dict[str, Any]) -> str:
    """A short hash of everything the features of ``files`` depend on."""
    payload = {
        "format": 1,
        "arch": arch,
        "backbone": backbone,
        "preprocess": {name: getattr(preprocess, name) for name in EVAL_FIELDS},  # (the eval pipeline's)
        "mode": mode,
        "files": [list(f) for f in files],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


@contextmanager
def _head_removed(model: nn.Module, arch: str) -> Iterator[None]:
    """The model outputs what its head receives: the head swapped for an identity meanwhile
    (the head is the last thing every supported family applies)."""
    head = head_module(model, arch)
    path = next(name for name, module in model.named_modules() if module is head)
    model.set_submodule(path, nn.Identity())
    try:
        yield
    finally:
        model.set_submodule(path, head)


@torch.inference_mode()
def compute_features(
    model: nn.Module,
    arch: str,
    samples: Sequence[Sample],
    preprocess: PreprocessConfig,
    out: np.ndarray,
    *,
    device: torch.device,
    batch_size: int,
    workers: int,
    ctx: DistContext,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    desc: str = "features",
) -> None:
    """Write the backbone features of ``samples`` (eval transform) into the rows of ``out``.

    With several processes each computes its shard and the rows are exchanged, so every rank
    ends with all of them.
    """
    sampler = EpochSampler(len(samples), shuffle=False, rank=ctx.rank, world_size=ctx.world_size, pad=True)
    dataset = ImageDataset.from_samples(samples, build_transforms(preprocess, train=False), preprocess.max_pixels)
    loader = DataLoader(
        _Indexed(dataset), batch_size=batch_size, sampler=sampler, num_workers=workers,
        collate_fn=_collate_indexed, pin_memory=device.type == "cuda",
    )
    was_training = model.training
    model.eval()
    try:
        with _head_removed(model, arch):
            bar = tqdm(loader, desc=desc, leave=False, disable=not (progress and ctx.is_main), unit="batch",
                       dynamic_ncols=True)
            for images, indices, errors in bar:
                bad = [e for e in errors if e]
                if bad:
                    raise DataError(f"cannot read image {bad[0][0]}: {bad[0][1]}; remove or fix the file")
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                autocast = (
                    torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
                )
                with autocast:
                    features = model(images)
                features = features.float().flatten(1)
                features, indices = ctx.gather_rows(features, indices)
                out[indices.numpy()] = features.cpu().numpy()
    finally:
        model.train(was_training)


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, dataset: ImageDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return (*self.dataset[index], index)


def _collate_indexed(batch):
    images, _, errors = collate([item[:3] for item in batch])
    return images, torch.tensor([item[3] for item in batch]), errors


def load_or_build(
    name: str,
    model: nn.Module,
    arch: str,
    samples: Sequence[Sample],
    preprocess: PreprocessConfig,
    in_features: int,
    cache_dir: str | None,
    *,
    device: torch.device,
    batch_size: int,
    workers: int,
    ctx: DistContext,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: bool = True,
    digest: str | None = None,
) -> FeatureSet:
    """The features of ``samples``: from ``cache_dir/NAME-KEY.npy`` when it exists, else
    computed (and written there by rank 0, atomically, replacing older ``NAME-*.npy`` files).
    With ``cache_dir=None`` they are computed and kept in memory only."""
    mode = {
        "device": device.type,
        "autocast": str(autocast_dtype) if autocast_dtype is not None else None,
        "channels_last": channels_last,
        "torch": torch.__version__.split("+")[0],
    }
    digest = digest or backbone_digest(model, arch)
    key = cache_key(arch, digest, preprocess, file_fingerprint([p for p, _ in samples]), mode)
    targets = torch.tensor([t for _, t in samples], dtype=torch.int64)
    shape = (len(samples), in_features)
    path = os.path.join(cache_dir, f"{name}-{key}.npy") if cache_dir else None
    cached = _read(path, shape) if path else None
    if path and ctx.all_true(cached is not None):
        return FeatureSet(torch.from_numpy(cached), targets, key, path, built=False)  # type: ignore[arg-type]

    write = path is not None and ctx.is_main
    tmp = f"{path}.{os.getpid()}.tmp" if write else None
    if write:
        try:
            os.makedirs(cache_dir, exist_ok=True)  # type: ignore[arg-type]
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        except OSError as exc:
            raise OutputError(f"cannot write the feature cache in {cache_dir}: {exc.strerror or exc}") from None
    else:
        out = np.empty(shape, dtype=np.float32)
    try:
        compute_features(
            model, arch, samples, preprocess, out, device=device, batch_size=batch_size, workers=workers, ctx=ctx,
            autocast_dtype=autocast_dtype, channels_last=channels_last, progress=progress, desc=f"caching {name} features",
        )
        if write:
            out.flush()  # type: ignore[union-attr]
            del out
            os.replace(tmp, path)  # type: ignore[arg-type]
            _remove_stale(cache_dir, name, keep=path)  # type: ignore[arg-type]
            out = _read(path, shape)  # type: ignore[arg-type, assignment]
    except BaseException:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return FeatureSet(torch.from_numpy(out), targets, key, path, built=True)


def _read(path: str | None, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached array, memory-mapped copy-on-write (so torch may wrap it), or None."""
    if path is None or not os.path.exists(path):
        return None
    try:
        array = np.load(path, mmap_mode="c")
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable feature cache %s (%s)", path, exc)
        return None
    if array.shape != shape or array.dtype != np.float32:
        log.warning("ignoring feature cache %s: shape %s, expected %s", path, array.shape, shape)
        return None
    return array


def _remove_stale(cache_dir: str, name: str, keep: str) -> None:
    for old in glob.glob(os.path.join(cache_dir, f"{name}-*.npy")):
        if os.path.abspath(old) != os.path.abspath(keep):
            try:
                os.unlink(old)
            except OSError:
                pass


class FeatureBatches(torch.utils.data.Dataset):
    """Batches of cached features, indexed by a list of sample indices (a BatchSampler's)."""

    def __init__(self, features: FeatureSet):
        self.features = features.features
        self.targets = features.targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, indices: list[int]):
        index = torch.as_tensor(indices, dtype=torch.int64)
        return self.features[index], self.targets[index], [None] * len(indices)


def feature_loader(features: FeatureSet, sampler: EpochSampler, batch_size: int, generator: torch.Generator | None = None) -> DataLoader:
    """A loader of ``(features, targets, errors)`` batches in ``sampler``'s order."""
    from torch.utils.data import BatchSampler

    return DataLoader(
        FeatureBatches(features),
        sampler=BatchSampler(sampler, batch_size, drop_last=False),
        batch_size=None,
        collate_fn=_identity,
        generator=generator,
    )


def _identity(batch):
    return batch
