"""Inference benchmark for ``cnnkit predict`` (issues 3 and 17), on real photos.

For each architecture, in one run on one machine:

1. the limit (``limit.py``): forward-only images/s of the model in each layout (NCHW,
   channels-last) at each batch size, one process with a thread per core (``cnnkit predict`` is
   one process); the best cell is the limit;
2. what one image costs: decoding (``load_image``) and preprocessing (resize, crop, normalise),
   one thread, median over the images, against the forward pass at the limit;
3. ``cnnkit predict DIR`` as a user runs it, whole process (start-up included), with its defaults
   and with each ``--batch-size`` x ``--workers`` asked for, ``--repeats`` runs each, interleaved;
   the median (min-max) and its ratio to the limit; "without start-up" is computed from the
   same runs, less the median whole-process time of ``cnnkit predict ONE.jpg``;
4. per-image baselines: the model called once per image in a Python loop (no start-up), and a
   shell loop running ``cnnkit predict IMAGE`` once per file;
5. start-up: ``cnnkit --help``, ``import torch, torchvision``, ``cnnkit predict ONE.jpg``;
6. peak RSS of ``cnnkit predict`` on 1,000 vs 10,000 files (mobilenet_v3_small at 64 px, the
   photos hard-linked over again: the point is whether memory grows with the number of inputs).

Every configuration's predictions are compared with the defaults' (top-1 of every image; the
whole CSV where the batch size is the same). Weights are random (throughput does not depend on
their values). The images are the first ``--images`` photos of ../shared/data/flowers-20 in sorted
path order (test/, then train/), copied into class folders.

    python benchmarks/predict_bench.py      # --archs resnet18 densenet121 --images 819 --repeats 5
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limit import (  # noqa: E402
    CNNKIT,
    REPO,
    copy_images,
    finish,
    machine,
    make_checkpoint,
    measure_limit,
    real_images,
    subprocess_env,
    summary,
)

ENV = subprocess_env()


def run(cmd: list[str], stdout=subprocess.DEVNULL) -> float:
    """Wall seconds of one whole ``cmd`` process."""
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=stdout, env=ENV)
    return time.perf_counter() - start


def predict_cmd(folder: Path, ckpt: Path, flags: list[str]) -> list[str]:
    return [*CNNKIT, "predict", str(folder), "-c", str(ckpt), "--format", "csv", "--no-progress", *flags]


def config_name(flags: list[str]) -> str:
    return " ".join(flags) if flags else "defaults"


def per_image_costs(ckpt: Path, paths: list[Path]) -> dict:
    """Median ms per image of decoding and of preprocessing, with one torch thread (as in a worker)."""
    import torch

    from cnnkit.data.transforms import load_image
    from cnnkit.inference.predictor import Predictor

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        transform = Predictor(str(ckpt), device="cpu").transform
        decode, preprocess = [], []
        for path in paths:
            began = time.perf_counter()
            image = load_image(path)
            decoded = time.perf_counter()
            transform(image)
            decode.append(decoded - began)
            preprocess.append(time.perf_counter() - decoded)
    finally:
        torch.set_num_threads(threads)
    return {"decode_ms": statistics.median(decode) * 1e3, "preprocess_ms": statistics.median(preprocess) * 1e3}


def python_loop(ckpt: Path, paths: list[Path]) -> float:
    """Images/s of the per-image way in one process: decode, transform, one forward pass each."""
    from cnnkit.data.transforms import load_image
    from cnnkit.inference.predictor import Predictor

    predictor = Predictor(str(ckpt), device="cpu")
    predictor.probabilities(predictor.transform(load_image(paths[0]))[None])  # warm-up
    start = time.perf_counter()
    for path in paths:
        predictor.probabilities(predictor.transform(load_image(path))[None])
    return len(paths) / (time.perf_counter() - start)


def read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


def compare_outputs(outputs: dict[str, Path]) -> dict[str, str]:
    """How each configuration's predictions compare with the defaults'."""
    base = read_rows(outputs["defaults"])
    verdicts = {}
    for name, path in outputs.items():
        if name != "defaults":
            rows = read_rows(path)
            verdicts[name] = ("identical CSV" if rows == base else "same top-1 for every image"
                              if [r[:2] for r in rows] == [r[:2] for r in base] else "DIFFERENT top-1")
    return verdicts


def bench_arch(arch: str, args, work: Path, folder: Path, images: list[Path]) -> dict:
    ckpt = make_checkpoint(arch, work / f"{arch}.pt")
    print(f"[{arch}] limit", file=sys.stderr, flush=True)
    limit = measure_limit(ckpt, args.limit_batch_sizes, min_batches=args.limit_batches, min_seconds=args.limit_seconds)
    print(f"[{arch}] per-image costs", file=sys.stderr, flush=True)
    costs = per_image_costs(ckpt, images)
    costs["forward_ms_at_limit"] = 1e3 / limit.img_s

    configs: list[list[str]] = [[]]  # the defaults first: what a user gets without flags
    configs += [["--batch-size", str(b), "--workers", str(w)] for b in args.batch_sizes for w in args.workers]
    outputs = {config_name(flags): work / f"{arch}-{i}.csv" for i, flags in enumerate(configs)}
    seconds: dict[str, list[float]] = {config_name(flags): [] for flags in configs}
    for flags in configs:  # warm-up (page cache, the files' first read) and the predictions to compare
        with open(outputs[config_name(flags)], "w") as out:
            run(predict_cmd(folder, ckpt, flags), stdout=out)
    one_image = [run([*CNNKIT, "predict", str(images[0]), "-c", str(ckpt)]) for _ in range(args.repeats)]
    for repeat in range(args.repeats):  # interleaved: a slow minute of the machine hits every config alike
        print(f"[{arch}] whole-process runs, round {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for flags in configs:
            seconds[config_name(flags)].append(run(predict_cmd(folder, ckpt, flags)))
    startup = statistics.median(one_image)
    n = len(images)
    rows = {}
    for name, values in seconds.items():
        rates = [n / s for s in values]
        without = [(n - 1) / max(s - startup, 1e-9) for s in values]
        rows[name] = {
            "seconds": summary(values), "img_s": summary(rates), "ratio": summary([r / limit.img_s for r in rates]),
            "img_s_without_startup": summary(without),
            "ratio_without_startup": summary([r / limit.img_s for r in without]),
        }
    equal = compare_outputs(outputs)

    loop = [python_loop(ckpt, images[: args.loop_images]) for _ in range(3)]
    shell = [run([*CNNKIT, "predict", str(p), "-c", str(ckpt)]) for p in images[: args.shell_images]]
    forward_s = n / limit.img_s
    return {
        "arch": arch, "images": n, "limit": limit.to_dict(), "limit_text": limit.describe(), "grid": limit.grid(),
        "costs": costs, "startup_one_image_s": summary(one_image), "predict": rows, "predictions": equal,
        "python_loop_img_s": summary(loop), "shell_loop_img_s": summary([1 / s for s in shell]),
        # what start-up alone allows: the forward passes at the limit plus the start-up, decoding free
        "ceiling_ratio_startup_only": forward_s / (forward_s + startup),
        # decoding and preprocessing in series with the forward passes (no overlap), start-up too
        "ceiling_ratio_serial_decode": forward_s / (forward_s + startup + n * (costs["decode_ms"] + costs["preprocess_ms"]) / 1e3),
    }


def bench_memory(work: Path, counts: list[int]) -> dict:
    ckpt = make_checkpoint("mobilenet_v3_small", work / "rss.pt", image_size=64)
    sources = real_images()
    probe = ("import resource, subprocess, sys;"
             "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL);"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = {}
    for count in counts:
        folder = work / f"rss_{count}"
        for i in range(count):
            target = folder / f"c{i % 5}" / f"img_{i:06d}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(sources[i % len(sources)], target)
        cmd = [*CNNKIT, "predict", str(folder), "-c", str(ckpt), "--format", "csv", "--no-progress"]
        done = subprocess.run([sys.executable, "-c", probe, *cmd], check=True, capture_output=True, text=True, env=ENV)
        out[count] = round(int(done.stdout.strip()) / 1024, 1)
        shutil.rmtree(folder)
    return out


def bench_startup(work: Path, image: Path, repeats: int) -> dict:
    ckpt = work / "resnet18.pt"
    if not ckpt.exists():
        make_checkpoint("resnet18", ckpt)
    check = "import sys; from cnnkit.cli import main; assert 'torch' not in sys.modules"
    no_torch = subprocess.run([sys.executable, "-c", check], env=ENV).returncode == 0
    return {
        "help_s": summary([run([*CNNKIT, "--help"]) for _ in range(repeats)]),
        "help_imports_torch": not no_torch,
        "import_torch_torchvision_s": summary([run([sys.executable, "-c", "import torch, torchvision"])
                                               for _ in range(repeats)]),
        "predict_one_s": summary([run([*CNNKIT, "predict", str(image), "-c", str(ckpt)]) for _ in range(repeats)]),
    }


def fmt(s: dict, digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(results: dict) -> str:
    out = []
    for r in results["archs"]:
        out += [f"**{r['arch']}**: the limit is {r['limit_text']}. Forward-only img/s, median of the per-batch "
                "rates of each cell:", "", r["grid"], ""]
    out += ["| arch | cnnkit predict | img/s, whole process | ratio to the limit | img/s without start-up "
            "(computed) | ratio without start-up | predictions vs defaults |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in results["archs"]:
        for name, row in r["predict"].items():
            out.append(f"| {r['arch']} | {name} | {fmt(row['img_s'])} | {fmt(row['ratio'], 2)} | "
                       f"{fmt(row['img_s_without_startup'])} | {fmt(row['ratio_without_startup'], 2)} | "
                       f"{r['predictions'].get(name, '(the reference)')} |")
    out += ["", "| arch | decode ms/img | preprocess ms/img | forward ms/img at the limit | start-up s "
            "(`predict ONE.jpg`) | ceiling: start-up only | ceiling: decoding in series |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["archs"]:
        c = r["costs"]
        out.append(f"| {r['arch']} | {c['decode_ms']:.2f} | {c['preprocess_ms']:.2f} | {c['forward_ms_at_limit']:.2f} | "
                   f"{fmt(r['startup_one_image_s'], 2)} | {r['ceiling_ratio_startup_only']:.2f} | "
                   f"{r['ceiling_ratio_serial_decode']:.2f} |")
    out += ["", "| arch | Python loop, batch 1, no start-up | shell loop, `cnnkit predict IMAGE` per file | "
            "best `cnnkit predict DIR` vs shell loop |", "| --- | ---: | ---: | ---: |"]
    for r in results["archs"]:
        best = max(row["img_s"]["median"] for row in r["predict"].values())
        out.append(f"| {r['arch']} | {fmt(r['python_loop_img_s'])} img/s | {fmt(r['shell_loop_img_s'], 3)} img/s | "
                   f"{best / r['shell_loop_img_s']['median']:.0f}× |")
    s = results.get("startup")
    if s:
        out += ["", "| start-up | seconds, median (min–max) |", "| --- | ---: |",
                f"| `cnnkit --help` (imports torch: {s['help_imports_torch']}) | {fmt(s['help_s'], 2)} |",
                f"| `python -c \"import torch, torchvision\"` | {fmt(s['import_torch_torchvision_s'], 2)} |",
                f"| `cnnkit predict ONE.jpg -c resnet18.pt` | {fmt(s['predict_one_s'], 2)} |"]
    if results.get("peak_rss_mb"):
        out += ["", "Peak RSS: " + ", ".join(f"{mb} MB on {n:,} files" for n, mb in results["peak_rss_mb"].items())]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "densenet121"])
    parser.add_argument("--images", type=int, default=819, help="photos from ../shared/data/flowers-20")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32], help="--batch-size values to run")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="--workers values to run")
    parser.add_argument("--repeats", type=int, default=5, help="whole-process runs per configuration")
    parser.add_argument("--limit-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--limit-batches", type=int, default=8, help="at least this many batches per cell")
    parser.add_argument("--limit-seconds", type=float, default=3.0, help="and at least this long per cell")
    parser.add_argument("--loop-images", type=int, default=64)
    parser.add_argument("--shell-images", type=int, default=5)
    parser.add_argument("--rss-counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-startup", action="store_true")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "out" / "predict_bench.json")
    args = parser.parse_args()

    started = time.time()
    results: dict = {"command": "python benchmarks/predict_bench.py " + " ".join(sys.argv[1:]),
                     "machine_before": machine(), "archs": []}
    print(json.dumps(results["machine_before"]), file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="cnnkit-bench-"))
    try:
        sources = real_images(args.images)
        folder = copy_images(sources, work / "photos")
        images = sorted(folder.glob("*/*.jpg"))
        for arch in args.archs:
            results["archs"].append(bench_arch(arch, args, work, folder, images))
        if not args.skip_startup:
            results["startup"] = bench_startup(work, images[0], args.repeats)
        if not args.skip_memory:
            results["peak_rss_mb"] = bench_memory(work, args.rss_counts)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    finish(results, started, args.output, markdown(results))


if __name__ == "__main__":
    main()
