"""Datasets: labelled ImageFolder trees for training, plain path lists for inference.

Free of torch at import (scoring an export never loads it): :class:`ImageDataset` is a map-style
dataset by duck typing, and :func:`collate` imports torch when it makes tensors.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import DataError, ImageError
from .transforms import is_image_file, load_image

log = logging.getLogger(__name__)

Sample = tuple[str, int]  # (image path, class index)


@dataclass(frozen=True)
class Splits:
    """Training and validation samples over one sorted list of class folder names."""

    classes: list[str]
    train: list[Sample]
    valid: list[Sample]
    description: str  # where the validation set came from, for the log and the checkpoint

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}


def walk_images(folder: str) -> list[str]:
    """The image files under ``folder`` (recursed; hidden files and folders skipped), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(os.path.join(dirpath, f) for f in filenames if is_image_file(f) and not f.startswith("."))
    return sorted(found)


def scan_image_folder(root: str) -> tuple[list[str], list[Sample]]:
    """Class names (sorted sub-folder names) and (path, class index) samples of an ImageFolder."""
    if not os.path.isdir(root):
        raise DataError(f"not a folder: {root}")
    classes = sorted(e.name for e in os.scandir(root) if _is_dir(e) and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    samples: list[Sample] = []
    for index, name in enumerate(classes):
        images = walk_images(os.path.join(root, name))
        if not images:
            raise DataError(f"class folder {os.path.join(root, name)} has no images")
        samples.extend((path, index) for path in images)
    return classes, samples


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop (ELOOP) or an unreadable link is not a class folder
        return False


def _split_dir(root: str, names: Sequence[str]) -> str | None:
    return next((os.path.join(root, n) for n in names if os.path.isdir(os.path.join(root, n))), None)


def load_splits(data_dir: str, val_split: float = 0.2, seed: int = 0) -> Splits:
    """Training and validation samples from ``data_dir``.

    ``data_dir`` is either a root with ``train/`` and ``valid/`` (or ``val/``) ImageFolders
    (``test/`` is left alone), or an ImageFolder itself, from which a seeded, stratified
    ``val_split`` share of each class is held out for validation.
    """
    if not os.path.exists(data_dir):
        raise DataError(f"DATA_DIR not found: {data_dir}")
    if not os.path.isdir(data_dir):
        raise DataError(f"DATA_DIR is not a folder: {data_dir}")
    train_dir = _split_dir(data_dir, ("train",))
    valid_dir = _split_dir(data_dir, ("valid", "val", "validation"))
    if train_dir and valid_dir:
        classes, train = scan_image_folder(train_dir)
        valid_classes, valid = scan_image_folder(valid_dir)
        if valid_classes != classes:
            only_train = sorted(set(classes) - set(valid_classes))
            only_valid = sorted(set(valid_classes) - set(classes))
            raise DataError(
                f"classes of {valid_dir} differ from {train_dir}: "
                f"only in train: {only_train or 'none'}; only in validation: {only_valid or 'none'}"
            )
        return Splits(classes, train, valid, f"validation set {valid_dir}")
    if train_dir and not valid_dir:
        data_dir = train_dir  # a train/ without valid/: split it
    classes, samples = scan_image_folder(data_dir)
    train, valid = stratified_split(samples, val_split, seed)
    return Splits(classes, train, valid, f"{val_split:.0%} of {data_dir} held out (seed {seed})")


def stratified_split(samples: Sequence[Sample], val_split: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out ``val_split`` of each class (at least one image where a class has two or more)."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    rng = random.Random(seed)
    train: list[Sample] = []
    valid: list[Sample] = []
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n_val = min(len(items) - 1, max(1, round(len(items) * val_split))) if len(items) > 1 else 0
        valid.extend(items[:n_val])
        train.extend(items[n_val:])
    if not valid:
        raise DataError("too few images to hold out a validation set: give each class at least 2 images")
    return sorted(train), sorted(valid)


class ImageDataset:
    """Yields ``(tensor or None, target, (path, reason) or None)``; targets default to indices.
    (What ``transform`` gives: a tensor, or an array from an eval pipeline built with ``arrays=True``.)

    A bad file never raises inside a DataLoader worker (where the reason would be buried in a
    re-raised traceback): its item carries the reason, and the caller decides what it means,
    an error row in inference, a DataError naming the file in training.
    """

    def __init__(
        self,
        paths: Sequence[str],
        transform: Callable,
        targets: Sequence[int] | None = None,
        max_pixels: int | None = None,
    ):
        self.paths = paths
        self.targets = targets
        self.transform = transform
        self.max_pixels = max_pixels

    @classmethod
    def from_samples(cls, samples: Sequence[Sample], transform: Callable, max_pixels: int | None = None):
        return cls([p for p, _ in samples], transform, [t for _, t in samples], max_pixels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Any, int, tuple[str, str] | None]:
        """Item ``item``, or for ``(index, seed)`` (a seeded sampler's draw) item ``index``
        transformed with torch's random generator seeded by ``seed`` (the caller's generator
        state is left as it was)."""
        if isinstance(item, tuple):
            import torch

            index, seed = item
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self[index]
        index = item
        target = index if self.targets is None else self.targets[index]
        path = self.paths[index]
        try:
            return self.transform(load_image(path, self.max_pixels)), target, None
        except ImageError as exc:
            return None, target, (path, str(exc))


def collate_arrays(batch: list[tuple[Any, int, tuple[str, str] | None]]):
    """``(good images stacked in one numpy array or None, targets of all items, errors of all
    items)``, in order. Stacked by numpy, single-threaded: torch.stack of a batch this size would
    start an OpenMP team of its own in the thread that decodes beside a model (runtime.prefetch)."""
    arrays = [np.asarray(t) for t, _, _ in batch if t is not None]
    return (np.stack(arrays) if arrays else None), np.array([t for _, t, _ in batch]), [e for _, _, e in batch]


def collate(batch: list[tuple[Any, int, tuple[str, str] | None]]):
    """:func:`collate_arrays` as torch tensors (sharing the arrays' memory): a DataLoader's batches."""
    import torch

    images, targets, errors = collate_arrays(batch)
    return (torch.from_numpy(images) if images is not None else None), torch.from_numpy(targets), errors


def batched(dataset: Any, batch_size: int) -> Iterator[Any]:
    """``dataset``'s items in :func:`collate_arrays` batches, in order, decoded in this thread (a
    DataLoader without workers)."""
    for start in range(0, len(dataset), batch_size):
        yield collate_arrays([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


def expand_inputs(inputs: Iterable[str], stdin: Iterable[str] | None = None) -> Iterator[str]:
    """Image paths from files, folders (recursed, images only, sorted) and ``-`` (paths on stdin).

    A named file is passed through even when it is missing or its extension is not an image's,
    so that it gets an error row rather than silently vanishing.
    """
    for item in inputs:
        if item == "-":
            for line in stdin if stdin is not None else sys.stdin:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line
        elif os.path.isdir(item):
            images = walk_images(item)
            if not images:
                log.warning("no images in folder %s", item)
            yield from images
        else:
            yield item  # a missing or unreadable file becomes an error row, like any bad image


def load_category_names(path: str, classes: Sequence[str] | None = None) -> dict[str, str]:
    """A JSON object of class label → human-readable name, checked against ``classes``."""
    try:
        with open(path, encoding="utf-8-sig") as handle:  # a byte-order mark (Windows editors) is fine
            names = json.load(handle)
    except FileNotFoundError:
        raise DataError(f"category names file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read category names {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"category names {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise DataError(f"category names {path} is not a label-to-name object: its JSON is nested too deeply") from None
    if not isinstance(names, dict) or not all(isinstance(v, str) for v in names.values()):
        raise DataError(f"category names {path} must be a JSON object of label to name strings")
    if classes is not None:
        missing = [c for c in classes if c not in names]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise DataError(f"category names {path} has no name for classes: {shown}")
        names = {c: names[c] for c in classes}
    return {str(k): v for k, v in names.items()}
