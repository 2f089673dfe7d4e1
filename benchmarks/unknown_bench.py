"""Open-set "unknown" benchmark (issue 15): confidence alone against the combined score.

``cnnkit train`` resnet18 from scratch (``--weights none``) at ``--size`` px on 15 of
flowers-20's 20 classes (a temporary data root of symlinks; the first 15 class folders in sorted
order), then ``cnnkit evaluate --split valid --target-coverage 0.95`` (re-fits the combined
score's standardisation and stores its threshold) and ``cnnkit evaluate --split test --unknown``
with the other 5 classes' test images as the unknown folder. Reports AUROC and FPR at 95% TPR
of confidence, of the feature distance and of the combined score (target: combined >=
confidence + 0.10 AUROC).

    python benchmarks/unknown_bench.py      # --size 96 --epochs 15
    python benchmarks/unknown_bench.py --size 128 --epochs 25 --recipe scratch --amp --keep DIR
    python benchmarks/unknown_bench.py --checkpoint benchmarks/out/unknown-run/best.pt --combinations
    python benchmarks/unknown_bench.py --checkpoint KEEP/best.pt --refit --unknown-splits train valid test

``--refit`` fits the checkpoint's open-set statistics again with this cnnkit (as training does at
its end), for a checkpoint trained before they changed. ``--unknown-splits`` takes the held-out
classes' photos from more splits than test/ (the model saw none of them), for a less noisy AUROC.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limit import (  # noqa: E402
    CNNKIT, FLOWERS_20, KNOWN_CLASSES as KNOWN, REPO, finish, flowers20_classes, link_classes, machine, subprocess_env,
)

ENV = subprocess_env()


def cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([*CNNKIT, *map(str, args)], env=ENV, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"cnnkit {' '.join(map(str, args))} failed:\n{result.stderr[-2000:]}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "out" / "unknown.json")
    parser.add_argument("--recipe", default=None, help="cnnkit train --recipe [default: train's own default]")
    parser.add_argument("--amp", action="store_true", help="cnnkit train --amp (bfloat16 autocast on the CPU)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="a best.pt trained by this script: skip training")
    parser.add_argument("--keep", type=Path, default=None, help="copy the trained best.pt into this folder")
    parser.add_argument("--combinations", action="store_true", help="also compare ways of combining the two scores")
    parser.add_argument("--refit", action="store_true", help="re-fit --checkpoint's open-set statistics first")
    parser.add_argument("--unknown-splits", nargs="+", default=["test"], choices=["train", "valid", "test"],
                        help="the held-out classes' splits whose photos are the unknown images")
    args = parser.parse_args()
    started = time.time()
    results: dict = {"command": " ".join(["python", "benchmarks/unknown_bench.py", *sys.argv[1:]]),
                     "machine_before": machine(), "size": args.size, "epochs": args.epochs,
                     "recipe": args.recipe, "amp": args.amp, "refit": args.refit,
                     "unknown_splits": args.unknown_splits}
    known, unknown = flowers20_classes()
    results.update(known=known, unknown=unknown)
    with tempfile.TemporaryDirectory(prefix="unknown-bench-") as tmp:
        root, held = link_classes(Path(tmp) / "data", known), Path(tmp) / "unknown"
        for name, split in ((n, s) for n in unknown for s in args.unknown_splits):
            (held / name / split).mkdir(parents=True)  # (links to files: --unknown does not follow a linked folder)
            for image in sorted((FLOWERS_20 / split / name).iterdir()):
                (held / name / split / image.name).symlink_to(image)
        run = Path(tmp) / "run"
        began = time.time()
        if args.checkpoint is None:
            cli("train", root, "--save-dir", run, "--arch", "resnet18", "--weights", "none", "--epochs", args.epochs,
                "--image-size", args.size, "--resize-size", int(args.size * 1.15), "--batch-size", 32,
                "--device", "cpu", "--no-progress", "--seed", 0,
                *(["--recipe", args.recipe] if args.recipe else []), *(["--amp"] if args.amp else []))
        else:
            run.mkdir()
            shutil.copy(args.checkpoint, run / "best.pt")
            if args.refit:
                refit(run / "best.pt", root)
        results["train_seconds"] = round(time.time() - began)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(run / "best.pt", args.keep / "best.pt")
        cli("evaluate", run / "best.pt", root, "--split", "valid", "--target-coverage", "0.95", "--device", "cpu",
            "--no-progress", "--json")
        report = json.loads(cli("evaluate", run / "best.calibrated.pt", root, "--split", "test", "--unknown", held,
                                "--device", "cpu", "--no-progress", "--json").stdout)
        if args.combinations:
            results["combinations"] = combinations(run / "best.calibrated.pt", root / "test", held)
    found = report["unknown"]
    results.update(test_accuracy=report["accuracy"], known_images=report["images"], unknown_images=found["images"],
                   scores={k: found[k] for k in ("confidence", "distance", "combined")})
    rows = [f"| {k} | {v['auroc']:.3f} | {v['fpr_at_95_tpr']:.1%} |" for k, v in results["scores"].items()]
    gain = results["scores"]["combined"]["auroc"] - results["scores"]["confidence"]["auroc"]
    recipe = "".join(f", {flag}" for flag in (f"--recipe {args.recipe}" if args.recipe else "", "--amp" if args.amp else "") if flag)
    trained = (f"{args.size} px, {args.epochs} epochs{recipe} ({results['train_seconds']} s)" if args.checkpoint is None
               else f"the checkpoint {args.checkpoint}")
    table = "\n".join([
        f"resnet18 from scratch, {trained}: test accuracy "
        f"{report['accuracy']:.1%} on {report['images']} images of the {KNOWN} known classes; "
        f"{found['images']} {'/'.join(args.unknown_splits)} images of the {len(unknown)} held-out classes as unknown"
        f"{' (open-set statistics re-fitted by this cnnkit)' if args.refit else ''}.",
        "",
        "| score | AUROC | FPR at 95% TPR |",
        "| --- | --- | --- |",
        *rows,
        "",
        f"combined - confidence AUROC: {gain:+.3f} (target +0.10)",
    ])
    if "combinations" in results:
        table += "\n\nWays of combining z(confidence) and z(distance) (each standardised on valid/), on the same images:\n\n"
        table += "| known score | AUROC | FPR at 95% TPR |\n| --- | --- | --- |\n"
        table += "\n".join(f"| {k} | {v['auroc']:.3f} | {v['fpr_at_95_tpr']:.1%} |" for k, v in results["combinations"].items())
    finish(results, started, args.output, table)


def refit(checkpoint: Path, root: Path) -> None:
    """Fit ``checkpoint``'s open-set statistics again, on ``root``'s train/ and valid/ photos."""
    import torch
    from torch.utils.data import DataLoader

    from cnnkit.data.folders import ImageDataset, collate, scan_image_folder
    from cnnkit.data.transforms import build_transforms
    from cnnkit.models.checkpoint import load_checkpoint
    from cnnkit.models.openset import fit_open_set

    ckpt = load_checkpoint(str(checkpoint))
    model = ckpt.build_model(torch.device("cpu"))
    transform = build_transforms(ckpt.preprocess, train=False)
    loaders = [DataLoader(ImageDataset.from_samples(scan_image_folder(str(root / split))[1], transform),
                          batch_size=64, collate_fn=collate) for split in ("train", "valid")]
    ckpt.open_set = fit_open_set(model, ckpt.arch, *loaders, num_classes=len(ckpt.classes))
    ckpt.save(checkpoint)


def combinations(checkpoint: Path, known_dir: Path, unknown_dir: Path) -> dict[str, dict[str, float]]:
    """AUROC and FPR@95 of a few known scores built from the same two z-scores."""
    import numpy as np

    from cnnkit.data.folders import expand_inputs, scan_image_folder
    from cnnkit.evaluate import separation
    from cnnkit.inference.predictor import Predictor

    predictor = Predictor(str(checkpoint), "cpu")
    stats = predictor.open_set.stats

    def z_scores(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        rows = [(p.max().item(), d) for _, p, d, e in predictor.score_paths_with_distance(paths) if e is None]
        conf, dist = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
        return ((conf - stats["confidence"]["mean"]) / stats["confidence"]["std"],
                (dist - stats["distance"]["mean"]) / stats["distance"]["std"])

    (kc, kd), (uc, ud) = z_scores([p for p, _ in scan_image_folder(str(known_dir))[1]]), z_scores(
        list(expand_inputs([str(unknown_dir)])))
    ways = {"z(conf)": lambda c, d: c, "-z(dist)": lambda c, d: -d, "z(conf) - z(dist) (cnnkit)": lambda c, d: c - d,
            "2 z(conf) - z(dist)": lambda c, d: 2 * c - d, "z(conf) - 2 z(dist)": lambda c, d: c - 2 * d,
            "min(z(conf), -z(dist))": lambda c, d: np.minimum(c, -d)}
    return {name: separation(f(kc, kd), f(uc, ud)) for name, f in ways.items()}


if __name__ == "__main__":
    main()
