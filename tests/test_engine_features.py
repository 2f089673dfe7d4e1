"""Issue 4's training: the feature cache, the fine-tuning phase, the LR schedule, early stopping,
class imbalance, gradient clipping, mixed precision, curves.png and MLflow tracking."""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import get_model

import cnnkit.training.loop as loop
from cnnkit.config import TrainConfig
from cnnkit.data import features
from cnnkit.data.folders import load_splits
from cnnkit.data.transforms import build_transforms, load_image
from cnnkit.distributed import DistContext
from cnnkit.errors import ConfigError, Interrupted
from cnnkit.models.build import build_model, head_module
from cnnkit.models.checkpoint import load_checkpoint
from cnnkit.models.openset import TENSOR_KEYS
from cnnkit.training import train
from cnnkit.training.recipe import balanced_class_weights
from cnnkit.training.schedule import lr_factor
from cnnkit.training.steps import (
    EpochStats,
    make_optimizer,
    optimise,
    training_objective,
)

from helpers import (
    interrupt_training_call,
    read_metrics,
    strip_timing,
    tiny_train_config,
    write_class_images,
)

ARCH = "mobilenet_v3_small"  # small checkpoints: these tests save many


@pytest.fixture(scope="session")
def pretrained_file(tmp_path_factory) -> Path:
    """A state_dict standing in for downloaded pretrained weights (so the backbone is frozen by
    default, and the features cached, as with real pretrained weights)."""
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("weights") / f"{ARCH}-pretrained.pth"
    torch.save(get_model(ARCH, weights=None).state_dict(), path)
    return path


def _config(data, save_dir, **overrides):
    return tiny_train_config(data, save_dir, **{"arch": ARCH, **overrides})


def _frozen_config(data, save_dir, weights, **overrides):
    return _config(data, save_dir, weights=str(weights), **overrides)


@pytest.fixture(scope="module")
def cached_run(image_folder, pretrained_file, tmp_path_factory):
    """A 2-epoch run on a frozen backbone, with the default (cached) recipe: (result, save dir, log)."""
    save_dir = tmp_path_factory.mktemp("cached")
    with _capture() as lines:
        result = train(_frozen_config(image_folder, save_dir, pretrained_file, epochs=2))
    return result, save_dir, "\n".join(lines)


class _capture:
    """Collect the 'cnnkit' log lines of a block (caplog is function-scoped)."""

    def __enter__(self) -> list[str]:
        self.lines: list[str] = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.lines.append(record.getMessage())  # type: ignore[method-assign]
        self.logger = logging.getLogger("cnnkit")
        self.level = self.logger.level
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.INFO)
        return self.lines

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)


@pytest.fixture(scope="module")
def fine_tuned(image_folder, pretrained_file, tmp_path_factory):
    """2 head epochs on cached features, then 2 epochs fine-tuning the whole network."""
    save_dir = tmp_path_factory.mktemp("fine-tuned")
    return train(_frozen_config(image_folder, save_dir, pretrained_file, epochs=2, fine_tune=2, scheduler="none"))


def _cache_files(save_dir: Path, name: str) -> list[Path]:
    return sorted((save_dir / features.CACHE_DIR).glob(f"{name}-*.npy"))


# --- the feature cache ------------------------------------------------------------------------


def test_cached_run_predicts_as_its_head_on_the_full_model(cached_run, image_folder):
    result, save_dir, log_text = cached_run
    assert "feature caching on" in log_text and "--augment" in log_text
    assert [row["epoch"] for row in result.history] == [1, 2]

    # The checkpoint is an ordinary full model: its head applied to the cached features gives
    # what the whole model gives on the images.
    ckpt = load_checkpoint(result.best_checkpoint)
    model = ckpt.build_model()
    splits = load_splits(str(image_folder))
    (valid_file,) = _cache_files(save_dir, "valid")
    cached = torch.from_numpy(np.load(valid_file))
    transform = build_transforms(ckpt.preprocess, train=False)
    images = torch.stack([transform(load_image(path)) for path, _ in splits.valid])
    with torch.inference_mode():
        through_head = head_module(model, ckpt.arch)(cached)
        through_model = model(images)
    torch.testing.assert_close(through_head, through_model, atol=1e-5, rtol=1e-4)
    # ...and the validation accuracy the run reported is that of the full model.
    accuracy = (through_model.argmax(1) == torch.tensor([t for _, t in splits.valid])).float().mean().item()
    assert result.history[result.best_epoch - 1]["val_acc"] == pytest.approx(accuracy, abs=1e-6)
    assert ckpt.summary["feature_cache"] is True and ckpt.reference_stats is not None


