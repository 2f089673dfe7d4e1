"""Exported ONNX models run by ONNX Runtime: the backend ``Predictor`` uses for ``.onnx`` files."""

from __future__ import annotations

import os

import torch

from ..errors import CheckpointError, ConfigError, first_line, require_extra
from ..models.exported import checkpoint_from_metadata, parse_onnx_props


class OnnxBackend:
    """An exported ONNX model run by ONNX Runtime, scoring preprocessed batches.

    ``checkpoint`` describes it (classes, names, preprocessing...) like a checkpoint without
    weights. ``threads`` sizes ONNX Runtime's intra-op pool; by default it is torch's, so the
    server's per-worker sizing applies to both runtimes.
    """

    format = "onnx"

    def __init__(self, path: str | os.PathLike[str], device: str = "auto", threads: int | None = None):
        require_extra("export", "onnxruntime")
        import onnxruntime as ort

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"exported model not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(path, options, providers=_providers(device, ort.get_available_providers()))
        except Exception as exc:
            raise CheckpointError(f"{path} is not a loadable ONNX model ({first_line(exc)})") from None
        self.path = path
        self.metadata = parse_onnx_props(self.session.get_modelmeta().custom_metadata_map)
        self.checkpoint = checkpoint_from_metadata(self.metadata, path)
        self.input_name = self.session.get_inputs()[0].name
        self.quantization = self.metadata.get("quantization")  # settings and gate of an int8 export
        self.name = "onnxruntime-int8" if self.quantization else "onnxruntime"

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities for a batch of preprocessed images (a CPU float32 tensor)."""
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])


def _providers(device: str, available: list[str]) -> list[str]:
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda") or device == "auto":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device != "auto":
            raise ConfigError(
                f"--device {device}: this onnxruntime has no CUDA provider (install onnxruntime-gpu), or use --device cpu"
            )
        return ["CPUExecutionProvider"]
    raise ConfigError(f"--device {device} is not supported for ONNX models; use cpu, cuda or auto")
