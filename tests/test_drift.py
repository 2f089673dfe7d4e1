"""cnnkit.drift: reference statistics at train time, PSI of recent traffic at serving time."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from cnnkit.drift import (
    CONFIDENCE_EDGES,
    DriftMonitor,
    check_reference,
    psi,
    reference_statistics,
)
from cnnkit.models.checkpoint import load_checkpoint


class FixedModel(nn.Module):
    """Log-probabilities that are a fixed function of the input's first pixel (class = its sign)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x[:, 0, 0, 0]
        logits = torch.stack([first * 4, -first * 4, torch.zeros_like(first)], dim=1)
        return torch.log_softmax(logits, dim=1)


def _loader(batches: list[torch.Tensor]):
    return [(b, torch.zeros(0 if b is None else len(b)), [] if b is None else [None] * len(b)) for b in batches]


def test_reference_statistics_summarise_predictions_and_pixels():
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(20, 3, 8, 8, generator=generator) + torch.tensor([0.5, -0.5, 0.0])[None, :, None, None]
    model = FixedModel().train()
    stats = reference_statistics(model, _loader([images[:7], None, images[7:]]))
    assert model.training  # mode restored
    assert stats["images"] == 20
    predicted = torch.log_softmax(FixedModel()(images), 1).argmax(1)
    expected = np.bincount(predicted.numpy(), minlength=3) / 20
    assert stats["class_distribution"] == pytest.approx(expected.tolist())
    assert sum(stats["confidence_distribution"]) == pytest.approx(1.0)
    assert len(stats["confidence_distribution"]) == len(CONFIDENCE_EDGES) - 1
    assert sum(stats["brightness_distribution"]) == pytest.approx(1.0)
    assert stats["pixel_mean"] == pytest.approx(images.mean(dim=(0, 2, 3)).tolist(), abs=1e-6)
    assert stats["pixel_std"] == pytest.approx(images.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-5)
    # plain Python values only, so that checkpoints holding them load with weights_only=True
    flat = [stats[k] for k in stats]
    assert all(type(v) in (int, float, list) for v in flat)
    assert all(type(x) in (int, float) for v in flat if isinstance(v, list) for x in v)


def test_reference_statistics_of_an_empty_loader_is_none():
    assert reference_statistics(FixedModel(), _loader([])) is None


def test_psi_is_zero_for_equal_distributions_and_grows_with_the_shift():
    assert psi([0.2, 0.3, 0.5], [20, 30, 50]) == pytest.approx(0.0, abs=1e-12)
    small = psi([0.2, 0.3, 0.5], [0.25, 0.3, 0.45])
    large = psi([0.2, 0.3, 0.5], [0.6, 0.3, 0.1])
    assert 0 < small < 0.1 < 0.25 < large
    assert math.isfinite(psi([0.5, 0.5, 0.0], [0.0, 0.5, 0.5]))  # empty bins do not blow up
    with pytest.raises(ValueError):
        psi([0.5, 0.5], [1.0])


def _reference() -> dict:
    images = torch.randn(400, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return reference_statistics(FixedModel(), _loader([images]))


def test_drift_monitor_is_quiet_on_like_traffic_and_loud_on_a_shift():
    reference = _reference()
    model = FixedModel()
    same = torch.randn(300, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    shifted = same + 2.0  # brighter images, all predicted as class 0 with high confidence

    def feed(monitor: DriftMonitor, images: torch.Tensor) -> dict[str, float]:
        probs = model(images).exp()
        top = probs.max(1)
        monitor.add(top.indices.tolist(), top.values.tolist(), images.mean(dim=(1, 2, 3)).tolist())
        return monitor.psi()

    quiet = feed(DriftMonitor(reference, window=300), same)
    loud = feed(DriftMonitor(reference, window=300), shifted)
    assert set(quiet) == set(loud) == {"class", "confidence", "brightness"}
    assert all(v < 0.1 for v in quiet.values()), quiet
    assert all(v > 0.25 for v in loud.values()), loud


def test_drift_monitor_waits_for_enough_images_and_keeps_a_window():
    monitor = DriftMonitor(_reference(), window=50, min_images=10)
    monitor.add([0] * 9, [0.9] * 9, [0.0] * 9)
    assert monitor.psi() == {}
    monitor.add([1] * 100, [0.9] * 100, [0.0] * 100)
    assert len(monitor) == 50
    assert monitor.psi()["class"] > 0.25


def test_check_reference_rejects_stats_for_another_model(caplog):
    reference = _reference()
    assert check_reference(reference, 3) == reference
    assert check_reference(None, 3) is None
    assert check_reference(reference, 5) is None  # other number of classes
    assert check_reference({**reference, "version": 99}, 3) is None
    assert check_reference({"version": 1}, 3) is None


def test_training_stores_reference_statistics_in_best_pt_only(trained):
    best = load_checkpoint(trained.best)  # weights_only=True
    stats = best.reference_stats
    assert stats is not None and stats["images"] == best.summary["valid_images"]
    assert len(stats["class_distribution"]) == len(best.classes)
    assert sum(stats["class_distribution"]) == pytest.approx(1.0)
    assert check_reference(stats, len(best.classes)) is not None
    assert load_checkpoint(trained.last).reference_stats is None  # the resume file has none
