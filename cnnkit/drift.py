"""Drift signals: reference statistics of the validation set, and how far live traffic is from them.

At train time :func:`reference_statistics` summarises what the model saw and said on the
validation set: the share of images predicted as each class, a histogram of top-1 confidence,
and the per-channel mean/std of the (preprocessed) input pixels plus a histogram of per-image
brightness. The summary is plain lists and floats, stored in the checkpoint (``reference_stats``)
so it still loads with ``weights_only=True``.

At serving time :class:`DriftMonitor` keeps a window of recent images and reports the
population-stability index (PSI) of each signal against the reference. The usual reading of PSI:
below 0.1 no real change, 0.1-0.25 a moderate shift, above 0.25 a major one. With few images in
the window, or many classes, PSI is noisy: it is reported only once the window holds
``min_images`` images.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

STATS_VERSION = 1
CONFIDENCE_EDGES = tuple(round(i / 10, 1) for i in range(11))  # 10 bins over [0, 1]
BRIGHTNESS_BINS = 10  # quantile bins of the reference's per-image brightness
SIGNALS = ("class", "confidence", "brightness")
_EPS = 1e-4  # floor for empty bins, so PSI stays finite


def image_brightness(batch: torch.Tensor) -> torch.Tensor:
    """Per-image mean of a batch of preprocessed images (normalised pixel units), shape ``[B]``."""
    return batch.float().mean(dim=(1, 2, 3))


def _confidence_histogram(confidences: np.ndarray) -> np.ndarray:
    # Interior edges only, so 1.0 falls in the last bin and 0.0 in the first.
    return np.bincount(np.searchsorted(CONFIDENCE_EDGES[1:-1], confidences, side="right"),
                       minlength=len(CONFIDENCE_EDGES) - 1)


def _shares(counts: np.ndarray) -> list[float]:
    total = int(counts.sum())  # plain Python numbers only: checkpoints load with weights_only=True
    return [int(c) / total for c in counts] if total else [0.0] * len(counts)


@torch.inference_mode()
def reference_statistics(
    model: nn.Module, loader: Iterable, device: torch.device | str = "cpu", num_classes: int | None = None
) -> dict[str, Any] | None:
    """Reference statistics of ``model`` (log-probability outputs, as cnnkit's models) on ``loader``.

    ``loader`` yields ``(images, targets, errors)`` batches as :func:`cnnkit.data.collate` makes
    them (``images`` may be None when a whole batch failed to decode; such items are skipped).
    Returns None when the loader holds no image. The model's train/eval mode is restored.
    """
    was_training = model.training
    model.eval()
    predicted: list[np.ndarray] = []
    confidences: list[np.ndarray] = []
    brightness: list[np.ndarray] = []
    channel_sum = torch.zeros(3, dtype=torch.float64)
    channel_sq = torch.zeros(3, dtype=torch.float64)
    pixels_per_channel = 0
    try:
        for batch in loader:
            images = batch[0]
            if images is None:
                continue
            probs = model(images.to(device)).float().exp().cpu()
            top = probs.max(dim=1)
            num_classes = num_classes or probs.shape[1]
            predicted.append(top.indices.numpy())
            confidences.append(top.values.numpy())
            images = images.double()
            brightness.append(image_brightness(images).numpy())
            channel_sum += images.sum(dim=(0, 2, 3))
            channel_sq += (images * images).sum(dim=(0, 2, 3))
            pixels_per_channel += images.shape[0] * images.shape[2] * images.shape[3]
    finally:
        model.train(was_training)
    if not predicted:
        return None
    classes = np.concatenate(predicted)
    conf = np.concatenate(confidences)
    bright = np.concatenate(brightness)
    mean = channel_sum / pixels_per_channel
    std = (channel_sq / pixels_per_channel - mean * mean).clamp(min=0).sqrt()
    # Quantile edges make the reference's brightness histogram about flat: every bin informative.
    edges = np.unique(np.quantile(bright, np.linspace(0, 1, BRIGHTNESS_BINS + 1)[1:-1]))
    return {
        "version": STATS_VERSION,
        "images": int(len(classes)),
        "class_distribution": _shares(np.bincount(classes, minlength=num_classes)),
        "confidence_edges": [float(e) for e in CONFIDENCE_EDGES],
        "confidence_distribution": _shares(_confidence_histogram(conf)),
        "brightness_edges": [float(e) for e in edges],
        "brightness_distribution": _shares(np.bincount(np.searchsorted(edges, bright, side="right"),
                                                       minlength=len(edges) + 1)),
        "pixel_mean": [float(v) for v in mean],
        "pixel_std": [float(v) for v in std],
    }


def psi(expected: Iterable[float], actual: Iterable[float]) -> float:
    """Population-stability index between two distributions over the same bins (shares or counts)."""
    e = np.asarray(list(expected), dtype=np.float64)
    a = np.asarray(list(actual), dtype=np.float64)
    if e.shape != a.shape or e.size == 0:
        raise ValueError(f"PSI needs two distributions over the same bins, got {e.size} and {a.size}")
    e = np.maximum(e / max(e.sum(), 1e-12), _EPS)
    a = np.maximum(a / max(a.sum(), 1e-12), _EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def reference_confidence_mean(stats: Mapping[str, Any]) -> float:
    """The reference's mean top-1 confidence, from its histogram (each bin at its midpoint: within
    half a bin, 0.05, of the exact mean), for comparing live traffic's mean with."""
    edges, shares = stats["confidence_edges"], stats["confidence_distribution"]
    total = sum(shares)
    return sum((lo + hi) / 2 * share for lo, hi, share in zip(edges, edges[1:], shares)) / total if total else 0.0


