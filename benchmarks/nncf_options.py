"""NNCF's quantization options against top-1 agreement (issue 13): which of them keeps the most of
the float model's answers?

The float OpenVINO IR of ``--checkpoint`` (``cnnkit export --format openvino``) is quantized by
``nncf.quantize`` on the same calibration images as ``cnnkit export --int8 --calibration-data
flowers-20`` (300 of train/, seed 0, through the checkpoint's eval pipeline), once per variant,
and each int8 model's top-1 is compared with the float checkpoint's on test/ and valid/, and its
probabilities with the float IR's on both (mean total variation distance, "probability moved"):

- ``cnnkit``: what ``cnnkit export --format openvino --int8`` runs by default
  (:func:`cnnkit.openvino_export.quantize_ir`, ``--smooth-quant auto``): quantized without and with
  SmoothQuant (alpha 0.5), the one whose valid/ probabilities moved less from the float model's kept;
- ``default``: ``nncf.quantize`` with its defaults (cnnkit's default before ``--smooth-quant``);
- ``full-bias-correction``: ``fast_bias_correction=False``;
- ``head-float``: the classifier head's MatMuls left in float (``ignored_scope``);
- ``ends-float``: the first convolution and the head's MatMuls left in float;
- ``mixed``: ``preset=MIXED`` (asymmetric activations);
- ``calibrate-all``: every image of train/ (2,044) calibrates, not 300;
- ``quantile``: activation ranges from the mean of per-batch quantiles (``MEAN_QUANTILE``) instead of min/max;
- ``smooth-conv``: SmoothQuant on the convolutions' inputs (alpha ``$SMOOTH_ALPHA``, 0.5 by default),
  switched on by NNCF's transformer model type (the only switch it has), with the preset that type
  implies (mixed); ``smooth-conv-performance``: the same with the performance preset (symmetric
  activations, what ``--smooth-quant`` runs); ``transformer-type``: the transformer type with SmoothQuant off;
  ``smooth-prepass``: NNCF's SmoothQuant algorithm alone, then the default quantization;
- ``channel-alignment``: NNCF's channel alignment on;
- ``agreement-control``: what ``cnnkit export --format openvino --int8 --min-agreement 99.5`` runs
  (:func:`cnnkit.openvino_export.quantize_ir`):
  ``quantize_with_accuracy_control`` with top-1 *agreement with the float model* as its metric, on
  the held-out valid/: the layers that change the most answers are reverted to float until 99.5 %
  of them agree. Its valid/ figure is then not held out; test/ is.

    python benchmarks/nncf_options.py --checkpoint CKPT    # a flowers-20 model
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NNCF_CI", "1")  # no usage telemetry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limit import CNNKIT, FLOWERS_20, machine, subprocess_env  # noqa: E402

VARIANTS = ("cnnkit", "default", "full-bias-correction", "head-float", "ends-float", "mixed", "calibrate-all",
            "quantile", "smooth-conv", "transformer-type", "smooth-conv-performance", "smooth-prepass",
            "channel-alignment", "agreement-control")
SMOOTH_ALPHA = float(os.environ.get("SMOOTH_ALPHA", "0.5"))


def options(nncf, variant: str, model) -> dict:
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    def smoothing(alpha: float) -> AdvancedQuantizationParameters:
        return AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=alpha, matmul=-1))

    quantile = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MEAN_QUANTILE)
    # NNCF runs SmoothQuant for its transformer model type only (which also leaves additions and pooling in float)
    transformer = {"model_type": nncf.ModelType.TRANSFORMER}
    return {"default": {}, "full-bias-correction": {"fast_bias_correction": False},
            "head-float": {"ignored_scope": nncf.IgnoredScope(types=["MatMul"])},
            "ends-float": {"ignored_scope": nncf.IgnoredScope(types=["MatMul"], names=[first_convolution(model)])},
            "mixed": {"preset": nncf.QuantizationPreset.MIXED}, "quantile": {"advanced_parameters": quantile},
            "calibrate-all": {}, "agreement-control": {}, "smooth-prepass": {}, "cnnkit": {},
            "smooth-conv": {**transformer, "advanced_parameters": smoothing(SMOOTH_ALPHA)},
            "transformer-type": {**transformer, "advanced_parameters": smoothing(-1)},
            "smooth-conv-performance": {**transformer, "preset": nncf.QuantizationPreset.PERFORMANCE,
                                        "advanced_parameters": smoothing(SMOOTH_ALPHA)},
            "channel-alignment": {"advanced_parameters": AdvancedQuantizationParameters(disable_channel_alignment=False)},
            }[variant]


def first_convolution(model) -> str:
    return next(op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "Convolution")


def quantize(nncf, float_xml: Path, int8_xml: Path, ckpt, images, variant: str) -> str:
    """Write the int8 model of ``variant`` to ``int8_xml``; return what cnnkit chose, if it did."""
    import openvino as ov

    from cnnkit.config.serving import SMOOTH_QUANT_AUTO_ALPHAS, SUGGESTED_MIN_AGREEMENT
    from cnnkit.models.exported import read_openvino_metadata, set_openvino_metadata
    from cnnkit.openvino_export import DecodedImages, quantize_ir

    if variant in ("agreement-control", "cnnkit"):
        settings = quantize_ir(str(float_xml), str(int8_xml), ckpt, images,
                               SUGGESTED_MIN_AGREEMENT / 100 * (variant != "cnnkit"),
                               SMOOTH_QUANT_AUTO_ALPHAS if variant == "cnnkit" else (0.0,))
        moved = ", ".join(f"{100 * m:.2f}% at alpha {a}" for a, m in settings["smooth_quant_moved"].items())
        return f" (kept: SmoothQuant alpha {settings['smooth_quant']:g}; valid/ probability moved {moved})" if moved else ""
    calibration = images.calibration
    if variant == "calibrate-all":
        calibration = [str(p) for p in sorted((FLOWERS_20 / "train").glob("*/*.jpg"))]
    model = ov.Core().read_model(float_xml)
    dataset = nncf.Dataset(DecodedImages(ckpt, calibration), lambda item: item[0])
    if variant == "smooth-prepass":  # NNCF's SmoothQuant alone, then the default quantization of its model
        from nncf.quantization.algorithms.pipeline import Pipeline
        from nncf.quantization.algorithms.smooth_quant.algorithm import SmoothQuant

        model = Pipeline([[SmoothQuant(len(calibration), alpha_map={"convolution": SMOOTH_ALPHA, "matmul": -1})]]).run(
            model, dataset)
    model = nncf.quantize(model, dataset,
                          subset_size=len(calibration), target_device=nncf.TargetDevice.CPU, **options(nncf, variant, model))
    set_openvino_metadata(model, {**read_openvino_metadata(str(float_xml)), "quantization": {"variant": variant}})
    ov.save_model(model, int8_xml, compress_to_fp16=False)
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()

    import nncf
    import numpy as np
    import openvino as ov

    from cnnkit.inference.predictor import Predictor
    from cnnkit.models.checkpoint import load_checkpoint
    from cnnkit.openvino_export import DecodedImages
    from cnnkit.quantize import gate_images

    nncf.set_log_level(logging.ERROR)
    print(machine(), flush=True)
    ckpt = load_checkpoint(str(args.checkpoint))
    work = Path(tempfile.mkdtemp(prefix="cnnkit-nncf-options-"))
    float_xml = work / "float.xml"
    subprocess.run([*CNNKIT, "-q", "export", str(args.checkpoint), "--format", "openvino", "-o", str(float_xml)],
                   check=True, env=subprocess_env(), stdout=subprocess.DEVNULL)
    images = gate_images(str(FLOWERS_20), ckpt.classes, 300, 500, 0)  # cnnkit export's defaults
    splits = {split: [str(p) for p in sorted((FLOWERS_20 / split).glob("*/*.jpg"))] for split in ("test", "valid")}
    reference = {s: [p.top[0].label for p in Predictor(str(args.checkpoint), "cpu", tta="none").predict_paths(paths)]
                 for s, paths in splits.items()}
    arrays = np.concatenate([image for image, _ in DecodedImages(ckpt, splits["valid"] + splits["test"])])
    core = ov.Core()
    reference_probabilities = core.compile_model(str(float_xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(arrays)[0]
    print("| variant | test agreement | valid/ agreement | test top-1 (float: "
          f"{sum(r == Path(p).parent.name for r, p in zip(reference['test'], splits['test'])) / len(splits['test']):.1%}) "
          "| probability moved, valid/ + test/ | quantization s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for variant in args.variants:
        int8_xml = work / f"{variant}.xml"
        start = time.perf_counter()
        chosen = quantize(nncf, float_xml, int8_xml, ckpt, images, variant)
        seconds = time.perf_counter() - start
        predictor = Predictor(str(int8_xml), "cpu", tta="none")
        top1 = {s: [p.top[0].label for p in predictor.predict_paths(paths)] for s, paths in splits.items()}
        agree = {s: sum(a == b for a, b in zip(top1[s], reference[s])) / len(reference[s]) for s in splits}
        accuracy = sum(a == Path(p).parent.name for a, p in zip(top1["test"], splits["test"])) / len(splits["test"])
        moved = 0.5 * np.abs(core.compile_model(str(int8_xml), "CPU")(arrays)[0] - reference_probabilities).sum(1).mean()
        print(f"| {variant}{chosen} | {agree['test']:.1%} | {agree['valid']:.1%} | {accuracy:.1%} | {moved:.2%} "
              f"| {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
