"""cnnkit.export: ONNX and TorchScript exports with parity checks, and the ONNX Runtime backend
behind ``cnnkit predict`` and ``cnnkit serve``."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from cnnkit.config import ExportConfig  # noqa: E402
from cnnkit.data.transforms import load_image  # noqa: E402
from cnnkit.errors import CheckpointError, CnnkitError, ConfigError, OutputError  # noqa: E402
from cnnkit.export import PARITY_ATOL, ParityReport, default_output, export  # noqa: E402
from cnnkit.inference.onnx import OnnxBackend  # noqa: E402
from cnnkit.inference.predictor import Predictor  # noqa: E402
from cnnkit.models.exported import read_metadata  # noqa: E402

from deploy_helpers import CLASSES, NAMES, image_bytes, make_checkpoint, metric, metric_values, random_image  # noqa: E402
from helpers import assert_one_line_error, frameworks_imported_by, run_cli  # noqa: E402

TEMPERATURE = 1.7


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A calibrated checkpoint: the export must carry the temperature into its probabilities."""
    return make_checkpoint(tmp_path_factory.mktemp("export") / "model.pt", temperature=TEMPERATURE)


@pytest.fixture(scope="module")
def onnx_export(checkpoint):
    return export(ExportConfig(str(checkpoint), format="onnx"))


@pytest.fixture(scope="module")
def torchscript_export(checkpoint):
    return export(ExportConfig(str(checkpoint), format="torchscript"))


def _batch(checkpoint: Path, n: int) -> torch.Tensor:
    predictor = Predictor(str(checkpoint), "cpu")
    return torch.stack([predictor.transform(random_image(50 + i)) for i in range(n)])


def test_onnx_export_passes_its_parity_check(onnx_export, checkpoint):
    assert onnx_export.path == str(checkpoint.with_suffix(".onnx"))
    parity = onnx_export.parity
    assert parity is not None and parity.ok
    assert parity.max_abs_diff <= PARITY_ATOL and parity.top1_agree == parity.samples
    assert "parity OK" in str(parity)


def test_onnx_model_has_dynamic_batch_probabilities_and_metadata(onnx_export, checkpoint):
    import onnx
    import onnxruntime as ort

    proto = onnx.load(onnx_export.path)
    props = {p.key: json.loads(p.value) for p in proto.metadata_props}
    assert props["cnnkit.classes"] == CLASSES
    assert props["cnnkit.class_names"] == NAMES
    assert props["cnnkit.preprocess"]["image_size"] == 64 and props["cnnkit.preprocess"]["resize_size"] == 72
    assert props["cnnkit.calibration"]["temperature"] == TEMPERATURE
    assert "centre-crop 64" in props["cnnkit.input"]

    session = ort.InferenceSession(onnx_export.path, providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("input", "probabilities")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 64, 64]  # symbolic batch dimension
    batch = _batch(checkpoint, 3)
    (probs,) = session.run(None, {"input": batch.numpy()})
    assert probs.shape == (3, len(CLASSES))
    assert probs.sum(axis=1) == pytest.approx([1.0] * 3, abs=1e-5)
    expected = Predictor(str(checkpoint), "cpu").probabilities(batch)  # calibrated, as predict reports
    assert torch.from_numpy(probs) == pytest.approx(expected, abs=PARITY_ATOL)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:FutureWarning")  # TorchScript is what is being tested
def test_torchscript_export_matches_and_carries_metadata(torchscript_export, checkpoint):
    assert torchscript_export.path.endswith("model.torchscript.pt")
    assert torchscript_export.parity is not None and torchscript_export.parity.ok
    extra = {"cnnkit.json": ""}
    module = torch.jit.load(torchscript_export.path, map_location="cpu", _extra_files=extra)
    meta = json.loads(extra["cnnkit.json"])
    assert meta["classes"] == CLASSES and meta["class_names"] == NAMES
    assert read_metadata(torchscript_export.path)["preprocess"] == meta["preprocess"]
    for n in (1, 4):
        batch = _batch(checkpoint, n)
        with torch.no_grad():
            got = module(batch)
        expected = Predictor(str(checkpoint), "cpu").probabilities(batch)
        assert got.shape == (n, len(CLASSES))
        assert (got - expected).abs().max() <= PARITY_ATOL


def test_predictor_runs_the_onnx_model_like_the_checkpoint(onnx_export, checkpoint):
    onnx_predictor = Predictor(onnx_export.path, "cpu")
    torch_predictor = Predictor(str(checkpoint), "cpu")
    assert onnx_predictor.backend is not None and onnx_predictor.model is None
    assert onnx_predictor.classes == torch_predictor.classes and onnx_predictor.names == torch_predictor.names
    images = [load_image(io.BytesIO(image_bytes(seed))) for seed in range(5)]
    got = onnx_predictor.predict_images(images, top_k=3)
    want = torch_predictor.predict_images(images, top_k=3)
    for g_row, w_row in zip(got, want):
        assert [g.label for g in g_row] == [w.label for w in w_row]
        assert [g.probability for g in g_row] == pytest.approx([w.probability for w in w_row], abs=PARITY_ATOL)


