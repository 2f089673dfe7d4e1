"""What every benchmark here shares: "the limit", the real data, the checkpoints, the statistics.

**The limit** (one definition, used by predict_bench.py and serve_load.py) is the bare model's
forward-only images/s on this machine, measured in the same run as the figure it bounds:

- the model cnnkit runs (the torchvision backbone with cnnkit's new head, built from the
  benchmark's checkpoint), scoring ready-made tensors through ``Predictor.probabilities``, the
  numeric path of ``cnnkit predict`` and ``cnnkit serve`` (``inference_mode``, log-probabilities
  -> ``exp``), with no decoding, no preprocessing and no I/O;
- in the **best** memory layout, NCHW (torch's default) or channels-last (what ``Predictor``
  uses on a CPU), and the **best** batch size among those the command can use;
- for each arrangement of the cores the command can use: ``1x2`` is one process with a torch
  thread per core (``cnnkit predict``, ``cnnkit serve --workers 1``), ``2x1`` one 1-thread process
  per core running at the same time, their rates summed (``cnnkit serve --workers 2``);
- each cell (arrangement, layout, batch) is the median of the per-batch rates of at least
  ``min_batches`` batches and ``min_seconds`` after two warm-up batches; the limit is the best
  cell, and is reported with the layout, batch size and arrangement that won.

Real data: ``../shared/data`` relative to the repository root (``flowers-20``: 2,539 photos of
Oxford Flowers-102, short side 256 px; ``flowers-mini``: the bundled 175), not in the repository.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FLOWERS_20 = SHARED_DATA / "flowers-20"
FLOWERS_MINI = SHARED_DATA / "flowers-mini"
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}
CNNKIT = [sys.executable, "-m", "cnnkit"]
if str(REPO) not in sys.path:  # this checkout's cnnkit, installed or not
    sys.path.insert(0, str(REPO))


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a ``python -m cnnkit`` child: this checkout first on its path."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


# --- machine, data, checkpoints ---------------------------------------------------------------


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name() -> str:
    """The CPU's model name and its vector extensions that matter to oneDNN, from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
    return f"{name} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'})"


def machine() -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu_name(), "cores": cores(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "load_avg_1m": load}


def finish(results: dict, started: float, output: Path, table: str) -> None:
    """Close a benchmark run: the machine after it, its wall time, ``output`` (JSON), and a
    summary line and ``table`` (the markdown for RESULTS.md) on stdout."""
    import json

    results["machine_after"] = machine()
    results["seconds"] = round(time.time() - started)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    m = results["machine_before"]
    print(f"`{results['command']}`: {results['seconds']} s; {m['cpu']}, {m['cores']} cores, torch {m['torch']}; "
          f"load average {m['load_avg_1m']:.2f} before, {results['machine_after']['load_avg_1m']:.2f} after\n")
    print(table)


def real_images(count: int | None = None, source: Path = FLOWERS_20) -> list[Path]:
    """The first ``count`` photos of ``source`` (train/, valid/, test/ in sorted path order)."""
    if not source.is_dir():
        raise SystemExit(f"{source} not found: the benchmarks read the real photos from ../shared/data")
    paths = sorted(source.glob("*/*/*.jpg"))
    if count is not None and count > len(paths):
        raise SystemExit(f"{source} has {len(paths)} photos, not {count}")
    return paths[:count]


KNOWN_CLASSES = 15  # the open-set and held-out transfer benchmarks: a model of flowers-20's first 15 classes


def flowers20_classes(known: int = KNOWN_CLASSES) -> tuple[list[str], list[str]]:
    """flowers-20's class folders in sorted order, split into the first ``known`` and the rest."""
    classes = sorted(p.name for p in (FLOWERS_20 / "train").iterdir() if p.is_dir())
    return classes[:known], classes[known:]


def link_classes(root: Path, names: list[str]) -> Path:
    """A data root at ``root`` with train/, valid/ and test/ linking to flowers-20's ``names`` folders."""
    for split in ("train", "valid", "test"):
        (root / split).mkdir(parents=True)
        for name in names:
            (root / split / name).symlink_to(FLOWERS_20 / split / name)
    return root


def copy_images(paths: list[Path], folder: Path) -> Path:
    """Copies of ``paths`` under ``folder``, one sub-folder per class (what ``cnnkit predict DIR`` reads)."""
    for i, path in enumerate(paths):
        out = folder / path.parent.name / f"{i:05d}_{path.name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
    return folder


def make_checkpoint(arch: str, path: Path, classes: int = 20, image_size: int | None = None) -> Path:
    """A cnnkit checkpoint of ``arch`` with random weights (``weights none``, seeded): throughput
    does not depend on the weights' values."""
    from cnnkit.data.transforms import resolve_preprocess
    from cnnkit.models.build import build_model
    from cnnkit.models.checkpoint import Checkpoint, library_versions

    torch.manual_seed(0)
    model, head = build_model(arch, classes, "none")
    Checkpoint(arch=arch, head=head, state_dict=model.state_dict(), classes=[f"c{i:02d}" for i in range(classes)],
               preprocess=resolve_preprocess(arch, image_size), versions=library_versions()).save(path)
    return path


