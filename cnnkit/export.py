"""Export a checkpoint to ONNX or TorchScript, verify parity, and run exported ONNX models.

The exported graph is the whole model: backbone, head and softmax. It takes ``input``, a float32
batch ``[N, 3, H, W]`` preprocessed as the metadata says (resize, centre crop, normalise), and
gives ``probabilities`` ``[N, classes]``, with the checkpoint's fitted temperature applied when it
has one, i.e. exactly what ``cnnkit predict`` reports. The batch dimension is dynamic.

Metadata travels with the file, so an export is as self-describing as a checkpoint: class labels
and names, preprocessing, arch, training summary, calibration and drift reference statistics, as
JSON values under ``cnnkit.*`` keys of the ONNX ``metadata_props``, or in the TorchScript extra
file ``cnnkit.json``.

ONNX uses torch's TorchScript-based exporter (``dynamo=False``): one self-contained file, no
onnxscript dependency, and the same behaviour on every torch this project supports (2.1 on).
torch marks it deprecated since 2.9; the parity check catches any drift in what it produces.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from .checkpoint import Checkpoint, load_checkpoint
from .config import ExportConfig, PreprocessConfig
from .errors import CheckpointError, CnnkitError, ConfigError, OutputError, require_extra
from .models import HeadSpec

log = logging.getLogger(__name__)

EXPORT_FORMAT = "cnnkit-export"
EXPORT_FORMAT_VERSION = 1
INPUT_NAME, OUTPUT_NAME = "input", "probabilities"
TORCHSCRIPT_METADATA = "cnnkit.json"  # the TorchScript extra file holding the metadata
PARITY_ATOL = 1e-4  # max abs difference of probabilities allowed between PyTorch and the export
PARITY_BATCHES = (1, 5)  # batch sizes checked; neither is the traced one, so the batch dim is tested
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


def is_onnx_file(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names an exported ONNX model (by its extension)."""
    return os.fspath(path).lower().endswith(".onnx")


