"""How ``cnnkit predict`` chooses ``--batch-size`` and ``--workers`` on this machine (issue 3).

Two measurements, one run:

1. forward-only images/s of the bare model on ready-made 224-px tensors by batch size, in
   torch's default NCHW layout and channels-last (what cnnkit uses);
2. ``cnnkit predict DIR`` end to end (whole process) for each ``--batch-size`` x ``--workers``.

Images are the bundled flower photos resized to 500x375 JPEGs (as in predict_bench.py).

    python benchmarks/predict_defaults.py --archs resnet18 densenet121
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from predict_bench import CNNKIT, make_checkpoint, make_images, run


def forward_by_batch(arch: str, batch_sizes: list[int], images_per_size: int) -> dict[str, dict[int, float]]:
    import torchvision

    model = torchvision.models.get_model(arch, weights=None).eval()
    table: dict[str, dict[int, float]] = {}
    for layout, fmt in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        model = model.to(memory_format=fmt)
        table[layout] = {}
        for batch_size in batch_sizes:
            x = torch.randn(batch_size, 3, 224, 224).contiguous(memory_format=fmt)
            times = []
            with torch.inference_mode():
                model(x)  # warm-up
                for _ in range(max(6, images_per_size // batch_size)):
                    start = time.perf_counter()
                    model(x)
                    times.append(time.perf_counter() - start)
            table[layout][batch_size] = batch_size / statistics.median(times)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "densenet121"])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--e2e-batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cnnkit-defaults-"))
    try:
        images = make_images(work / "photos", args.images, (500, 375))
        for arch in args.archs:
            for layout, row in forward_by_batch(arch, args.batch_sizes, 96).items():
                cells = "  ".join(f"{bs}: {v:.1f}" for bs, v in row.items())
                print(f"{arch:12} forward-only img/s {layout:13} by batch size  {cells}", flush=True)
            ckpt = work / f"{arch}.pt"
            make_checkpoint(arch, ckpt)
            for batch_size in args.e2e_batch_sizes:
                for workers in args.workers:
                    seconds = run([*CNNKIT, "predict", str(work / "photos"), "-c", str(ckpt), "--batch-size",
                                   str(batch_size), "--workers", str(workers), "--format", "csv", "--no-progress"])
                    print(f"{arch:12} cnnkit predict --batch-size {batch_size:2} --workers {workers}: "
                          f"{len(images) / seconds:.1f} img/s ({seconds:.1f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
