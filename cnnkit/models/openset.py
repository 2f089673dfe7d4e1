"""Open-set statistics: how far an image's features are from every class the model was trained on.

At the end of training :func:`fit_open_set` takes one pass over the training images (eval
preprocessing, no gradient; :func:`fit_open_set_on_features` reuses a frozen backbone's cached
features of them instead) and keeps, for the penultimate features (the backbone's output, the
head's input), the mean of each class and the inverse Cholesky factor of their shared
covariance (the Mahalanobis detector of Lee et al. 2018), and the mean and inverse factor of one
Gaussian of all the training features, the *background*. A new image's distance is its relative
Mahalanobis distance (Ren et al. 2021): the squared distance to the nearest class mean less the
squared distance to the background, which cancels what every class shares (the directions in
which all flowers vary) and leaves what tells the classes apart. Ren et al. made it for unknowns
that look like the known classes, which is what a user's stray images usually are; on flowers-20
it separated 5 held-out classes better than the plain distance on every split it was read on
(benchmarks/RESULTS.md). Statistics of version 1 (no background) keep the plain distance.

The *known score* that ``--abstain`` thresholds combines it with the top-1 confidence: each is
standardised (mean and standard deviation on the validation images) and the score is
``z(confidence) - z(distance)``, higher for an image more like the training classes. Both signals
fail differently (confidence is high for a confidently-wrong image of an unseen class; the
distance is large for an unusual but correctly classified image), and a sum of z-scores needs no
fitting on unknown images, which a user rarely has. On the 696 photos of flowers-20's 5 held-out
classes the sum had a higher AUROC than either signal alone (benchmarks/RESULTS.md).

Everything is a plain dict of floats and float32 tensors, so a checkpoint still loads with
``weights_only=True``; :func:`open_set_to_json` / :func:`open_set_from_json` carry it in an
export's JSON metadata.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import math
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .build import head_module

log = logging.getLogger(__name__)

OPEN_SET_VERSION = 2  # 2: with the background Gaussian (relative distance); 1: without
# Wider features (VGG's and AlexNet's flattened conv maps: 25,088 and 9,216 values) are averaged
# over contiguous groups down to this many, so each stored D x D factor stays <= 16 MiB.
MAX_FEATURES = 2048
# Ridge added to both covariances, relative to their mean variance: with fewer training images
# than feature dimensions a sample covariance is singular (sklearn is not in the lock, so no
# Ledoit-Wolf shrinkage). 0.01: on flowers-20's held-out classes 0.05 did worse, and 0.001 was
# within 0.005 AUROC of it with a near-singular covariance damped ten times less
# (benchmarks/unknown_select.py).
RIDGE = 0.01
_HEAD_CHUNK = 4096  # features through the head at a time (a large validation set stays in memory bounds)
TENSOR_KEYS = ("means", "precision_factor", "background_mean", "background_factor")


def reduce_features(features: torch.Tensor) -> torch.Tensor:
    """``[B, ...]`` features as ``[B, D]`` float64, D <= :data:`MAX_FEATURES`."""
    flat = features.detach().flatten(1).float()
    if flat.shape[1] > MAX_FEATURES:
        flat = F.adaptive_avg_pool1d(flat[:, None, :], MAX_FEATURES)[:, 0, :]
    return flat.double()


@contextlib.contextmanager
def capture_features(model: nn.Module, arch: str) -> Iterator[list[torch.Tensor]]:
    """While open, each forward pass of ``model`` appends its head's input (reduced) to the list."""
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(reduce_features(inputs[0]).cpu())

    handle = head_module(model, arch).register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def standardise(values: np.ndarray) -> dict[str, float]:
    return {"mean": float(values.mean()), "std": float(max(values.std(), 1e-6))}