def model_version(path: str | os.PathLike[str]) -> str:
    """A model file's identity: ``sha256:`` and the first 16 hex digits of its SHA-256."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()[:16]


class ProbabilityModel(nn.Module):
    """A cnnkit model (log-probabilities out) with softmax probabilities out, optionally tempered."""

    def __init__(self, model: nn.Module, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = self.model(x).float()
        if self.temperature != 1.0:
            log_probs = torch.log_softmax(log_probs / self.temperature, dim=1)
        return log_probs.exp()


# --- metadata -----------------------------------------------------------------------------


def export_metadata(ckpt: Checkpoint, source_version: str | None = None) -> dict[str, Any]:
    """Everything but the weights that a runtime needs to use the exported model."""
    pre = ckpt.preprocess
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_FORMAT_VERSION,
        "arch": ckpt.arch,
        "head": ckpt.head.to_dict(),
        "classes": list(ckpt.classes),
        "class_names": {c: ckpt.name_of(c) for c in ckpt.classes},
        "preprocess": pre.to_dict(),
        "input": (
            f"{INPUT_NAME}: float32 [batch, 3, {pre.image_size}, {pre.image_size}], RGB; resize the short side "
            f"to {pre.resize_size} ({pre.interpolation}), centre-crop {pre.image_size}, scale to [0, 1], "
            f"subtract mean {list(pre.mean)}, divide by std {list(pre.std)}"
        ),
        "output": f"{OUTPUT_NAME}: float32 [batch, {len(ckpt.classes)}], softmax over the classes, in order",
        "calibration": dict(getattr(ckpt, "calibration", {}) or {}),
        "summary": dict(ckpt.summary),
        "versions": dict(ckpt.versions),
        "reference_stats": getattr(ckpt, "reference_stats", None),
        "source_model_version": source_version,
    }


def checkpoint_from_metadata(meta: Mapping[str, Any], source: str) -> Checkpoint:
    """A weightless :class:`Checkpoint` describing an exported model (for Predictor and the server).

    The temperature is already in the exported graph, so it is left out of ``calibration``.
    """
    if meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{source} is not a model exported by cnnkit export (no cnnkit metadata)")
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"{source} was exported by a newer cnnkit (format {meta.get('format_version')}); upgrade cnnkit")
    try:
        ckpt = Checkpoint(
            arch=meta["arch"],
            head=HeadSpec.from_dict(meta["head"]),
            state_dict={},
            classes=list(meta["classes"]),
            preprocess=PreprocessConfig.from_dict(meta["preprocess"]),
            class_names=dict(meta.get("class_names") or {}),
            summary=dict(meta.get("summary") or {}),
            versions=dict(meta.get("versions") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{source} has incomplete cnnkit metadata ({exc})") from None
    if hasattr(ckpt, "calibration"):
        ckpt.calibration = {k: v for k, v in (meta.get("calibration") or {}).items() if k != "temperature"}
    ckpt.reference_stats = meta.get("reference_stats")
    return ckpt


def _onnx_props(meta: Mapping[str, Any]) -> dict[str, str]:
    return {f"cnnkit.{key}": json.dumps(value, ensure_ascii=False) for key, value in meta.items()}


def _parse_onnx_props(props: Mapping[str, str]) -> dict[str, Any]:
    meta = {}
    for key, value in props.items():
        if key.startswith("cnnkit."):
            try:
                meta[key[len("cnnkit."):]] = json.loads(value)
            except json.JSONDecodeError:
                continue
    return meta


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The cnnkit metadata of an exported ONNX or TorchScript file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"exported model not found: {path}")
    if is_onnx_file(path):
        require_extra("export", "onnx")
        import onnx

        try:
            model = onnx.load(path, load_external_data=False)
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable ONNX model ({_first_line(exc)})") from None
        return _parse_onnx_props({p.key: p.value for p in model.metadata_props})
    extra = {TORCHSCRIPT_METADATA: ""}
    try:
        _load_torchscript(path, extra)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable TorchScript model ({_first_line(exc)})") from None
    return json.loads(extra[TORCHSCRIPT_METADATA] or "{}")


def _load_torchscript(path: str, extra_files: dict[str, Any] | None = None) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation notice
        module = torch.jit.load(path, map_location="cpu", _extra_files=extra_files or {})
    return module.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


# --- ONNX Runtime backend -----------------------------------------------------------------


class OnnxBackend:
    """An exported ONNX model run by ONNX Runtime, scoring preprocessed batches.

    ``checkpoint`` describes it (classes, names, preprocessing...) like a checkpoint without
    weights. ``threads`` sizes ONNX Runtime's intra-op pool; by default it is torch's, so the
    server's per-worker sizing applies to both runtimes.
    """

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
            raise CheckpointError(f"{path} is not a loadable ONNX model ({_first_line(exc)})") from None
        self.path = path
        self.metadata = _parse_onnx_props(self.session.get_modelmeta().custom_metadata_map)
        self.checkpoint = checkpoint_from_metadata(self.metadata, path)
        self.input_name = self.session.get_inputs()[0].name

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


# --- export -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParityReport:
    samples: int
    max_abs_diff: float
    top1_agree: int  # samples whose top-1 class matches (or the reference's top two are tied)
    tolerance: float = PARITY_ATOL

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.top1_agree == self.samples

    def __str__(self) -> str:
        verdict = "parity OK" if self.ok else "PARITY FAILED"
        return (
            f"{verdict}: on {self.samples} samples (batches of {', '.join(map(str, PARITY_BATCHES))}) the export "
            f"matches PyTorch within {self.max_abs_diff:.1e} (tolerance {self.tolerance:.0e}), "
            f"same top-1 on {self.top1_agree}/{self.samples}"
        )


@dataclass(frozen=True)
class ExportResult:
    path: str
    format: str
    bytes: int
    seconds: float
    parity: ParityReport | None


def default_output(checkpoint: str, fmt: str) -> str:
    """``runs/best.pt`` → ``runs/best.onnx`` or ``runs/best.torchscript.pt``."""
    stem, ext = os.path.splitext(checkpoint)
    return (stem if ext.lower() in (".pt", ".pth", ".ckpt") else checkpoint) + SUFFIXES[fmt]


def export(cfg: ExportConfig) -> ExportResult:
    """Everything ``cnnkit export`` does: write the model in ``cfg.format``, then check parity.

    The file is written beside its destination under a temporary name and moved into place only
    when the parity check passes, so a failed export leaves nothing behind and never replaces an
    earlier file.
    """
    if cfg.format == "onnx":
        require_extra("export", "onnx", "onnxruntime")
    output = cfg.output or default_output(cfg.checkpoint, cfg.format)
    ckpt = load_checkpoint(cfg.checkpoint)
    if os.path.exists(output):
        if os.path.isdir(output):
            raise OutputError(f"--output {output} is a folder; give a file name")
        if os.path.samefile(output, cfg.checkpoint):
            raise OutputError(f"--output {output} is the checkpoint itself; give another file name")
        if not cfg.force:
            raise OutputError(f"{output} already exists; use --force to overwrite it, or another --output")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise OutputError(f"the folder of --output does not exist: {folder}")

    reference = ProbabilityModel(ckpt.build_model("cpu"), getattr(ckpt, "temperature", 1.0)).eval()
    meta = export_metadata(ckpt, model_version(cfg.checkpoint))
    size = ckpt.preprocess.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(output)}.", suffix=".tmp", dir=folder)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    try:
        with torch.inference_mode(False), torch.no_grad():
            if cfg.format == "onnx":
                _export_onnx(reference, example, tmp, meta, cfg.opset)
            else:
                _export_torchscript(reference, example, tmp, meta)
        parity = check_parity(reference, tmp, cfg.format, size) if cfg.check else None
        if parity is not None and not parity.ok:
            raise CnnkitError(f"{parity}; nothing was written (please report this exporter problem)")
        os.replace(tmp, output)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    seconds = time.perf_counter() - start
    log.info("exported %s to %s (%s) in %.1fs", cfg.checkpoint, output, cfg.format, seconds)
    return ExportResult(output, cfg.format, os.path.getsize(output), seconds, parity)


def _export_onnx(model: nn.Module, example: torch.Tensor, path: str, meta: Mapping[str, Any], opset: int) -> None:
    import onnx

    options: dict[str, Any] = {}
    if "dynamo" in inspect.signature(torch.onnx.export).parameters:
        options["dynamo"] = False  # the TorchScript-based exporter: see the module docstring
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice and tracer warnings
        try:
            torch.onnx.export(
                model,
                (example,),
                path,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
                do_constant_folding=True,
                **options,
            )
        except Exception as exc:
            raise CnnkitError(f"ONNX export failed (opset {opset}): {_first_line(exc)}") from None
    proto = onnx.load(path)
    for key, value in _onnx_props(meta).items():
        proto.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    proto.doc_string = f"cnnkit {meta['arch']} classifier: {meta['input']} -> {meta['output']}"
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: str, meta: Mapping[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices: TorchScript is what was asked for
        try:
            traced = torch.jit.trace(model, example, check_trace=False)  # check_parity checks, on other batch sizes
        except Exception as exc:
            raise CnnkitError(f"TorchScript export failed: {_first_line(exc)}") from None
        torch.jit.save(traced, path, _extra_files={TORCHSCRIPT_METADATA: json.dumps(meta, ensure_ascii=False)})


@torch.inference_mode()
def check_parity(reference: nn.Module, path: str, fmt: str, image_size: int) -> ParityReport:
    """Compare the exported file's probabilities with ``reference``'s on seeded random batches."""
    if fmt == "onnx":
        backend = OnnxBackend(path, device="cpu")
        run = backend.probabilities
    else:
        loaded = _load_torchscript(path)

        def run(batch: torch.Tensor) -> torch.Tensor:
            return loaded(batch)

    generator = torch.Generator().manual_seed(1)
    worst, agree, samples = 0.0, 0, 0
    for n in PARITY_BATCHES:
        batch = torch.randn(n, 3, image_size, image_size, generator=generator)
        expected = reference(batch).float()
        actual = run(batch).float()
        if actual.shape != expected.shape:
            return ParityReport(samples + n, float("inf"), agree)
        worst = max(worst, float((expected - actual).abs().max()))
        top2 = expected.topk(min(2, expected.shape[1]), dim=1).values
        tied = (top2[:, 0] - top2[:, -1]) <= PARITY_ATOL
        agree += int(((expected.argmax(1) == actual.argmax(1)) | tied).sum())
        samples += n
    return ParityReport(samples, worst, agree)
