"""cnnkit export --format openvino: the float IR (parity with torch, metadata in rt_info), its int8
version by NNCF behind the same gate as the ONNX one, and the IR in predict, evaluate, info and
serve like an .onnx."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import multiprocessing
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

for _extra in ("openvino", "nncf", "onnx", "onnxruntime"):
    if importlib.util.find_spec(_extra) is None:  # (find_spec: importorskip would load the runtime here)
        pytest.skip(f"{_extra} is not installed", allow_module_level=True)

from cnnkit.config import EvaluateConfig, ExportConfig  # noqa: E402
from cnnkit.data.transforms import load_image  # noqa: E402
from cnnkit.errors import CheckpointError, ConfigError  # noqa: E402
from cnnkit.export import PARITY_ATOL, export  # noqa: E402
from cnnkit.inference.predictor import Predictor  # noqa: E402
from cnnkit.models.checkpoint import load_checkpoint  # noqa: E402
from cnnkit.models.exported import export_metadata, model_version, read_metadata  # noqa: E402
from cnnkit.quantize import GateReport  # noqa: E402
from cnnkit.serve.model import model_file  # noqa: E402

from deploy_helpers import CLASSES, NAMES, image_bytes, make_checkpoint  # noqa: E402
from helpers import (  # noqa: E402
    CLASSES as COLOURS,
    assert_one_line_error,
    cli_subprocess_env,
    frameworks_imported_by,
    run_cli,
    write_class_images,
)

# As in test_quantize: the speed test says little on 64-px models, so these tests pass the gate
# with --min-speedup 0 (and a random model's accuracy with a lax drop) and fail it with --min-speedup 1000.
LAX = dict(int8=True, min_speedup=0.0, max_accuracy_drop=100.0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A calibrated checkpoint (the IR must carry the temperature into its probabilities)."""
    return make_checkpoint(tmp_path_factory.mktemp("openvino") / "model.pt", temperature=1.7)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A data root of the checkpoint's classes: train/ (6 per class) calibrates, valid/ (2 per class) gates."""
    root, rng = tmp_path_factory.mktemp("openvino-data"), np.random.default_rng(0)
    for label, colour in zip(CLASSES, COLOURS):
        write_class_images(root / "train" / label, colour, 6, rng)
        write_class_images(root / "valid" / label, colour, 2, rng)
    return root


# The OpenVINO runtime is never loaded into this process: loaded into the suite's long-lived
# process beside torch's and ONNX Runtime's thread pools, it crashed that process with SIGSEGV,
# in quantizations and server threads of later tests, and once in CI within this module (never
# on the development machine). The user's commands load it in processes of their own (run_cli);
# everything else that needs it runs in ``runtime``, a new interpreter (spawned, not forked from
# this process and its thread pools), and the tests assert here on what it sends back.
@pytest.fixture(scope="module")
def runtime():
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


@pytest.fixture(autouse=True)
def runtime_stays_out():
    yield
    assert "openvino" not in sys.modules, "a test loaded the OpenVINO runtime into the suite's process"


def in_runtime(runtime: ProcessPoolExecutor, function, *args, **kwargs):
    """``function(*args, **kwargs)`` in the runtime's process: its result, or its exception raised here."""
    return runtime.submit(function, *args, **kwargs).result(timeout=600)


@pytest.fixture(scope="module")
def float_ir(checkpoint, runtime):
    return in_runtime(runtime, export, ExportConfig(str(checkpoint), format="openvino"))


@pytest.fixture(scope="module")
def int8_ir(checkpoint, data, tmp_path_factory):
    """The int8 IR as a user makes it, in its own process (NNCF's quantization, run inside the
    suite's long-lived process after hundreds of other tests, crashed it with SIGSEGV)."""
    done = run_cli(["export", checkpoint, "--format", "openvino", "--int8", "--calibration-data", data,
                    "--min-agreement", "99.5", "--min-speedup", "0", "--max-accuracy-drop", "100"],
                   cli_subprocess_env(tmp_path_factory.mktemp("torch-home")))
    assert done.returncode == 0, done.stderr
    path = str(checkpoint.with_suffix(".int8.xml"))
    gate = {k: v for k, v in read_metadata(path)["quantization"]["gate"].items()
            if k not in ("accuracy_drop", "speedup", "passed")}
    return SimpleNamespace(path=path, gate=GateReport(**gate))


