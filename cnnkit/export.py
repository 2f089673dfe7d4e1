"""Export a checkpoint to ONNX, OpenVINO IR or TorchScript and verify parity.

The exported graph is the whole model: backbone, head and softmax. It takes ``input``, a float32
batch ``[N, 3, H, W]`` preprocessed as the metadata says (resize, centre crop, normalise), and
gives ``probabilities`` ``[N, classes]``, with the checkpoint's fitted temperature applied when it
has one, i.e. exactly what ``cnnkit predict`` reports. The batch dimension is dynamic.

Metadata travels with the file (see :mod:`cnnkit.models.exported`), so an export is as
self-describing as a checkpoint. The OpenVINO IR (``.xml`` and ``.bin``) is converted from the
float ONNX export (:mod:`cnnkit.openvino_export`), and checked against PyTorch in its turn.

ONNX uses torch's TorchScript-based exporter (``dynamo=False``): one self-contained file, no
onnxscript dependency, and the same behaviour on every torch this project supports (2.1 on).
torch marks it deprecated since 2.9; the parity check catches any drift in what it produces.
"""

from __future__ import annotations

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

from .config import ExportConfig
from .errors import CnnkitError, OutputError, first_line, require_extra
from .inference.onnx import OnnxBackend
from .inference.openvino import OpenVinoBackend
from .models.checkpoint import load_checkpoint
from .models.exported import (
    INPUT_NAME,
    OUTPUT_NAME,
    TORCHSCRIPT_METADATA,
    export_metadata,
    ir_weights,
    load_torchscript,
    model_version,
    set_onnx_metadata,
)
from .openvino_export import convert_to_ir, quantize_gated_openvino
from .quantize import GateReport, quantize_gated

log = logging.getLogger(__name__)

PARITY_ATOL = 1e-4  # max abs difference of probabilities allowed between PyTorch and the export
PARITY_BATCHES = (1, 5)  # batch sizes checked; neither is the traced one, so the batch dim is tested
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "onnx-int8": ".int8.onnx", "openvino": ".xml",
            "openvino-int8": ".int8.xml"}


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
    gate: GateReport | None = None  # with --int8: what the quantized model measured


def default_output(checkpoint: str, fmt: str, int8: bool = False) -> str:
    """``runs/best.pt`` → ``runs/best.onnx``, ``runs/best.int8.onnx``, ``runs/best.xml`` (OpenVINO; and
    ``runs/best.bin``), ``runs/best.int8.xml`` or ``runs/best.torchscript.pt``."""
    stem, ext = os.path.splitext(checkpoint)
    return (stem if ext.lower() in (".pt", ".pth", ".ckpt") else checkpoint) + SUFFIXES[fmt + "-int8" * int8]