class OpenSetScorer:
    """Distances of features to the training classes, and the known score (see the module doc)."""

    def __init__(self, stats: Mapping[str, Any]):
        self.stats = stats
        self.factor_t = stats["precision_factor"].double().T
        self.whitened_means = stats["means"].double() @ self.factor_t  # [C, D]
        self.relative = "background_factor" in stats
        if self.relative:
            self.background_factor_t = stats["background_factor"].double().T
            self.whitened_background = stats["background_mean"].double() @ self.background_factor_t  # [D]

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Each row of ``[B, D]``'s relative Mahalanobis distance (squared, to the nearest class
        mean, less squared, to the background: negative where an image is nearer its class than
        the background); with version-1 statistics its Mahalanobis distance (not squared) to the
        nearest class mean."""
        features = features.double()
        z = features @ self.factor_t
        squared = (z[:, None, :] - self.whitened_means[None]).pow(2).sum(dim=2).min(dim=1).values
        if not self.relative:
            return squared.clamp(min=0).sqrt()
        return squared - (features @ self.background_factor_t - self.whitened_background).pow(2).sum(dim=1)

    def known_scores(self, confidence: np.ndarray, distance: np.ndarray) -> np.ndarray:
        """``z(confidence) - z(distance)``: higher is more like the training classes."""
        conf, dist = self.stats["confidence"], self.stats["distance"]
        return (np.asarray(confidence) - conf["mean"]) / conf["std"] - (np.asarray(distance) - dist["mean"]) / dist["std"]


def _inverse_factor(cov: torch.Tensor, ridge: float) -> torch.Tensor:
    """Lower-triangular ``F`` (float32) with ``F.T @ F`` the inverse of ``cov`` plus ``ridge`` times
    its mean variance."""
    scale = float(torch.diagonal(cov).mean()) or 1.0
    lower = torch.linalg.cholesky(cov + ridge * scale * torch.eye(len(cov), dtype=torch.float64))
    return torch.linalg.solve_triangular(lower, torch.eye(len(cov), dtype=torch.float64), upper=False).float()


def gaussian_fit(features: torch.Tensor, targets: torch.Tensor, num_classes: int,
                 ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means ``[C, D]`` and the lower-triangular ``F`` with ``F.T @ F`` the inverse of the
    shared (within-class, ridged) covariance; both float32. A class with no image gets the mean
    of all features (it then never is the nearest for long)."""
    features = features.double()
    means = features.mean(dim=0).repeat(num_classes, 1)
    centred = torch.empty_like(features)
    for c in range(num_classes):
        mask = targets == c
        if bool(mask.any()):
            means[c] = features[mask].mean(dim=0)
        centred[mask] = features[mask] - means[c]
    cov = centred.T @ centred / max(len(features) - num_classes, 1)
    return means.float(), _inverse_factor(cov, ridge)


