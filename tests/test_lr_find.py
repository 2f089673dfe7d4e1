"""cnnkit.lr_find: the learning-rate range test, and the lr-find command."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.models import get_model

from cnnkit.config import LRFindConfig
from cnnkit.errors import ConfigError, OutputError
from cnnkit.training.lr_find import format_result, lr_find, lr_schedule, smooth, suggest

from helpers import tiny_train_config


def test_schedule_grows_exponentially_between_the_bounds():
    lrs = lr_schedule(1e-6, 1.0, 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert [b / a for a, b in zip(lrs, lrs[1:])] == pytest.approx([10.0] * 6)


def test_smoothing_is_bias_corrected():
    assert smooth([2.0] * 5) == pytest.approx([2.0] * 5)  # no pull towards 0 at the start
    noisy = smooth([1.0, 3.0] * 50)
    assert max(noisy[-10:]) - min(noisy[-10:]) < 0.1


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    lrs = lr_schedule(1e-6, 10.0, 141)
    x = np.log10(lrs)
    # Flat, a fall centred on 1e-3 (steepest there), a minimum near 1e-1, then divergence.
    loss = 2.0 - 1.5 / (1 + np.exp(-(x + 3) * 4)) + np.where(x > -1, (x + 1) ** 2 * 5, 0.0)
    suggestion = suggest(lrs, list(loss))
    assert suggestion == pytest.approx(1e-3, rel=0.15)
    assert suggest(lrs, list(2.0 + x)) is None  # a loss that only rises: nothing to suggest
    assert suggest(lrs[:4], [1.0, 0.9, 0.8, 0.7]) is None


def test_config_checks_the_range():
    with pytest.raises(ConfigError, match="--start-lr"):
        LRFindConfig(tiny_train_config("d", "s"), start_lr=1.0, end_lr=0.1)
    with pytest.raises(ConfigError, match="--steps"):
        LRFindConfig(tiny_train_config("d", "s"), steps=3)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "mobilenet.pth"
    torch.save(get_model("mobilenet_v3_small", weights=None).state_dict(), path)
    return path


def test_range_test_on_cached_features_plots_and_suggests(image_folder, weights_file, tmp_path):
    train_cfg = tiny_train_config(image_folder, tmp_path, arch="mobilenet_v3_small", weights=str(weights_file))
    result = lr_find(LRFindConfig(train_cfg, start_lr=1e-5, end_lr=10.0, steps=60))
    assert 10 <= len(result.lrs) <= 60 and len(result.losses) == len(result.smoothed) == len(result.lrs)
    assert result.lrs == pytest.approx(lr_schedule(1e-5, 10.0, 60)[: len(result.lrs)])
    assert all(math.isfinite(v) for v in result.losses[:10])
    # a seeded run whose smoothed loss falls before it rises: a suggestion, on the falling part
    lowest = min(range(len(result.smoothed)), key=result.smoothed.__getitem__)
    assert result.suggestion is not None and result.suggestion == suggest(result.lrs, result.smoothed)
    assert result.lrs[0] < result.suggestion <= result.lrs[lowest]
    assert (tmp_path / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "feature_cache").glob("train-*.npy"))  # cnnkit train will reuse it
    assert not (tmp_path / "best.pt").exists()  # nothing else is written
    text = format_result(result)
    assert "learning rate" in text and "lr_find.png" in text
    with pytest.raises(OutputError, match="lr_find.png exists"):
        lr_find(LRFindConfig(train_cfg, steps=10))


def test_many_passes_over_a_small_folder_share_one_loader_iterator(image_folder, tmp_path, monkeypatch):
    """18 images in batches of 6 give 3 steps an epoch: 12 steps are 4 passes over the folder, in
    one iterator, so its worker process starts once (it used to start again for every pass)."""
    from torch.utils.data import DataLoader

    iterators = []
    real = DataLoader.__iter__
    monkeypatch.setattr(DataLoader, "__iter__", lambda self: iterators.append(self.num_workers) or real(self))
    train_cfg = tiny_train_config(image_folder, tmp_path, workers=1)  # resnet18 from scratch, decoded images
    result = lr_find(LRFindConfig(train_cfg, start_lr=1e-6, end_lr=1e-3, steps=12, plot=False))
    assert len(result.losses) == 12 and not result.diverged
    assert iterators == [1]  # one training iterator with its one worker; no validation pass