# --- statistics -------------------------------------------------------------------------------


def summary(values: list[float]) -> dict:
    """Median, min and max of ``values`` (and how many)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


# --- the limit --------------------------------------------------------------------------------


@dataclass
class Limit:
    img_s: float  # the best cell's median
    arrangement: str  # "1x2": one process x 2 threads; "2x1": two 1-thread processes
    layout: str
    batch: int
    cells: dict[str, dict] = field(default_factory=dict)  # "arrangement layout batch" -> cell

    def describe(self) -> str:
        return f"{self.img_s:.1f} img/s ({self.layout}, batch {self.batch}, {self.arrangement})"

    def grid(self) -> str:
        """A Markdown table: img/s (median of the per-batch rates) of every cell, the best in bold."""
        arrangements = list(dict.fromkeys(c["arrangement"] for c in self.cells.values()))
        batches = sorted({c["batch"] for c in self.cells.values()})
        lines = ["| arrangement, layout | " + " | ".join(f"batch {b}" for b in batches) + " |",
                 "| --- |" + " ---: |" * len(batches)]
        for arrangement in arrangements:
            for layout in LAYOUTS:
                row = []
                for batch in batches:
                    cell = self.cells.get(f"{arrangement} {layout} {batch}")
                    text = "-" if cell is None else f"{cell['img_s']:.1f}"
                    best = cell is not None and (arrangement, layout, batch) == (self.arrangement, self.layout, self.batch)
                    row.append(f"**{text}**" if best else text)
                lines.append(f"| {arrangement}, {layout} | " + " | ".join(row) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"img_s": round(self.img_s, 2), "arrangement": self.arrangement, "layout": self.layout,
                "batch": self.batch, "cells": self.cells}


def _measure_cells(checkpoint: str, cells: list[tuple[str, int]], threads: int, min_batches: int,
                   min_seconds: float, barrier, results) -> None:
    """(A child process.) Per-batch rates of ``Predictor.probabilities`` for each (layout, batch)."""
    torch.set_num_threads(threads)
    from cnnkit.inference.predictor import Predictor

    predictor = Predictor(checkpoint, device="cpu")
    size = predictor.checkpoint.preprocess.image_size
    out = []
    for layout, batch in cells:
        fmt = LAYOUTS[layout]
        predictor.model = predictor.model.to(memory_format=fmt)
        predictor.memory_format = fmt
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
        for _ in range(2):
            predictor.probabilities(x)
        if barrier is not None:
            barrier.wait()  # the processes of one arrangement measure each cell at the same time
        rates, began = [], time.perf_counter()
        while len(rates) < min_batches or time.perf_counter() - began < min_seconds:
            start = time.perf_counter()
            predictor.probabilities(x)
            rates.append(batch / (time.perf_counter() - start))
        out.append({"layout": layout, "batch": batch, "rates": rates})
    results.put(out)


def measure_limit(checkpoint: Path, batch_sizes: list[int], arrangements: list[str] | None = None,
                  min_batches: int = 8, min_seconds: float = 3.0) -> Limit:
    """The limit (module docstring) for ``checkpoint``: every arrangement x layout x batch size,
    each in fresh processes (spawned: no torch state shared with the benchmark)."""
    n = cores()
    arrangements = arrangements or [f"1x{n}"]
    context = multiprocessing.get_context("spawn")
    cells = [(layout, batch) for layout in LAYOUTS for batch in batch_sizes]
    table: dict[str, dict] = {}
    for arrangement in arrangements:
        processes, threads = (int(v) for v in arrangement.split("x"))
        results = context.Queue()
        barrier = context.Barrier(processes) if processes > 1 else None
        children = [context.Process(target=_measure_cells, args=(str(checkpoint), cells, threads, min_batches,
                                                                 min_seconds, barrier, results))
                    for _ in range(processes)]
        for child in children:
            child.start()
        outputs = [results.get() for _ in children]
        for child in children:
            child.join()
            if child.exitcode:
                raise RuntimeError(f"a limit measurement process exited with {child.exitcode}")
        for i, (layout, batch) in enumerate(cells):
            medians = [statistics.median(output[i]["rates"]) for output in outputs]
            quartiles = [statistics.quantiles(output[i]["rates"], n=4) for output in outputs]
            table[f"{arrangement} {layout} {batch}"] = {
                "arrangement": arrangement, "layout": layout, "batch": batch,
                "img_s": round(sum(medians), 2),  # summed over the processes running together
                "q1_q3": [round(sum(q[0] for q in quartiles), 2), round(sum(q[2] for q in quartiles), 2)],
                "batches": min(len(output[i]["rates"]) for output in outputs),
            }
    best = max(table.values(), key=lambda c: c["img_s"])
    return Limit(best["img_s"], best["arrangement"], best["layout"], best["batch"], table)
