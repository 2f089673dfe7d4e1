"""int8 post-training quantization of an ONNX export, kept only when it passes a measured gate.

Quantization is ONNX Runtime's (``onnxruntime.quantization``): its model pre-processing (graph
optimisation and shape inference), then static quantization in the QDQ format with per-channel
int8 weights and uint8 activations, whose ranges are calibrated on images preprocessed by the
checkpoint's own eval pipeline (:func:`~cnnkit.data.transforms.build_transforms`), so calibration
sees exactly what prediction will. On a CPU without VNNI the weights keep 7 bits
(``reduce_range``): the u8 x s8 products of AVX2 can saturate otherwise (ONNX Runtime's guidance).
The probability head (softmax, temperature) stays float.

**The gate**: on held-out images (none of them used for calibration), the float model and the
int8 model score the same batches, one after the other, at the batch size ``cnnkit predict`` uses
on a CPU. The int8 model is kept only if its top-1 accuracy is at most ``max_accuracy_drop``
points below the float model's (on unlabelled images: its disagreement with the float model's
top-1, an upper bound of the accuracy it can lose) and it is at least ``min_speedup`` times as
fast as the faster float runtime (the torch checkpoint or the float ONNX export; for an OpenVINO
int8 model, the float OpenVINO IR too). :func:`quantize_and_gate` runs that sequence whatever the
quantizer: :func:`quantize_gated` here for ONNX Runtime, :mod:`cnnkit.openvino_export` for NNCF.
"""

from __future__ import annotations

import logging
import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import ExportConfig
from .data.folders import ImageDataset, collate, expand_inputs, scan_image_folder
from .data.transforms import build_transforms
from .errors import CnnkitError, DataError, GateError, first_line, require_extra
from .inference.onnx import OnnxBackend
from .inference.predictor import Predictor, scoring_defaults
from .models.checkpoint import Checkpoint
from .models.exported import INPUT_NAME, set_onnx_metadata
from .runtime import has_vnni

log = logging.getLogger(__name__)

FLOAT_HEAD_OPS = ("Softmax", "LogSoftmax", "Exp", "Div")  # the probability head, left in float32
HELD_OUT_SPLITS = ("valid", "val", "validation", "test")


@dataclass(frozen=True)
class GateImages:
    """Which images calibrate and which measure the gate (never the same ones)."""

    calibration: list[str]
    held_out: list[str]
    labels: list[int] | None  # the checkpoint's class index of each held-out image, when labelled
    description: str


def gate_images(data_dir: str, classes: Sequence[str], calibration: int, held_out: int, seed: int) -> GateImages:
    """Split ``data_dir`` into calibration and held-out images.

    A data root (``train/`` and ``valid/``, ``val/`` or ``test/``) calibrates on ``train/`` and
    gates on the other; a labelled folder (class sub-folders named as the checkpoint's classes)
    or a plain folder of images is split in two halves by a seeded draw. Each part is capped at
    its count by a seeded draw too.
    """
    if not os.path.isdir(data_dir):
        raise DataError(f"--calibration-data: not a folder: {data_dir}")
    train_dir = os.path.join(data_dir, "train")
    other = next((os.path.join(data_dir, n) for n in HELD_OUT_SPLITS if os.path.isdir(os.path.join(data_dir, n))), None)
    rng = random.Random(seed)
    if os.path.isdir(train_dir) and other:
        calib, _ = _labelled(train_dir, classes)
        gate, labels = _labelled(other, classes)
        where = f"calibrated on {train_dir}, gated on {other}"
    else:
        paths, labels = _labelled(data_dir, classes) if _is_labelled(data_dir, classes) else (_images(data_dir), None)
        if len(paths) < 2:
            raise DataError(f"--calibration-data {data_dir}: need at least 2 images (some to calibrate, others to test)")
        order = list(range(len(paths)))
        rng.shuffle(order)
        half = len(order) // 2
        calib = [paths[i] for i in sorted(order[half:])]
        held = sorted(order[:half])
        gate = [paths[i] for i in held]
        labels = [labels[i] for i in held] if labels is not None else None
        where = f"{data_dir} split in two halves (seed {seed})"
    calib = sorted(rng.sample(calib, calibration)) if len(calib) > calibration else calib
    if len(gate) > held_out:
        keep = sorted(rng.sample(range(len(gate)), held_out))
        gate = [gate[i] for i in keep]
        labels = [labels[i] for i in keep] if labels is not None else None
    kind = "labelled" if labels is not None else "unlabelled"
    return GateImages(calib, gate, labels, f"{len(calib)} calibration and {len(gate)} held-out images ({kind}): {where}")


