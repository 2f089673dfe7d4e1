"""``cnnkit inspect --label-issues`` on flipped labels (issue 15): how many of the flips the top suspects hold.

flowers-20 (``../shared/data/flowers-20``) is copied to a temporary data root with ``--flip`` (5 %
by default) of its training photos moved, with a fixed seed, into the folder of another class
drawn at random: their label is now wrong. Then, as a user would:

1. ``cnnkit train`` resnet18 from scratch (``--weights none``) on that data root, flips included
   (the backbone has seen the wrong labels, as a user's would): ``--size`` px, ``--epochs``,
   ``--recipe scratch --amp``; or ``--checkpoint`` a best.pt this script trained before (``--keep``);
2. ``cnnkit inspect DATA --label-issues --checkpoint best.pt --json`` (k-fold heads on the frozen
   backbone's features, cleanlab's ``find_label_issues``).

Reported: of the K top-ranked suspects (K = the number flipped), the share that are flips (the
target: >= 60 %); cleanlab's whole issue set, its precision and recall; the label each flip was
given back (suggested = its true class); inspect's wall time. Written to
benchmarks/out/label_issues.json.

    python benchmarks/label_issues_bench.py --keep benchmarks/out/flipped-run     # trains (~20 min)
    python benchmarks/label_issues_bench.py --checkpoint benchmarks/out/flipped-run/best.pt
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limit import CNNKIT, FLOWERS_20, REPO, finish, machine, subprocess_env  # noqa: E402

ENV = subprocess_env()


def cli(*args: object) -> subprocess.CompletedProcess:
    result = subprocess.run([*CNNKIT, *map(str, args)], env=ENV, capture_output=True, text=True)
    if result.returncode not in (0, 10):  # inspect: 10 when flowers-20's own cross-split duplicates are found
        raise SystemExit(f"cnnkit {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return result


def flip(root: Path, share: float, seed: int) -> dict[str, str]:
    """Move ``share`` of train/'s photos into another class's folder: new relative path -> true class."""
    rng = random.Random(seed)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    photos = sorted((root / "train").glob("*/*"))
    flipped = {}
    for photo in rng.sample(photos, round(share * len(photos))):
        true = photo.parent.name
        given = rng.choice([c for c in classes if c != true])
        target = root / "train" / given / f"flipped_{photo.name}"
        photo.rename(target)
        flipped[str(target.relative_to(root))] = true
    return flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flip", type=float, default=0.05, help="share of the training photos given a wrong label")
    parser.add_argument("--seed", type=int, default=0, help="which photos are flipped, and to which class")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--checkpoint", type=Path, default=None, help="a best.pt this script trained: skip training")
    parser.add_argument("--keep", type=Path, default=None, help="copy the trained best.pt into this folder")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "out" / "label_issues.json")
    args = parser.parse_args()
    started = time.time()
    results: dict = {"command": " ".join(["python", "benchmarks/label_issues_bench.py", *sys.argv[1:]]),
                     "machine_before": machine(), "flip": args.flip, "seed": args.seed}
    with tempfile.TemporaryDirectory(prefix="label-issues-bench-") as tmp:
        root = Path(tmp) / "flowers-20"
        shutil.copytree(FLOWERS_20, root)
        flipped = flip(root, args.flip, args.seed)
        run = Path(tmp) / "run"
        began = time.time()
        if args.checkpoint is None:
            cli("train", root, "--save-dir", run, "--arch", "resnet18", "--weights", "none", "--epochs", args.epochs,
                "--image-size", args.size, "--batch-size", 64, "--recipe", "scratch", "--amp", "--device", "cpu",
                "--no-progress", "--seed", 0)
            results["train"] = {"size": args.size, "epochs": args.epochs, "seconds": round(time.time() - began)}
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                shutil.copy(run / "best.pt", args.keep / "best.pt")
            checkpoint = run / "best.pt"
        else:
            checkpoint = args.checkpoint
        began = time.time()
        report = json.loads(cli("inspect", root, "--label-issues", "--checkpoint", checkpoint, "--json",
                                "--no-progress", "--device", "cpu").stdout)
        results["inspect_seconds"] = round(time.time() - began, 1)
        section = report["label_issues"]
        suspects = [(str(Path(s["path"]).relative_to(root)), s["suggested"]) for s in section["suspects"]]
    k = len(flipped)
    top = [path for path, _ in suspects[:k]]
    found = [path for path in top if path in flipped]
    caught = [path for path, _ in suspects if path in flipped]
    restored = sum(suggested == flipped[path] for path, suggested in suspects if path in flipped)
    results.update(
        images=section["images"], flipped=k, out_of_fold_accuracy=section["out_of_fold_accuracy"],
        top_k_share=len(found) / k, issues=len(suspects),
        precision=len(caught) / max(1, len(suspects)), recall=len(caught) / k,
        true_class_suggested=restored / max(1, len(caught)), backbone=section["backbone"],
    )
    trained = (f"trained here on the flipped data ({args.size} px, {args.epochs} epochs, --recipe scratch --amp, "
               f"{results['train']['seconds']} s)" if args.checkpoint is None else f"the checkpoint {args.checkpoint}")
    table = "\n".join([
        f"{section['images']} images, {k} training labels flipped ({args.flip:.0%} of train/, seed {args.seed}); "
        f"backbone: resnet18 from scratch, {trained}; out-of-fold accuracy {section['out_of_fold_accuracy']:.1%}; "
        f"inspect {results['inspect_seconds']} s.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| flips among the top {k} suspects (target >= 60%) | **{len(found)} of {k}, {len(found) / k:.1%}** |",
        f"| cleanlab's issues: count, precision, recall | {len(suspects)}, {results['precision']:.1%}, "
        f"{results['recall']:.1%} |",
        f"| caught flips whose suggested label is the true class | {results['true_class_suggested']:.1%} |",
    ])
    finish(results, started, args.output, table)


if __name__ == "__main__":
    main()
