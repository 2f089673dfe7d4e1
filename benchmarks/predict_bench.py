"""Inference benchmark for ``cnnkit predict`` (issue 3).

For each architecture it measures, in one run on one machine:

1. the limit: forward-only images/s of the bare torchvision model on pre-made tensors at each
   batch size, in torch's default NCHW layout and channels-last (which cnnkit uses);
2. ``cnnkit predict DIR --batch-size B`` end to end (a whole process, start-up included) and its
   ratio to both limits at the same batch size;
3. per-image baselines: the same model called once per image in a Python loop (decode,
   transform, forward), and a shell loop running ``cnnkit predict IMAGE`` once per file, as
   scripts written for the seed project's ``predict.py`` do;
4. peak RSS of ``cnnkit predict`` on 1,000 vs 10,000 images (small images and a small model:
   the point is whether memory grows with the number of inputs);
5. ``cnnkit --help`` wall time, whether it imports torch, and ``cnnkit predict ONE.jpg`` wall
   time against ``python -c "import torch, torchvision"``.

Weights are random (``weights none``): throughput does not depend on their values. Images are
the bundled flower photos resized to a realistic 500x375 and re-encoded as JPEG.

    python benchmarks/predict_bench.py --archs resnet18 densenet121 --images 480
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO / "data" / "flowers-mini"
CNNKIT = [sys.executable, "-m", "cnnkit"]


def make_images(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """``count`` JPEGs of ``size`` made from the bundled photos (cycled), in class folders."""
    sources = sorted(FLOWERS.glob("*/*/*.jpg"))
    paths = []
    for i in range(count):
        src = sources[i % len(sources)]
        out = folder / f"c{i % 5}" / f"img_{i:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        if i < len(sources):
            Image.open(src).convert("RGB").resize(size, Image.BICUBIC).save(out, quality=90)
        else:  # same pixels again: a link keeps 10,000 files cheap to make
            os.link(paths[i % len(sources)], out)
        paths.append(out)
    return paths


def make_checkpoint(arch: str, path: Path, image_size: int | None = None) -> None:
    from cnnkit.data.transforms import resolve_preprocess
    from cnnkit.models.build import build_model
    from cnnkit.models.checkpoint import Checkpoint, library_versions

    model, head = build_model(arch, 5, "none")
    Checkpoint(
        arch=arch,
        head=head,
        state_dict=model.state_dict(),
        classes=[f"c{i}" for i in range(5)],
        preprocess=resolve_preprocess(arch, image_size),
        versions=library_versions(),
    ).save(path)


def forward_limit(arch: str, batch_size: int, batches: int, channels_last: bool, image_size: int = 224) -> float:
    """Images/s of the bare torchvision model on pre-made tensors (median of ``batches``), in
    torch's default NCHW layout or channels-last (what cnnkit uses)."""
    import torchvision

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = torchvision.models.get_model(arch, weights=None).eval().to(memory_format=fmt)
    x = torch.randn(batch_size, 3, image_size, image_size).contiguous(memory_format=fmt)
    times = []
    with torch.inference_mode():
        model(x)  # warm-up
        for _ in range(batches):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)