def test_cached_and_uncached_training_agree(cached_run, image_folder, pretrained_file, tmp_path):
    cached = cached_run[0]
    direct = train(_frozen_config(image_folder, tmp_path / "direct", pretrained_file, epochs=2, cache_features=False))
    assert not (tmp_path / "direct" / features.CACHE_DIR).exists()
    for a, b in zip(strip_timing(cached.history), strip_timing(direct.history)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-4), key
    a, b = load_checkpoint(cached.last_checkpoint).state_dict, load_checkpoint(direct.last_checkpoint).state_dict
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)
    # best.pt's open-set statistics: the cached run fits them on its cached features, the other
    # on a pass over the images
    a, b = load_checkpoint(cached.best_checkpoint).open_set, load_checkpoint(direct.best_checkpoint).open_set
    assert a["images"] == b["images"] == 18
    for key in TENSOR_KEYS:
        torch.testing.assert_close(a[key], b[key], atol=1e-3, rtol=1e-3)
    for key in ("confidence", "distance"):
        assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-4), key


def test_second_run_reuses_the_cache(cached_run, image_folder, pretrained_file, tmp_path, caplog):
    save_dir = tmp_path / "run"
    shutil.copytree(cached_run[1] / features.CACHE_DIR, save_dir / features.CACHE_DIR)
    files = _cache_files(save_dir, "train") + _cache_files(save_dir, "valid")
    stamps = [f.stat().st_mtime_ns for f in files]
    caplog.set_level(logging.INFO, logger="cnnkit")
    train(_frozen_config(image_folder, save_dir, pretrained_file, epochs=1))
    assert "read from the cache" in caplog.text
    assert _cache_files(save_dir, "train") + _cache_files(save_dir, "valid") == files
    assert [f.stat().st_mtime_ns for f in files] == stamps


def _load(name, model, samples, preprocess, cache_dir):
    return features.load_or_build(
        name, model, ARCH, samples, preprocess, 576, str(cache_dir), device=torch.device("cpu"),
        batch_size=4, workers=0, ctx=DistContext(), progress=False,
    )


def test_a_changed_image_invalidates_the_cache(image_folder_copy, tmp_path):
    from cnnkit.config import PreprocessConfig

    torch.manual_seed(0)  # (the same backbone whatever ran before in the process)
    model, _ = build_model(ARCH, 3, "none", 32, freeze=True)
    preprocess = PreprocessConfig(image_size=32, resize_size=36)
    samples = load_splits(str(image_folder_copy)).train
    first = _load("train", model, samples, preprocess, tmp_path)
    again = _load("train", model, samples, preprocess, tmp_path)
    assert first.built and not again.built and again.key == first.key
    torch.testing.assert_close(again.features, first.features)

    changed = Path(samples[4][0])  # rewrite one image with other pixels
    rng = np.random.default_rng(99)
    Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))  # whatever the clock does, the mtime differs
    after = _load("train", model, samples, preprocess, tmp_path)
    assert after.built and after.key != first.key
    assert sorted(tmp_path.glob("train-*.npy")) == [Path(after.path)]  # the stale file is gone
    # relative, not allclose's absolute 1e-8: a random backbone's features can all be that small
    assert not torch.allclose(after.features[4], first.features[4], rtol=1e-3, atol=0)
    torch.testing.assert_close(after.features[:4], first.features[:4])
    torch.testing.assert_close(after.features[5:], first.features[5:])

    # Other weights or other preprocessing are other keys too.
    other_model, _ = build_model(ARCH, 3, "none", 32, freeze=True)
    assert features.backbone_digest(other_model, ARCH) != features.backbone_digest(model, ARCH)
    bigger = PreprocessConfig(image_size=40, resize_size=44)
    assert _load("train", model, samples, bigger, tmp_path).key != after.key


