"""NNCF's quantization options against top-1 agreement (issue 13): which of them keeps the most of
the float model's answers?

The float OpenVINO IR of ``--checkpoint`` (``cnnkit export --format openvino``) is quantized by
``nncf.quantize`` on the same calibration images as ``cnnkit export --int8 --calibration-data
flowers-20`` (300 of train/, seed 0, through the checkpoint's eval pipeline), once per variant,
and each int8 model's top-1 is compared with the float checkpoint's on test/ and valid/:

- ``default``: ``nncf.quantize`` with its defaults (what ``cnnkit export --format openvino --int8``
  runs by default; before this benchmark, with accuracy control on labelled data reverting layers
  only when more than 1 point of accuracy was lost);
- ``full-bias-correction``: ``fast_bias_correction=False``;
- ``head-float``: the classifier head's MatMuls left in float (``ignored_scope``);
- ``mixed``: ``preset=MIXED`` (asymmetric activations);
- ``calibrate-all``: every image of train/ (2,044) calibrates, not 300;
- ``quantile``: activation ranges from the mean of per-batch quantiles (``MEAN_QUANTILE``) instead of min/max;
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
from pathlib import Path

os.environ.setdefault("NNCF_CI", "1")  # no usage telemetry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limit import CNNKIT, FLOWERS_20, machine, subprocess_env  # noqa: E402

VARIANTS = ("default", "full-bias-correction", "head-float", "mixed", "calibrate-all", "quantile", "agreement-control")


def options(nncf, variant: str) -> dict:
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    quantile = AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MEAN_QUANTILE)
    return {"default": {}, "full-bias-correction": {"fast_bias_correction": False},
            "head-float": {"ignored_scope": nncf.IgnoredScope(types=["MatMul"])},
            "mixed": {"preset": nncf.QuantizationPreset.MIXED}, "calibrate-all": {}, "agreement-control": {},
            "quantile": {"advanced_parameters": quantile}}[variant]


def quantize(nncf, float_xml: Path, int8_xml: Path, ckpt, images, variant: str) -> None:
    """Write the int8 model of ``variant`` to ``int8_xml``."""
    import openvino as ov

    from cnnkit.config.serving import SUGGESTED_MIN_AGREEMENT
    from cnnkit.models.exported import read_openvino_metadata, set_openvino_metadata
    from cnnkit.openvino_export import DecodedImages, quantize_ir

    if variant == "agreement-control":
        quantize_ir(str(float_xml), str(int8_xml), ckpt, images, SUGGESTED_MIN_AGREEMENT / 100)
        return
    calibration = images.calibration
    if variant == "calibrate-all":
        calibration = [str(p) for p in sorted((FLOWERS_20 / "train").glob("*/*.jpg"))]
    model = nncf.quantize(ov.Core().read_model(float_xml), nncf.Dataset(DecodedImages(ckpt, calibration), lambda item: item[0]),
                          subset_size=len(calibration), target_device=nncf.TargetDevice.CPU, **options(nncf, variant))
    set_openvino_metadata(model, {**read_openvino_metadata(str(float_xml)), "quantization": {"variant": variant}})
    ov.save_model(model, int8_xml, compress_to_fp16=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = parser.parse_args()

    import nncf

    from cnnkit.inference.predictor import Predictor
    from cnnkit.models.checkpoint import load_checkpoint
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
    print("| variant | test agreement | valid/ agreement | test top-1 (float: "
          f"{sum(r == Path(p).parent.name for r, p in zip(reference['test'], splits['test'])) / len(splits['test']):.1%}) |")
    print("| --- | ---: | ---: | ---: |")
    for variant in args.variants:
        int8_xml = work / f"{variant}.xml"
        quantize(nncf, float_xml, int8_xml, ckpt, images, variant)
        predictor = Predictor(str(int8_xml), "cpu", tta="none")
        top1 = {s: [p.top[0].label for p in predictor.predict_paths(paths)] for s, paths in splits.items()}
        agree = {s: sum(a == b for a, b in zip(top1[s], reference[s])) / len(reference[s]) for s in splits}
        accuracy = sum(a == Path(p).parent.name for a, p in zip(top1["test"], splits["test"])) / len(splits["test"])
        print(f"| {variant} | {agree['test']:.1%} | {agree['valid']:.1%} | {accuracy:.1%} |", flush=True)


if __name__ == "__main__":
    main()
