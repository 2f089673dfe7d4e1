"""Memory layout of a CPU training step: NCHW against channels-last (NHWC), per architecture and size.

One training step as ``cnnkit train`` takes it (forward, cross-entropy, backward, fused AdamW;
float32; torchvision's model with a 5-class head; random images and labels) for each
architecture, training-crop size and batch in the grid, in each layout: the median of
``--repeats`` steps after 3 warm-up steps, both layouts of a cell timed back to back. The ratio
is channels-last's step time over NCHW's (above 1: NCHW is faster). cnnkit's training chooses
the layout from these figures (``cnnkit.training.recipe.prefers_channels_last``).

    python benchmarks/layout_bench.py
    python benchmarks/layout_bench.py --cells resnet18:48:16 densenet121:128:32 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limit import REPO, finish, machine  # noqa: E402

CELLS = [
    "resnet18:32:16", "resnet18:48:16", "resnet18:64:32", "resnet18:96:16", "resnet18:128:32", "resnet18:128:64",
    "resnet34:64:16", "resnet50:64:16", "resnet50:128:16",
    "mobilenet_v3_small:64:32", "mobilenet_v3_small:128:32", "efficientnet_b0:64:32", "efficientnet_b0:128:32",
    "densenet121:64:32", "densenet121:128:32", "vgg11_bn:64:32", "vgg11_bn:128:32", "shufflenet_v2_x0_5:64:32",
]


def step_seconds(arch: str, size: int, batch: int, channels_last: bool, repeats: int) -> float:
    from torchvision.models import get_model

    torch.manual_seed(0)
    model = get_model(arch, num_classes=5)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 5, (batch,))
    if channels_last:
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    times = []
    for _ in range(3 + repeats):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", nargs="+", default=CELLS, help="ARCH:SIZE:BATCH cells")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    started, before = time.time(), machine()
    rows, lines = [], ["| arch | training crop, px | batch | NCHW img/s | channels-last img/s | "
                       "channels-last time / NCHW time |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for cell in args.cells:
        arch, size, batch = cell.split(":")
        nchw = step_seconds(arch, int(size), int(batch), False, args.repeats)
        nhwc = step_seconds(arch, int(size), int(batch), True, args.repeats)
        rows.append({"arch": arch, "size": int(size), "batch": int(batch), "nchw_s": nchw, "channels_last_s": nhwc})
        lines.append(f"| {arch} | {size} | {batch} | {int(batch) / nchw:.0f} | {int(batch) / nhwc:.0f} | "
                     f"**{nhwc / nchw:.2f}** |")
        print(lines[-1], file=sys.stderr, flush=True)
    finish({"command": " ".join(["python", "benchmarks/layout_bench.py", *sys.argv[1:]]), "machine_before": before,
            "torch_threads": torch.get_num_threads(), "cells": rows},
           started, REPO / "benchmarks" / "out" / "layout_bench.json", "\n".join(lines))


if __name__ == "__main__":
    main()
