"""Training benchmark for ``cnnkit train`` (issues 4 and 17), on real photos.

For each architecture, in one process on one machine, on ../shared/data/flowers-mini (the bundled
Oxford Flowers-102 sample: 120 training and 28 validation photos, 5 classes, short side 256 px),
``--repeats`` times (figures are medians, with min-max, over the repeats):

(a) frozen backbone without the feature cache (``--no-cache-features``): seconds per epoch;
(b) frozen backbone with the feature cache (the default): the first epoch (features computed)
    and the later epochs, and the wall time of the whole ``--epochs``-epoch ``train()`` call;
(c) full fine-tuning (``--no-freeze``: every parameter trains, with augmentation): seconds per epoch;
(d) the reference: a plain loop as in the seed project's ``train.py`` (torchvision ImageFolder,
    DataLoader, the model with a new head, Adam, NLLLoss, a validation pass per epoch), head-only
    for the same ``--epochs`` epochs as (b), measured end to end (set-up included), and full, with
    the same batch size, image size and DataLoader workers as cnnkit.

An "epoch" is a training pass over the training images plus a validation pass. Per-epoch times
are medians over the epochs after the first of each run (the first pays one-off costs: worker
start-up, kernel selection). Weights are random and stored as a ".pth" file given to
``--weights``, so cnnkit treats them as pretrained (frozen backbone, cached features):
throughput does not depend on their values.

    python benchmarks/train_bench.py      # --archs resnet18 densenet121 --epochs 10 --full-epochs 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limit import FLOWERS_MINI, REPO, finish, machine, summary  # noqa: E402


def weights_file(arch: str, folder: Path) -> Path:
    import torchvision

    torch.manual_seed(0)
    path = folder / f"{arch}-random.pth"
    torch.save(torchvision.models.get_model(arch, weights=None).state_dict(), path)
    return path


def steady(seconds: list[float]) -> float:
    """Median epoch time, the first epoch excluded when there are others."""
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


# --- cnnkit ------------------------------------------------------------------------------------


def cnnkit_run(data: Path, out: Path, arch: str, epochs: int, batch_size: int, workers: int, **options) -> dict:
    from cnnkit.config import TrainConfig
    from cnnkit.training import train

    shutil.rmtree(out, ignore_errors=True)
    cfg = TrainConfig(str(data), arch=arch, epochs=epochs, batch_size=batch_size, workers=workers,
                      device="cpu", save_dir=str(out), progress=False, scheduler="cosine", **options)
    start = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - start
    return {"wall": wall, "epochs": [row["seconds"] for row in result.history],
            "val_acc": [row["val_acc"] for row in result.history]}


# --- the reference loop (the seed project's train.py, condensed) ---------------------------------


def reference_run(data: Path, arch: str, epochs: int, batch_size: int, workers: int, freeze: bool,
                  image_size: int = 224) -> dict:
    from torch import nn, optim
    from torchvision import datasets, models, transforms

    start = time.perf_counter()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), transforms.Normalize(mean, std)])
    valid_tf = transforms.Compose([transforms.Resize(round(image_size / 0.875)), transforms.CenterCrop(image_size),
                                   transforms.ToTensor(), transforms.Normalize(mean, std)])
    train_data = datasets.ImageFolder(str(data / "train"), transform=train_tf)
    valid_data = datasets.ImageFolder(str(data / "valid"), transform=valid_tf)
    train_loader = torch.utils.data.DataLoader(train_data, batch_size=batch_size, shuffle=True, num_workers=workers)
    valid_loader = torch.utils.data.DataLoader(valid_data, batch_size=batch_size, num_workers=workers)

    model = models.get_model(arch, weights=None)
    for param in model.parameters():
        param.requires_grad = not freeze
    attr = "fc" if hasattr(model, "fc") else "classifier"
    old = getattr(model, attr)
    in_features = old.in_features if isinstance(old, nn.Linear) else next(
        m for m in old.modules() if isinstance(m, nn.Linear)).in_features
    setattr(model, attr, nn.Sequential(nn.Linear(in_features, 512), nn.ReLU(), nn.Dropout(0.2),
                                       nn.Linear(512, len(train_data.classes)), nn.LogSoftmax(dim=1)))
    criterion = nn.NLLLoss()
    optimizer = optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    setup = time.perf_counter() - start

    times, accs = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for images, labels in valid_loader:
                log_ps = model(images)
                criterion(log_ps, labels)
                correct += (log_ps.argmax(1) == labels).sum().item()
        times.append(time.perf_counter() - t0)
        accs.append(correct / len(valid_data))
    return {"setup": setup, "epochs": times, "val_acc": accs}


# --- main --------------------------------------------------------------------------------------


def one_repeat(arch: str, data: Path, work: Path, pretrained: Path, workers: int, args) -> dict:
    """(a)-(d) once; (c) and the reference's full run back to back, so that they see the same machine."""
    common = dict(batch_size=args.batch_size, workers=workers)
    print(f"[{arch}] (a) frozen backbone, no cache", file=sys.stderr, flush=True)
    a = cnnkit_run(data, work / "a", arch, args.uncached_epochs, weights=str(pretrained), cache_features=False, **common)
    print(f"[{arch}] (b) frozen backbone, feature cache, {args.epochs} epochs", file=sys.stderr, flush=True)
    b = cnnkit_run(data, work / "b", arch, args.epochs, weights=str(pretrained), **common)
    print(f"[{arch}] (d) reference loop, head only, {args.epochs} epochs", file=sys.stderr, flush=True)
    started = time.perf_counter()
    d_head = reference_run(data, arch, args.epochs, args.batch_size, workers, freeze=True)
    d_head["wall"] = time.perf_counter() - started  # measured end to end: set-up and every epoch
    print(f"[{arch}] (c) full fine-tuning", file=sys.stderr, flush=True)
    c = cnnkit_run(data, work / "c", arch, args.full_epochs, weights=str(pretrained), freeze=False, **common)
    print(f"[{arch}] (d) reference loop, full", file=sys.stderr, flush=True)
    d_full = reference_run(data, arch, args.full_epochs, args.batch_size, workers, freeze=False)

    uncached, full = steady(a["epochs"]), steady(c["epochs"])
    cached_later = statistics.median(b["epochs"][1:])
    ref_head, ref_full = steady(d_head["epochs"]), steady(d_full["epochs"])
    return {
        "a_uncached_epoch_s": uncached,
        "b_cached_first_epoch_s": b["epochs"][0],
        "b_cached_later_epoch_s": cached_later,
        "b_cached_run_wall_s": b["wall"],
        "c_full_epoch_s": full,
        "d_ref_head_epoch_s": ref_head,
        "d_ref_head_run_wall_s": d_head["wall"],
        "d_ref_full_epoch_s": ref_full,
        "ratio_cache_later_vs_uncached": uncached / cached_later,
        "ratio_head_run_ref_vs_cnnkit": d_head["wall"] / b["wall"],
        "ratio_full_cnnkit_vs_ref_speed": ref_full / full,
        "raw": {"a": a, "b": b, "c": c, "d_head": d_head, "d_full": d_full},
    }