def test_an_exports_batches_are_decoded_in_a_thread_beside_scoring_unless_workers_0(onnx_export, tmp_path,
                                                                                   monkeypatch):
    """On a CPU with at most 2 cores an export's batches are decoded in a prefetch thread while
    ONNX Runtime scores the previous one; ``--workers 0`` decodes them in turn, in the main thread;
    the rows are the same either way."""
    import threading

    from cnnkit.inference import predictor as predictor_module

    monkeypatch.setattr(predictor_module, "available_cores", lambda: 2)
    paths = []
    for seed in range(5):
        paths.append(str(tmp_path / f"{seed}.png"))
        Path(paths[-1]).write_bytes(image_bytes(seed))
    decoded_in = []
    predictor = Predictor(onnx_export.path, "cpu")
    transform = predictor.transform
    predictor.transform = lambda image: (decoded_in.append(threading.current_thread().name), transform(image))[1]

    overlapped = [(p.path, p.top) for p in predictor.predict_paths(paths, top_k=2, batch_size=2)]
    assert set(decoded_in) == {"cnnkit-prefetch"}
    decoded_in.clear()
    in_turn = [(p.path, p.top) for p in predictor.predict_paths(paths, top_k=2, batch_size=2, workers=0)]
    assert set(decoded_in) == {threading.main_thread().name}
    assert overlapped == in_turn


def test_cli_predict_of_an_export_never_imports_torch(onnx_export, tmp_path, cli_env):
    """An export is decoded, scored and written without torch or torchvision (their imports are
    seconds of every short predict), unless decoding workers (torch's DataLoader) are asked for."""
    for seed in range(3):
        (tmp_path / f"{seed}.png").write_bytes(image_bytes(seed))
    result, imported = frameworks_imported_by(["predict", str(tmp_path), "-c", onnx_export.path, "-f", "csv"], cli_env)
    assert result.returncode == 0, result.stderr
    assert imported == [] and len(result.stdout.splitlines()) == 4
    result, imported = frameworks_imported_by(["predict", str(tmp_path), "-c", onnx_export.path, "--workers", "1",
                                               "--batch-size", "1", "-f", "csv"], cli_env)
    assert result.returncode == 0 and "torch" in imported and len(result.stdout.splitlines()) == 4


def test_cli_predict_accepts_an_onnx_model(onnx_export, tmp_path, cli_env):
    image = tmp_path / "photo.png"
    image.write_bytes(image_bytes(seed=1))
    for args in (["-c", onnx_export.path], [onnx_export.path]):  # --checkpoint, and the seed order
        result = run_cli(["predict", str(image), *args, "-k", "2", "-f", "jsonl"], cli_env)
        assert result.returncode == 0, result.stderr
        row = json.loads(result.stdout)
        assert len(row["predictions"]) == 2 and row["predictions"][0]["label"] in CLASSES


def test_create_app_serves_an_onnx_model(onnx_export, checkpoint):
    pytest.importorskip("flask")
    pytest.importorskip("prometheus_client")
    from cnnkit.serve import create_app

    app = create_app(onnx_export.path, torch_threads=torch.get_num_threads())
    try:
        client = app.test_client()
        meta = client.get("/metadata").get_json()
        assert meta["backend"] == "onnxruntime" and meta["format"] == "onnx"
        assert meta["drift"]["reference"] is True  # the reference statistics travel in the export
        data = image_bytes(seed=2)
        answer = client.post("/predict", json={"image": base64.b64encode(data).decode(), "top_k": 3})
        assert answer.status_code == 200, answer.get_data(as_text=True)
        got = answer.get_json()["results"][0]["predictions"]
        want = Predictor(str(checkpoint), "cpu").predict_images([load_image(io.BytesIO(data))], 3)[0]
        assert [g["label"] for g in got] == [w.label for w in want]
        assert [g["probability"] for g in got] == pytest.approx([w.probability for w in want], abs=PARITY_ATOL)
        assert client.post("/predict", data=b"x", content_type="text/plain").status_code == 415
        assert metric(metric_values(client.get("/metrics").get_data(as_text=True)), "cnnkit_images_total", role="primary") == 1
    finally:
        app.extensions["cnnkit"].close()


