"""OpenVINO IR exports: the float IR converted from the float ONNX export, and its int8 version by
NNCF's post-training quantization, kept only when it passes the same gate as an ONNX int8 model.

The IR is read from the ONNX file :mod:`cnnkit.export` writes (the same graph: probabilities out,
temperature in, dynamic batch) by the OpenVINO core's ONNX reader, then saved with float32
weights (``save_model`` would halve them to float16 by default, off the parity tolerance), and
cnnkit's metadata in its rt_info.

int8: NNCF calibrates on images preprocessed by the checkpoint's own eval pipeline
(:func:`cnnkit.quantize.batches`). ``--smooth-quant auto`` (the default) quantizes twice, plain and
with SmoothQuant on the convolutions' inputs (alpha 0.5: half of each input channel's range moved
into the weights, which are quantized per channel), and keeps the model whose probabilities on the
held-out images moved less from the float model's (benchmarks/RESULTS.md: it kept 99.6 % of a
densenet121's test answers where plain NNCF kept 98.8 %, did not help every model, and its scales
cost about a quarter of the int8 speed). With ``--min-agreement`` above 0 (0, the default: plain
``nncf.quantize``), ``nncf.quantize_with_accuracy_control`` measures top-1 *agreement with the
float model* on the held-out images (labelled or not): the layers that change the most answers are
reverted to float until at least that share of them keep the float model's top-1. Agreement rather
than accuracy, because the answers a user sees change with every disagreement, right or wrong, and
an accuracy that nets gains against losses hides them; and the agreement bounds the accuracy change.
The held-out images then also measure the gate (:func:`cnnkit.quantize.quantize_and_gate`), against
the torch checkpoint, the float ONNX export and the float IR.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Any, Iterator, Sequence

from .config import ExportConfig
from .errors import CnnkitError, DataError, first_line, require_extra
from .inference.onnx import OnnxBackend
from .inference.openvino import OpenVinoBackend
from .models.checkpoint import Checkpoint
from .models.exported import set_openvino_metadata
from .quantize import GateImages, GateReport, Runtime, batches, quantize_and_gate

log = logging.getLogger(__name__)

# Held-out images scored in one call by the accuracy control's metric: NNCF re-scores them for every
# group of quantizers it ranks (about 120 for densenet121), and one image a call is the slowest way.
VALIDATION_BATCH = 16


def convert_to_ir(onnx_path: str, xml_path: str, meta: dict[str, Any]) -> None:
    """Write the OpenVINO IR of the ONNX model ``onnx_path`` (``xml_path`` and the ``.bin`` beside
    it), with ``meta`` in its rt_info."""
    require_extra("openvino", "openvino")
    import openvino as ov

    try:
        model = ov.Core().read_model(onnx_path)  # (not ov.convert_model: the same graph, without its telemetry)
        set_openvino_metadata(model, meta)
        ov.save_model(model, xml_path, compress_to_fp16=False)
    except Exception as exc:
        raise CnnkitError(f"OpenVINO conversion failed: {first_line(exc)}") from None


class DecodedImages:
    """Preprocessed images, one ``(array [1, 3, H, W], class index or -1)`` each, decoded anew on
    each pass (NNCF reads its data more than once); ``seen`` counts the images decoded."""

    def __init__(self, ckpt: Checkpoint, paths: list[str], labels: list[int] | None = None):
        self.ckpt, self.paths, self.labels = ckpt, paths, labels
        self.seen = 0

    def __iter__(self) -> Iterator[tuple[Any, int]]:
        count = 0
        for batch, indices in batches(self.ckpt, self.paths, 8):
            for image, i in zip(batch, indices):
                count += 1
                self.seen = max(self.seen, count)
                yield image[None].numpy(), self.labels[i] if self.labels is not None else -1


def quantize_ir(float_xml: str, int8_xml: str, ckpt: Checkpoint, images: GateImages, min_agreement: float,
                smooth_quant_alphas: Sequence[float] = (0.0,)) -> dict[str, Any]:
    """Write the int8 version of the float IR ``float_xml`` to ``int8_xml`` (NNCF; with accuracy
    control keeping the float top-1 of at least ``min_agreement`` of the held-out images, where it
    is above 0); return its settings.

    Quantized once for each SmoothQuant alpha (0: off); of several, the model kept is the one whose
    probabilities on the held-out images moved least from the float model's (mean total variation
    distance): a measure of every image, where top-1 agreement on a few hundred turns on the two or
    three near ties int8 flips either way.
    """
    require_extra("openvino", "openvino", "nncf")
    os.environ.setdefault("NNCF_CI", "1")  # read when nncf is imported: otherwise it sends usage telemetry
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # nncf.torch's import: "No CUDA runtime"
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.ERROR)  # its INFO lines would mix with cnnkit's output
    calibration = DecodedImages(ckpt, images.calibration)
    if min_agreement > 0:
        log.info("int8: reverting the layers that change the most answers to float until %.1f%% of the held-out "
                 "images keep the float model's top-1 (each layer group is tried in turn: minutes, for deep "
                 "models on a few cores)", 100 * min_agreement)
    core = ov.Core()
    try:
        # The float IR's outputs on the held-out images, once: accuracy control's reference answers
        # (for every alpha) and the reference the alphas' models are compared with.
        reference = (_outputs(core.compile_model(float_xml, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), ckpt,
                              images.held_out) if min_agreement > 0 or len(smooth_quant_alphas) > 1 else None)
        with contextlib.redirect_stdout(io.StringIO()):  # NNCF's progress bars (rich) would mix with cnnkit's output
            models = {alpha: _quantize(nncf, core.read_model(float_xml), calibration, ckpt, images, min_agreement, alpha,
                                       reference)
                      for alpha in smooth_quant_alphas}
        moved = _probabilities_moved(core, models, reference, ckpt, images.held_out) if len(models) > 1 else {}
        alpha = min(moved, key=moved.__getitem__) if moved else smooth_quant_alphas[0]
        if moved:
            log.info("int8: SmoothQuant %s (held-out probabilities moved %s)", f"alpha {alpha:g}" if alpha else "off",
                     ", ".join(f"{100 * m:.2f}% {'at alpha ' + format(a, 'g') if a else 'without it'}"
                               for a, m in moved.items()))
        ov.save_model(models[alpha], int8_xml, compress_to_fp16=False)
    except CnnkitError:
        raise
    except Exception as exc:  # NNCF raises what its graph code meets
        raise CnnkitError(f"int8 quantization (NNCF) failed: {first_line(exc)}") from None
    if not calibration.seen:
        raise DataError("no calibration image could be decoded")
    control = min_agreement > 0
    return {"method": "NNCF post-training quantization (OpenVINO), int8 weights and activations"
                      + (f", SmoothQuant (alpha {alpha:g}) on the convolutions' inputs" if alpha else "")
                      + (f", accuracy control (layers reverted to float until at least {min_agreement:.1%} of the "
                         "held-out images keep the float model's top-1)" if control else ""),
            "calibration_method": "NNCF's", "calibration_images": calibration.seen, "accuracy_control": control,
            "min_agreement": min_agreement, "smooth_quant": alpha,
            "smooth_quant_moved": {format(a, "g"): m for a, m in moved.items()}, "nncf": nncf.__version__}


def _quantize(nncf: Any, model: Any, calibration: DecodedImages, ckpt: Checkpoint, images: GateImages,
              min_agreement: float, smooth_quant: float, reference: Any) -> Any:
    """``nncf.quantize``, or ``quantize_with_accuracy_control`` on agreement with the float model,
    whose outputs on the held-out images are ``reference``."""
    import numpy as np
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    dataset = nncf.Dataset(calibration, lambda item: item[0])
    common: dict[str, Any] = dict(subset_size=len(images.calibration), target_device=nncf.TargetDevice.CPU)
    advanced = None
    if smooth_quant > 0:
        # NNCF runs SmoothQuant for transformers only, so that model type switches it on (it also
        # leaves additions and pooling in float); PERFORMANCE keeps symmetric activations, as for a CNN.
        common.update(model_type=nncf.ModelType.TRANSFORMER, preset=nncf.QuantizationPreset.PERFORMANCE)
        advanced = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=smooth_quant, matmul=-1))
    if min_agreement <= 0:
        return nncf.quantize(model, dataset, advanced_parameters=advanced, **common)
    # Each held-out image with its index for a label: the float model's answer is looked up by it.
    held_out = DecodedImages(ckpt, images.held_out, list(range(len(images.held_out))))
    answers = np.argmax(reference, axis=1)

    def agreement(compiled: Any, items: Any) -> tuple[float, list[float]]:
        """The share of ``items`` given the float model's answer, and a 1 or 0 for each."""
        same: list[float] = []
        for batch in _in_batches(items, VALIDATION_BATCH):
            top1 = np.argmax(compiled(np.concatenate([image for image, _ in batch]))[0], axis=1)
            same += [float(int(answer) == answers[index]) for answer, (_, index) in zip(top1, batch)]
        return (sum(same) / len(same) if same else 1.0), same

    return nncf.quantize_with_accuracy_control(model, dataset, nncf.Dataset(held_out, lambda item: item[0]), agreement,
                                               max_drop=1.0 - min_agreement, drop_type=nncf.DropType.ABSOLUTE,
                                               advanced_quantization_parameters=advanced, **common)