def check_reference(stats: Any, num_classes: int) -> dict[str, Any] | None:
    """``stats`` if it is a usable reference for ``num_classes`` classes, else None (with a log line)."""
    if stats is None:
        return None
    try:
        ok = (
            isinstance(stats, Mapping)
            and stats.get("version") == STATS_VERSION
            and len(stats["class_distribution"]) == num_classes
            and len(stats["confidence_distribution"]) == len(CONFIDENCE_EDGES) - 1
            and len(stats["brightness_distribution"]) == len(stats["brightness_edges"]) + 1
        )
    except (KeyError, TypeError):
        ok = False
    if not ok:
        log.warning("the model's reference statistics are not usable by this cnnkit; drift is not reported")
        return None
    return dict(stats)


class DriftMonitor:
    """PSI of a window of recent images against reference statistics. Thread-safe."""

    def __init__(self, reference: Mapping[str, Any], window: int = 1000, min_images: int | None = None):
        self.reference = reference
        self.window = window
        self.min_images = min(window, 100) if min_images is None else min_images
        self._brightness_edges = np.asarray(reference["brightness_edges"], dtype=np.float64)
        self._recent: deque[tuple[int, float, float]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._recent)

    def add(self, classes: Iterable[int], confidences: Iterable[float], brightness: Iterable[float]) -> None:
        with self._lock:
            self._recent.extend(zip(classes, confidences, brightness))

    def psi(self) -> dict[str, float]:
        """PSI per signal (``class``, ``confidence``, ``brightness``); empty while the window is short."""
        with self._lock:
            if len(self._recent) < max(self.min_images, 1):
                return {}
            rows = np.asarray(self._recent, dtype=np.float64)
        ref = self.reference
        classes = np.bincount(rows[:, 0].astype(np.int64), minlength=len(ref["class_distribution"]))
        confidence = _confidence_histogram(rows[:, 1])
        brightness = np.bincount(np.searchsorted(self._brightness_edges, rows[:, 2], side="right"),
                                 minlength=len(self._brightness_edges) + 1)
        values = {
            "class": psi(ref["class_distribution"], classes),
            "confidence": psi(ref["confidence_distribution"], confidence),
            "brightness": psi(ref["brightness_distribution"], brightness),
        }
        return {k: v for k, v in values.items() if math.isfinite(v)}
