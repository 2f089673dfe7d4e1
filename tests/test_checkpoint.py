"""cnnkit.models.checkpoint: the self-describing file, saved atomically, loaded safely."""

from __future__ import annotations

import dataclasses
import errno
import os
import zipfile

import pytest
import torch

import cnnkit.models.checkpoint as checkpoint_module
from cnnkit.config import PreprocessConfig
from cnnkit.errors import CheckpointError, OutputError
from cnnkit.models.build import build_model
from cnnkit.models.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    Checkpoint,
    atomic_save,
    describe,
    format_description,
    load_checkpoint,
)

from helpers import CLASSES, NAMES, MaliciousPickle


@pytest.fixture(scope="module")
def small():
    """A hand-made Checkpoint of a small model (no training needed) and the model itself."""
    torch.manual_seed(0)
    model, head = build_model("mobilenet_v3_small", 3, "none", hidden_units=8)
    model.eval()
    ckpt = Checkpoint(
        arch="mobilenet_v3_small",
        head=head,
        state_dict={k: v.clone() for k, v in model.state_dict().items()},
        classes=list(CLASSES),
        preprocess=PreprocessConfig(image_size=32, resize_size=36),
        class_names=dict(NAMES),
        train_config={"arch": "mobilenet_v3_small", "epochs": 1},
        summary={"epochs": 1, "best_val_acc": 0.5},
        training_state={"epoch": 1, "best_val_acc": 0.5, "best_epoch": 1},
    )
    return ckpt, model


@pytest.fixture
def saved(small, tmp_path):
    path = tmp_path / "model.pt"
    small[0].save(path)
    return path


def _assert_same(a: Checkpoint, b: Checkpoint) -> None:
    assert (a.arch, a.head, a.classes, a.preprocess, a.class_names) == (b.arch, b.head, b.classes, b.preprocess, b.class_names)
    assert (a.train_config, a.summary, a.training_state) == (b.train_config, b.summary, b.training_state)
    assert a.state_dict.keys() == b.state_dict.keys()
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key]), key


def _assert_one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


# --- round trips ----------------------------------------------------------------------------


def test_to_dict_from_dict_round_trip(small):
    ckpt, _ = small
    payload = ckpt.to_dict()
    assert payload["format"] == FORMAT and payload["format_version"] == FORMAT_VERSION
    _assert_same(Checkpoint.from_dict(payload), ckpt)


def test_save_load_round_trip_rebuilds_the_same_model(small, saved):
    ckpt, model = small
    loaded = load_checkpoint(saved)
    _assert_same(loaded, ckpt)
    rebuilt = loaded.build_model()
    assert not rebuilt.training
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))


def test_load_accepts_a_pathlike_and_records_library_versions(small, saved):
    loaded = load_checkpoint(saved)  # a pathlib.Path
    assert set(loaded.versions) >= {"cnnkit", "torch", "torchvision", "python"}
    assert loaded.versions["torch"] == str(torch.__version__)


def test_detached_copy_owns_its_tensors_and_keeps_the_other_values(small):
    live = dataclasses.replace(small[0], state_dict={k: v.clone() for k, v in small[0].state_dict.items()},
                               training_state={"epoch": 2, "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}},
                                                                         "param_groups": [{"lr": 0.1, "params": [0]}]}})
    copy = live.detached()
    assert (copy.arch, copy.classes, copy.preprocess, copy.summary) == (live.arch, live.classes, live.preprocess, live.summary)
    assert copy.training_state["epoch"] == 2
    for tensor in live.state_dict.values():
        tensor.add_(1)  # the next training step, in place
    live.training_state["optimizer"]["state"][0]["exp_avg"].zero_()
    assert all(torch.equal(copy.state_dict[k], small[0].state_dict[k]) for k in copy.state_dict)
    assert torch.equal(copy.training_state["optimizer"]["state"][0]["exp_avg"], torch.ones(3))
    assert copy.training_state["optimizer"]["param_groups"] == [{"lr": 0.1, "params": [0]}]


def test_name_of_falls_back_to_the_label(small):
    ckpt, _ = small
    assert ckpt.name_of("red") == "Red rose"
    assert ckpt.name_of("unnamed") == "unnamed"
    assert ckpt.class_to_idx == {"blue": 0, "green": 1, "red": 2}