def test_augment_turns_caching_off(image_folder, pretrained_file, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cnnkit")
    train(_frozen_config(image_folder, tmp_path, pretrained_file, epochs=1, augment=True))
    assert "feature caching on" not in caplog.text
    assert not (tmp_path / features.CACHE_DIR).exists()


def test_cache_features_with_a_trainable_backbone_is_a_config_error(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="--cache-features needs a frozen backbone"):
        train(_config(image_folder, tmp_path, cache_features=True))
    with pytest.raises(ConfigError, match="--augment"):
        TrainConfig("data", cache_features=True, augment=True)


# --- fine-tuning ------------------------------------------------------------------------------


def test_fine_tune_unfreezes_the_backbone_after_the_head_phase(fine_tuned, pretrained_file):
    result = fine_tuned
    rows = read_metrics(result.metrics_file)
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert [row["lr"] for row in rows] == [1e-3, 1e-3, 1e-4, 1e-4]  # --fine-tune-lr: a tenth by default
    assert result.fine_tune_from == 2 and result.epochs == 4
    last = load_checkpoint(result.last_checkpoint)
    assert last.training_state["fine_tune_from"] == 2 and last.training_state["optimizer_phase"] == "fine-tune"
    weights = torch.load(pretrained_file, map_location="cpu", weights_only=True)
    assert not torch.equal(last.state_dict["features.0.0.weight"], weights["features.0.0.weight"])  # it trained
    assert last.summary["fine_tune_from"] == 2


def test_resume_across_the_fine_tune_switch_equals_the_uninterrupted_run(
    fine_tuned, image_folder, pretrained_file, tmp_path, monkeypatch
):
    whole = fine_tuned
    save_dir = tmp_path / "parts"
    recipe = dict(epochs=2, fine_tune=2, scheduler="none")
    with monkeypatch.context() as patch:
        interrupt_training_call(patch, 3)  # Ctrl-C in the first fine-tuning epoch
        with pytest.raises(Interrupted):
            train(_frozen_config(image_folder, save_dir, pretrained_file, **recipe))
    state = load_checkpoint(save_dir / "last.pt").training_state
    assert state["epoch"] == 2 and state["fine_tune_from"] == 2 and state["optimizer_phase"] == "head"
    resumed = train(_frozen_config(image_folder, save_dir, pretrained_file, **recipe, resume=str(save_dir / "last.pt")))
    assert strip_timing(resumed.history) == strip_timing(whole.history)
    a, b = load_checkpoint(whole.last_checkpoint).state_dict, load_checkpoint(resumed.last_checkpoint).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fine_tune_needs_a_frozen_backbone(image_folder, tmp_path):
    with pytest.raises(ConfigError, match="--fine-tune"):
        train(_config(image_folder, tmp_path, fine_tune=2))


# --- schedule, early stopping, imbalance, clipping, precision --------------------------------


def test_lr_factor_warms_up_then_follows_the_schedule():
    assert lr_factor(0, 10, "cosine") == 1.0 and lr_factor(5, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(0, 10, "cosine", warmup=1) == pytest.approx(0.01)
    assert lr_factor(0.5, 10, "cosine", warmup=1) == pytest.approx(0.505)
    assert lr_factor(1, 10, "cosine", warmup=1) == pytest.approx(1.0)
    assert lr_factor(5.5, 10, "cosine", warmup=1) == pytest.approx(0.5)
    assert lr_factor(10, 10, "cosine", warmup=1) == pytest.approx(0.0, abs=1e-12)
    assert [lr_factor(e, 9, "step") for e in (0, 3, 6)] == pytest.approx([1, 0.1, 0.01])
    assert lr_factor(0.0, 9, "none", warmup=1) == 1.0


def test_learning_rate_changes_every_step(image_folder, pretrained_file, tmp_path, monkeypatch):
    seen = []
    real = loop.set_lr
    monkeypatch.setattr(loop, "set_lr", lambda opt, lr: (seen.append(lr), real(opt, lr)))
    train(_frozen_config(image_folder, tmp_path, pretrained_file, epochs=2, warmup=1.0))  # 3 steps per epoch
    assert seen[:3] == pytest.approx([1e-5, 1e-3 * (0.01 + 0.99 / 3), 1e-3 * (0.01 + 0.99 * 2 / 3)])
    assert seen[3] == pytest.approx(1e-3) and seen[3] > seen[4] > seen[5]


def _scripted_validation(monkeypatch, losses):
    """Validation passes report ``losses`` in turn (training passes run for real)."""
    real = loop.run_epoch
    scripted = iter(losses)

    def run(model, loader, device, optimizer=None, *args, **kwargs):
        stats = real(model, loader, device, optimizer, *args, **kwargs)
        if optimizer is None:
            return EpochStats(next(scripted), stats.acc, stats.top5, stats.images, stats.seconds)
        return stats

    monkeypatch.setattr(loop, "run_epoch", run)


def test_early_stop_ends_the_run_after_patience_epochs(image_folder, pretrained_file, tmp_path, monkeypatch, caplog):
    _scripted_validation(monkeypatch, [1.0, 0.9, 0.95, 0.91, 1.2, 0.1, 0.1])
    caplog.set_level(logging.INFO, logger="cnnkit")
    result = train(_frozen_config(image_folder, tmp_path, pretrained_file, epochs=7, early_stop=3))
    assert result.stopped_early == 5 and [row["epoch"] for row in result.history] == [1, 2, 3, 4, 5]
    assert "early stop" in caplog.text
    last = load_checkpoint(result.last_checkpoint)
    assert last.training_state["stopped_early"] == 5 and last.summary["stopped_early"] == 5
    with pytest.raises(ConfigError, match="stopped early"):
        train(_frozen_config(image_folder, tmp_path, pretrained_file, epochs=7, resume=str(tmp_path / "last.pt")))


def test_early_stop_of_the_head_phase_starts_fine_tuning(image_folder, pretrained_file, tmp_path, monkeypatch):
    _scripted_validation(monkeypatch, [1.0, 1.1, 0.5])
    cfg = _frozen_config(image_folder, tmp_path, pretrained_file, epochs=6, fine_tune=1, early_stop=1)
    result = train(cfg)
    assert result.fine_tune_from == 2 and result.epochs == 3 and result.stopped_early is None


def test_balanced_class_weights():
    weights = balanced_class_weights([0, 0, 0, 1, 2, 2], 3)
    torch.testing.assert_close(weights, torch.tensor([6 / 9, 6 / 3, 6 / 6]))
    targets = torch.tensor([0, 1, 2])
    log_probs = torch.full((3, 3), -5.0)
    log_probs[torch.arange(3), targets] = torch.tensor([-1.0, -1.0, -2.0])  # per-image NLL 1, 1, 2
    assert training_objective(log_probs, targets, None).item() == pytest.approx(4 / 3)
    assert training_objective(log_probs, targets, weights).item() == pytest.approx((6 / 9 + 2 + 2) / 3)
    # a soft target weighs by its mix: half class 0, half class 2
    soft = torch.tensor([[0.5, 0.0, 0.5], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    expected = [(0.5 * 1 + 0.5 * 5) * (0.5 * 6 / 9 + 0.5 * 1), 1 * 2, 2 * 1]
    assert training_objective(log_probs, targets, weights, soft).item() == pytest.approx(sum(expected) / 3)


@pytest.fixture(scope="session")
def imbalanced_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imbalanced")
    rng = np.random.default_rng(3)
    for colour, n in (("blue", 10), ("green", 2), ("red", 2)):
        write_class_images(root / "train" / colour, colour, n, rng)
        write_class_images(root / "valid" / colour, colour, 1, rng)
    return root


def test_imbalance_is_warned_about_and_class_weights_reach_the_loss(
    imbalanced_folder, pretrained_file, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="cnnkit")
    used = []
    real = loop.run_epoch

    def spy(*args, **kwargs):
        used.append(kwargs.get("class_weights"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "run_epoch", spy)
    train(_frozen_config(imbalanced_folder, tmp_path / "plain", pretrained_file, epochs=1))
    assert "class imbalance: blue has 10 training images, green only 2 (5x)" in caplog.text
    assert "--class-weights balanced" in caplog.text and used[0] is None
    caplog.clear()
    used.clear()
    train(_frozen_config(imbalanced_folder, tmp_path / "weighted", pretrained_file, epochs=1, class_weights="balanced"))
    torch.testing.assert_close(used[0], torch.tensor([14 / 30, 14 / 6, 14 / 6]))  # training pass
    assert used[1] is None  # the validation loss stays the plain NLL
    assert "consider" not in caplog.text


def test_balanced_sampler_draws_classes_equally_often(imbalanced_folder, pretrained_file, tmp_path, monkeypatch):
    drawn = []
    real = loop.run_epoch

    def spy(model, loader, device, optimizer=None, *args, **kwargs):
        if optimizer is not None:
            sampler = getattr(loader.sampler, "sampler", loader.sampler)  # inside a BatchSampler
            drawn.extend(sampler)  # the epoch's indices (the sampler is set to the epoch)
        return real(model, loader, device, optimizer, *args, **kwargs)

    monkeypatch.setattr(loop, "run_epoch", spy)
    train(_frozen_config(imbalanced_folder, tmp_path, pretrained_file, epochs=1, sampler="balanced"))
    targets = [t for _, t in load_splits(str(imbalanced_folder)).train]
    assert len(drawn) == len(targets)  # an epoch is still one training set's worth of images
    assert sum(targets[i] == 0 for i in drawn) < 10  # blue is 10 of 14 images, drawn about a third


def test_gradient_clipping_bounds_the_norm():
    model = nn.Linear(4, 3)
    optimizer = make_optimizer(model.parameters(), lr=0.0, weight_decay=0.0)
    params = list(model.parameters())
    objective = (model(torch.full((2, 4), 100.0)) ** 2).sum()
    optimise(objective, optimizer, params, clip_grad=0.5)
    norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
    assert norm.item() == pytest.approx(0.5, rel=1e-4)


def test_weight_decay_spares_biases():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    groups = make_optimizer(model.parameters(), 1e-3, 0.05).param_groups
    assert [(len(g["params"]), g["weight_decay"]) for g in groups] == [(1, 0.05), (3, 0.0)]


def test_the_optimizer_is_fused_adamw_and_steps_as_the_looped_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    twin = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    twin.load_state_dict(model.state_dict())
    fused = make_optimizer(model.parameters(), 1e-2, 0.05)
    assert all(group["fused"] for group in fused.param_groups)
    looped = torch.optim.AdamW([{"params": [twin[0].weight], "weight_decay": 0.05},
                                {"params": [twin[0].bias, *twin[1].parameters()], "weight_decay": 0.0}], lr=1e-2)
    for _ in range(5):
        inputs = torch.randn(6, 4)
        for net, optimizer in ((model, fused), (twin, looped)):
            optimizer.zero_grad()
            net(inputs).pow(2).sum().backward()
            optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_amp_on_the_cpu_trains_in_bfloat16(image_folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cnnkit")
    convolutions: list[tuple[bool, torch.dtype]] = []  # (grad mode, output dtype) of every Conv2d call

    def record(module, inputs, output):
        if isinstance(module, nn.Conv2d):
            convolutions.append((torch.is_grad_enabled(), output.dtype))

    hook = nn.modules.module.register_module_forward_hook(record)
    try:
        result = train(_config(image_folder, tmp_path, epochs=1, amp=True))
    finally:
        hook.remove()
    assert "bfloat16 autocast" in caplog.text
    assert {dtype for grad, dtype in convolutions if grad} == {torch.bfloat16}  # every training step's convolutions
    assert math.isfinite(result.history[0]["train_loss"])
    assert all(v.dtype != torch.bfloat16 for v in load_checkpoint(result.best_checkpoint).state_dict.values())


# --- outputs: curves.png, MLflow ------------------------------------------------------------


def test_curves_png_is_written_beside_the_metrics(cached_run):
    result, save_dir, _ = cached_run
    assert (save_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.curves == str(save_dir / "curves.png")


def test_without_matplotlib_training_goes_on_without_curves(image_folder, pretrained_file, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cnnkit.plots", None)  # import fails as if not installed
    result = train(_frozen_config(image_folder, tmp_path, pretrained_file, epochs=1))
    assert result.curves is None and not (tmp_path / "curves.png").exists()
    assert "matplotlib is not installed" in caplog.text


def test_mlflow_logs_params_metrics_and_the_checkpoint(image_folder, pretrained_file, tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 deprecates, but keeps, the file store
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "cnnkit-test")
    save_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_training_call(patch, 3)
        with pytest.raises(Interrupted):
            train(_frozen_config(image_folder, save_dir, pretrained_file, epochs=3, mlflow=True))
    result = train(_frozen_config(image_folder, save_dir, pretrained_file, resume=str(save_dir / "last.pt")))

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("cnnkit-test")
    (run,) = client.search_runs([experiment.experiment_id])  # the resumed run continued it
    assert run.info.status == "FINISHED"
    assert run.data.params["arch"] == ARCH and run.data.params["epochs"] == "3"
    history = client.get_metric_history(run.info.run_id, "val_acc")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([row["val_acc"] for row in result.history])
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"best.pt", "metrics.jsonl", "curves.png"} <= artifacts


def test_mlflow_missing_is_one_clear_config_error(image_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ConfigError, match=r"--mlflow needs MLflow.*pip install 'cnnkit\[mlflow\]'"):
        train(_config(image_folder, tmp_path, mlflow=True))
    assert not (tmp_path / "best.pt").exists()
