"""Sampling an epoch: a pure function of (seed, epoch, rank), so a resumed run repeats it."""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of every random choice in ``epoch``: a resumed run repeats it exactly."""
    return seed * 100_003 + epoch


def draw_seed(epoch_seed: int, position: int) -> int:
    """The seed of the random choices (augmentation) made for the ``position``-th draw of an epoch."""
    return (epoch_seed * 1_000_003 + position) % 2**63


class EpochSampler(Sampler[int]):
    """Indices of one epoch for one rank, a pure function of (seed, epoch, rank).

    DistributedSampler's scheme (one permutation shared by all ranks, padded to a multiple of
    the world size, rank ``r`` taking every ``world_size``-th index from ``r``), plus weighted
    draws (``--sampler balanced``) and unpadded shards for evaluation (``pad=False``), where a
    repeated image would be counted twice. With one process it is a plain shuffle.

    :meth:`draws` pairs each index with a seed of its own (:class:`SeededDraws`).
    """

    def __init__(
        self,
        size: int,
        shuffle: bool = True,
        seed: int = 0,
        weights: Sequence[float] | torch.Tensor | None = None,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> list[int]:
        if self.weights is None and not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator()
        generator.manual_seed(epoch_seed(self.seed, self.epoch))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.size, replacement=True, generator=generator).tolist()
        return torch.randperm(self.size, generator=generator).tolist()

    def draws(self) -> Iterator[tuple[int, int]]:
        """This rank's ``(index, seed)`` pairs: each seed is :func:`draw_seed` of the draw's place
        in the epoch's order (so the same for any number of loader workers)."""
        order = self._order()
        if self.world_size > 1 and self.pad and order:
            total = math.ceil(len(order) / self.world_size) * self.world_size
            order = (order * math.ceil(total / len(order)))[:total]
        base = epoch_seed(self.seed, self.epoch)
        return ((order[p], draw_seed(base, p)) for p in range(self.rank, len(order), self.world_size))

    def __iter__(self) -> Iterator[int]:
        return (index for index, _ in self.draws())

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.size
        if self.pad:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))


class RepeatedSampler(Sampler[int]):
    """``epochs`` consecutive epochs of ``sampler`` (each its own (seed, epoch) order) as one:
    for a loader iterated many times over a small set (lr-find), so one iterator, and its worker
    processes, serve them all."""

    def __init__(self, sampler: EpochSampler, epochs: int):
        self.sampler, self.epochs, self.epoch = sampler, max(1, epochs), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def draws(self) -> Iterator[tuple[int, int]]:
        for i in range(self.epochs):
            self.sampler.set_epoch((self.epoch - 1) * self.epochs + i + 1)
            yield from self.sampler.draws()

    def __iter__(self) -> Iterator[int]:
        return (index for index, _ in self.draws())

    def __len__(self) -> int:
        return self.epochs * len(self.sampler)


class SeededDraws(Sampler[tuple[int, int]]):
    """A sampler's ``(index, seed)`` draws (:meth:`EpochSampler.draws`), for a loader of
    :class:`~cnnkit.data.folders.ImageDataset` that augments: each image is transformed with
    torch's generator seeded by its draw's seed, so its augmentation is the same whichever
    process decodes it, the main one or any of the loader's workers, fresh or kept from the
    epoch before, and a resumed run repeats it."""

    def __init__(self, sampler: EpochSampler | RepeatedSampler):
        self.sampler = sampler

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self.sampler.draws()

    def __len__(self) -> int:
        return len(self.sampler)
