"""The DataLoaders of a run's phases: decoded images (augmented or not), or, while a frozen
backbone's head trains without augmentation, the backbone's cached features."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import PreprocessConfig
from ..data import features
from ..data.folders import ImageDataset, Splits, collate
from ..data.samplers import EpochSampler, SeededDraws
from ..data.transforms import build_transforms
from ..distributed import DistContext
from ..models.build import HeadSpec
from ..runtime import default_workers
from .recipe import HEAD, Recipe, balanced_class_weights

log = logging.getLogger(__name__)


class RunLoaders:
    """Loaders for each phase of one run, in the order of its (seed, epoch)-driven samplers."""

    def __init__(self, recipe: Recipe, ctx: DistContext, splits: Splits, preprocess: PreprocessConfig):
        cfg = recipe.cfg
        self.recipe, self.ctx, self.splits, self.preprocess = recipe, ctx, splits, preprocess
        self.device = ctx.device
        self.workers = default_workers(cfg.workers)
        # The loaders draw their workers' base seed from this generator, not from the global one
        # (whose stream drives dropout and mixing). Augmentation has seeds of its own (SeededDraws).
        self.generator = torch.Generator()
        targets = [t for _, t in splits.train]
        weights = None
        if cfg.sampler == "balanced":
            weights = balanced_class_weights(targets, len(splits.classes))[torch.as_tensor(targets)]
        self.train_sampler: torch.utils.data.Sampler = EpochSampler(
            len(splits.train), shuffle=True, seed=cfg.seed, weights=weights, rank=ctx.rank, world_size=ctx.world_size
        )
        self.valid_sampler = EpochSampler(
            len(splits.valid), shuffle=False, rank=ctx.rank, world_size=ctx.world_size, pad=False
        )
        self.features: dict[str, features.FeatureSet] = {}
        self.cache_seconds = 0.0  # the one-off feature computation, counted in the next epoch's time
        self._whole_valid: DataLoader | None = None
        self._whole_train: DataLoader | None = None

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.recipe.cfg.save_dir, features.CACHE_DIR)

    def set_epoch(self, epoch: int, seed: int) -> None:
        self.generator.manual_seed(seed)
        self.train_sampler.set_epoch(epoch)

    def image_loader(
        self, samples: list, sampler: Any, augment: bool, generator: torch.Generator | None = None
    ) -> DataLoader:
        """A loader of decoded images (``augment``: each with its draw's own seed). Its worker
        processes persist from one epoch to the next: forking them afresh every epoch doubled the
        README demo's epoch time on 2 cores (most of the difference was system time)."""
        transform = build_transforms(self.preprocess, train=augment)
        if augment:
            sampler = SeededDraws(sampler)
        return DataLoader(
            ImageDataset.from_samples(samples, transform, self.preprocess.max_pixels),
            batch_size=self.recipe.cfg.batch_size, sampler=sampler, num_workers=self.workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda", generator=generator, persistent_workers=self.workers > 0,
        )

    def for_phase(self, phase: str, model: nn.Module, head: HeadSpec) -> tuple[DataLoader, DataLoader]:
        """(train, validation) loaders for ``phase``: on cached features in a cached head phase."""
        if phase == HEAD and self.recipe.caches_features:
            if not self.features:
                self._cache_features(model, head)
            return (
                features.feature_loader(self.features["train"], self.train_sampler, self.recipe.cfg.batch_size,
                                        self.generator),
                features.feature_loader(self.features["valid"], self.valid_sampler, self.recipe.cfg.batch_size),
            )
        self.features.clear()  # fine-tuning changes the backbone: the cached features are stale
        return (
            self.image_loader(self.splits.train, self.train_sampler, self.recipe.augment(phase), self.generator),
            self.image_loader(self.splits.valid, self.valid_sampler, augment=False),
        )

    def whole_validation(self) -> DataLoader:
        """The whole validation set as images, unsharded (rank 0 computes statistics alone)."""
        if self._whole_valid is None:
            whole = EpochSampler(len(self.splits.valid), shuffle=False)
            self._whole_valid = self.image_loader(self.splits.valid, whole, augment=False)
        return self._whole_valid

    def whole_train(self) -> DataLoader:
        """The whole training set as unaugmented images, in order, unsharded (open-set statistics)."""
        if self._whole_train is None:
            self._whole_train = self.image_loader(self.splits.train, EpochSampler(len(self.splits.train), shuffle=False),
                                                  augment=False)
        return self._whole_train

    def take_cache_seconds(self) -> float:
        seconds, self.cache_seconds = self.cache_seconds, 0.0
        return seconds

    def _cache_features(self, model: nn.Module, head: HeadSpec) -> None:
        recipe, cfg = self.recipe, self.recipe.cfg
        digest = features.backbone_digest(model, cfg.arch)
        start = time.perf_counter()
        for name, samples in (("train", self.splits.train), ("valid", self.splits.valid)):
            self.features[name] = features.load_or_build(
                name, model, cfg.arch, samples, self.preprocess, head.in_features, self.cache_dir,
                device=self.device, batch_size=cfg.batch_size, workers=self.workers, ctx=self.ctx,
                autocast_dtype=recipe.autocast_dtype, channels_last=recipe.channels_last,
                progress=cfg.progress, digest=digest,
            )
        built = [n for n, f in self.features.items() if f.built]
        self.cache_seconds = time.perf_counter() - start
        if self.ctx.is_main:
            log.info(
                "backbone features: %s%s in %.1fs",
                f"computed and cached ({', '.join(built)})" if built else "read from the cache",
                f", reused ({', '.join(n for n in self.features if n not in built)})" if built and len(built) < 2 else "",
                self.cache_seconds,
            )