def _outputs(compiled: Any, ckpt: Checkpoint, paths: list[str]) -> Any:
    """``compiled``'s outputs (probabilities, ``[N, classes]``) on ``paths``, in order."""
    import numpy as np

    rows = [compiled(np.concatenate([image for image, _ in batch]))[0]
            for batch in _in_batches(DecodedImages(ckpt, paths), VALIDATION_BATCH)]
    return np.concatenate(rows) if rows else np.zeros((0, len(ckpt.classes)), dtype=np.float32)


def _probabilities_moved(core: Any, models: dict[float, Any], reference: Any, ckpt: Checkpoint,
                         paths: list[str]) -> dict[float, float]:
    """Each int8 model's mean total variation distance from ``reference``, the float IR's
    probabilities on ``paths``."""
    import numpy as np

    return {alpha: 0.5 * float(np.abs(_outputs(core.compile_model(model, "CPU"), ckpt, paths) - reference).sum())
            / max(len(reference), 1) for alpha, model in models.items()}


def _in_batches(items: Any, size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def quantize_gated_openvino(cfg: ExportConfig, ckpt: Checkpoint, float_onnx: str, float_xml: str, int8_xml: str,
                            meta: dict[str, Any]) -> GateReport:
    """Quantize the float IR ``float_xml`` into ``int8_xml`` and gate it as
    :func:`cnnkit.quantize.quantize_gated` does an ONNX model (the float ONNX export ``float_onnx``
    is one of the float runtimes it must beat); the gate's figures go into the IR's metadata."""
    import openvino as ov

    def exports() -> dict[str, Runtime]:
        return {"onnx": OnnxBackend(float_onnx, "cpu").probabilities,
                "openvino": OpenVinoBackend(float_xml, "cpu").probabilities,
                "int8": OpenVinoBackend(int8_xml, "cpu").probabilities}

    def quantize(images: GateImages) -> dict[str, Any]:
        return quantize_ir(float_xml, int8_xml, ckpt, images, cfg.min_agreement / 100, cfg.smooth_quant_alphas)

    quantization, report = quantize_and_gate(cfg, ckpt, quantize, exports, "openvino")
    core = ov.Core()
    core.set_property({"ENABLE_MMAP": False})  # the weights in memory, not mapped from the file rewritten here
    model = core.read_model(int8_xml)
    set_openvino_metadata(model, {**meta, "quantization": quantization})
    ov.save_model(model, int8_xml, compress_to_fp16=False)
    return report