def run(cmd: list[str], **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - start


def python_loop(arch: str, ckpt: Path, paths: list[Path]) -> float:
    """Images/s of the per-image way: decode, transform, one forward pass per image."""
    from cnnkit.data.transforms import load_image
    from cnnkit.inference.predictor import Predictor

    predictor = Predictor(str(ckpt), device="cpu")
    start = time.perf_counter()
    for path in paths:
        predictor.probabilities(predictor.transform(load_image(path))[None])
    return len(paths) / (time.perf_counter() - start)


def peak_rss_mb(cmd: list[str]) -> float:
    """Peak RSS of the largest process ``cmd`` starts (itself or a DataLoader worker)."""
    probe = (
        "import resource, subprocess, sys;"
        "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True)
    return int(out.stdout.strip()) / 1024


def bench_arch(arch: str, args, work: Path, images: list[Path]) -> dict:
    ckpt = work / f"{arch}.pt"
    make_checkpoint(arch, ckpt)
    folder = images[0].parent.parent
    row: dict = {"arch": arch, "images": len(images), "by_batch_size": {}}
    for batch_size in args.batch_sizes:
        limit_nchw = forward_limit(arch, batch_size, args.limit_batches, channels_last=False)
        limit_cl = forward_limit(arch, batch_size, args.limit_batches, channels_last=True)
        e2e_seconds = [
            run([*CNNKIT, "predict", str(folder), "-c", str(ckpt), "--batch-size", str(batch_size),
                 "--format", "csv", "--no-progress"])
            for _ in range(args.repeats)
        ]
        e2e = len(images) / statistics.median(e2e_seconds)
        row["by_batch_size"][batch_size] = {
            "limit_nchw_img_s": round(limit_nchw, 2),
            "limit_channels_last_img_s": round(limit_cl, 2),
            "predict_img_s": round(e2e, 2),
            "predict_vs_limit_nchw": round(e2e / limit_nchw, 3),
            "predict_vs_limit_channels_last": round(e2e / limit_cl, 3),
        }
    best = max(v["predict_img_s"] for v in row["by_batch_size"].values())
    loop = python_loop(arch, ckpt, images[: args.loop_images])
    shell_seconds = [run([*CNNKIT, "predict", str(p), "-c", str(ckpt)]) for p in images[: args.shell_images]]
    shell = 1 / statistics.median(shell_seconds)
    row.update({
        "python_loop_img_s": round(loop, 2),
        "best_predict_vs_python_loop": round(best / loop, 2),
        "shell_loop_img_s": round(shell, 3),
        "best_predict_vs_shell_loop": round(best / shell, 1),
    })
    return row


def bench_memory(work: Path, counts: list[int]) -> dict:
    ckpt = work / "rss.pt"
    make_checkpoint("mobilenet_v3_small", ckpt, image_size=64)
    out = {}
    for count in counts:
        folder = work / f"rss_{count}"
        make_images(folder, count, (96, 72))
        out[count] = round(peak_rss_mb([*CNNKIT, "predict", str(folder), "-c", str(ckpt), "--format", "csv",
                                        "--no-progress"]), 1)
    return out


def bench_startup(work: Path, image: Path, repeats: int) -> dict:
    ckpt = work / "resnet18.pt"
    if not ckpt.exists():
        make_checkpoint("resnet18", ckpt)
    no_torch = subprocess.run(
        [sys.executable, "-c", "import sys; from cnnkit.cli import main; assert 'torch' not in sys.modules"]
    ).returncode == 0
    help_s = statistics.median(run([*CNNKIT, "--help"]) for _ in range(repeats))
    import_s = statistics.median(run([sys.executable, "-c", "import torch, torchvision"]) for _ in range(repeats))
    one_s = statistics.median(run([*CNNKIT, "predict", str(image), "-c", str(ckpt)]) for _ in range(repeats))
    return {
        "help_seconds": round(help_s, 3),
        "help_imports_torch": not no_torch,
        "import_torch_torchvision_seconds": round(import_s, 3),
        "predict_one_seconds": round(one_s, 3),
        "predict_one_minus_import_seconds": round(one_s - import_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "densenet121"])
    parser.add_argument("--images", type=int, default=480, help="JPEGs (500x375) for the throughput runs")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32],
                        help="cnnkit predict --batch-size values (8 is its CPU default)")
    parser.add_argument("--repeats", type=int, default=3, help="end-to-end runs per arch (median)")
    parser.add_argument("--limit-batches", type=int, default=10)
    parser.add_argument("--loop-images", type=int, default=64)
    parser.add_argument("--shell-images", type=int, default=5)
    parser.add_argument("--rss-counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="cnnkit-bench-"))
    try:
        images = make_images(work / "photos", args.images, (500, 375))
        results = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                       f"{torch.get_num_threads()} threads",
            "archs": [],
        }
        for arch in args.archs:
            row = bench_arch(arch, args, work, images)
            results["archs"].append(row)
            print(json.dumps(row), flush=True)
        results["startup"] = bench_startup(work, images[0], args.repeats)
        print(json.dumps(results["startup"]), flush=True)
        if not args.skip_memory:
            results["peak_rss_mb"] = bench_memory(work, args.rss_counts)
            print(json.dumps({"peak_rss_mb": results["peak_rss_mb"]}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