def test_checkpoint_saved_on_a_gpu_loads_on_a_cpu_only_machine(saved, tmp_path):
    """Re-tag every storage as cuda:0, as if saved on a GPU: loading must still map it to the CPU."""
    with zipfile.ZipFile(saved) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    pickle_name = next(n for n in entries if n.endswith("/data.pkl"))
    original = entries[pickle_name]
    entries[pickle_name] = original.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    assert entries[pickle_name] != original
    gpu_file = tmp_path / "gpu.pt"
    with zipfile.ZipFile(gpu_file, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(gpu_file, weights_only=True)  # what a load without map_location does
    loaded = load_checkpoint(gpu_file)
    assert all(t.device.type == "cpu" for t in loaded.state_dict.values())
    assert torch.equal(loaded.state_dict["classifier.0.weight"], load_checkpoint(saved).state_dict["classifier.0.weight"])


def test_build_model_moves_the_model_to_the_requested_device(small):
    model = small[0].build_model(torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in model.parameters())


# --- atomic save ----------------------------------------------------------------------------


def _partial_then(exc: BaseException):
    def fake_save(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        handle.flush()
        raise exc

    return fake_save


@pytest.mark.parametrize(
    "exc, expected",
    [
        (OSError(errno.ENOSPC, "No space left on device"), OutputError),
        (RuntimeError("serialisation failed"), RuntimeError),
        (KeyboardInterrupt(), KeyboardInterrupt),
    ],
)
def test_failed_save_leaves_the_old_file_intact_and_no_temporary(small, saved, monkeypatch, exc, expected):
    before = saved.read_bytes()
    monkeypatch.setattr(checkpoint_module.torch, "save", _partial_then(exc))
    with pytest.raises(expected):
        small[0].save(saved)
    monkeypatch.undo()
    assert saved.read_bytes() == before
    assert sorted(os.listdir(saved.parent)) == ["model.pt"]
    load_checkpoint(saved)  # still a good checkpoint


def test_out_of_space_is_reported_as_one_line_output_error(small, saved, monkeypatch):
    monkeypatch.setattr(checkpoint_module.torch, "save", _partial_then(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OutputError) as info:
        small[0].save(saved)
    assert "No space left on device" in _assert_one_line(info)


def test_atomic_save_replaces_the_file_and_cleans_up(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"a": torch.ones(2)}, path)
    atomic_save({"a": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(3))
    assert os.listdir(tmp_path) == ["state.pt"]


def test_atomic_save_into_a_missing_folder_is_an_output_error(tmp_path):
    with pytest.raises(OutputError, match="cannot write"):
        atomic_save({"a": 1}, tmp_path / "missing" / "state.pt")


# --- refusing what is not a safe, readable cnnkit checkpoint --------------------------------


@pytest.mark.parametrize("where", ["top-level", "in-summary", "in-state-dict"])
@pytest.mark.parametrize("how", ["system", "open", "eval", "popen"])
def test_malicious_pickle_is_refused_without_running_it(small, tmp_path, how, where):
    marker = tmp_path / "pwned"
    evil = MaliciousPickle(marker, how)
    payload = small[0].to_dict()
    if where == "top-level":
        payload["extra"] = evil
    elif where == "in-summary":
        payload["summary"] = {"note": [1, {"deep": evil}]}
    else:
        payload["state_dict"] = {**payload["state_dict"], next(iter(payload["state_dict"])): evil}
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = _assert_one_line(info)
    assert "arbitrary Python objects" in message and str(path) in message
    assert not marker.exists()


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello\nworld\n")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "not a cnnkit checkpoint" in _assert_one_line(info)


def test_empty_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "not a cnnkit checkpoint" in _assert_one_line(info)


def test_plain_torch_save_dict_without_the_format_key_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv1.weight": torch.zeros(2), "epoch": 3}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "is not a cnnkit checkpoint" in _assert_one_line(info)


def test_truncated_checkpoint_is_reported_as_truncated_or_corrupt(saved, tmp_path):
    path = tmp_path / "cut.pt"
    path.write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "truncated or corrupt" in _assert_one_line(info)


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 99])
def test_newer_format_version_asks_for_an_upgrade(small, tmp_path, version):
    path = tmp_path / "future.pt"
    torch.save({**small[0].to_dict(), "format_version": version}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = _assert_one_line(info)
    assert f"format version {version}," in message and "upgrade cnnkit" in message


def test_checkpoint_missing_required_fields_is_incomplete(small, tmp_path):
    payload = small[0].to_dict()
    del payload["classes"]
    path = tmp_path / "partial.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "incomplete or damaged" in _assert_one_line(info)


def test_missing_checkpoint_and_folder_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="folder"):
        load_checkpoint(tmp_path)


def test_state_dict_that_does_not_fit_the_architecture_fails_on_build_model(small):
    ckpt, _ = small
    other, _ = build_model("mobilenet_v3_small", 5, "none", hidden_units=8)  # 5 classes, not 3
    wrong = Checkpoint(ckpt.arch, ckpt.head, other.state_dict(), ckpt.classes, ckpt.preprocess)
    with pytest.raises(CheckpointError) as info:
        wrong.build_model()
    assert "do not fit mobilenet_v3_small" in _assert_one_line(info)


def test_a_regnet_checkpoint_loads_and_a_damaged_head_is_still_refused_unallocated(tmp_path):
    """RegNet cannot be built on the meta device (its widths come from tensor values): the head
    alone is checked there, and the checkpoint loads (it was refused as unbuildable)."""
    import dataclasses

    torch.manual_seed(0)
    model, head = build_model("regnet_x_400mf", 3, "none", hidden_units=8)
    path = tmp_path / "regnet.pt"
    Checkpoint("regnet_x_400mf", head, model.state_dict(), list(CLASSES), PreprocessConfig(32, 36)).save(path)
    loaded = load_checkpoint(path).build_model()
    batch = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(batch), model.eval()(batch))
    damaged = load_checkpoint(path)
    damaged.head = dataclasses.replace(damaged.head, hidden_units=10**9)  # 1.6 TB if it were allocated
    with pytest.raises(CheckpointError) as info:
        damaged.build_model()
    assert "do not fit regnet_x_400mf: size mismatch for fc.0.weight: (8, 400)" in _assert_one_line(info)