def background_fit(features: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean ``[D]`` and inverse covariance factor (as :func:`gaussian_fit`'s) of one Gaussian
    of all ``features``, whatever their class: the background of the relative distance."""
    features = features.double()
    mean = features.mean(dim=0)
    centred = features - mean
    return mean.float(), _inverse_factor(centred.T @ centred / max(len(features), 1), ridge)


@torch.inference_mode()
def _features_and_confidence(model: nn.Module, arch: str, loader: Iterable,
                             device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    feats, targets, confidence = [], [], []
    with capture_features(model, arch) as captured:
        for images, batch_targets, errors in loader:
            if images is None:
                continue
            log_probs = model(images.to(device)).float()
            decoded = torch.as_tensor([e is None for e in errors], dtype=torch.bool)
            targets.append(torch.as_tensor(batch_targets)[decoded])
            confidence.append(log_probs.exp().max(dim=1).values.cpu().double())
            feats.append(captured.pop())
    if not feats:
        return torch.empty(0), torch.empty(0, dtype=torch.long), torch.empty(0)
    return torch.cat(feats), torch.cat(targets).long(), torch.cat(confidence)


def fit_open_set(model: nn.Module, arch: str, train_loader: Iterable, valid_loader: Iterable,
                 num_classes: int, device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """Open-set statistics of ``model`` (see the module doc): one pass over ``train_loader`` for the
    Gaussian fit, one over ``valid_loader`` for the standardisation. Loaders yield
    ``(images, targets, errors)`` as :func:`cnnkit.data.collate` makes them. None without images.
    The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        feats, targets, _ = _features_and_confidence(model, arch, train_loader, device)
        valid_feats, _, valid_conf = _features_and_confidence(model, arch, valid_loader, device)
    finally:
        model.train(was_training)
    return open_set_statistics(feats, targets, valid_feats, valid_conf, num_classes)


@torch.inference_mode()
def fit_open_set_on_features(head: nn.Module, train_features: torch.Tensor, train_targets: torch.Tensor,
                             valid_features: torch.Tensor, num_classes: int,
                             device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The statistics of :func:`fit_open_set` from the head's inputs already computed (a frozen
    backbone's cached features of the same images), with no pass over the images; ``head`` maps
    them to log-probabilities. Its train/eval mode is restored."""
    was_training = head.training
    head.eval()
    try:
        valid_conf = torch.cat([
            head(chunk.to(device)).float().exp().max(dim=1).values.cpu().double()
            for chunk in valid_features.split(_HEAD_CHUNK)
        ]) if len(valid_features) else torch.empty(0)
    finally:
        head.train(was_training)
    return open_set_statistics(reduce_features(train_features), train_targets.long(),
                               reduce_features(valid_features), valid_conf, num_classes)


def open_set_statistics(feats: torch.Tensor, targets: torch.Tensor, valid_feats: torch.Tensor,
                        valid_conf: torch.Tensor, num_classes: int) -> dict[str, Any] | None:
    """The statistics from the training images' features ``[N, D]`` and class indices, and the
    validation images' features and top-1 confidences (standardisation); None without training
    features. Without validation images the training features standardise the distance."""
    if len(feats) == 0:
        return None
    means, factor = gaussian_fit(feats, targets, num_classes)
    background_mean, background_factor = background_fit(feats)
    stats: dict[str, Any] = {"version": OPEN_SET_VERSION, "images": len(feats), "ridge": RIDGE,
                             "means": means, "precision_factor": factor,
                             "background_mean": background_mean, "background_factor": background_factor}
    if len(valid_feats) == 0:
        valid_feats, valid_conf = feats, None
    distance = OpenSetScorer(stats).distances(valid_feats).numpy()
    confidence = valid_conf.numpy() if valid_conf is not None else np.ones_like(distance)
    stats.update(confidence=standardise(confidence), distance=standardise(distance))
    return stats


def check_open_set(stats: Any, num_classes: int) -> dict[str, Any] | None:
    """``stats`` if usable for a model of ``num_classes`` classes, else None (with a log line)."""
    if stats is None:
        return None
    try:
        ok = _usable(stats, num_classes)
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        log.warning("the model's open-set statistics are not usable by this cnnkit; unknown detection uses confidence alone")
        return None
    return dict(stats)


def _usable(stats: Mapping[str, Any], num_classes: int) -> bool:
    means, version = stats["means"], stats.get("version")
    if version not in (1, OPEN_SET_VERSION) or not isinstance(means, torch.Tensor) or means.dim() != 2:
        return False
    dim = means.shape[1]
    shapes = {"means": (num_classes, dim), "precision_factor": (dim, dim)}
    if version != 1:
        shapes.update(background_mean=(dim,), background_factor=(dim, dim))
    return (
        all(isinstance(stats[k], torch.Tensor) and tuple(stats[k].shape) == shape for k, shape in shapes.items())
        and all(math.isfinite(stats[k][s]) and stats[k]["std"] > 0 for k in ("confidence", "distance")
                for s in ("mean", "std"))
    )


def open_set_to_json(stats: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The statistics as JSON values (tensors as base64 float32 with their shape)."""
    if stats is None:
        return None
    out = dict(stats)
    for key in (k for k in TENSOR_KEYS if k in stats):  # (version 1: no background)
        tensor = stats[key].detach().to(torch.float32).contiguous()
        out[key] = {"shape": list(tensor.shape),
                    "float32_base64": base64.b64encode(tensor.numpy().tobytes()).decode("ascii")}
    return out


def open_set_from_json(meta: Any) -> dict[str, Any] | None:
    """Inverse of :func:`open_set_to_json`; None for anything else (checked later by :func:`check_open_set`)."""
    if not isinstance(meta, Mapping):
        return None
    out = dict(meta)
    try:
        for key in (k for k in TENSOR_KEYS if k in meta or k in TENSOR_KEYS[:2]):  # (version 1: no background)
            raw = base64.b64decode(meta[key]["float32_base64"])
            out[key] = torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).reshape(meta[key]["shape"])
    except (KeyError, TypeError, ValueError, RuntimeError):
        return None
    return out