def test_export_refuses_to_overwrite_without_force(onnx_export, checkpoint, cli_env):
    before = Path(onnx_export.path).stat().st_mtime_ns
    result = run_cli(["export", str(checkpoint), "--format", "onnx"], cli_env)
    assert result.returncode == 6
    assert_one_line_error(result.stderr, "already exists", "--force")
    assert Path(onnx_export.path).stat().st_mtime_ns == before
    with pytest.raises(OutputError, match="the checkpoint itself"):
        export(ExportConfig(str(checkpoint), output=str(checkpoint), force=True))


def test_cli_export_writes_the_file_and_reports_parity(checkpoint, tmp_path, cli_env):
    output = tmp_path / "deploy" / "m.onnx"
    output.parent.mkdir()
    result = run_cli(["export", str(checkpoint), "--output", str(output)], cli_env)
    assert result.returncode == 0, result.stderr
    assert output.is_file() and f"wrote {output}" in result.stdout
    assert "parity OK" in result.stdout and "same top-1 on 6/6" in result.stdout
    assert [p.name for p in output.parent.iterdir()] == ["m.onnx"]  # no temporary left behind


def test_failed_parity_check_writes_nothing(checkpoint, tmp_path, monkeypatch):
    import cnnkit.export as export_module

    monkeypatch.setattr(export_module, "check_parity", lambda *args: ParityReport(6, 0.5, 4))
    output = tmp_path / "bad.onnx"
    with pytest.raises(CnnkitError, match="PARITY FAILED.*nothing was written"):
        export(ExportConfig(str(checkpoint), output=str(output)))
    assert list(tmp_path.iterdir()) == []


def test_export_of_a_bad_checkpoint_is_exit_4(tmp_path, cli_env):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = run_cli(["export", str(bad)], cli_env)
    assert result.returncode == 4
    assert_one_line_error(result.stderr, "not a cnnkit checkpoint")


def test_onnx_files_not_written_by_cnnkit_are_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "plain.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    with pytest.raises(CheckpointError, match="not a model exported by cnnkit"):
        OnnxBackend(path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not protobuf")
    with pytest.raises(CheckpointError, match="not a loadable ONNX model"):
        Predictor(str(garbage), "cpu")


def test_missing_export_extra_is_one_clear_message(checkpoint, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ConfigError, match=r"onnxruntime is not installed.*pip install 'cnnkit\[export\]'"):
        export(ExportConfig(str(checkpoint), output=str(checkpoint.with_name("x.onnx"))))


def test_default_output_names():
    assert default_output("runs/best.pt", "onnx") == "runs/best.onnx"
    assert default_output("runs/best.pt", "torchscript") == "runs/best.torchscript.pt"
    assert default_output("model", "onnx") == "model.onnx"
    assert default_output("runs/best.pt", "openvino") == "runs/best.xml"  # and runs/best.bin beside it


@pytest.mark.parametrize("values, flag", [
    ({"format": "tflite"}, "--format"), ({"opset": 5}, "--opset"), ({"format": "openvino", "output": "m.onnx"}, "--output"),
    ({"int8": True, "calibration_data": "d", "min_agreement": 99.0}, "--min-agreement"),  # ONNX Runtime has no such control
    ({"format": "openvino", "int8": True, "calibration_data": "d", "min_agreement": 101}, "--min-agreement"),
    ({"int8": True, "calibration_data": "d", "smooth_quant": "0.5"}, "--smooth-quant"),  # NNCF's, not ONNX Runtime's
    ({"format": "openvino", "int8": True, "calibration_data": "d", "smooth_quant": "1.5"}, "--smooth-quant"),
    ({"format": "openvino", "int8": True, "calibration_data": "d", "smooth_quant": "0"}, "--smooth-quant"),  # off is "off"
    ({"format": "openvino", "int8": True, "calibration_data": "d", "smooth_quant": "half"}, "--smooth-quant"),
])
def test_export_config_names_the_flag_to_fix(values, flag):
    with pytest.raises(ConfigError, match=flag):
        ExportConfig("m.pt", **values)


@pytest.mark.parametrize("value, alphas", [("auto", (0.0, 0.5)), ("off", (0.0,)), ("0.7", (0.7,)), ("1", (1.0,))])
def test_smooth_quant_names_the_alphas_to_quantize_with(value, alphas):
    cfg = ExportConfig("m.pt", format="openvino", int8=True, calibration_data="d", smooth_quant=value)
    assert cfg.smooth_quant_alphas == alphas


def test_info_describes_an_export_from_its_metadata(onnx_export, torchscript_export, checkpoint, cli_env):
    for exported, kind in ((onnx_export, "onnx"), (torchscript_export, "torchscript")):
        result = run_cli(["info", exported.path], cli_env)
        assert result.returncode == 0, result.stderr
        assert f"({kind}, float32, sha256:" in result.stdout and "exported from sha256:" in result.stdout
        assert "Red fox" in result.stdout and "int8" not in result.stdout
