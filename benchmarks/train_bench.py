"""Training benchmark for ``cnnkit train`` (issue 4).

For each architecture, in one process on one machine, on one generated ImageFolder:

(a) frozen backbone without the feature cache (``--no-cache-features``): seconds per epoch;
(b) frozen backbone with the feature cache (the default): the first epoch (features computed)
    and the later epochs, and the wall time of the whole 10-epoch ``train()`` call;
(c) full fine-tuning (``--no-freeze``: every parameter trains, with augmentation): seconds per epoch;
(d) the reference: a plain loop as in the seed project's ``train.py`` (torchvision ImageFolder,
    DataLoader, the model with a new head, Adam, NLLLoss, a validation pass per epoch), head-only
    and full, with the same batch size, image size and DataLoader workers as cnnkit.

An "epoch" is a training pass over the training images plus a validation pass. Per-epoch times
are medians over the epochs after the first of each run (the first pays one-off costs: worker
start-up, kernel selection); the reference's 10-epoch time is its set-up plus 10 such epochs.
Weights are random and stored as a ".pth" file given to ``--weights``, so cnnkit treats them as
pretrained (frozen backbone, cached features): throughput does not depend on their values.
Images are the bundled flower photos resized to a realistic 500x375 and re-encoded as JPEG.

    python benchmarks/train_bench.py --archs resnet18 densenet121
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO / "data" / "flowers-mini"
sys.path.insert(0, str(REPO))


def make_dataset(root: Path, n_train: int, n_valid: int, size: tuple[int, int] = (500, 375)) -> Path:
    """train/ and valid/ ImageFolders of 5 classes, from the bundled photos (cycled)."""
    sources = sorted(FLOWERS.glob("*/*/*.jpg"))
    count = 0
    for split, n in (("train", n_train), ("valid", n_valid)):
        for i in range(n):
            src = sources[count % len(sources)]
            out = root / split / f"c{i % 5}" / f"img_{count:05d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.open(src).convert("RGB").resize(size, Image.BICUBIC).save(out, quality=90)
            count += 1
    return root


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


def bench_arch(arch: str, data: Path, work: Path, args) -> dict:
    from cnnkit.runtime import default_workers

    workers = default_workers(args.workers)
    work.mkdir(parents=True, exist_ok=True)
    pretrained = weights_file(arch, work)
    common = dict(batch_size=args.batch_size, workers=workers)
    print(f"[{arch}] (a) frozen backbone, no cache", flush=True)
    a = cnnkit_run(data, work / "a", arch, args.uncached_epochs, weights=str(pretrained), cache_features=False, **common)
    print(f"[{arch}] (b) frozen backbone, feature cache, {args.epochs} epochs", flush=True)
    b = cnnkit_run(data, work / "b", arch, args.epochs, weights=str(pretrained), **common)
    print(f"[{arch}] (d) reference loop, head only", flush=True)
    d_head = reference_run(data, arch, args.ref_epochs, args.batch_size, workers, freeze=True)
    # (c) and the reference's full run back to back, so that they see the same machine.
    print(f"[{arch}] (c) full fine-tuning", flush=True)
    c = cnnkit_run(data, work / "c", arch, args.full_epochs, weights=str(pretrained), freeze=False, **common)
    print(f"[{arch}] (d) reference loop, full", flush=True)
    d_full = reference_run(data, arch, args.full_epochs, args.batch_size, workers, freeze=False)

    n_train = args.train
    uncached = steady(a["epochs"])
    cached_later = statistics.median(b["epochs"][1:])
    full = steady(c["epochs"])
    ref_head, ref_full = steady(d_head["epochs"]), steady(d_full["epochs"])
    ref_ten = d_head["setup"] + d_head["epochs"][0] + (args.epochs - 1) * ref_head
    row = {
        "arch": arch,
        "workers": workers,
        "a_uncached_epoch_s": uncached,
        "a_uncached_img_s": n_train / uncached,
        "b_cached_first_epoch_s": b["epochs"][0],
        "b_cached_later_epoch_s": cached_later,
        "b_cached_later_img_s": n_train / cached_later,
        "b_cached_run_wall_s": b["wall"],
        "c_full_epoch_s": full,
        "c_full_img_s": n_train / full,
        "d_ref_head_epoch_s": ref_head,
        "d_ref_head_img_s": n_train / ref_head,
        "d_ref_head_ten_epochs_s": ref_ten,
        "d_ref_full_epoch_s": ref_full,
        "d_ref_full_img_s": n_train / ref_full,
        "ratio_cache_later_vs_uncached": uncached / cached_later,
        "ratio_ten_head_epochs_ref_vs_cnnkit": ref_ten / b["wall"],
        "ratio_full_cnnkit_vs_ref_speed": ref_full / full,
        "raw": {"a": a, "b": b, "c": c, "d_head": d_head, "d_full": d_full},
    }
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "raw"}), flush=True)
    return row


def table(rows: list[dict], n_train: int, epochs: int) -> str:
    lines = [
        f"| arch | (a) uncached epoch | (b) cached: 1st epoch / later epochs | (b) {epochs} cached epochs, whole run | "
        f"(c) full fine-tuning epoch | (d) reference: head epoch / {epochs} head epochs / full epoch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['arch']} | {r['a_uncached_epoch_s']:.1f} s ({r['a_uncached_img_s']:.1f} img/s) "
            f"| {r['b_cached_first_epoch_s']:.1f} s / {r['b_cached_later_epoch_s']:.3f} s ({r['b_cached_later_img_s']:.0f} img/s) "
            f"| {r['b_cached_run_wall_s']:.1f} s "
            f"| {r['c_full_epoch_s']:.1f} s ({r['c_full_img_s']:.1f} img/s) "
            f"| {r['d_ref_head_epoch_s']:.1f} s / {r['d_ref_head_ten_epochs_s']:.0f} s / {r['d_ref_full_epoch_s']:.1f} s |"
        )
    lines += ["", "| arch | later cached epoch vs uncached epoch (target ≥ 20×) | "
              f"{epochs} head epochs: reference / cnnkit (target ≥ 5×) | full fine-tuning speed: cnnkit / reference (target ≥ 0.95) |",
              "| --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['arch']} | {r['ratio_cache_later_vs_uncached']:.0f}× | "
                     f"{r['ratio_ten_head_epochs_ref_vs_cnnkit']:.1f}× | {r['ratio_full_cnnkit_vs_ref_speed']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "densenet121"])
    parser.add_argument("--train", type=int, default=160, help="training images")
    parser.add_argument("--valid", type=int, default=40, help="validation images")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the cached head-only run (b)")
    parser.add_argument("--uncached-epochs", type=int, default=2, help="epochs of (a)")
    parser.add_argument("--full-epochs", type=int, default=3, help="epochs of (c) and of the reference's full run")
    parser.add_argument("--ref-epochs", type=int, default=2, help="epochs of the reference's head-only run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers [default: cnnkit's default]")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "train_bench.json")
    args = parser.parse_args()

    logging.getLogger("cnnkit").setLevel(logging.WARNING)
    logging.getLogger("cnnkit").addHandler(logging.StreamHandler())
    meta = {
        "command": "python benchmarks/train_bench.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "images": f"{args.train} train + {args.valid} validation JPEGs, 500x375, 5 classes",
    }
    print(json.dumps(meta), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnkit-train-bench-") as tmp:
        work = Path(tmp)
        data = make_dataset(work / "data", args.train, args.valid)
        for arch in args.archs:
            rows.append(bench_arch(arch, data, work / arch, args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print()
    print(table(rows, args.train, args.epochs))


if __name__ == "__main__":
    main()