def export(cfg: ExportConfig) -> ExportResult:
    """Everything ``cnnkit export`` does: write the model in ``cfg.format``, then check parity.

    The file is written beside its destination under a temporary name and moved into place only
    when the parity check passes, so a failed export leaves nothing behind and never replaces an
    earlier file. With ``cfg.int8`` the file written is the int8 model, and only when it passes
    its gate (:mod:`cnnkit.quantize`). An OpenVINO IR is two files, the ``.xml`` and its ``.bin``.
    """
    ir = cfg.format == "openvino"
    if cfg.format == "onnx":
        require_extra("export", "onnx", "onnxruntime")
    if ir:
        require_extra("openvino", "openvino", "onnx", "onnxruntime", *(["nncf"] if cfg.int8 else []))
    output = cfg.output or default_output(cfg.checkpoint, cfg.format, cfg.int8)
    ckpt = load_checkpoint(cfg.checkpoint)
    for target in [output, ir_weights(output)] if ir else [output]:
        if os.path.exists(target):
            if os.path.isdir(target):
                raise OutputError(f"--output {target} is a folder; give a file name")
            if os.path.samefile(target, cfg.checkpoint):
                raise OutputError(f"--output {target} is the checkpoint itself; give another file name")
            if not cfg.force:
                raise OutputError(f"{target} already exists; use --force to overwrite it, or another --output")
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise OutputError(f"the folder of --output does not exist: {folder}")

    reference = ProbabilityModel(ckpt.build_model("cpu"), getattr(ckpt, "temperature", 1.0)).eval()
    meta = export_metadata(ckpt, model_version(cfg.checkpoint))
    size = ckpt.preprocess.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    tmp = int8 = source = gate = None
    suffix = ".xml" if ir else ".tmp"  # an IR's .bin is its .xml's name with .bin
    try:
        tmp = _temporary(output, folder, suffix=suffix)
        int8 = _temporary(output, folder, ".int8", suffix) if cfg.int8 else None
        source = _temporary(output, folder, ".float", ".onnx") if ir else None  # the ONNX the IR is read from
        with torch.inference_mode(False), torch.no_grad():
            if cfg.format == "torchscript":
                _export_torchscript(reference, example, tmp, meta)
            else:
                _export_onnx(reference, example, source or tmp, meta, cfg.opset)
        if ir:
            convert_to_ir(source, tmp, meta)
        parity = check_parity(reference, tmp, cfg.format, size) if cfg.check else None
        if parity is not None and not parity.ok:
            raise CnnkitError(f"{parity}; nothing was written (please report this exporter problem)")
        if int8 is not None:
            gate = (quantize_gated_openvino(cfg, ckpt, source, tmp, int8, meta) if ir
                    else quantize_gated(cfg, ckpt, tmp, int8, meta))
        if ir:
            os.replace(ir_weights(int8 or tmp), ir_weights(output))  # the weights first: the .xml names a model
        os.replace(int8 or tmp, output)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
    finally:
        for path in (tmp, int8, source):
            for name in (path, ir_weights(path)) if ir and path and path.endswith(".xml") else (path,):
                if name is not None and os.path.exists(name):
                    os.unlink(name)
    seconds = time.perf_counter() - start
    log.info("exported %s to %s (%s%s) in %.1fs", cfg.checkpoint, output, cfg.format, ", int8" * cfg.int8, seconds)
    size = os.path.getsize(output) + (os.path.getsize(ir_weights(output)) if ir else 0)
    return ExportResult(output, cfg.format, size, seconds, parity, gate)


def _temporary(output: str, folder: str, tag: str = "", suffix: str = ".tmp") -> str:
    """A new empty file beside ``output``, moved into place once it is complete."""
    try:
        fd, path = tempfile.mkstemp(prefix=f".{os.path.basename(output)}{tag}.", suffix=suffix, dir=folder)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(path, 0o666 & ~umask)  # mkstemp's 0600 would hide the model from a server's other user
    except OSError as exc:
        raise OutputError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    return path


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
            raise CnnkitError(f"ONNX export failed (opset {opset}): {first_line(exc)}") from None
    proto = onnx.load(path)
    set_onnx_metadata(proto, meta)
    proto.doc_string = f"cnnkit {meta['arch']} classifier: {meta['input']} -> {meta['output']}"
    onnx.checker.check_model(proto)
    onnx.save(proto, path)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: str, meta: Mapping[str, Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices: TorchScript is what was asked for
        try:
            traced = torch.jit.trace(model, example, check_trace=False)  # check_parity checks, on other batch sizes
        except Exception as exc:
            raise CnnkitError(f"TorchScript export failed: {first_line(exc)}") from None
        torch.jit.save(traced, path, _extra_files={TORCHSCRIPT_METADATA: json.dumps(meta, ensure_ascii=False)})


@torch.inference_mode()
def check_parity(reference: nn.Module, path: str, fmt: str, image_size: int) -> ParityReport:
    """Compare the exported file's probabilities with ``reference``'s on seeded random batches."""
    if fmt in ("onnx", "openvino"):
        backend = OnnxBackend(path, device="cpu") if fmt == "onnx" else OpenVinoBackend(path, device="cpu")

        def run(batch: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(backend.probabilities(batch))
    else:
        loaded = load_torchscript(path)

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
