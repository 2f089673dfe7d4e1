"""cnnkit.config and cnnkit.errors: validation, serialisation, exit codes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from cnnkit.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PredictConfig,
    PreprocessConfig,
    TrainConfig,
)
from cnnkit.errors import (
    CheckpointError,
    CnnkitError,
    ConfigError,
    DataError,
    ImageError,
    Interrupted,
    OutputError,
    PartialFailure,
    WeightsError,
)

# --- PreprocessConfig -----------------------------------------------------------------------


def test_preprocess_defaults_are_imagenet_224_from_256():
    cfg = PreprocessConfig()
    assert (cfg.image_size, cfg.resize_size, cfg.interpolation) == (224, 256, "bilinear")
    assert cfg.mean == IMAGENET_MEAN and cfg.std == IMAGENET_STD


def test_preprocess_mean_and_std_are_normalised_to_float_tuples():
    cfg = PreprocessConfig(mean=[0, 0, 1], std=[1, 1, 2])
    assert cfg.mean == (0.0, 0.0, 1.0) and cfg.std == (1.0, 1.0, 2.0)
    assert all(isinstance(v, float) for v in cfg.mean + cfg.std)


def test_preprocess_round_trips_through_dict():
    cfg = PreprocessConfig(image_size=64, resize_size=73, interpolation="bicubic", hflip=0.0, max_pixels=1000)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg


def test_from_dict_ignores_keys_it_does_not_know():
    values = {**PreprocessConfig(image_size=32, resize_size=40).to_dict(), "added_in_v9": True}
    assert PreprocessConfig.from_dict(values) == PreprocessConfig(image_size=32, resize_size=40)


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"image_size": 8, "resize_size": 8}, "image_size"),
        ({"image_size": 64, "resize_size": 32}, "resize_size"),
        ({"mean": (0.5, 0.5)}, "mean and std"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"interpolation": "lanczos"}, "interpolation"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"min_scale": 1.5}, "min_scale"),
        ({"hflip": 1.5}, "hflip"),
        ({"max_pixels": 0}, "max_pixels"),
    ],
)
def test_invalid_preprocess_values_raise_config_error(changes, fragment):
    with pytest.raises(ConfigError, match=fragment):
        PreprocessConfig(**changes)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        PreprocessConfig().image_size = 32  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig(data_dir="d").epochs = 3  # type: ignore[misc]


# --- TrainConfig ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"data_dir": ""}, "DATA_DIR"),
        ({"weights": ""}, "--weights"),
        ({"hidden_units": -1}, "--hidden-units"),
        ({"dropout": 1.0}, "--dropout"),
        ({"dropout": -0.1}, "--dropout"),
        ({"learning_rate": 0.0}, "--learning-rate"),
        ({"epochs": 0}, "--epochs"),
        ({"batch_size": 0}, "--batch-size"),
        ({"workers": -1}, "--workers"),
        ({"device": "gpu"}, "--device"),
        ({"device": "cuda:x"}, "--device"),
        ({"val_split": 0.0}, "--val-split"),
        ({"val_split": 1.0}, "--val-split"),
        ({"image_size": 8}, "--image-size"),
        ({"scheduler": "linear"}, "--scheduler"),
    ],
)
def test_invalid_train_values_raise_config_error_naming_the_flag(changes, fragment):
    values = {"data_dir": "data", **changes}
    with pytest.raises(ConfigError) as info:
        TrainConfig(**values)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_valid_device_names_are_accepted(device):
    assert TrainConfig(data_dir="d", device=device).device == device
    assert PredictConfig(inputs=("x.jpg",), checkpoint="c.pt", device=device).device == device


@pytest.mark.parametrize("weights, pretrained", [("DEFAULT", True), ("IMAGENET1K_V1", True), ("w.pth", True), ("none", False), ("None", False), ("NONE", False)])
def test_pretrained_is_false_only_for_weights_none(weights, pretrained):
    assert TrainConfig(data_dir="d", weights=weights).pretrained is pretrained


def test_train_config_round_trips_through_dict():
    cfg = TrainConfig(data_dir="d", arch="resnet18", weights="none", epochs=7, image_size=64, freeze=False)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_train_config_defaults_leave_choices_to_the_library():
    cfg = TrainConfig(data_dir="d")
    assert cfg.workers is None and cfg.freeze is None and cfg.image_size is None and cfg.resize_size is None


# --- PredictConfig --------------------------------------------------------------------------


def test_predict_inputs_become_a_tuple_of_strings():
    cfg = PredictConfig(inputs=[Path("a.jpg"), "b"], checkpoint="c.pt")  # type: ignore[arg-type]
    assert cfg.inputs == ("a.jpg", "b")


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"inputs": ()}, "INPUT"),
        ({"checkpoint": ""}, "--checkpoint"),
        ({"top_k": 0}, "--top-k"),
        ({"batch_size": 0}, "--batch-size"),
        ({"workers": -2}, "--workers"),
        ({"device": "tpu"}, "--device"),
    ],
)
def test_invalid_predict_values_raise_config_error(changes, fragment):
    values = {"inputs": ("x.jpg",), "checkpoint": "c.pt", **changes}
    with pytest.raises(ConfigError, match=fragment):
        PredictConfig(**values)


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, code",
    [
        (ConfigError, 2),
        (DataError, 3),
        (CheckpointError, 4),
        (WeightsError, 5),
        (OutputError, 6),
        (PartialFailure, 7),
        (Interrupted, 130),
    ],
)
def test_each_error_carries_its_documented_exit_code(error, code):
    assert issubclass(error, CnnkitError)
    assert error.exit_code == code


def test_config_error_is_also_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_image_error_is_per_file_not_a_cnnkit_error():
    assert not issubclass(ImageError, CnnkitError)


def test_config_module_does_not_import_torch():
    code = "import sys, cnnkit.config, cnnkit.errors; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
