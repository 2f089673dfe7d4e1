"""cnnkit.training: the training loop, metrics, checkpoints, resume and the output folder."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import get_model

import cnnkit.training.prepare as training_prepare
from cnnkit.config import TrainConfig
from cnnkit.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Interrupted,
    OutputError,
)
from cnnkit.models.checkpoint import load_checkpoint
from cnnkit.runtime import default_workers, resolve_device
from cnnkit.training import train
from cnnkit.training.callbacks.checkpoints import BackgroundWrites
from cnnkit.training.rundir import load_history
from cnnkit.training.steps import run_epoch

from helpers import (
    NAMES,
    interrupt_training_call,
    read_metrics,
    strip_timing,
    tiny_train_config,
    write_class_images,
)

METRIC_KEYS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr", "seconds", "images_per_s"}


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


@pytest.fixture
def build_spy(monkeypatch):
    """Records the model train() builds, with a copy of its initial state."""
    built = []
    real = training_prepare.build_model

    def spy(*args, **kwargs):
        model, head = real(*args, **kwargs)
        built.append((model, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        return model, head

    monkeypatch.setattr(training_prepare, "build_model", spy)
    return built


# --- outputs of a run -----------------------------------------------------------------------


def test_training_writes_best_last_and_one_metrics_row_per_epoch(trained):
    assert trained.best.is_file() and trained.last.is_file() and trained.metrics.is_file()
    rows = read_metrics(trained.metrics)
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    for row in rows:
        assert METRIC_KEYS <= set(row)
        assert 0 <= row["train_acc"] <= 1 and 0 <= row["val_acc"] <= row["val_top5"] <= 1
        assert row["train_loss"] > 0 and row["val_loss"] > 0 and row["seconds"] > 0 and row["images_per_s"] > 0
    assert rows == trained.result.history
    assert (trained.result.best_checkpoint, trained.result.last_checkpoint) == (str(trained.best), str(trained.last))


def test_accuracies_are_whole_images_over_the_image_count(trained):
    for row in read_metrics(trained.metrics):
        assert math.isclose(row["train_acc"] * 18, round(row["train_acc"] * 18), abs_tol=1e-4)  # 18 train images
        assert math.isclose(row["val_acc"] * 6, round(row["val_acc"] * 6), abs_tol=1e-4)  # 6 valid images


def test_best_checkpoint_holds_the_epoch_with_the_best_validation_accuracy(trained):
    rows = read_metrics(trained.metrics)
    best_acc = max(row["val_acc"] for row in rows)
    best_epoch = next(row["epoch"] for row in rows if row["val_acc"] == best_acc)
    assert (trained.result.best_epoch, trained.result.best_val_acc) == (best_epoch, pytest.approx(best_acc, abs=1e-6))
    summary = load_checkpoint(trained.best).summary
    assert summary["epochs"] == best_epoch and summary["best_epoch"] == best_epoch


def test_training_learns_the_colour_task(trained):
    assert trained.result.best_val_acc > 0.5  # chance is 1/3


def test_category_names_are_stored_in_the_checkpoints(trained):
    assert load_checkpoint(trained.best).class_names == NAMES
    assert load_checkpoint(trained.last).class_names == NAMES


def test_summary_records_the_data_and_seed(trained, image_folder):
    summary = load_checkpoint(trained.last).summary
    assert summary["data_dir"] == str(image_folder.resolve())
    assert (summary["train_images"], summary["valid_images"], summary["seed"]) == (18, 6, 0)
    assert summary["weights"] == "none" and summary["frozen_backbone"] is False


# --- run_epoch ------------------------------------------------------------------------------


def test_run_epoch_averages_over_images_not_over_batches():
    """A 4-image batch (3 right) and a 1-image batch (wrong): accuracy is 3/5, not (3/4 + 0/1) / 2."""
    logits = [
        [5.0, 1, 0, 0, 0, 0],  # target 0, predicted 0
        [0, 5.0, 1, 0, 0, 0],  # target 1, predicted 1
        [0, 0, 5.0, 1, 0, 0],  # target 2, predicted 2
        [0, 0, 0, 4.0, 0, 5.0],  # target 3, predicted 5, target second: a top-5 hit
        [5.0, 4, 3, 2, -9.0, 1],  # target 4, ranked last: a miss even in the top 5
    ]
    targets = [0, 1, 2, 3, 4]

    def log_softmax(row):
        norm = math.log(sum(math.exp(v) for v in row))
        return [v - norm for v in row]

    log_probs = torch.tensor([log_softmax(row) for row in logits])
    loader = [
        (log_probs[:4], torch.tensor(targets[:4]), [None] * 4),
        (log_probs[4:], torch.tensor(targets[4:]), [None]),
    ]
    stats = run_epoch(nn.Identity(), loader, torch.device("cpu"), optimizer=None, progress=False)
    expected_loss = -sum(log_softmax(row)[t] for row, t in zip(logits, targets)) / 5
    assert stats.images == 5
    assert stats.acc == pytest.approx(3 / 5)
    assert stats.top5 == pytest.approx(4 / 5)
    assert stats.loss == pytest.approx(expected_loss, rel=1e-5)
    assert stats.acc != pytest.approx((3 / 4 + 0 / 1) / 2)


def test_run_epoch_names_the_first_unreadable_image():
    loader = [(torch.zeros(1, 3), torch.tensor([0, 1]), [None, ("photos/bad.jpg", "corrupt or truncated image")])]
    with pytest.raises(DataError, match="cannot read image photos/bad.jpg: corrupt or truncated image"):
        run_epoch(nn.LogSoftmax(dim=1), loader, torch.device("cpu"), progress=False)


def test_run_epoch_with_an_optimizer_updates_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=1))
    before = model[0].weight.detach().clone()
    loader = [(torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1]), [None] * 5)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = run_epoch(model, loader, torch.device("cpu"), optimizer, progress=False)
    assert stats.images == 5 and not torch.equal(model[0].weight, before)


# --- reproducibility ------------------------------------------------------------------------


def test_same_seed_twice_gives_identical_metrics_and_weights(trained, tmp_path):
    """`--seed`: same seed, same machine, same metrics, whatever ran before in the process."""
    torch.manual_seed(12345)  # as if other work had used the global RNG meanwhile
    result = train(dataclasses.replace(trained.cfg, save_dir=str(tmp_path)))
    assert strip_timing(result.history) == strip_timing(read_metrics(trained.metrics))
    _assert_same_state(load_checkpoint(tmp_path / "last.pt").state_dict, load_checkpoint(trained.last).state_dict)


def test_another_seed_gives_another_run(trained, tmp_path):
    result = train(dataclasses.replace(trained.cfg, save_dir=str(tmp_path), seed=1, epochs=1))
    first = strip_timing(read_metrics(trained.metrics))[0]
    assert strip_timing(result.history)[0] != first


# --- interrupt and resume -------------------------------------------------------------------


def test_interrupt_keeps_last_checkpoint_of_the_last_finished_epoch(interrupted, trained):
    _, save_dir, error = interrupted
    assert "interrupted in epoch 3" in str(error) and "holds epoch 2" in str(error)
    assert f"--resume {save_dir / 'last.pt'}" in str(error)
    assert error.exit_code == 130
    assert load_checkpoint(save_dir / "last.pt").training_state["epoch"] == 2
    assert strip_timing(read_metrics(save_dir / "metrics.jsonl")) == strip_timing(read_metrics(trained.metrics))[:2]


class _FakeCheckpoint:
    """Records its write in ``written``; waits for ``gate`` first, or raises ``error``."""

    def __init__(self, written: list, gate: threading.Event | None = None, error: Exception | None = None):
        self.written, self.gate, self.error = written, gate, error

    def save(self, path: str) -> None:
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.error is not None:
            raise self.error
        self.written.append(path)


def test_checkpoint_writes_run_in_the_background_in_order():
    writes, written, gate = BackgroundWrites(), [], threading.Event()
    writes.submit(_FakeCheckpoint(written, gate), "best.pt")
    writes.submit(_FakeCheckpoint(written), "last.pt")
    assert written == []  # submit returned with the first write still waiting: the epoch goes on
    gate.set()
    writes.wait()
    assert written == ["best.pt", "last.pt"]
    writes.submit(_FakeCheckpoint(written), "last.pt")  # the thread serves the next epoch too
    writes.close()
    assert written == ["best.pt", "last.pt", "last.pt"]


def test_a_failed_background_write_is_raised_by_the_next_wait_after_the_later_writes_end():
    writes, written = BackgroundWrites(), []
    writes.submit(_FakeCheckpoint(written, error=OutputError("cannot write best.pt: No space left on device")), "best.pt")
    writes.submit(_FakeCheckpoint(written), "last.pt")
    with pytest.raises(OutputError, match="No space left"):
        writes.wait()
    assert written == ["last.pt"]
    writes.close()  # raised once: nothing is pending any more


def test_resume_equals_the_uninterrupted_run(interrupted, trained, image_folder, tmp_path):
    _, save_dir, _ = interrupted
    run_dir = Path(shutil.copytree(save_dir, tmp_path / "run"))
    # What a user passes: the data, the checkpoint and run options; the recipe comes from last.pt.
    cfg = TrainConfig(
        data_dir=str(image_folder), resume=str(run_dir / "last.pt"), save_dir=str(run_dir),
        epochs=3, workers=0, device="cpu", progress=False,
    )
    result = train(cfg)
    assert strip_timing(read_metrics(run_dir / "metrics.jsonl")) == strip_timing(read_metrics(trained.metrics))
    assert strip_timing(result.history) == strip_timing(read_metrics(trained.metrics))
    resumed, straight = load_checkpoint(run_dir / "last.pt"), load_checkpoint(trained.last)
    _assert_same_state(resumed.state_dict, straight.state_dict)
    assert resumed.training_state["epoch"] == 3
    assert (result.best_epoch, result.best_val_acc) == (trained.result.best_epoch, trained.result.best_val_acc)
    assert resumed.arch == "resnet18" and resumed.preprocess == straight.preprocess


def test_resume_into_a_new_folder_continues_the_run_there(interrupted, trained, image_folder, tmp_path):
    _, save_dir, _ = interrupted
    before = (save_dir / "last.pt").read_bytes()
    cfg = TrainConfig(
        data_dir=str(image_folder), resume=str(save_dir / "last.pt"), save_dir=str(tmp_path / "moved"),
        epochs=3, workers=0, device="cpu", progress=False,
    )
    train(cfg)
    assert strip_timing(read_metrics(tmp_path / "moved" / "metrics.jsonl")) == strip_timing(read_metrics(trained.metrics))
    _assert_same_state(load_checkpoint(tmp_path / "moved" / "last.pt").state_dict, load_checkpoint(trained.last).state_dict)
    assert (save_dir / "last.pt").read_bytes() == before  # the source run is left as it was


def test_resume_with_more_epochs_extends_a_finished_run(trained, image_folder, tmp_path):
    run_dir = Path(shutil.copytree(trained.save_dir, tmp_path / "run"))
    cfg = TrainConfig(
        data_dir=str(image_folder), resume=str(run_dir / "last.pt"), save_dir=str(run_dir),
        epochs=4, workers=0, device="cpu", progress=False,
    )
    result = train(cfg)
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2, 3, 4]
    assert strip_timing(rows[:3]) == strip_timing(read_metrics(trained.metrics))
    assert load_checkpoint(run_dir / "last.pt").training_state["epoch"] == 4
    assert result.epochs == 4


def test_resume_of_a_finished_run_without_more_epochs_is_a_config_error(trained, image_folder, tmp_path):
    before = trained.last.read_bytes()
    cfg = TrainConfig(data_dir=str(image_folder), resume=str(trained.last), save_dir=str(tmp_path / "out"),
                      epochs=3, workers=0, device="cpu", progress=False)
    with pytest.raises(ConfigError, match="already trained 3 epochs; pass a larger --epochs"):
        train(cfg)
    assert trained.last.read_bytes() == before
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    "flag, value",
    [("arch", "mobilenet_v3_small"), ("hidden_units", 64), ("learning_rate", 0.5), ("image_size", 64)],
)
def test_resume_with_a_conflicting_recipe_flag_is_a_config_error(trained, image_folder, tmp_path, flag, value):
    cfg = TrainConfig(data_dir=str(image_folder), resume=str(trained.last), save_dir=str(tmp_path),
                      epochs=5, device="cpu", progress=False, **{flag: value})
    with pytest.raises(ConfigError) as info:
        train(cfg)
    assert "--" + flag.replace("_", "-") in str(info.value)
    assert "differ from the run being resumed" in str(info.value)


def test_resume_from_best_is_a_checkpoint_error(trained, image_folder, tmp_path):
    cfg = TrainConfig(data_dir=str(image_folder), resume=str(trained.best), save_dir=str(tmp_path), epochs=5)
    with pytest.raises(CheckpointError, match="cannot be resumed.*last.pt"):
        train(cfg)


def test_resume_with_data_of_other_classes_is_a_data_error(trained, image_folder_copy, tmp_path):
    # A resumable checkpoint without category names, so the class check itself is reached.
    ckpt = load_checkpoint(trained.last)
    ckpt.class_names, ckpt.train_config = {}, {**ckpt.train_config, "category_names": None}
    ckpt.save(tmp_path / "last.pt")
    for split in ("train", "valid"):
        write_class_images(image_folder_copy / split / "yellow", "red", 2, np.random.default_rng(0))
    cfg = TrainConfig(data_dir=str(image_folder_copy), resume=str(tmp_path / "last.pt"), save_dir=str(tmp_path / "o"),
                      epochs=5, device="cpu", progress=False)
    with pytest.raises(DataError, match="classes in .* differ from those of .*last.pt"):
        train(cfg)


def test_interrupt_before_any_epoch_finished_saves_nothing(image_folder, tmp_path, monkeypatch):
    interrupt_training_call(monkeypatch, 1)
    with pytest.raises(Interrupted, match="before any epoch finished; nothing was saved"):
        train(tiny_train_config(image_folder, tmp_path))
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()


def test_resuming_into_another_runs_folder_does_not_overwrite_it_without_force(interrupted, trained, image_folder, tmp_path):
    """--resume only protects the run being resumed; another run's best.pt in --save-dir must not be
    silently replaced (without --resume, the same folder is refused without --force)."""
    other_run = Path(shutil.copytree(trained.save_dir, tmp_path / "other-run"))
    before = (other_run / "best.pt").read_bytes(), (other_run / "last.pt").read_bytes()
    source = Path(shutil.copytree(interrupted[1], tmp_path / "interrupted"))
    cfg = TrainConfig(data_dir=str(image_folder), resume=str(source / "last.pt"), save_dir=str(other_run),
                      epochs=3, workers=0, device="cpu", progress=False)
    with pytest.raises(OutputError):
        train(cfg)
    assert ((other_run / "best.pt").read_bytes(), (other_run / "last.pt").read_bytes()) == before


# --- the output folder ----------------------------------------------------------------------


@pytest.mark.parametrize("existing", ["best.pt", "last.pt", "metrics.jsonl"])
def test_existing_run_files_are_not_overwritten_without_force(image_folder, tmp_path, existing):
    precious = tmp_path / existing
    precious.write_bytes(b"a previous run's file")
    with pytest.raises(OutputError) as info:
        train(tiny_train_config(image_folder, tmp_path))
    assert existing in str(info.value) and "--force" in str(info.value)
    assert precious.read_bytes() == b"a previous run's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [existing]


def test_force_overwrites_a_previous_run(image_folder, tmp_path):
    (tmp_path / "best.pt").write_bytes(b"old")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "old": True}) + "\n" * 2 + "{}\n")
    train(tiny_train_config(image_folder, tmp_path, epochs=1, force=True))
    assert load_checkpoint(tmp_path / "best.pt").arch == "resnet18"
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert len(rows) == 1 and METRIC_KEYS <= set(rows[0]) and "old" not in rows[0]


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_save_dir_is_an_output_error(image_folder, tmp_path, where):
    if where == "under-a-file":
        (tmp_path / "afile").write_text("I am a file")
        save_dir = tmp_path / "afile" / "sub"
    else:
        save_dir = Path("/proc/cnnkit-test-run")
    with pytest.raises(OutputError, match="--save-dir"):
        train(tiny_train_config(image_folder, save_dir))
    assert not save_dir.exists()


# --- what is trained ------------------------------------------------------------------------


def test_without_pretrained_weights_the_backbone_is_trained(image_folder, tmp_path, build_spy):
    train(tiny_train_config(image_folder, tmp_path, epochs=1))
    (model, initial), = build_spy
    assert all(p.requires_grad for p in model.parameters())
    final = load_checkpoint(tmp_path / "last.pt")
    assert not torch.equal(final.state_dict["conv1.weight"], initial["conv1.weight"])
    assert final.summary["frozen_backbone"] is False


def test_with_pretrained_weights_the_backbone_is_frozen_by_default(image_folder, tmp_path, build_spy):
    torch.manual_seed(3)
    weights = get_model("resnet18", weights=None).state_dict()
    weights_file = tmp_path / "resnet18-pretrained.pth"
    torch.save(weights, weights_file)
    train(tiny_train_config(image_folder, tmp_path / "run", epochs=1, weights=str(weights_file)))
    (model, initial), = build_spy
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.0.weight", "fc.0.bias", "fc.3.weight", "fc.3.bias"}
    final = load_checkpoint(tmp_path / "run" / "last.pt")
    backbone = [key for key in weights if not key.startswith("fc.")]
    for key in backbone:  # weights and BatchNorm statistics alike
        assert torch.equal(final.state_dict[key], weights[key]), key
    assert not torch.equal(final.state_dict["fc.0.weight"], initial["fc.0.weight"])
    assert final.summary["frozen_backbone"] is True


def test_bad_image_in_the_training_set_is_a_data_error_naming_it(image_folder_copy, tmp_path):
    bad = image_folder_copy / "train" / "red" / "zz_broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(DataError) as info:
        train(tiny_train_config(image_folder_copy, tmp_path, epochs=1))
    assert str(bad) in str(info.value) and "remove or fix" in str(info.value)
    assert not (tmp_path / "best.pt").exists()


def test_category_names_missing_a_class_are_refused_before_training(image_folder, tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"red": "Red"}))
    with pytest.raises(DataError, match="no name for classes: blue, green"):
        train(tiny_train_config(image_folder, tmp_path / "run", category_names=str(names)))
    assert not (tmp_path / "run").exists()


# --- runtime --------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_is_a_config_error(image_folder, tmp_path):
    assert resolve_device("auto").type in ("cpu", "mps")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda:0")
    with pytest.raises(ConfigError, match="CUDA"):
        train(tiny_train_config(image_folder, tmp_path, device="cuda"))


def test_augmentation_is_the_same_in_the_main_process_and_in_workers_kept_across_epochs(image_folder, tmp_path):
    """Each training draw is augmented with its own seed (samplers.SeededDraws), so the loader's
    workers, kept alive from one epoch to the next, change no figure of the run."""
    histories = [strip_timing(train(tiny_train_config(image_folder, tmp_path / f"w{w}", workers=w, epochs=2)).history)
                 for w in (0, 2)]
    assert histories[0] == histories[1]


def test_default_workers():
    assert default_workers(0) == 0 and default_workers(3) == 3
    assert 1 <= default_workers(None) <= 4


def test_load_history_drops_rows_past_the_checkpoint_and_cut_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"epoch": e, "val_acc": e / 10} for e in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"epoch": 4, "val_a')
    assert load_history(str(path), upto=2) == rows[:2]
    assert load_history(str(path), upto=9) == rows
    assert load_history(str(tmp_path / "missing.jsonl"), upto=3) == []


# --- a last.pt written before the redesign (tests/fixtures/pre_redesign/make.py) -------------

PRE_REDESIGN = Path(__file__).resolve().parent / "fixtures" / "pre_redesign"


def test_a_last_pt_written_before_the_redesign_resumes_as_the_old_code_finished_it(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(PRE_REDESIGN / "run", run_dir)
    cfg = TrainConfig(data_dir=str(PRE_REDESIGN / "data"), save_dir=str(run_dir), resume=str(run_dir / "last.pt"),
                      workers=0, device="cpu", progress=False)
    result = train(cfg)
    expected = strip_timing([json.loads(line) for line in (PRE_REDESIGN / "expected.jsonl").read_text().splitlines()])
    history = strip_timing(result.history)
    assert history[:2] == expected[:2]  # epoch 1 from the file, 2 trained now on cached features
    # Epoch 3 fine-tunes with augmentation, which draws from seeds of each image's own since the
    # fixture was made (samplers.SeededDraws): the same schedule, other crops.
    assert [{k: row[k] for k in ("epoch", "lr")} for row in history[2:]] == [{"epoch": 3, "lr": expected[2]["lr"]}]
    assert (result.epochs, result.fine_tune_from, result.stopped_early) == (3, 2, None)
    last = load_checkpoint(run_dir / "last.pt").training_state
    assert last["epoch"] == 3 and last["optimizer_phase"] == "fine-tune" and last["bad_epochs"] == 0