def bench_arch(arch: str, data: Path, work: Path, args) -> dict:
    from cnnkit.runtime import default_workers

    workers = default_workers(args.workers)
    work.mkdir(parents=True, exist_ok=True)
    pretrained = weights_file(arch, work)
    repeats = []
    for repeat in range(args.repeats):
        print(f"[{arch}] repeat {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
        repeats.append(one_repeat(arch, data, work, pretrained, workers, args))
        print(json.dumps({k: round(v, 3) for k, v in repeats[-1].items() if k != "raw"}), file=sys.stderr, flush=True)
    keys = [k for k in repeats[0] if k != "raw"]
    return {"arch": arch, "workers": workers, **{k: summary([r[k] for r in repeats]) for k in keys},
            "raw": [r["raw"] for r in repeats]}


def fmt(s: dict, digits: int = 1, unit: str = "") -> str:
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def table(rows: list[dict], n_train: int, epochs: int) -> str:
    lines = [
        f"| arch | (a) uncached epoch | (b) cached: 1st epoch | (b) cached: later epochs | (b) {epochs} cached epochs, "
        f"whole run | (c) full fine-tuning epoch | (d) reference: head epoch | (d) reference: {epochs} head epochs, "
        "whole run | (d) reference: full epoch |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {fmt(r['a_uncached_epoch_s'])} s | {fmt(r['b_cached_first_epoch_s'])} s "
            f"| {fmt(r['b_cached_later_epoch_s'], 3)} s | {fmt(r['b_cached_run_wall_s'])} s "
            f"| {fmt(r['c_full_epoch_s'])} s | {fmt(r['d_ref_head_epoch_s'])} s | {fmt(r['d_ref_head_run_wall_s'])} s "
            f"| {fmt(r['d_ref_full_epoch_s'])} s |"
        )
    lines += ["", f"Training images per second of epoch ({n_train} training images): (a) "
              + ", ".join(f"{r['arch']} {n_train / r['a_uncached_epoch_s']['median']:.1f}" for r in rows) + "; (c) "
              + ", ".join(f"{r['arch']} {n_train / r['c_full_epoch_s']['median']:.1f}" for r in rows) + "; (d) full "
              + ", ".join(f"{r['arch']} {n_train / r['d_ref_full_epoch_s']['median']:.1f}" for r in rows) + ".", ""]
    lines += ["| arch | later cached epoch vs uncached epoch (target ≥ 20×) | "
              f"{epochs} head epochs, whole runs: reference / cnnkit (target ≥ 5×) | full fine-tuning speed: cnnkit / "
              "reference (target ≥ 0.95) |", "| --- | --- | --- | --- |"]
    def verdict(s: dict, target: float) -> str:
        return "met" if s["median"] >= target else f"missed by {(target - s['median']) / target:.0%}"

    for r in rows:
        cache, head, full = (r["ratio_cache_later_vs_uncached"], r["ratio_head_run_ref_vs_cnnkit"],
                             r["ratio_full_cnnkit_vs_ref_speed"])
        lines.append(f"| {r['arch']} | {fmt(cache, 0, '×')} ({verdict(cache, 20)}) | {fmt(head, 1, '×')} "
                     f"({verdict(head, 5)}) | {fmt(full, 2)} ({verdict(full, 0.95)}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "densenet121"])
    parser.add_argument("--data", type=Path, default=FLOWERS_MINI, help="DATA_DIR with train/ and valid/")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the cached head-only run (b) and of (d) head-only")
    parser.add_argument("--uncached-epochs", type=int, default=2, help="epochs of (a)")
    parser.add_argument("--full-epochs", type=int, default=2, help="epochs of (c) and of the reference's full run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of everything (medians, min–max)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers [default: cnnkit's default]")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "train_bench.json")
    args = parser.parse_args()

    logging.getLogger("cnnkit").setLevel(logging.WARNING)
    logging.getLogger("cnnkit").addHandler(logging.StreamHandler())
    n_train = len(list((args.data / "train").glob("*/*.jpg")))
    n_valid = len(list((args.data / "valid").glob("*/*.jpg")))
    started = time.time()
    results: dict = {"command": "python benchmarks/train_bench.py " + " ".join(sys.argv[1:]),
                     "machine_before": machine(), "images": f"{args.data}: {n_train} train + {n_valid} validation photos"}
    print(json.dumps(results["machine_before"]), file=sys.stderr, flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnkit-train-bench-") as tmp:
        for arch in args.archs:
            rows.append(bench_arch(arch, args.data, Path(tmp) / arch, args))
    results["rows"] = rows
    workers = rows[0]["workers"] if rows else "?"
    finish(results, started, args.out,
           f"{results['images']}; {workers} DataLoader workers\n\n{table(rows, n_train, args.epochs)}")

if __name__ == "__main__":
    main()
