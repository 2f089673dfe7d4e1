"""cnnkit.quantize: int8 ONNX exports, calibrated on the data, kept only when they pass the gate;
and the int8 model in predict, serve and info like any ONNX export."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from cnnkit.config import ExportConfig  # noqa: E402
from cnnkit.errors import ConfigError, DataError, GateError  # noqa: E402
from cnnkit.export import default_output, export  # noqa: E402
from cnnkit.inference.predictor import Predictor  # noqa: E402
from cnnkit.models.exported import read_metadata  # noqa: E402
from cnnkit.quantize import GateReport, gate_images  # noqa: E402

from deploy_helpers import image_bytes  # noqa: E402
from helpers import CLASSES, assert_one_line_error, run_cli  # noqa: E402

# The gate's speed test on 32-px models says little (a batch takes well under a millisecond):
# these tests pass it with --min-speedup 0 and fail it with an impossible one.
PASS = dict(int8=True, min_speedup=0.0)


@pytest.fixture(scope="module")
def int8_export(trained, image_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("int8") / "model.int8.onnx"
    result = export(ExportConfig(str(trained.best), output=str(output), calibration_data=str(image_folder), **PASS))
    return result


def _nodes(path: str) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(path).graph.node}


def test_the_int8_export_is_quantized_and_its_gate_measured_on_the_held_out_images(int8_export, trained, image_folder):
    ops = _nodes(int8_export.path)
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops, ops
    import onnx

    model = onnx.load(int8_export.path)
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= 20  # every convolution's weights (resnet18: 20) and the head's
    gate = int8_export.gate
    assert gate is not None and gate.passed and gate.labelled
    assert gate.images == 6  # valid/: 2 per class, none of them used to calibrate
    # The float accuracy is the checkpoint's own on valid/, recomputed here.
    valid = sorted((image_folder / "valid").glob("*/*"))
    predictor = Predictor(str(trained.best), "cpu")
    top1 = [p.top[0].label for p in predictor.predict_paths([str(p) for p in valid])]
    assert gate.float_accuracy == pytest.approx(sum(t == p.parent.name for t, p in zip(top1, valid)) / len(valid))
    assert 0 <= gate.agreement <= 1 and gate.int8_accuracy is not None
    assert gate.int8_img_s > 0 and gate.torch_img_s > 0 and gate.onnx_img_s > 0
    assert gate.speedup == pytest.approx(gate.int8_img_s / max(gate.torch_img_s, gate.onnx_img_s))
    assert gate.batch_size == 8 and "gate passed on 6 held-out images" in str(gate)


def test_the_int8_model_scores_close_to_the_float_model(int8_export, trained, sample_images):
    float_model, int8_model = Predictor(str(trained.best), "cpu"), Predictor(int8_export.path, "cpu")
    assert int8_model.backend is not None and int8_model.backend.name == "onnxruntime-int8"
    batch = torch.stack([float_model.transform(image) for image in _images(sample_images)])
    expected, actual = float_model.probabilities(batch), int8_model.probabilities(batch)
    assert actual.shape == expected.shape
    assert np.allclose(actual.sum(1), np.ones(len(batch)), atol=1e-4)  # the head stayed float
    assert np.abs(actual - expected).max() < 0.15
    assert not np.array_equal(actual, expected)  # it is not the float model under another name


def _images(paths):
    from cnnkit.data.transforms import load_image

    return [load_image(p) for p in paths]


def test_the_int8_metadata_round_trips_with_the_gate_figures(int8_export, trained):
    meta = read_metadata(int8_export.path)
    quantization = meta["quantization"]
    assert quantization["gate"] == json.loads(json.dumps(int8_export.gate.to_dict()))
    assert quantization["calibration_images"] == 18  # train/: 6 per class
    assert quantization["calibration_method"] == "minmax" and isinstance(quantization["reduce_range"], bool)
    assert "calibrated on" in quantization["data"] and "valid" in quantization["data"]
    assert meta["classes"] == list(CLASSES) and meta["arch"] == "resnet18"  # what every export carries
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(int8_export.path).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: a server's user reads it


def test_predict_and_info_take_the_int8_model(int8_export, sample_images, cli_env):
    result = run_cli(["predict", *map(str, sample_images), "-c", int8_export.path, "-f", "jsonl"], cli_env)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 3 and all(r["predictions"][0]["label"] in CLASSES for r in rows)
    info = run_cli(["info", int8_export.path], cli_env)
    assert info.returncode == 0, info.stderr
    assert "(onnx, int8, sha256:" in info.stdout and "gate         passed on 6 held-out images" in info.stdout
    as_json = json.loads(run_cli(["info", int8_export.path, "--json"], cli_env).stdout)
    assert as_json["export"]["precision"] == "int8" and as_json["quantization"]["gate"]["passed"] is True


def test_serve_names_the_int8_backend(int8_export):
    pytest.importorskip("flask")
    pytest.importorskip("prometheus_client")
    import base64

    from cnnkit.serve import create_app

    app = create_app(int8_export.path, torch_threads=torch.get_num_threads())
    try:
        client = app.test_client()
        meta = client.get("/metadata").get_json()
        assert meta["backend"] == "onnxruntime-int8" and meta["format"] == "onnx"
        assert meta["quantization"]["gate"]["passed"] is True
        answer = client.post("/predict", json={"image": base64.b64encode(image_bytes(seed=3)).decode()})
        assert answer.status_code == 200, answer.get_data(as_text=True)
        assert b'backend="onnxruntime-int8"' in client.get("/metrics").data
    finally:
        app.extensions["cnnkit"].close()


def test_a_model_too_slow_for_the_gate_is_exit_9_and_writes_nothing(trained, image_folder, tmp_path, cli_env):
    output = tmp_path / "slow.int8.onnx"
    result = run_cli(["export", str(trained.best), "--int8", "--calibration-data", str(image_folder),
                      "--min-speedup", "1000", "-o", str(output)], cli_env)
    assert result.returncode == 9, result.stderr
    assert_one_line_error(result.stderr, "failed its gate", "--min-speedup 1000", "nothing was written", "--ignore-gate")
    assert list(tmp_path.iterdir()) == []  # no model, no temporary left behind


def test_ignore_gate_keeps_a_model_that_failed_its_gate_and_says_so(trained, image_folder, tmp_path):
    output = tmp_path / "kept.int8.onnx"
    result = export(ExportConfig(str(trained.best), output=str(output), calibration_data=str(image_folder),
                                 int8=True, min_speedup=1000, ignore_gate=True))
    assert result.gate is not None and not result.gate.passed
    gate = read_metadata(output)["quantization"]["gate"]
    assert gate["passed"] is False and gate["min_speedup"] == 1000
    assert [p.name for p in tmp_path.iterdir()] == ["kept.int8.onnx"]


def test_a_failed_gate_never_replaces_an_earlier_export_even_with_force(trained, image_folder, tmp_path, int8_export):
    output = tmp_path / "model.int8.onnx"
    shutil.copyfile(int8_export.path, output)
    before = output.read_bytes()
    with pytest.raises(GateError):
        export(ExportConfig(str(trained.best), output=str(output), calibration_data=str(image_folder), int8=True,
                            min_speedup=1000, force=True))
    assert output.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.int8.onnx"]


def _report(**changes) -> GateReport:
    values = dict(images=100, labelled=True, agreement=0.99, float_accuracy=0.80, int8_accuracy=0.79,
                  torch_img_s=50.0, onnx_img_s=60.0, int8_img_s=120.0, batch_size=8, threads=2,
                  max_accuracy_drop=1.0, min_speedup=1.2)
    return GateReport(**{**values, **changes})


@pytest.mark.parametrize("changes, failures", [
    ({}, []),  # 1 point lost, 2.0x: passes at the limits
    ({"int8_accuracy": 0.785}, ["top-1 accuracy drops 1.50 points"]),
    ({"int8_img_s": 70.0}, ["1.17x the faster float runtime"]),  # against ONNX's 60, not torch's 50
    ({"int8_accuracy": 0.70, "int8_img_s": 30.0}, ["top-1 accuracy drops 10.00 points", "0.50x"]),
    ({"labelled": False, "float_accuracy": None, "int8_accuracy": None, "agreement": 0.98},
     ["agreement with the float model's top-1 drops 2.00 points"]),
    ({"labelled": False, "float_accuracy": None, "int8_accuracy": None, "agreement": 1.0, "max_accuracy_drop": 0.0}, []),
    ({"int8_accuracy": 0.81}, []),  # int8 better than float
    # an OpenVINO int8 model must beat the float IR too, when it is the faster float runtime
    ({"openvino_img_s": 80.0, "int8_img_s": 90.0, "runtime": "openvino"}, ["1.12x the faster float runtime"]),
])
def test_the_gate_verdict(changes, failures):
    report = _report(**changes)
    assert len(report.failures) == len(failures)
    for got, want in zip(report.failures, failures):
        assert want in got
    assert report.passed == (not failures)
    assert report.to_dict()["passed"] == report.passed


def test_a_data_root_calibrates_on_train_and_gates_on_valid(image_folder):
    images = gate_images(str(image_folder), CLASSES, calibration=300, held_out=500, seed=0)
    assert len(images.calibration) == 18 and all("/train/" in p for p in images.calibration)
    assert len(images.held_out) == 6 and all("/valid/" in p for p in images.held_out)
    assert images.labels == [CLASSES.index(Path(p).parent.name) for p in images.held_out]


def test_a_labelled_folder_is_split_in_disjoint_seeded_halves(flat_folder):
    images = gate_images(str(flat_folder), CLASSES, calibration=300, held_out=500, seed=0)
    assert len(images.calibration) == len(images.held_out) == 12
    assert not set(images.calibration) & set(images.held_out)
    assert images.labels == [CLASSES.index(Path(p).parent.name) for p in images.held_out]
    assert gate_images(str(flat_folder), CLASSES, 300, 500, seed=0) == images
    assert gate_images(str(flat_folder), CLASSES, 300, 500, seed=1).held_out != images.held_out


def test_plain_images_gate_on_agreement_and_counts_are_capped(flat_folder, tmp_path):
    for image in flat_folder.glob("*/*"):
        shutil.copyfile(image, tmp_path / f"{image.parent.name}-{image.name}")
    images = gate_images(str(tmp_path), CLASSES, calibration=5, held_out=3, seed=0)
    assert images.labels is None and "unlabelled" in images.description
    assert len(images.calibration) == 5 and len(images.held_out) == 3


def test_class_folders_the_model_does_not_know_are_refused(flat_folder, tmp_path):
    data = Path(shutil.copytree(flat_folder, tmp_path / "data"))
    (data / "blue").rename(data / "zebra")
    with pytest.raises(DataError, match="class folders the model does not know: zebra"):
        gate_images(str(data), CLASSES, 300, 500, seed=0)


def test_a_data_root_of_other_classes_is_refused(image_folder, tmp_path):
    data = Path(shutil.copytree(image_folder, tmp_path / "data"))
    for split in ("train", "valid"):
        for folder in (data / split).iterdir():
            folder.rename(folder.with_name(f"not-{folder.name}"))
    with pytest.raises(DataError, match="class folders the model does not know: not-blue"):
        gate_images(str(data), CLASSES, 300, 500, seed=0)


def test_too_few_calibration_images_are_refused(tmp_path):
    (tmp_path / "one.png").write_bytes(image_bytes(seed=1))
    with pytest.raises(DataError, match="at least 2 images"):
        gate_images(str(tmp_path), CLASSES, 300, 500, seed=0)
    with pytest.raises(DataError, match="not a folder"):
        gate_images(str(tmp_path / "missing"), CLASSES, 300, 500, seed=0)


@pytest.mark.parametrize("values, flag", [
    ({"int8": True}, "--calibration-data"),
    ({"int8": True, "calibration_data": "d", "format": "torchscript"}, "--format onnx or openvino"),
    ({"int8": True, "calibration_data": "d", "format": "openvino", "calibration_method": "entropy"},
     "--calibration-method"),
    ({"int8": True, "calibration_data": "d", "check": False}, "--no-check"),
    ({"calibration_data": "d"}, "--int8"),
    ({"ignore_gate": True}, "--int8"),
    ({"int8": True, "calibration_data": "d", "calibration_images": 0}, "--calibration-images"),
    ({"int8": True, "calibration_data": "d", "gate_images": 0}, "--gate-images"),
    ({"int8": True, "calibration_data": "d", "calibration_method": "kl"}, "--calibration-method"),
    ({"int8": True, "calibration_data": "d", "max_accuracy_drop": -1}, "--max-accuracy-drop"),
    ({"int8": True, "calibration_data": "d", "min_speedup": -1}, "--min-speedup"),
])
def test_int8_options_name_the_flag_to_fix(values, flag):
    with pytest.raises(ConfigError, match=flag):
        ExportConfig("m.pt", **values)


@pytest.mark.parametrize("fmt, name", [("onnx", "runs/best.int8.onnx"), ("openvino", "runs/best.int8.xml")])
def test_int8_default_output_name(fmt, name):
    assert default_output("runs/best.pt", fmt, int8=True) == name


def test_missing_onnxruntime_is_one_line(trained, image_folder, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ConfigError, match=r"onnxruntime is not installed.*pip install 'cnnkit\[export\]'"):
        export(ExportConfig(str(trained.best), output=str(tmp_path / "m.onnx"), calibration_data=str(image_folder), **PASS))


def test_undecodable_calibration_images_are_left_out_with_a_warning(trained, image_folder, tmp_path, caplog):
    data = Path(shutil.copytree(image_folder, tmp_path / "data"))
    (data / "train" / CLASSES[0] / "broken.png").write_bytes(b"not an image")
    result = export(ExportConfig(str(trained.best), output=str(tmp_path / "m.int8.onnx"), calibration_data=str(data),
                                 **PASS))
    assert read_metadata(result.path)["quantization"]["calibration_images"] == 18  # 19 files, one refused
    assert any("1 of 19 images could not be decoded" in r.getMessage() for r in caplog.records)


def test_report_fields_are_plain_data():
    report = _report()
    assert json.loads(json.dumps(report.to_dict()))["speedup"] == pytest.approx(2.0)
    assert dataclasses.replace(report, min_speedup=2.5).passed is False
