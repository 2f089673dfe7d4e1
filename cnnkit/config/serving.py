"""The configs of ``cnnkit serve`` and ``cnnkit export``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .base import CALIBRATION_METHODS, DEVICE_PATTERN, TTA_MODES, Serializable, check


SERVE_HOST_PATTERN = re.compile(r"^[A-Za-z0-9.:\-\[\]]+$")
HEADER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")  # an HTTP header name (RFC 9110 token)
EXPORT_FORMATS = ("onnx", "openvino", "torchscript")
# The --min-agreement that benchmarks/RESULTS.md measured (NNCF options: on a flowers-20 resnet18,
# plain NNCF kept 98.8 % of the test photos' answers, this control 99.2 %). Not the default: NNCF
# tries each layer group in turn, which took over 25 minutes for densenet121 on 2 cores.
SUGGESTED_MIN_AGREEMENT = 99.5
# SmoothQuant for the convolutions of an OpenVINO int8 export: "auto" quantizes with it off and at
# the paper's alpha, 0.5, and keeps the model whose held-out probabilities moved less. Not always on:
# in benchmarks/RESULTS.md it kept more of a densenet121's answers, but not of a resnet18's valid/ ones.
DEFAULT_SMOOTH_QUANT = "auto"
SMOOTH_QUANT_AUTO_ALPHAS = (0.0, 0.5)


@dataclass(frozen=True)
class ServeConfig(Serializable):
    """Options of ``cnnkit serve``: the model, gunicorn's processes, micro-batching and limits."""

    checkpoint: str  # a cnnkit checkpoint, or a model exported with ``cnnkit export --format onnx``
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int | None = None  # gunicorn worker processes (a model copy each); None: one per core, up to 4
    threads: int = 64  # request threads per worker: enough to refuse the excess at once when --max-queue is reached
    max_batch: int = 16  # images per forward pass
    max_wait_ms: float = 5.0  # how long a batch waits for requests still being decoded
    max_bytes: int = 10 * 1024 * 1024  # request body limit (413 above it)
    max_images: int = 32  # images per request
    max_pixels: int = 25_000_000  # per image, decoded and after resizing (capped by the model's own limit)
    timeout: float = 30.0  # seconds a request may take to arrive (408 after) and to wait for its result (503 after)
    top_k: int = 1  # when a request gives no top_k
    torch_threads: int | None = None  # None: the machine's cores divided among the workers, at least 1
    drift_window: int = 1000  # recent images the drift PSI is computed over
    category_names: str | None = None
    device: str = "auto"
    max_queue: int | None = None  # images a worker holds at most (decoding, queued, scoring); None: from queue_target_ms
    queue_target_ms: float = 500.0  # with max_queue None: the queue a worker can clear in this time, measured at warm-up
    api_key_file: str | None = None  # keys for /predict, /invocations, /metadata and /admin/* (one per line)
    protect_metrics: bool = False  # /metrics needs a key too
    canary: str | None = None  # a candidate model answering canary_percent % of requests
    canary_percent: float = 10.0  # the canary's share of requests (of each sticky key's, by a stable hash)
    canary_header: str = "X-Client-Id"  # a request carrying it is routed by its value: the same client, the same model
    shadow: str | None = None  # a candidate model scoring copies of the primary's requests, off the request path
    shadow_share: float = 0.1  # the most of a worker's time the shadow may take, and only while it holds no request
    shadow_queue: int = 32  # copies waiting for the shadow, at most (more are dropped and counted)
    tta: str | None = None  # TTA_MODES; None: the checkpoint's, else none

    def __post_init__(self) -> None:
        check(bool(self.checkpoint), "give the model to serve: a checkpoint or an exported .onnx or .xml")
        check(bool(SERVE_HOST_PATTERN.match(self.host)), f"--host must be an address such as 127.0.0.1 or 0.0.0.0, got {self.host!r}")
        check(1 <= self.port <= 65535, f"--port must be between 1 and 65535, got {self.port}")
        check(self.workers is None or self.workers >= 1, f"--workers must be at least 1, got {self.workers}")
        check(self.threads >= 1, f"--threads must be at least 1, got {self.threads}")
        check(self.max_batch >= 1, f"--max-batch must be at least 1, got {self.max_batch}")
        check(0 <= self.max_wait_ms <= 10_000, f"--max-wait-ms must be between 0 and 10000, got {self.max_wait_ms}")
        check(self.max_bytes >= 1024, f"--max-bytes must be at least 1024, got {self.max_bytes}")
        check(self.max_images >= 1, f"--max-images must be at least 1, got {self.max_images}")
        check(self.max_pixels > 0, f"--max-pixels must be positive, got {self.max_pixels}")
        check(self.timeout > 0, f"--timeout must be positive (seconds), got {self.timeout}")
        check(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        check(
            self.torch_threads is None or self.torch_threads >= 1,
            f"--torch-threads must be at least 1, got {self.torch_threads}",
        )
        check(self.drift_window >= 10, f"--drift-window must be at least 10 images, got {self.drift_window}")
        check(bool(DEVICE_PATTERN.match(self.device)), f"--device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        check(self.max_queue is None or self.max_queue >= 1, f"--max-queue must be at least 1 image, got {self.max_queue}")
        check(1 <= self.queue_target_ms <= 600_000,
               f"--queue-target-ms must be between 1 and 600000 (milliseconds), got {self.queue_target_ms}")
        check(self.api_key_file is None or bool(self.api_key_file), "--api-key-file must not be empty")
        check(not self.protect_metrics or bool(self.api_key_file), "--protect-metrics needs --api-key-file")
        for flag, path in (("--canary", self.canary), ("--shadow", self.shadow)):
            check(path is None or bool(path), f"{flag} must not be empty: give a checkpoint or an exported .onnx or .xml")
        check(0 < self.canary_percent <= 100, f"--canary-percent must be above 0 and at most 100, got {self.canary_percent}")
        check(bool(HEADER_NAME_PATTERN.match(self.canary_header)),
               f"--canary-header must be an HTTP header name such as X-Client-Id, got {self.canary_header!r}")
        check(0 < self.shadow_share <= 1, f"--shadow-share must be above 0 and at most 1 (a share of time), got {self.shadow_share}")
        check(self.shadow_queue >= 1, f"--shadow-queue must be at least 1 image, got {self.shadow_queue}")
        check(self.tta is None or self.tta in TTA_MODES, f"--tta must be one of {', '.join(TTA_MODES)}, got {self.tta!r}")


@dataclass(frozen=True)
class ExportConfig(Serializable):
    """Options of ``cnnkit export``."""

    checkpoint: str
    format: str = "onnx"  # onnx | openvino | torchscript
    output: str | None = None  # None: the checkpoint's path with .onnx / .xml (and .bin) / .torchscript.pt
    opset: int = 17  # ONNX opset
    check: bool = True  # verify parity with PyTorch after export
    force: bool = False  # overwrite an existing output
    int8: bool = False  # static int8 quantization (ONNX Runtime QDQ, or NNCF for OpenVINO), kept only if it passes the gate
    ignore_gate: bool = False  # keep the int8 model even when it fails the gate (its figures say so)
    calibration_data: str | None = None  # images to calibrate and gate on (a folder or a data root)
    calibration_images: int = 300  # at most this many calibrate the activation ranges
    gate_images: int = 500  # at most this many held-out images measure the gate
    calibration_method: str = "minmax"  # ONNX Runtime's; NNCF (openvino) sets its ranges its own way
    max_accuracy_drop: float = 1.0  # percentage points of top-1 accuracy the int8 model may lose
    min_speedup: float = 1.2  # the int8 model must be this many times faster than the faster float one
    # OpenVINO int8: NNCF reverts layers to float until this many percent of the held-out images keep
    # the float model's top-1 (0: plain quantization, every layer int8)
    min_agreement: float = 0.0
    # OpenVINO int8: SmoothQuant's alpha, the share of each convolution input's range moved into its
    # weights: "auto" (try off and 0.5, keep the closer to the float model), "off", or a number in (0, 1]
    smooth_quant: str = DEFAULT_SMOOTH_QUANT
    seed: int = 0  # which images calibrate and which are held out

    def __post_init__(self) -> None:
        check(bool(self.checkpoint), "give the checkpoint to export")
        check(
            self.format in EXPORT_FORMATS,
            f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {self.format!r}",
        )
        check(self.output is None or bool(self.output), "--output must not be empty")
        check(self.format != "openvino" or self.output is None or self.output.lower().endswith(".xml"),
              f"--output of an OpenVINO IR names its .xml (the .bin is written beside it), got {self.output!r}")
        check(11 <= self.opset <= 20, f"--opset must be between 11 and 20, got {self.opset}")
        if self.int8:
            check(self.format in ("onnx", "openvino"),
                  "--int8 needs --format onnx or openvino (TorchScript is exported as float32 only)")
            check(self.format == "onnx" or self.calibration_method == "minmax",
                  "--calibration-method is ONNX Runtime's: with --format openvino, NNCF sets the ranges; drop it")
            check(bool(self.calibration_data), "--int8 needs --calibration-data DIR: images like the training data")
            check(self.check, "--int8 needs the parity check of the float export: drop --no-check")
        else:
            check(self.calibration_data is None, "--calibration-data is only used with --int8")
            check(not self.ignore_gate, "--ignore-gate is only used with --int8")
        check(self.calibration_images >= 1, f"--calibration-images must be at least 1, got {self.calibration_images}")
        check(self.gate_images >= 1, f"--gate-images must be at least 1, got {self.gate_images}")
        check(
            self.calibration_method in CALIBRATION_METHODS,
            f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.calibration_method!r}",
        )
        check(0 <= self.max_accuracy_drop <= 100,
               f"--max-accuracy-drop is in percentage points, 0 to 100, got {self.max_accuracy_drop}")
        check(self.min_speedup >= 0, f"--min-speedup must be 0 or more, got {self.min_speedup}")
        check(0 <= self.min_agreement <= 100, f"--min-agreement is a percentage, 0 to 100, got {self.min_agreement}")
        check(not self.min_agreement or (self.int8 and self.format == "openvino"),
              "--min-agreement is NNCF's accuracy control: it needs --format openvino --int8")
        check(self.smooth_quant in ("auto", "off") or _is_alpha(self.smooth_quant),
              f"--smooth-quant is auto, off or SmoothQuant's alpha (above 0, at most 1), got {self.smooth_quant!r}")
        check(self.smooth_quant == DEFAULT_SMOOTH_QUANT or (self.int8 and self.format == "openvino"),
              "--smooth-quant is NNCF's: it needs --format openvino --int8")

    @property
    def smooth_quant_alphas(self) -> tuple[float, ...]:
        """The SmoothQuant alphas to quantize with (0: off); more than one: keep the best."""
        return {"auto": SMOOTH_QUANT_AUTO_ALPHAS, "off": (0.0,)}.get(self.smooth_quant) or (float(self.smooth_quant),)


def _is_alpha(text: str) -> bool:
    try:
        return 0 < float(text) <= 1
    except ValueError:
        return False