def _is_labelled(folder: str, classes: Sequence[str]) -> bool:
    """Whether ``folder``'s sub-folders are class folders: any of them named as a class of the
    model (none: plain images, in folders or not; :func:`_labelled` refuses the others)."""
    return any(e.is_dir() and e.name in classes for e in os.scandir(folder))


def _labelled(folder: str, classes: Sequence[str]) -> tuple[list[str], list[int]]:
    names, samples = scan_image_folder(folder)
    unknown = sorted(set(names) - set(classes))
    if unknown:
        raise DataError(f"--calibration-data {folder} has class folders the model does not know: "
                        f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    index = [classes.index(name) for name in names]
    return [p for p, _ in samples], [index[i] for _, i in samples]


def _images(folder: str) -> list[str]:
    found = list(expand_inputs([folder]))  # recursed, images only, sorted
    if not found:
        raise DataError(f"--calibration-data {folder} has no images")
    return found


def batches(ckpt: Checkpoint, paths: Sequence[str], batch_size: int) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Preprocessed batches of ``paths`` (the checkpoint's eval pipeline) and each image's index;
    images that cannot be decoded are left out, with one warning for them all."""
    dataset = ImageDataset(list(paths), build_transforms(ckpt.preprocess, train=False),
                           max_pixels=ckpt.preprocess.max_pixels)
    bad = 0
    for images, indices, errors in DataLoader(dataset, batch_size=batch_size, collate_fn=collate):
        good = [int(i) for i, e in zip(indices, errors) if e is None]
        bad += len(errors) - len(good)
        if images is not None:
            yield images, good
    if bad:
        log.warning("%d of %d images could not be decoded and were left out", bad, len(paths))


class CalibrationReader:
    """ONNX Runtime's ``CalibrationDataReader`` protocol (``get_next``) over preprocessed batches."""

    def __init__(self, ckpt: Checkpoint, paths: Sequence[str], input_name: str, batch_size: int = 8):
        self._batches = batches(ckpt, paths, batch_size)
        self.input_name = input_name
        self.images = 0

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self.images += len(batch[1])
        return {self.input_name: batch[0].numpy()}


def quantize(float_path: str, int8_path: str, reader: CalibrationReader, method: str) -> dict[str, Any]:
    """Write the int8 (QDQ) version of the ONNX model ``float_path`` to ``int8_path``; return its settings."""
    require_extra("export", "onnxruntime", "onnx")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reduce_range = not has_vnni()
    prepared = int8_path + ".pre.onnx"
    try:
        quant_pre_process(float_path, prepared)
        head = [n.name for n in onnx.load(prepared).graph.node if n.op_type in FLOAT_HEAD_OPS]
        quantize_static(
            prepared, int8_path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
            reduce_range=reduce_range, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method={"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                              "percentile": CalibrationMethod.Percentile}[method],
            nodes_to_exclude=head,
        )
    except CnnkitError:
        raise
    except Exception as exc:  # onnxruntime's quantizer raises what its graph code meets
        raise CnnkitError(f"int8 quantization failed: {first_line(exc)}") from None
    finally:
        if os.path.exists(prepared):
            os.unlink(prepared)
    if not reader.images:
        raise DataError("no calibration image could be decoded")
    return {"method": "onnxruntime static, QDQ, per-channel int8 weights, uint8 activations",
            "calibration_method": method, "calibration_images": reader.images, "reduce_range": reduce_range}


@dataclass(frozen=True)
class GateReport:
    """What the gate measured on the held-out images, and its verdict."""

    images: int
    labelled: bool
    agreement: float  # share of images whose int8 top-1 is the float model's
    float_accuracy: float | None
    int8_accuracy: float | None
    torch_img_s: float  # median of the per-batch rates, float32 checkpoint (torch)
    onnx_img_s: float  # float32 ONNX export (ONNX Runtime)
    int8_img_s: float
    batch_size: int
    threads: int
    max_accuracy_drop: float
    min_speedup: float
    openvino_img_s: float | None = None  # float32 OpenVINO IR, measured when the int8 model is OpenVINO's
    runtime: str = "onnxruntime"  # what runs the int8 model (and the float export of the same format)

    @property
    def accuracy_drop(self) -> float:
        """Points of top-1 accuracy lost (unlabelled: the disagreement with the float model)."""
        if self.labelled:
            return 100 * (self.float_accuracy - self.int8_accuracy)
        return 100 * (1 - self.agreement)

    @property
    def speedup(self) -> float:
        return self.int8_img_s / max(r for r in (self.torch_img_s, self.onnx_img_s, self.openvino_img_s) if r is not None)

    @property
    def failures(self) -> list[str]:
        failed = []
        if self.accuracy_drop > self.max_accuracy_drop + 1e-9:
            what = "top-1 accuracy" if self.labelled else "agreement with the float model's top-1"
            failed.append(f"{what} drops {self.accuracy_drop:.2f} points (--max-accuracy-drop {self.max_accuracy_drop:g})")
        if self.speedup < self.min_speedup:
            failed.append(f"{self.speedup:.2f}x the faster float runtime (--min-speedup {self.min_speedup:g})")
        return failed

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy_drop": round(self.accuracy_drop, 4), "speedup": round(self.speedup, 4),
                "passed": self.passed}

    def __str__(self) -> str:
        accuracy = (f"top-1 {self.float_accuracy:.2%} float, {self.int8_accuracy:.2%} int8"
                    if self.labelled else "unlabelled images")
        openvino = f", float OpenVINO {self.openvino_img_s:.1f}" if self.openvino_img_s is not None else ""
        return (f"gate {'passed' if self.passed else 'FAILED'} on {self.images} held-out images: {accuracy}, "
                f"agreement {self.agreement:.2%}; batch {self.batch_size}, {self.threads} threads: int8 ({self.runtime}) "
                f"{self.int8_img_s:.1f} img/s, float torch {self.torch_img_s:.1f}, float ONNX {self.onnx_img_s:.1f}"
                f"{openvino} = {self.speedup:.2f}x" + ("" if self.passed else "; " + "; ".join(self.failures)))


Runtime = Callable[[torch.Tensor], np.ndarray]  # preprocessed batch -> probabilities


def measure_gate(ckpt: Checkpoint, exports: Mapping[str, Runtime], images: GateImages, cfg: ExportConfig,
                 runtime: str = "onnxruntime") -> GateReport:
    """Score the held-out images with the float checkpoint and each of ``exports`` ("onnx": the
    float ONNX export, "openvino": the float IR, if measured, and "int8": the quantized model, run
    by ``runtime``), batch by batch in turn; accuracy, agreement and each one's median per-batch rate."""
    torch_model = Predictor(ckpt, device="cpu", tta="none")  # (the gate compares one view with one view)
    runtimes = {"torch": torch_model.probabilities, **exports}
    batch_size, _ = scoring_defaults("cpu", None, None)
    rates: dict[str, list[float]] = {name: [] for name in runtimes}
    top1: dict[str, list[int]] = {"torch": [], "int8": []}
    scored: list[int] = []
    for n, (batch, indices) in enumerate(batches(ckpt, images.held_out, batch_size)):
        for name, run in runtimes.items():
            if n == 0:
                run(batch)  # warm-up: first-call allocations and kernel selection are not the rate
            began = time.perf_counter()
            probs = run(batch)
            rates[name].append(len(indices) / (time.perf_counter() - began))
            if name in top1:
                top1[name] += probs.argmax(1).tolist()
        scored += indices
    if not scored:
        raise DataError("no held-out image could be decoded")
    agreement = sum(a == b for a, b in zip(top1["torch"], top1["int8"])) / len(scored)
    accuracy: dict[str, float | None] = {"torch": None, "int8": None}
    if images.labels is not None:
        truth = [images.labels[i] for i in scored]
        accuracy = {k: sum(p == t for p, t in zip(v, truth)) / len(truth) for k, v in top1.items()}
    return GateReport(
        images=len(scored), labelled=images.labels is not None, agreement=agreement,
        float_accuracy=accuracy["torch"], int8_accuracy=accuracy["int8"],
        torch_img_s=statistics.median(rates["torch"]), onnx_img_s=statistics.median(rates["onnx"]),
        int8_img_s=statistics.median(rates["int8"]), batch_size=batch_size, threads=torch.get_num_threads(),
        max_accuracy_drop=cfg.max_accuracy_drop, min_speedup=cfg.min_speedup,
        openvino_img_s=statistics.median(rates["openvino"]) if "openvino" in rates else None, runtime=runtime,
    )


def quantize_and_gate(cfg: ExportConfig, ckpt: Checkpoint, quantize_with: Callable[[GateImages], dict[str, Any]],
                      exports: Callable[[], Mapping[str, Runtime]], runtime: str) -> tuple[dict[str, Any], GateReport]:
    """The int8 sequence, whatever the quantizer: split ``cfg.calibration_data`` (:func:`gate_images`),
    quantize with ``quantize_with`` (its settings back), measure the gate on ``exports()`` (as
    :func:`measure_gate`) and raise :class:`GateError` on a failed gate unless ``cfg.ignore_gate``.
    Returns the ``quantization`` metadata (settings, data, gate figures) and the report."""
    images = gate_images(cfg.calibration_data, ckpt.classes, cfg.calibration_images, cfg.gate_images, cfg.seed)
    log.info("int8: %s", images.description)
    settings = quantize_with(images)
    report = measure_gate(ckpt, exports(), images, cfg, runtime)
    log.debug("int8: %s", report)
    if not report.passed and not cfg.ignore_gate:
        raise GateError(f"the int8 model failed its gate: {'; '.join(report.failures)}; nothing was written "
                        "(--ignore-gate keeps it anyway)")
    if not report.passed:
        log.warning("int8: keeping a model that failed its gate (--ignore-gate): %s", "; ".join(report.failures))
    return {**settings, "data": images.description, "gate": report.to_dict()}, report


def quantize_gated(cfg: ExportConfig, ckpt: Checkpoint, float_path: str, int8_path: str,
                   meta: dict[str, Any]) -> GateReport:
    """Quantize the float export ``float_path`` into ``int8_path``, measure the gate and write the
    settings and the gate's figures into the int8 file's metadata; a failed gate raises
    :class:`GateError` unless ``cfg.ignore_gate``."""
    import onnx

    def quantize_with(images: GateImages) -> dict[str, Any]:
        reader = CalibrationReader(ckpt, images.calibration, INPUT_NAME)
        return quantize(float_path, int8_path, reader, cfg.calibration_method)

    def exports() -> dict[str, Runtime]:
        return {"onnx": OnnxBackend(float_path, "cpu").probabilities, "int8": OnnxBackend(int8_path, "cpu").probabilities}

    quantization, report = quantize_and_gate(cfg, ckpt, quantize_with, exports, "onnxruntime")
    proto = onnx.load(int8_path)
    set_onnx_metadata(proto, {**meta, "quantization": quantization})
    onnx.save(proto, int8_path)
    return report
