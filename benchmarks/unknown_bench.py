"""Open-set "unknown" benchmark (issue 15): confidence alone against the combined score.

``cnnkit train`` resnet18 from scratch (``--weights none``) at ``--size`` px on 15 of
flowers-20's 20 classes (a temporary data root of symlinks; the first 15 class folders in sorted
order), then ``cnnkit evaluate --split valid --target-coverage 0.95`` (re-fits the combined
score's standardisation and stores its threshold) and ``cnnkit evaluate --split test --unknown``
with the other 5 classes' test images as the unknown folder. Reports AUROC and FPR at 95% TPR
of confidence, of the feature distance and of the combined score (target: combined >=
confidence + 0.10 AUROC).

    python benchmarks/unknown_bench.py      # --size 96 --epochs 15
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limit import CNNKIT, FLOWERS_20, REPO, finish, machine, subprocess_env  # noqa: E402

ENV = subprocess_env()
KNOWN = 15


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
    args = parser.parse_args()
    started = time.time()
    results: dict = {"command": " ".join(["python", "benchmarks/unknown_bench.py", *sys.argv[1:]]),
                     "machine_before": machine(), "size": args.size, "epochs": args.epochs}
    classes = sorted(p.name for p in (FLOWERS_20 / "train").iterdir() if p.is_dir())
    known, unknown = classes[:KNOWN], classes[KNOWN:]
    results.update(known=known, unknown=unknown)
    with tempfile.TemporaryDirectory(prefix="unknown-bench-") as tmp:
        root, held = Path(tmp) / "data", Path(tmp) / "unknown"
        for split in ("train", "valid", "test"):
            (root / split).mkdir(parents=True)
            for name in known:
                (root / split / name).symlink_to(FLOWERS_20 / split / name)
        held.mkdir()
        for name in unknown:
            (held / name).symlink_to(FLOWERS_20 / "test" / name)
        run = Path(tmp) / "run"
        began = time.time()
        cli("train", root, "--save-dir", run, "--arch", "resnet18", "--weights", "none", "--epochs", args.epochs,
            "--image-size", args.size, "--resize-size", int(args.size * 1.15), "--batch-size", 32,
            "--device", "cpu", "--no-progress", "--seed", 0)
        results["train_seconds"] = round(time.time() - began)
        cli("evaluate", run / "best.pt", root, "--split", "valid", "--target-coverage", "0.95", "--device", "cpu",
            "--no-progress", "--json")
        report = json.loads(cli("evaluate", run / "best.calibrated.pt", root, "--split", "test", "--unknown", held,
                                "--device", "cpu", "--no-progress", "--json").stdout)
    found = report["unknown"]
    results.update(test_accuracy=report["accuracy"], known_images=report["images"], unknown_images=found["images"],
                   scores={k: found[k] for k in ("confidence", "distance", "combined")})
    rows = [f"| {k} | {v['auroc']:.3f} | {v['fpr_at_95_tpr']:.1%} |" for k, v in results["scores"].items()]
    gain = results["scores"]["combined"]["auroc"] - results["scores"]["confidence"]["auroc"]
    table = "\n".join([
        f"resnet18 from scratch, {args.size} px, {args.epochs} epochs ({results['train_seconds']} s): test accuracy "
        f"{report['accuracy']:.1%} on {report['images']} images of the {KNOWN} known classes; "
        f"{found['images']} test images of the {len(unknown)} held-out classes as unknown.",
        "",
        "| score | AUROC | FPR at 95% TPR |",
        "| --- | --- | --- |",
        *rows,
        "",
        f"combined - confidence AUROC: {gain:+.3f} (target +0.10)",
    ])
    finish(results, started, args.output, table)


if __name__ == "__main__":
    main()
