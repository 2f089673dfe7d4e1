"""Exported OpenVINO IR models run by the OpenVINO runtime: the backend ``Predictor`` uses for ``.xml`` files."""

from __future__ import annotations

import functools
import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CheckpointError, ConfigError, first_line, require_extra
from ..models.exported import checkpoint_from_metadata, export_info, ir_weights, read_openvino_metadata
from ..runtime import compute_threads

if TYPE_CHECKING:
    from ..models.checkpoint import Checkpoint


class OpenVinoBackend:
    """An exported OpenVINO IR (``model.xml`` and ``model.bin``) on the CPU, scoring preprocessed batches.

    Like :class:`~cnnkit.inference.onnx.OnnxBackend`: ``info`` (and ``checkpoint``) describe it,
    and ``threads`` sizes OpenVINO's pool (by default :func:`~cnnkit.runtime.compute_threads`, so
    the server's per-worker sizing applies). Float layers run in float32: OpenVINO's default on CPUs with AMX or AVX-512 BF16
    is bfloat16, which would give other probabilities than the model that was checked.
    """

    format = "openvino"
    device_type = "cpu"

    def __init__(self, path: str | os.PathLike[str], device: str = "auto", threads: int | None = None):
        require_extra("openvino", "openvino")
        import openvino as ov

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise CheckpointError(f"exported model not found: {path}")
        if device not in ("auto", "cpu"):
            raise ConfigError(f"--device {device}: OpenVINO models run on the CPU here; use --device cpu or auto")
        self.path = path
        self.metadata = read_openvino_metadata(path)
        self.info = export_info(self.metadata, path)  # refuses IRs cnnkit did not export
        if not os.path.isfile(ir_weights(path)):
            raise CheckpointError(f"{path}: its weights file {os.path.basename(ir_weights(path))} is missing "
                                  "(an OpenVINO IR is the .xml and the .bin beside it)")
        config = {"INFERENCE_NUM_THREADS": threads or compute_threads(), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "f32"}
        try:
            core = ov.Core()
            self.compiled = core.compile_model(core.read_model(path), "CPU", config)
        except Exception as exc:  # the runtime's own errors, for a damaged or foreign file
            raise CheckpointError(f"{path} is not a loadable OpenVINO model ({first_line(exc)})") from None
        self._request = self.compiled.create_infer_request()
        self._lock = threading.Lock()  # an infer request runs one inference at a time
        self.quantization = self.metadata.get("quantization")  # settings and gate of an int8 export
        self.name = "openvino-int8" if self.quantization else "openvino"

    @functools.cached_property
    def checkpoint(self) -> Checkpoint:
        """A weightless checkpoint describing the model (imports torch)."""
        return checkpoint_from_metadata(self.metadata, self.path)

    def probabilities(self, batch: Any) -> np.ndarray:
        """Class probabilities for a batch of preprocessed images (an array, or a CPU tensor)."""
        array = np.ascontiguousarray(batch, dtype=np.float32)
        with self._lock:
            self._request.infer({0: array})
            return np.array(self._request.get_output_tensor(0).data, copy=True)  # the request reuses its buffer
