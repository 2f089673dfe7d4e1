"""Shared fixtures: tiny learnable image folders, a category-names file and one trained run.

Everything is small on purpose (3 classes, 40x48 images, 32 px crops, resnet18 from scratch with
a 32-unit head) so the whole suite runs in a few minutes on two CPU cores, with no network.
Session-scoped fixtures are shared: tests must treat their files as read-only (copy first).
Plain helpers (image makers, the tiny TrainConfig, the CLI runner) are in helpers.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import urllib.error
from pathlib import Path
from typing import Any, Callable

import pytest

from helpers import (
    CLASSES,
    INITIAL_SEED,
    NAMES,
    TrainedRun,
    cli_subprocess_env,
    interrupt_training_call,
    make_flat_folder,
    make_split_folder,
    tiny_train_config,
)

# --- hypothesis profiles --------------------------------------------------------------------
# "ci" (the default) keeps every fuzz harness within its share of a one-minute budget on two
# cores; `pytest --hypothesis-profile=long` runs 20x more examples (docs/RELIABILITY.md). Tests
# size their own budgets as multiples of the loaded profile's max_examples (see fuzz_budget in
# fuzz_helpers.py), so the profile scales all of them. No example database: runs are reproducible
# from the seed hypothesis prints on failure, and the tree stays clean.
try:
    from hypothesis import HealthCheck
    from hypothesis import settings as _hypothesis_settings

    _FUZZ = dict(database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    _hypothesis_settings.register_profile("ci", max_examples=100, **_FUZZ)
    _hypothesis_settings.register_profile("long", max_examples=2000, **_FUZZ)
    _hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # hypothesis is in the test extra; without it only the fuzz tests skip
    pass

# --- data fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """DATA_DIR with train/ (6 per class) and valid/ (2 per class); read-only for tests."""
    return make_split_folder(tmp_path_factory.mktemp("split-data"))


@pytest.fixture(scope="session")
def flat_folder(tmp_path_factory) -> Path:
    """An ImageFolder without train/valid: 8 images in each of the 3 class folders; read-only."""
    return make_flat_folder(tmp_path_factory.mktemp("flat-data"))


@pytest.fixture(scope="session")
def category_names(tmp_path_factory) -> Path:
    """cat_to_name.json for the three colour classes."""
    path = tmp_path_factory.mktemp("names") / "cat_to_name.json"
    path.write_text(json.dumps(NAMES), encoding="utf-8")
    return path


@pytest.fixture
def image_folder_copy(image_folder, tmp_path) -> Path:
    """A private, modifiable copy of the split data set."""
    return Path(shutil.copytree(image_folder, tmp_path / "data"))


@pytest.fixture
def sample_images(image_folder) -> list[Path]:
    """One validation image per class, in class order (blue, green, red)."""
    return [sorted((image_folder / "valid" / c).iterdir())[0] for c in CLASSES]


# --- training fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def trained(tmp_path_factory, image_folder, category_names) -> TrainedRun:
    """One 3-epoch run (with category names), shared by the predict/checkpoint/CLI tests.

    ``build_transforms`` is spied on, so tests can compare inference with what training used.
    """
    import torch

    import cnnkit.training.loaders as loaders_module
    from cnnkit.training import train

    save_dir = tmp_path_factory.mktemp("trained")
    cfg = tiny_train_config(image_folder, save_dir, category_names=str(category_names))
    preprocess: dict[bool, Any] = {}
    pipelines: dict[bool, Callable] = {}
    real = loaders_module.build_transforms

    def spy(pre, train):
        pipeline = real(pre, train)
        preprocess[train], pipelines[train] = pre, pipeline
        return pipeline

    # Runs that must start alike (this one and `interrupted`, for the resume test) start from the
    # same global RNG state, whether or not train() seeds the initial weights from cfg.seed
    # itself (test_engine's same-seed test checks that it does).
    torch.manual_seed(INITIAL_SEED)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loaders_module, "build_transforms", spy)
        result = train(cfg)
    return TrainedRun(cfg, result, save_dir, preprocess, pipelines)


@pytest.fixture(scope="session")
def interrupted(trained, tmp_path_factory):
    """The shared run's exact recipe, interrupted (Ctrl-C) during epoch 3's training pass:
    (config, save dir, the Interrupted error). Read-only: copy the folder to resume it."""
    import dataclasses

    import torch

    from cnnkit.errors import Interrupted
    from cnnkit.training import train

    save_dir = tmp_path_factory.mktemp("interrupted")
    cfg = dataclasses.replace(trained.cfg, save_dir=str(save_dir))
    torch.manual_seed(INITIAL_SEED)  # the same initial weights as the shared run
    with pytest.MonkeyPatch.context() as mp:
        interrupt_training_call(mp, 3)
        with pytest.raises(Interrupted) as info:
            train(cfg)
    return cfg, save_dir, info.value


# --- hygiene --------------------------------------------------------------------------------


_PRISTINE_LOGGER = (lambda lg: (list(lg.handlers), lg.level, lg.propagate))(logging.getLogger("cnnkit"))


def _reset_cnnkit_logger() -> None:
    logger = logging.getLogger("cnnkit")
    handlers, level, propagate = _PRISTINE_LOGGER
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate
    logger.disabled = False  # logging.config with disable_existing_loggers (a tool under test)


@pytest.fixture(autouse=True)
def _restore_cnnkit_logger():
    """The CLI reconfigures the 'cnnkit' logger (own stderr handler, no propagation); put it back
    as it was when the suite started, before and after every test, so that caplog works whatever
    ran before (a session fixture that ran the CLI in-process sets up before this fixture, so a
    snapshot taken here could already be the CLI's)."""
    _reset_cnnkit_logger()
    yield
    _reset_cnnkit_logger()


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """No test may download anything: torch hub's downloads fail at once."""
    import torch.hub

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "urlopen", refuse)
    monkeypatch.delenv("CNNKIT_DEBUG", raising=False)


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME, so that no pretrained weights are in the hub cache."""
    home = tmp_path / "torch-home"
    home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def cli_env(tmp_path) -> dict[str, str]:
    """Environment for ``python -m cnnkit`` subprocesses (see helpers.cli_subprocess_env)."""
    return cli_subprocess_env(tmp_path / "torch-home")