def _images(n: int = 5):
    return [load_image(io.BytesIO(image_bytes(seed))) for seed in range(n)]


# --- run in the runtime's process (module-level: they travel by name) ---------------------------


def _open_ir(path: str, batch: np.ndarray | None = None) -> dict:
    """The IR as ``Predictor`` opens it: its backend described, and its probabilities for ``batch``."""
    predictor = Predictor(path, "cpu")
    backend = predictor.backend
    return dict(backend=type(backend).__name__, name=backend.name, model=predictor.model,
                quantization=backend.quantization, class_names=backend.checkpoint.class_names,
                probabilities=None if batch is None else backend.probabilities(batch))


def _smoothing_nodes(xml: Path) -> list[str]:
    """NNCF's SmoothQuant scales on the convolutions' inputs, by their names."""
    import openvino as ov

    return [op.get_friendly_name() for op in ov.Core().read_model(str(xml)).get_ops()
            if "smooth_quant" in op.get_friendly_name()]


def _evaluate_report(cfg: EvaluateConfig) -> dict:
    from cnnkit.evaluate import evaluate

    return evaluate(cfg).report


def _served(path: str) -> dict:
    """What the app answers for the IR: /metadata, a /predict and whether /metrics names the backend."""
    from cnnkit.serve import create_app

    app = create_app(path, torch_threads=torch.get_num_threads())
    try:
        client = app.test_client()
        meta = client.get("/metadata").get_json()
        answer = client.post("/predict", json={"image": base64.b64encode(image_bytes(seed=3)).decode(), "top_k": 2})
        metrics = client.get("/metrics").data.decode()
        return dict(meta=meta, status=answer.status_code, body=answer.get_json(), text=answer.get_data(as_text=True),
                    labelled=f'backend="{meta["backend"]}"' in metrics)
    finally:
        app.extensions["cnnkit"].close()


