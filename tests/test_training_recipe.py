"""The training recipe's options (issue 12): augmentation policies, flips and rotations, random
erasing (cnnkit.data.transforms), MixUp / CutMix and label smoothing (the objective in
cnnkit.training.steps), each in a tiny run, and a resumed run with them on."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from cnnkit.config import PreprocessConfig, TrainConfig
from cnnkit.data.transforms import RandomRot90, build_batch_mix, build_transforms
from cnnkit.errors import ConfigError, Interrupted
from cnnkit.models.checkpoint import load_checkpoint
from cnnkit.training import train
from cnnkit.training.steps import training_objective

from helpers import interrupt_training_call, read_metrics, strip_timing, tiny_train_config


@pytest.fixture
def photo() -> Image.Image:
    """A 48x40 image whose every pixel differs, so that flips and rotations show."""
    pixels = torch.arange(48 * 40 * 3, dtype=torch.int64).reshape(40, 48, 3) % 251
    return Image.fromarray(pixels.to(torch.uint8).numpy(), mode="RGB")


# --- pipelines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["light", "trivial", "rand"])
def test_every_policy_makes_training_tensors_and_leaves_the_eval_pipeline_alone(photo, policy):
    plain = PreprocessConfig(image_size=32, resize_size=36)
    pre = dataclasses.replace(plain, policy=policy, vflip=0.5, rot90=True, random_erase=0.5)
    torch.manual_seed(0)
    views = torch.stack([build_transforms(pre, train=True)(photo) for _ in range(6)])
    assert views.shape == (6, 3, 32, 32) and torch.isfinite(views).all()
    assert len({v.sum().item() for v in views}) > 1  # random: not the same view every time
    torch.testing.assert_close(build_transforms(pre, train=False)(photo), build_transforms(plain, train=False)(photo),
                               rtol=0, atol=0)


def test_training_crops_take_their_own_size_and_scale_and_eval_keeps_image_size(photo, monkeypatch):
    from torchvision.transforms import RandomResizedCrop

    pre = PreprocessConfig(image_size=32, resize_size=36, train_size=24, min_scale=0.5)
    seen = []
    real = RandomResizedCrop.get_params
    monkeypatch.setattr(RandomResizedCrop, "get_params",
                        staticmethod(lambda img, scale, ratio: seen.append(scale) or real(img, scale, ratio)))
    torch.manual_seed(0)
    assert build_transforms(pre, train=True)(photo).shape == (3, 24, 24)  # FixRes: train smaller...
    assert build_transforms(pre, train=False)(photo).shape == (3, 32, 32)  # ...evaluate at image_size
    assert seen == [(0.5, 1.0)]
    with pytest.raises(ConfigError, match="train_size must be at least 16"):
        PreprocessConfig(train_size=8)


def test_train_size_ratio_and_min_scale_reach_the_checkpoints_preprocessing(image_folder, tmp_path, caplog):
    caplog.set_level("INFO", logger="cnnkit")
    train(tiny_train_config(image_folder, tmp_path, epochs=1, train_size_ratio=0.75, min_scale=0.35))
    ckpt = load_checkpoint(tmp_path / "best.pt")
    assert (ckpt.preprocess.train_size, ckpt.preprocess.min_scale, ckpt.preprocess.image_size) == (24, 0.35, 32)
    assert "crops of 0.35..1 of the area, training crops at 0.75 of the image size" in caplog.text
    for bad, message in (({"train_size_ratio": 1.5}, r"--train-size-ratio must be in \(0, 1\]"),
                         ({"min_scale": 0}, r"--min-scale must be in \(0, 1\]")):
        with pytest.raises(ConfigError, match=message):
            TrainConfig("data", **bad)


def test_policy_none_trains_on_the_eval_pipeline(photo):
    pre = PreprocessConfig(image_size=32, resize_size=36, policy="none")
    torch.testing.assert_close(build_transforms(pre, train=True)(photo), build_transforms(pre, train=False)(photo),
                               rtol=0, atol=0)


def test_the_trivial_policy_is_torchvisions_trivial_augment_after_the_crop_and_flip():
    names = [type(step).__name__ for step in build_transforms(PreprocessConfig(policy="trivial"), train=True).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "TrivialAugmentWide", "NormalizedTensor"]
    names = [type(step).__name__ for step in build_transforms(
        PreprocessConfig(policy="rand", vflip=0.5, rot90=True, random_erase=0.25), train=True).transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "RandomVerticalFlip", "RandomRot90", "RandAugment",
                     "NormalizedTensor", "RandomErasing"]


def test_rot90_turns_by_every_multiple_of_90_degrees_without_loss(photo):
    torch.manual_seed(0)
    seen = {RandomRot90()(photo).tobytes() for _ in range(40)}
    expected = {photo.rotate(angle, expand=True).tobytes() for angle in (0, 90, 180, 270)}
    assert seen == expected


# --- mixing and the objective ---------------------------------------------------------------


def test_batch_mix_is_off_at_zero_and_gives_soft_targets_that_sum_to_one():
    assert build_batch_mix(3, 0.0, 0.0) is None
    images, targets = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.2, 1.0)):
        torch.manual_seed(1)
        mixed, soft = build_batch_mix(3, mixup, cutmix)(images, targets)
        assert mixed.shape == images.shape and soft.shape == (8, 3)
        torch.testing.assert_close(soft.sum(dim=1), torch.ones(8))
        assert not torch.equal(mixed, images) and (soft < 1).any()  # pairs were mixed


def test_label_smoothing_spreads_eps_of_each_target_over_the_classes():
    log_probs = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))
    targets = torch.tensor([0, 2])
    eps = 0.3
    smoothed = [(1 - eps + eps / 3, eps / 3, eps / 3), (eps / 3, eps / 3, 1 - eps + eps / 3)]
    expected = -sum(sum(t * lp for t, lp in zip(row, lps)) for row, lps in zip(smoothed, log_probs.tolist())) / 2
    assert training_objective(log_probs, targets, None, label_smoothing=eps).item() == pytest.approx(expected)
    plain = training_objective(log_probs, targets, None).item()
    assert plain == pytest.approx(-(log_probs[0, 0] + log_probs[1, 2]).item() / 2)


# --- the options in a run -------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"augment": "trivial"},
    {"augment": "rand", "random_erase": 0.5, "vflip": True, "rot90": True},
    {"mixup": 0.4},
    {"cutmix": 1.0, "label_smoothing": 0.1},
], ids=["trivial", "rand+erase+flips", "mixup", "cutmix+smoothing"])
def test_each_option_trains_and_is_kept_in_the_checkpoint(image_folder, tmp_path, options):
    result = train(tiny_train_config(image_folder, tmp_path, epochs=1, **options))
    assert result.epochs == 1 and all(torch.isfinite(torch.tensor(row["train_loss"])) for row in result.history)
    ckpt = load_checkpoint(tmp_path / "best.pt")
    saved = TrainConfig.from_dict(ckpt.train_config)
    assert all(getattr(saved, name) == value for name, value in options.items())
    assert ckpt.preprocess.policy == options.get("augment", "light")
    assert ckpt.preprocess.vflip == (0.5 if options.get("vflip") else 0.0) and ckpt.preprocess.rot90 == options.get("rot90", False)


def test_mixing_turns_the_feature_cache_off_and_says_so(image_folder, tmp_path, caplog):
    torch.manual_seed(0)
    backbone = tmp_path / "backbone.pth"
    from torchvision.models import resnet18

    torch.save(resnet18().state_dict(), backbone)
    caplog.set_level("INFO", logger="cnnkit")
    train(tiny_train_config(image_folder, tmp_path / "run", weights=str(backbone), epochs=1, mixup=0.2))
    assert "feature caching on" not in caplog.text
    with pytest.raises(ConfigError, match="--mixup"):
        TrainConfig("data", cache_features=True, cutmix=1.0)


def test_a_run_with_every_option_resumes_exactly_as_it_would_have_run(image_folder, tmp_path):
    cfg = tiny_train_config(image_folder, tmp_path / "straight", epochs=2, augment="trivial", random_erase=0.25,
                            rot90=True, mixup=0.2, cutmix=1.0, label_smoothing=0.1, ema=0.9)
    straight = train(cfg)
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        interrupt_training_call(mp, 2)  # in epoch 2: last.pt holds epoch 1
        with pytest.raises(Interrupted):
            train(dataclasses.replace(cfg, save_dir=str(run_dir)))
    copy = Path(shutil.copytree(run_dir, tmp_path / "resumed"))
    resumed = train(TrainConfig(data_dir=str(image_folder), resume=str(copy / "last.pt"), save_dir=str(copy),
                                workers=0, device="cpu", progress=False))
    assert strip_timing(resumed.history) == strip_timing(straight.history)
    assert strip_timing(read_metrics(copy / "metrics.jsonl")) == strip_timing(straight.history)
    a, b = load_checkpoint(copy / "last.pt").state_dict, load_checkpoint(tmp_path / "straight" / "last.pt").state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_ema_weights_are_validated_and_saved_in_best_and_the_raw_ones_in_last(image_folder, tmp_path):
    result = train(tiny_train_config(image_folder, tmp_path, epochs=2, ema=0.5, learning_rate=0.01))
    best, last = load_checkpoint(tmp_path / "best.pt"), load_checkpoint(tmp_path / "last.pt")
    average = {k.removeprefix("module."): v for k, v in last.training_state["ema"].items() if k.startswith("module.")}
    assert average.keys() == last.state_dict.keys()
    assert any(not torch.equal(average[k], last.state_dict[k]) for k in average)  # the average is not the raw weights
    assert any(not torch.equal(average[k], last.state_dict[k]) for k in average if "running_mean" in k)  # BN too
    if result.best_epoch == 2:  # best.pt holds the average at its epoch
        assert all(torch.equal(best.state_dict[k], average[k]) for k in average)
    assert last.training_state["ema"]["n_averaged"].item() == result.history[-1]["epoch"] * 3  # 18 images, batches of 6


def test_lr_find_takes_the_recipe_options(image_folder, tmp_path):
    from cnnkit.config import LRFindConfig
    from cnnkit.training.lr_find import lr_find

    cfg = tiny_train_config(image_folder, tmp_path, augment="rand", mixup=0.2, cutmix=1.0, label_smoothing=0.1)
    result = lr_find(LRFindConfig(cfg, start_lr=1e-6, end_lr=1e-3, steps=10, plot=False))
    assert len(result.losses) == 10 and all(torch.isfinite(torch.tensor(result.losses)))


@pytest.mark.parametrize("recipe", [None, "scratch", "transfer"])
def test_a_recipe_fills_the_fields_the_flags_leave_unset_and_is_logged(image_folder, tmp_path, caplog, recipe):
    from cnnkit.config import RECIPES

    caplog.set_level("INFO", logger="cnnkit")
    cfg = tiny_train_config(image_folder, tmp_path / "run", recipe=recipe, epochs=1, label_smoothing=0.05)
    train(cfg)
    saved = TrainConfig.from_dict(load_checkpoint(tmp_path / "run" / "best.pt").train_config)
    name = recipe or "scratch"  # the default from random weights (tiny_train_config: --weights none)
    assert saved.recipe == name and f"recipe {name} (" in caplog.text
    assert saved.label_smoothing == 0.05  # a flag overrides the recipe's field...
    assert all(getattr(saved, k) == v for k, v in RECIPES[name].items() if k != "label_smoothing")  # ...and no other


def test_the_default_recipe_follows_the_weights_and_says_why():
    from cnnkit.training.prepare import recipe_reason

    scratch, transfer = TrainConfig("d", weights="none"), TrainConfig("d", weights="IMAGENET1K_V1")
    assert scratch.with_recipe().recipe == "scratch" and transfer.with_recipe().recipe == "transfer"
    assert "the default from scratch" in recipe_reason(scratch)
    assert "the default from pretrained weights" in recipe_reason(transfer)
    chosen = TrainConfig("d", weights="none", recipe="plain")
    assert chosen.with_recipe().recipe == "plain" and recipe_reason(chosen) == "--recipe"


def test_a_run_saved_before_the_crop_fields_resumes_with_the_crops_it_trained_on():
    from cnnkit.training.recipe import resume_config

    saved = SimpleNamespace(training_state={"epoch": 1}, train_config={"data_dir": "d", "weights": "none", "recipe": "scratch"},
                            preprocess=PreprocessConfig(image_size=64, resize_size=72))
    cfg = resume_config(TrainConfig("d", resume="last.pt"), saved)
    assert (cfg.train_size_ratio, cfg.min_scale) == (1.0, 0.08)  # not today's scratch crops (0.75, 0.25)


def test_checkpoints_from_before_the_policies_keep_their_augmentation():
    assert TrainConfig.from_dict({"data_dir": "d", "augment": True}).augment == "light"
    assert TrainConfig.from_dict({"data_dir": "d", "augment": False}).augment == "none"
    assert TrainConfig.from_dict({"data_dir": "d", "augment": None}).augment is None
    assert PreprocessConfig.from_dict({"image_size": 64, "resize_size": 72}).policy == "light"
    with pytest.raises(ConfigError, match="--augment must be one of"):
        TrainConfig("d", augment="heavy")


@pytest.mark.parametrize(
    "arch, image_size, ratio, device, expected",
    [
        ("resnet18", 64, None, "cpu", False),  # the README demo: NCHW, faster for a ResNet's small crops
        ("resnet18", 128, None, "cpu", False),  # the scratch recipe's 96-px training crops
        ("resnet18", 128, 1.0, "cpu", True),
        ("resnet50", 224, None, "cpu", True),
        ("mobilenet_v3_small", 64, None, "cpu", True),  # NHWC at every size measured
        ("densenet121", 32, None, "cpu", True),
        ("resnet18", 64, None, "cuda", True),
        ("resnet18", 224, None, "mps", False),
    ],
)
def test_the_memory_layout_is_the_faster_one_measured_for_the_family_and_crop(arch, image_size, ratio, device, expected):
    from cnnkit.training import recipe

    cfg = TrainConfig("d", arch=arch, weights="none", image_size=image_size, train_size_ratio=ratio).with_recipe()
    assert recipe.resolve_recipe(cfg, torch.device(device), None).channels_last is expected


# --- the time budget --------------------------------------------------------------------------


@pytest.mark.parametrize("budget, native, expected", [(None, True, False), ("10m", True, True), ("10m", False, False)])
def test_bfloat16_is_the_default_only_under_a_time_budget_on_native_hardware(monkeypatch, budget, native, expected):
    from cnnkit.training import recipe

    monkeypatch.setattr(recipe, "has_native_bfloat16", lambda: native)
    cfg = TrainConfig("d", weights="none", time_budget=budget).with_recipe()  # as prepare_run passes it
    assert recipe.default_amp(cfg, torch.device("cpu")) is expected
    assert recipe.default_amp(cfg, torch.device("cuda")) is True
    chosen = recipe.resolve_recipe(cfg, torch.device("cpu"), None)
    assert chosen.amp is expected and chosen.autocast_dtype == (torch.bfloat16 if expected else None)
    assert recipe.resolve_recipe(dataclasses.replace(cfg, amp=False), torch.device("cpu"), None).amp is False


def test_durations_parse_and_bad_ones_say_what_to_write():
    from cnnkit.config import parse_duration

    assert [parse_duration(t) for t in ("90s", "25m", "1h30m", "1.5h", "2m30s")] == [90, 1500, 5400, 5400, 150]
    for bad in ("", "25", "m", "1d", "-5m"):
        with pytest.raises(ConfigError, match="90s, 25m or 1h30m"):
            parse_duration(bad)
    with pytest.raises(ConfigError, match="--fine-tune"):
        TrainConfig("d", time_budget="10m", fine_tune=2)


def test_a_time_budget_plans_again_when_the_machine_slows_down(image_folder, tmp_path, monkeypatch, caplog):
    """Epochs take 10 s of a fake clock, then 20 s from the fourth on: the plan made after epoch
    2 (9 epochs in 100 s) would end at 150 s, so it is made again from the recent pace, twice,
    and the run ends inside the budget with the cosine decay at its end."""
    import cnnkit.training.callbacks.time_budget as budget_module

    clock = {"now": 0.0, "epoch": 0}
    real_after_epoch = budget_module.TimeBudget.after_epoch

    def after_epoch(self, trainer):
        clock["epoch"] += 1
        clock["now"] += 10.0 if clock["epoch"] <= 3 else 20.0
        real_after_epoch(self, trainer)

    monkeypatch.setattr(budget_module, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    monkeypatch.setattr(budget_module.TimeBudget, "after_epoch", after_epoch)
    caplog.set_level("INFO", logger="cnnkit")
    result = train(tiny_train_config(image_folder, tmp_path, epochs=None, time_budget="100s", scheduler="cosine"))
    assert result.epochs == 6 and clock["now"] == 90.0  # 3 x 10 s + 3 x 20 s: inside 100 s, not an epoch short
    assert "lately (planned again after epoch 4), 50s left: 7 epochs" in caplog.text
    assert "lately (planned again after epoch 5), 30s left: 6 epochs" in caplog.text
    lrs = [row["lr"] for row in result.history]
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))  # the decay steepens; it never climbs back
    assert load_checkpoint(tmp_path / "last.pt").training_state["budget_planned"] == 6


def test_a_plan_within_one_percent_of_its_window_is_kept():
    from cnnkit.training.callbacks.time_budget import TimeBudget

    budget = TimeBudget("100s")  # the window for 10 s epochs: ending 90-100 s, give or take 1 s
    assert budget.on_course(100.9, 10) and budget.on_course(89.1, 10) and budget.on_course(95, 10)
    assert not budget.on_course(101.1, 10) and not budget.on_course(88.9, 10)


def test_plan_epochs_fills_the_budget_and_keeps_a_reserve():
    from cnnkit.training.callbacks.time_budget import plan_epochs

    assert plan_epochs(budget=100, elapsed=12, epoch_seconds=10, done=1, reserve=3) == 1 + 8  # 85 s left: 8 more
    assert plan_epochs(budget=100, elapsed=99, epoch_seconds=10, done=1, reserve=3) == 1  # nothing left
    assert plan_epochs(budget=60, elapsed=20, epoch_seconds=9.5, done=2, reserve=0) == 2 + 4


def test_a_time_budget_plans_the_epochs_from_a_fake_clock_and_the_schedule_ends(image_folder, tmp_path, monkeypatch):
    """Each epoch takes 10 s of a fake clock; a 65 s budget leaves room for 6 epochs (and the
    reserve): the cosine schedule is planned for them, reaches zero on the last, and last.pt
    keeps the plan."""
    import cnnkit.training.callbacks.time_budget as budget_module

    clock = {"now": 0.0}
    real_after_epoch = budget_module.TimeBudget.after_epoch

    def after_epoch(self, trainer):  # an epoch "takes" 10 s
        clock["now"] += 10.0
        real_after_epoch(self, trainer)

    monkeypatch.setattr(budget_module, "time", SimpleNamespace(monotonic=lambda: clock["now"]))
    monkeypatch.setattr(budget_module.TimeBudget, "after_epoch", after_epoch)
    result = train(tiny_train_config(image_folder, tmp_path, epochs=None, time_budget="65s", scheduler="cosine"))
    assert result.epochs == 6
    lrs = [row["lr"] for row in result.history]
    assert lrs[0] == pytest.approx(0.01 * 1e-3)  # epoch 1 warms up from 1%
    assert lrs[1] == pytest.approx(1e-3)  # the cosine starts at the peak after the warm-up epoch...
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:]))  # ...and decays every epoch
    last = load_checkpoint(tmp_path / "last.pt")
    assert TrainConfig.from_dict(last.train_config).epochs == 6 and last.training_state["budget_planned"] == 6
    from cnnkit.training.schedule import lr_factor

    assert lr_factor(6.0, 6, "cosine", 1.0) == 0.0  # the schedule's end is the run's end
