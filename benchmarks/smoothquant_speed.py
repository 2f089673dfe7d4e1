"""What SmoothQuant costs in speed (issue 13): the int8 IR of ``cnnkit export --format openvino
--int8`` with ``--smooth-quant off`` and with ``--smooth-quant 0.5``, timed in one run.

For each architecture, a checkpoint with random seeded weights at its own 224-px preprocessing
(throughput does not depend on the weights' values) is exported twice, calibrated on the same 128
flowers-20 photos (``--ignore-gate``: random weights make the gate's accuracy half meaningless).
Then both IRs, compiled as cnnkit's backend compiles them, score the same preprocessed photos at
each batch size, interleaved over ``--repeats`` rounds of ``--seconds`` each; the table gives the
median images per second and the ratio of the two in each round's pair.

    python benchmarks/smoothquant_speed.py          # --archs resnet18 densenet121
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from limit import CNNKIT, machine, make_checkpoint, real_images, subprocess_env  # noqa: E402

SETTINGS = ("off", "0.5")


def export(checkpoint: Path, calibration: Path, setting: str) -> Path:
    output = checkpoint.with_name(f"{checkpoint.stem}-smooth-{setting}.xml")
    subprocess.run([*CNNKIT, "-q", "export", str(checkpoint), "--format", "openvino", "--int8", "--calibration-data",
                    str(calibration), "--smooth-quant", setting, "--ignore-gate", "-o", str(output)],
                   check=True, env=subprocess_env(), stdout=subprocess.DEVNULL)
    return output


def throughput(model, inputs, seconds: float) -> float:
    model(inputs)  # warm-up
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        model(inputs)
        done += len(inputs)
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "densenet121"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    from cnnkit.inference.openvino import OpenVinoBackend
    from cnnkit.models.checkpoint import load_checkpoint
    from cnnkit.quantize import batches

    host = machine()
    print(f"`{shlex.join(['python', 'benchmarks/smoothquant_speed.py', *sys.argv[1:]])}`: {host['cpu']}, "
          f"{host['cores']} cores, torch {host['torch']}; load average {host['load_avg_1m']:.2f} before\n")
    print("| arch | batch | int8 IR, SmoothQuant off (img/s) | int8 IR, SmoothQuant 0.5 (img/s) | 0.5 / off, per round |")
    print("| --- | ---: | ---: | ---: | --- |")
    photos = real_images()
    with tempfile.TemporaryDirectory(prefix="cnnkit-smoothquant-") as tmp:
        calibration = Path(tmp) / "calibration"  # one flat folder: the random models' classes are not flowers
        calibration.mkdir()
        for photo in photos[-128:]:
            shutil.copyfile(photo, calibration / f"{photo.parent.name}_{photo.name}")
        for arch in args.archs:
            checkpoint = make_checkpoint(arch, Path(tmp) / f"{arch}.pt")
            backends = {s: OpenVinoBackend(str(export(checkpoint, calibration, s)), "cpu") for s in SETTINGS}
            paths = [str(p) for p in photos[:max(args.batch_sizes)]]
            images = next(iter(batches(load_checkpoint(str(checkpoint)), paths, len(paths))))[0].numpy()
            for size in args.batch_sizes:
                rounds = [{s: throughput(backends[s].probabilities, images[:size], args.seconds) for s in SETTINGS}
                          for _ in range(args.repeats)]
                off, on = (statistics.median(r[s] for r in rounds) for s in SETTINGS)
                ratios = [r["0.5"] / r["off"] for r in rounds]
                print(f"| {arch} | {size} | {off:.1f} | {on:.1f} | {', '.join(f'{x:.2f}' for x in ratios)} "
                      f"(median **{statistics.median(ratios):.2f}**) |", flush=True)


if __name__ == "__main__":
    main()
