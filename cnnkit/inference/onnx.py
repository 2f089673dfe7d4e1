"""Exported ONNX models run by ONNX Runtime: the backend ``Predictor`` uses for ``.onnx`` files."""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CheckpointError, ConfigError, first_line, require_extra
from ..models.exported import checkpoint_from_metadata, export_info, parse_onnx_props
from ..runtime import compute_threads

if TYPE_CHECKING:
    from ..models.checkpoint import Checkpoint


class OnnxBackend:
    """An exported ONNX model run by ONNX Runtime, scoring preprocessed batches.

    ``info`` describes it (classes, names, preprocessing, calibration), and ``checkpoint`` all of
    its metadata, like a checkpoint without weights. ``threads`` sizes ONNX Runtime's intra-op
    pool; by default :func:`~cnnkit.runtime.compute_threads`, so the server's per-worker sizing
    applies to every runtime.
    """

    format = "onnx"

    def __init__(self, path: str | os.PathLike[str], device: str = "auto", threads: int | None = None):
        require_extra("export", "onnxruntime")
        import onnxruntime as ort

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"exported model not found: {path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or compute_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(path, options, providers=_providers(device, ort.get_available_providers()))
        except Exception as exc:
            raise CheckpointError(f"{path} is not a loadable ONNX model ({first_line(exc)})") from None
        self.path = path
        self.metadata = parse_onnx_props(self.session.get_modelmeta().custom_metadata_map)
        self.info = export_info(self.metadata, path)
        self.device_type = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self.input_name = self.session.get_inputs()[0].name
        self.quantization = self.metadata.get("quantization")  # settings and gate of an int8 export
        self.name = "onnxruntime-int8" if self.quantization else "onnxruntime"

    @functools.cached_property
    def checkpoint(self) -> Checkpoint:
        """A weightless checkpoint describing the model (imports torch)."""
        return checkpoint_from_metadata(self.metadata, self.path)

    def probabilities(self, batch: Any) -> np.ndarray:
        """Class probabilities for a batch of preprocessed images (an array, or a CPU tensor)."""
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]


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