# --- checkpoints written by training --------------------------------------------------------


def test_trained_best_is_not_resumable_and_last_is(trained):
    best, last = load_checkpoint(trained.best), load_checkpoint(trained.last)
    assert best.training_state is None
    assert last.training_state["epoch"] == 3 and "optimizer" in last.training_state


def test_trained_checkpoint_is_self_describing(trained):
    ckpt = load_checkpoint(trained.best)
    assert ckpt.arch == "resnet18" and ckpt.classes == list(CLASSES) and ckpt.class_names == NAMES
    assert ckpt.head.hidden_units == 32 and ckpt.head.num_classes == 3
    assert ckpt.preprocess == trained.preprocess[False]
    assert ckpt.train_config["arch"] == "resnet18" and ckpt.train_config["seed"] == 0
    assert ckpt.summary["best_epoch"] == trained.result.best_epoch


def test_describe_reports_metadata_without_weights(trained):
    meta = describe(trained.last)
    assert "state_dict" not in meta
    assert meta["arch"] == "resnet18" and meta["resumable"] is True
    assert meta["classes"] == [{"label": c, "name": NAMES[c]} for c in CLASSES]
    assert meta["preprocess"]["image_size"] == 32
    n_params = sum(t.numel() for t in load_checkpoint(trained.last).state_dict.values() if t.is_floating_point())
    assert meta["parameters"] == n_params > 11_000_000
    assert describe(trained.best)["resumable"] is False


def test_info_text_shows_calibration_and_drift_reference(trained, tmp_path):
    ckpt = load_checkpoint(trained.best)
    ckpt.calibration = {"temperature": 1.5, "abstain_threshold": 0.42}
    ckpt.save(tmp_path / "calibrated.pt")
    text = format_description(describe(tmp_path / "calibrated.pt"))
    assert "calibration  temperature 1.5, abstain threshold 0.42" in text
    assert "drift ref    stored" in text
    assert "calibration" not in format_description(describe(trained.last)).split("drift ref")[0]