def _write_plain_ir(path: Path) -> None:
    """An IR that cnnkit did not write: a softmax, saved by OpenVINO itself."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([-1, 3], np.float32, name="x")
    ov.save_model(ov.Model([ops.softmax(x, 1)], [x], "plain"), str(path))


def _open_backend(path: Path, device: str = "auto") -> None:
    from cnnkit.inference.openvino import OpenVinoBackend

    OpenVinoBackend(path, device)


# --- the tests --------------------------------------------------------------------------------


def test_the_float_ir_is_written_beside_its_weights_and_matches_torch(float_ir, checkpoint, runtime):
    assert float_ir.path == str(checkpoint.with_suffix(".xml")) and checkpoint.with_suffix(".bin").is_file()
    assert float_ir.parity is not None and float_ir.parity.ok and float_ir.gate is None
    assert float_ir.bytes == checkpoint.with_suffix(".xml").stat().st_size + checkpoint.with_suffix(".bin").stat().st_size
    assert not [p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".")]  # no temporaries left
    reference = Predictor(str(checkpoint), "cpu")
    batch = torch.stack([reference.transform(image) for image in _images()])
    ir = in_runtime(runtime, _open_ir, float_ir.path, batch.numpy())
    assert (ir["backend"], ir["name"], ir["model"]) == ("OpenVinoBackend", "openvino", None)
    assert np.abs(ir["probabilities"] - reference.probabilities(batch)).max() <= PARITY_ATOL  # temperature included


def test_the_metadata_round_trips_through_rt_info(float_ir, checkpoint, cli_env):
    expected = export_metadata(load_checkpoint(str(checkpoint)), model_version(checkpoint))
    assert read_metadata(float_ir.path) == json.loads(json.dumps(expected))
    result = run_cli(["info", float_ir.path], cli_env)
    assert result.returncode == 0, result.stderr
    assert "(openvino, float32, sha256:" in result.stdout and "Red fox" in result.stdout and "int8" not in result.stdout


def test_the_model_version_covers_the_weights(float_ir, tmp_path):
    copy = Path(shutil.copyfile(float_ir.path, tmp_path / "m.xml"))
    weights = tmp_path / "m.bin"
    shutil.copyfile(Path(float_ir.path).with_suffix(".bin"), weights)
    assert model_version(copy) == model_version(float_ir.path)
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert model_version(copy) != model_version(float_ir.path)


def test_the_int8_ir_passes_its_gate_with_figures_in_its_metadata(int8_ir, float_ir, checkpoint, runtime):
    assert int8_ir.path == str(checkpoint.with_suffix(".int8.xml")) and checkpoint.with_suffix(".int8.bin").is_file()
    gate = int8_ir.gate
    assert gate is not None and gate.passed and gate.labelled and gate.images == 6 and gate.runtime == "openvino"
    assert min(gate.torch_img_s, gate.onnx_img_s, gate.openvino_img_s, gate.int8_img_s) > 0
    assert gate.speedup == pytest.approx(gate.int8_img_s / max(gate.torch_img_s, gate.onnx_img_s, gate.openvino_img_s))
    assert "int8 (openvino)" in str(gate) and "float OpenVINO" in str(gate)
    quantization = read_metadata(int8_ir.path)["quantization"]
    assert quantization["gate"] == json.loads(json.dumps(gate.to_dict()))
    assert quantization["accuracy_control"] is True and quantization["calibration_images"] == 18  # train/: 6 per class
    assert quantization["min_agreement"] == 0.995 and "float model's top-1" in quantization["method"]
    moved = quantization["smooth_quant_moved"]  # --smooth-quant auto: with it off and at 0.5, the closer one kept
    assert set(moved) == {"0", "0.5"} and all(0 <= m <= 1 for m in moved.values())
    assert quantization["smooth_quant"] == float(min(moved, key=moved.__getitem__))
    ir = in_runtime(runtime, _open_ir, int8_ir.path)
    assert ir["name"] == "openvino-int8" and ir["quantization"] == quantization
    weights = [Path(p).with_suffix(".bin").stat().st_size for p in (int8_ir.path, float_ir.path)]
    assert weights[0] < 0.4 * weights[1]  # int8 weights: about a quarter of float32's


def test_by_default_every_layer_is_int8_without_accuracy_control(checkpoint, data, tmp_path, cli_env, runtime):
    out = tmp_path / "plain.xml"
    done = run_cli(["export", checkpoint, "--format", "openvino", "--int8", "--calibration-data", data, "-o", out,
                    "--min-speedup", "0", "--max-accuracy-drop", "100"], cli_env)
    assert done.returncode == 0, done.stderr
    quantization = read_metadata(str(out))["quantization"]
    assert quantization["accuracy_control"] is False and quantization["min_agreement"] == 0
    assert set(quantization["smooth_quant_moved"]) == {"0", "0.5"}  # --smooth-quant auto tried both
    smoothing = in_runtime(runtime, _smoothing_nodes, out)
    assert bool(smoothing) == (quantization["smooth_quant"] > 0)  # and saved the one it kept


# ~9 s: -m slow; the default export (above) checks the SmoothQuant it kept
@pytest.mark.slow
def test_smooth_quant_at_one_alpha_quantizes_once_with_it(checkpoint, data, tmp_path, cli_env, runtime):
    out = tmp_path / "smooth.xml"
    done = run_cli(["export", checkpoint, "--format", "openvino", "--int8", "--calibration-data", data, "-o", out,
                    "--smooth-quant", "0.5", "--min-speedup", "0", "--max-accuracy-drop", "100"], cli_env)
    assert done.returncode == 0, done.stderr
    quantization = read_metadata(str(out))["quantization"]
    assert quantization["smooth_quant"] == 0.5 and quantization["smooth_quant_moved"] == {}
    assert "SmoothQuant (alpha 0.5)" in quantization["method"] and in_runtime(runtime, _smoothing_nodes, out)


def test_predict_evaluate_and_info_take_the_int8_ir(int8_ir, data, tmp_path, cli_env, runtime):
    images = sorted(str(p) for p in (data / "valid").glob("*/*"))
    result, imported = frameworks_imported_by(["predict", *images, "-c", int8_ir.path, "-f", "jsonl"], cli_env)
    assert result.returncode == 0, result.stderr
    assert imported == []  # (torch's import would be seconds of every short predict)
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 6 and all(r["predictions"][0]["label"] in CLASSES for r in rows)
    info = run_cli(["info", int8_ir.path], cli_env)
    assert info.returncode == 0, info.stderr
    assert "(openvino, int8, sha256:" in info.stdout and "gate         passed on 6 held-out images" in info.stdout
    assert "OpenVINO img/s" in info.stdout
    report = in_runtime(runtime, _evaluate_report, EvaluateConfig(int8_ir.path, str(data), split="valid", device="cpu"))
    assert report["images"] == 6
    with pytest.raises(ConfigError, match="export"):  # an export is read-only: no calibration stored in it
        in_runtime(runtime, _evaluate_report, EvaluateConfig(int8_ir.path, str(data), split="valid", calibrate=True))


def test_serve_names_the_openvino_backend(int8_ir, float_ir, tmp_path, runtime):
    pytest.importorskip("flask")
    pytest.importorskip("prometheus_client")
    for exported, backend in ((float_ir, "openvino"), (int8_ir, "openvino-int8")):
        served = in_runtime(runtime, _served, exported.path)
        meta = served["meta"]
        assert meta["backend"] == backend and meta["format"] == "openvino"
        assert (meta["quantization"] is None) == (backend == "openvino")
        assert served["status"] == 200, served["text"]
        assert len(served["body"]["results"][0]["predictions"]) == 2 and served["labelled"]
    folder = tmp_path / "model"
    folder.mkdir()
    for suffix in (".xml", ".bin"):
        shutil.copyfile(Path(float_ir.path).with_suffix(suffix), folder / f"model{suffix}")
    assert model_file(str(folder)) == str(folder / "model.xml")  # a SageMaker-style folder holding the IR


# ~12 s: -m slow; test_quantize's ONNX twin keeps the gate's refusal in the default suite
@pytest.mark.slow
def test_a_failed_gate_is_exit_9_and_writes_nothing(checkpoint, data, tmp_path, cli_env):
    output = tmp_path / "slow.int8.xml"
    result = run_cli(["export", str(checkpoint), "--format", "openvino", "--int8", "--calibration-data", str(data),
                      "--max-accuracy-drop", "100", "--min-speedup", "1000", "-o", str(output)], cli_env)
    assert result.returncode == 9, result.stderr
    assert_one_line_error(result.stderr, "failed its gate", "--min-speedup 1000", "nothing was written", "--ignore-gate")
    assert list(tmp_path.iterdir()) == []  # no .xml, no .bin, no temporary ONNX left behind


def test_missing_openvino_or_nncf_is_one_line(checkpoint, data, float_ir, tmp_path, monkeypatch):
    real = importlib.util.find_spec
    for missing, config in (("openvino", ExportConfig(str(checkpoint), format="openvino", output=str(tmp_path / "m.xml"))),
                            ("nncf", ExportConfig(str(checkpoint), format="openvino", output=str(tmp_path / "m.xml"),
                                                  calibration_data=str(data), **LAX))):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, m=missing: None if name == m else real(name, *a))
        with pytest.raises(ConfigError, match=rf"^{missing} is not installed.*pip install 'cnnkit\[openvino\]'$"):
            export(config)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    with pytest.raises(ConfigError, match=r"openvino is not installed"):
        Predictor(float_ir.path, "cpu")
    assert list(tmp_path.iterdir()) == []


def test_irs_cnnkit_did_not_write_are_refused(float_ir, tmp_path, runtime):
    in_runtime(runtime, _write_plain_ir, tmp_path / "plain.xml")
    with pytest.raises(CheckpointError, match="not a model exported by cnnkit"):
        in_runtime(runtime, _open_backend, tmp_path / "plain.xml")
    (tmp_path / "garbage.xml").write_bytes(b"\x00 not xml <")
    with pytest.raises(CheckpointError, match="not a readable OpenVINO IR"):
        in_runtime(runtime, _open_ir, str(tmp_path / "garbage.xml"))
    lone = Path(shutil.copyfile(float_ir.path, tmp_path / "lone.xml"))
    with pytest.raises(CheckpointError, match="lone.bin is missing"):
        in_runtime(runtime, _open_backend, lone)
    with pytest.raises(ConfigError, match="--device cpu or auto"):
        in_runtime(runtime, _open_backend, float_ir.path, "cuda")


def test_names_of_the_classes_travel(float_ir, runtime):
    assert in_runtime(runtime, _open_ir, float_ir.path)["class_names"] == NAMES
