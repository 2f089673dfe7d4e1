"""AdamW's step: PyTorch's default (a loop of small ops per tensor) against its fused kernel, which
``cnnkit train`` uses since this benchmark (``cnnkit.training.steps.make_optimizer``).

Two measurements, in one run:

- the step alone: resnet18's 11.7 M parameters in the optimizer cnnkit builds
  (``make_optimizer``: decayed kernels, undecayed biases and norms), random gradients, ``torch.optim.AdamW`` with ``foreach``/``fused`` unset (the
  default: the per-tensor loop on a CPU), ``foreach=True`` and ``fused=True``; the median of
  ``--repeats`` timings of 10 steps each, after 3 warm-up steps;
- the README demo's training (resnet18 from scratch on the bundled flowers-mini, 64 px, 15
  epochs, ``cnnkit.training.train`` in this process) with the looped and the fused optimizer,
  interleaved ``--repeats`` times: the median of the epochs' summed seconds (metrics.jsonl), and of
  the run's wall time.

    python benchmarks/optimizer_bench.py --repeats 3
    python benchmarks/optimizer_bench.py --repeats 3 --batch-size 8 --epochs 30 --amp
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limit import REPO, finish, machine  # noqa: E402

IMPLEMENTATIONS = {"default (loop)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


@contextlib.contextmanager
def adamw_as(kwargs: dict) -> Iterator[None]:
    """While open, cnnkit's ``make_optimizer`` builds its AdamW (the same groups) with ``kwargs``
    in place of its own ``fused`` choice: {} is PyTorch's default, the loop cnnkit used before."""
    real = torch.optim.AdamW

    def adamw(*args, fused=None, **rest):
        return real(*args, **rest, **kwargs)

    with mock.patch.object(torch.optim, "AdamW", adamw):
        yield


def step_ms(kwargs: dict, repeats: int) -> float:
    from torchvision.models import resnet18

    from cnnkit.training.steps import make_optimizer

    torch.manual_seed(0)
    model = resnet18()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    with adamw_as(kwargs):
        optimizer = make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(3):
        optimizer.step()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(10):
            optimizer.step()
        times.append((time.perf_counter() - started) / 10 * 1000)
    return statistics.median(times)


def demo_run(kwargs: dict, args: argparse.Namespace, save_dir: Path) -> dict:
    from cnnkit.config import TrainConfig
    from cnnkit.training import train

    cfg = TrainConfig(data_dir=str(REPO / "data" / "flowers-mini"), arch="resnet18", weights="none", image_size=64,
                      epochs=args.epochs, batch_size=args.batch_size, amp=args.amp or None, seed=0,
                      save_dir=str(save_dir), force=True, progress=False)
    started = time.perf_counter()
    with adamw_as(kwargs):
        result = train(cfg)
    wall = time.perf_counter() - started
    return {"epoch_seconds": round(sum(row["seconds"] for row in result.history), 2), "wall": round(wall, 2),
            "best_val_acc": result.best_val_acc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--amp", action="store_true", help="bfloat16 autocast (--amp)")
    args = parser.parse_args()
    started = time.time()
    results: dict = {"command": "python benchmarks/optimizer_bench.py " + " ".join(sys.argv[1:]),
                     "machine_before": machine()}
    results["step_ms"] = {name: step_ms(kwargs, max(args.repeats, 5)) for name, kwargs in IMPLEMENTATIONS.items()}
    runs: dict[str, list[dict]] = {"looped": [], "fused": []}
    with tempfile.TemporaryDirectory(prefix="cnnkit-optimizer-") as tmp:
        for repeat in range(args.repeats):  # interleaved, so a drift in the machine's speed hits both
            for name in runs:
                kwargs = IMPLEMENTATIONS["fused" if name == "fused" else "default (loop)"]
                runs[name].append(demo_run(kwargs, args, Path(tmp) / f"{name}-{repeat}"))
                print(f"{name} {repeat}: {runs[name][-1]}", file=sys.stderr, flush=True)
    results["demo"] = runs
    medians = {name: {key: statistics.median(r[key] for r in rows) for key in ("epoch_seconds", "wall")}
               for name, rows in runs.items()}
    accuracies = {name: " / ".join(f"{100 * r['best_val_acc']:.1f}" for r in rows) for name, rows in runs.items()}
    steps = results["step_ms"]
    table = "\n".join([
        "| AdamW step, resnet18 | ms (median) | vs default |", "| --- | ---: | ---: |",
        *(f"| {name} | {ms:.1f} | {steps['default (loop)'] / ms:.2f}x |" for name, ms in steps.items()),
        "",
        f"| README demo training ({args.epochs} epochs, batch {args.batch_size}{', bfloat16' if args.amp else ''}) "
        f"| epochs' seconds (median of {args.repeats}) | wall seconds | best validation accuracy per run |",
        "| --- | ---: | ---: | --- |",
        *(f"| {name} | {medians[name]['epoch_seconds']:.1f} | {medians[name]['wall']:.1f} | "
          f"{accuracies[name]} |" for name in runs),
        "",
        f"looped / fused, epochs' seconds: {medians['looped']['epoch_seconds'] / medians['fused']['epoch_seconds']:.2f}x",
    ])
    finish(results, started, REPO / "benchmarks" / "out" / "optimizer_bench.json", table)


if __name__ == "__main__":
    main()
