"""The train and lr-find commands' issue-4 flags: each maps to its TrainConfig field, the help
says what caching implies, and --help stays instant."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torchvision.models import get_model

import cnnkit.training
from cnnkit.cli import main


def invoke(args):
    return CliRunner().invoke(main, [str(a) for a in args], prog_name="cnnkit")


def test_help_is_instant_and_says_augmentation_cannot_apply_to_cached_features():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, cnnkit.cli; print('torch' in sys.modules)"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.stdout.strip() == "False"
    text = " ".join(invoke(["train", "--help"]).output.split())
    assert "Augmentation cannot apply to cached features, so --augment turns this off" in text
    for flag in ("--fine-tune", "--fine-tune-lr", "--early-stop", "--clip-grad", "--class-weights", "--sampler",
                 "--weight-decay", "--warmup", "--amp", "--mlflow", "--nproc", "--cache-features"):
        assert flag in text
    assert "torchrun --nproc-per-node" in text


@pytest.fixture
def captured(monkeypatch):
    seen = []

    def fake_train(cfg):
        seen.append(cfg)
        raise KeyboardInterrupt  # stop before anything runs; exit 130

    monkeypatch.setattr(cnnkit.training, "train", fake_train)
    return seen


def test_train_flags_map_to_config_fields(captured, tmp_path):
    result = invoke([
        "train", tmp_path, "--fine-tune", "3", "--fine-tune-lr", "2e-5", "--early-stop", "4", "--clip-grad", "1.5",
        "--class-weights", "balanced", "--weight-decay", "0.05", "--warmup", "0.5", "--scheduler", "step",
        "--no-augment", "--no-cache-features", "--amp", "--mlflow", "--nproc", "2",
        "--train-size-ratio", "0.75", "--min-scale", "0.25",
    ])
    assert result.exit_code == 130
    (cfg,) = captured
    assert (cfg.fine_tune, cfg.fine_tune_lr, cfg.early_stop, cfg.clip_grad) == (3, 2e-5, 4, 1.5)
    assert (cfg.class_weights, cfg.sampler, cfg.weight_decay, cfg.warmup, cfg.scheduler) == (
        "balanced", "shuffle", 0.05, 0.5, "step")
    assert (cfg.augment, cfg.cache_features, cfg.amp, cfg.mlflow, cfg.nproc) == ("none", False, True, True, 2)
    assert (cfg.train_size_ratio, cfg.min_scale) == (0.75, 0.25)
    assert cfg.epochs is None  # not given: 5 for a new run, the run's own when resuming


def test_defaults_leave_the_choices_to_the_engine(captured, tmp_path):
    invoke(["train", tmp_path])
    (cfg,) = captured
    assert (cfg.augment, cfg.cache_features, cfg.amp, cfg.freeze) == (None, None, None, None)
    assert (cfg.scheduler, cfg.fine_tune, cfg.early_stop, cfg.clip_grad) == ("cosine", 0, None, None)


def test_contradictory_flags_are_one_line_usage_errors(tmp_path):
    result = invoke(["train", tmp_path, "--cache-features", "--augment"])
    assert result.exit_code == 2 and "--cache-features" in result.output
    result = invoke(["train", tmp_path, "--class-weights", "balanced", "--sampler", "balanced"])
    assert result.exit_code == 2 and "choose one" in result.output


def test_lr_find_command(image_folder, tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "mobilenet.pth"
    torch.save(get_model("mobilenet_v3_small", weights=None).state_dict(), weights)
    env = {"TORCH_HOME": str(tmp_path / "torch-home"), "PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "cnnkit", "lr-find", str(image_folder), "--arch", "mobilenet_v3_small",
         "--weights", str(weights), "--image-size", "32", "--resize-size", "36", "--batch-size", "6",
         "--workers", "0", "--device", "cpu", "--hidden-units", "32", "--start-lr", "1e-5", "--steps", "60",
         "--save-dir", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=180,
    )
    assert done.returncode == 0, done.stderr
    assert "smoothed loss" in done.stdout
    # the seeded range test of test_lr_find.py, through the command: its loss falls, then rises
    suggested = re.search(r"^suggested learning rate: (\S+) \(steepest descent", done.stdout, re.MULTILINE)
    assert suggested and 1e-5 < float(suggested.group(1)) < 10.0, done.stdout
    assert "no suggestion" not in done.stdout
    assert "feature caching on" in done.stderr
    assert (tmp_path / "out" / "lr_find.png").exists()
