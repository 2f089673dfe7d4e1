"""cnnkit.distributed: sharded sampling, and real 2-process data-parallel training on the CPU
(torchrun, gloo backend)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cnnkit.data.folders import load_splits
from cnnkit.data.samplers import EpochSampler, RepeatedSampler, SeededDraws, epoch_seed
from cnnkit.data.transforms import build_transforms, load_image
from cnnkit.errors import ConfigError
from cnnkit.models.checkpoint import load_checkpoint

from helpers import TINY_TRAIN_ARGS, read_metrics, tiny_train_config, write_class_images

# --- sampling ---------------------------------------------------------------------------------


def _shards(size: int, world: int, **kwargs) -> list[list[int]]:
    shards = []
    for rank in range(world):
        sampler = EpochSampler(size, rank=rank, world_size=world, **kwargs)
        sampler.set_epoch(3)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1])
    return shards


def test_evaluation_shards_cover_every_image_exactly_once():
    shards = _shards(7, 2, shuffle=False, pad=False)
    assert sorted(shards[0] + shards[1]) == list(range(7))
    assert [len(s) for s in shards] == [4, 3]


def test_training_shards_are_padded_to_equal_length_and_shuffled_per_epoch():
    shards = _shards(7, 3, shuffle=True, seed=5)
    assert [len(s) for s in shards] == [3, 3, 3]
    assert set().union(*map(set, shards)) == set(range(7))
    sampler = EpochSampler(7, shuffle=True, seed=5)
    sampler.set_epoch(3)
    third = list(sampler)
    sampler.set_epoch(4)
    assert list(sampler) != third  # a new order every epoch...
    sampler.set_epoch(3)
    assert list(sampler) == third  # ...that is a function of (seed, epoch) alone: resume repeats it
    assert epoch_seed(5, 3) != epoch_seed(5, 4)


def test_seeded_draws_give_each_place_in_the_epoch_a_seed_shared_by_its_shards():
    whole = EpochSampler(7, shuffle=True, seed=5)
    whole.set_epoch(3)
    draws = list(SeededDraws(whole))
    assert [index for index, _ in draws] == list(whole) and len(SeededDraws(whole)) == 7
    assert len({seed for _, seed in draws}) == 7  # a seed per draw, not per image
    shards = []
    for rank in range(2):
        shard = EpochSampler(7, shuffle=True, seed=5, rank=rank, world_size=2, pad=False)
        shard.set_epoch(3)
        shards.append(list(SeededDraws(shard)))
    assert sorted(shards[0] + shards[1]) == sorted(draws)  # rank r takes places r, r + 2, ...
    whole.set_epoch(4)
    assert {seed for _, seed in SeededDraws(whole)}.isdisjoint({seed for _, seed in draws})
    repeated = RepeatedSampler(EpochSampler(3, seed=1), epochs=2)
    repeated.set_epoch(1)
    assert len({seed for _, seed in SeededDraws(repeated)}) == 6


def test_weighted_sampler_draws_by_weight():
    sampler = EpochSampler(4, seed=0, weights=[1.0, 1.0, 1.0, 0.0])
    draws = [i for epoch in range(50) for i in (sampler.set_epoch(epoch), list(sampler))[1]]
    assert 3 not in draws and len(draws) == 200
    assert min(np.bincount(draws, minlength=3)[:3]) > 40


def test_nproc_under_torchrun_is_a_config_error(image_folder, tmp_path, monkeypatch):
    from cnnkit.training import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="--nproc starts torchrun itself"):
        train(tiny_train_config(image_folder, tmp_path, nproc=2))


# --- two real processes -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> Path:
    """7 validation images: 2 ranks get shards of 4 and 3, where a padded sampler would repeat one."""
    root = tmp_path_factory.mktemp("odd-data")
    rng = np.random.default_rng(11)
    for colour, n_valid in (("blue", 3), ("green", 2), ("red", 2)):
        write_class_images(root / "train" / colour, colour, 6, rng)
        write_class_images(root / "valid" / colour, colour, n_valid, rng)
    return root


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CNNKIT_DEBUG", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(TORCH_HOME=str(tmp_path / "torch-home"), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _whole_set_accuracy(checkpoint: Path, data: Path) -> float:
    """Accuracy of a checkpoint on every validation image, in this one process."""
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model()
    transform = build_transforms(ckpt.preprocess, train=False)
    valid = load_splits(str(data)).valid
    with torch.inference_mode():
        predicted = model(torch.stack([transform(load_image(p)) for p, _ in valid])).argmax(1)
    return (predicted == torch.tensor([t for _, t in valid])).float().mean().item()


def test_torchrun_two_processes_gloo(odd_folder, tmp_path):
    save_dir = tmp_path / "run"
    args = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "cnnkit", "train", str(odd_folder), *TINY_TRAIN_ARGS, "--batch-size", "3", "--epochs", "2",
        "--save-dir", str(save_dir),
        # the recipe's options too: each process augments and mixes its own batches
        "--augment", "trivial", "--random-erase", "0.25", "--mixup", "0.2", "--cutmix", "1.0", "--label-smoothing", "0.1",
    ]
    done = subprocess.run(args, capture_output=True, text=True, env=_env(tmp_path), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 alone wrote the outputs and reported: one checkpoint of each kind, one log.
    assert sorted(p.name for p in save_dir.iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl"]
    assert done.stdout.count("best validation accuracy") == 1
    assert done.stderr.count("epoch 2/2") == 1 and "x 2 processes" in done.stderr
    rows = read_metrics(save_dir / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2]
    last = load_checkpoint(save_dir / "last.pt")
    assert last.summary["processes"] == 2 and last.summary["valid_images"] == 7
    # The validation accuracy is over all 7 images (a count of sevenths), and is the whole
    # set's accuracy of the final model, as one process computes it.
    assert round(rows[-1]["val_acc"] * 7, 4) == round(rows[-1]["val_acc"] * 7)
    assert rows[-1]["val_acc"] == pytest.approx(_whole_set_accuracy(save_dir / "last.pt", odd_folder), abs=1e-6)


def test_nproc_launches_two_processes_with_the_feature_cache(odd_folder, tmp_path, monkeypatch):
    from cnnkit.training import train

    for key, value in _env(tmp_path).items():
        monkeypatch.setenv(key, value)
    cfg = tiny_train_config(odd_folder, tmp_path / "run", freeze=True, fine_tune=1, epochs=2, batch_size=3, nproc=2)
    result = train(cfg)
    assert result.fine_tune_from == 2 and result.epochs == 3
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[-1]["val_acc"] == pytest.approx(_whole_set_accuracy(tmp_path / "run" / "last.pt", odd_folder), abs=1e-6)
    assert len(list((tmp_path / "run" / "feature_cache").glob("*.npy"))) == 2
