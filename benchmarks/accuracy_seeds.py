"""Validation accuracy of the default training recipe over seeds (issues 4 and 17).

resnet18 from scratch (``--weights none``: the whole network trains), 64-px crops, 20 epochs, on
the bundled ``data/flowers-mini`` (5 classes, 120 training and 28 validation photos), for each
seed, with the default recipe and with ``--weight-decay 0 --warmup 0``; the best epoch's
validation accuracy (what ``best.pt`` holds) and the last epoch's, read from metrics.jsonl.
Accuracy, not speed: a busy machine changes the times, not the figures (same seed, same machine,
same metrics).

    python benchmarks/accuracy_seeds.py      # --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limit import CNNKIT, REPO, machine, subprocess_env  # noqa: E402

RECIPES = {"default": [], "`--weight-decay 0 --warmup 0`": ["--weight-decay", "0", "--warmup", "0"]}


def train(seed: int, flags: list[str], save_dir: Path) -> dict:
    cmd = [*CNNKIT, "train", str(REPO / "data" / "flowers-mini"), "--arch", "resnet18", "--weights", "none",
           "--image-size", "64", "--epochs", "20", "--seed", str(seed), "--save-dir", str(save_dir), "--force",
           "--no-progress", *flags]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    rows = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"best": max(r["val_acc"] for r in rows), "last": rows[-1]["val_acc"],
            "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "out" / "accuracy_seeds.json")
    args = parser.parse_args()

    results: dict = {"command": "python benchmarks/accuracy_seeds.py " + " ".join(sys.argv[1:]),
                     "machine": machine(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="cnnkit-accuracy-") as tmp:
        for name, flags in RECIPES.items():
            for seed in args.seeds:
                run = train(seed, flags, Path(tmp) / f"{len(results['runs'])}")
                results["runs"][f"{name} seed {seed}"] = run
                print(f"{name} seed {seed}: {run}", file=sys.stderr, flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")

    seconds = [r["seconds"] for r in results["runs"].values()]
    print(f"`{results['command']}`; {results['machine']['cpu']}; {statistics.median(seconds):.0f} s per run "
          f"(median; {min(seconds):.0f}–{max(seconds):.0f})\n")
    print("| recipe | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("| --- |" + " ---: |" * (len(args.seeds) + 1))
    for name in RECIPES:
        for which, label in (("best", "best epoch (`best.pt`)"), ("last", "last epoch")):
            values = [results["runs"][f"{name} seed {s}"][which] for s in args.seeds]
            print(f"| {name}: {label} | " + " | ".join(f"{v:.1%}" for v in values)
                  + f" | {statistics.mean(values):.1%} |")


if __name__ == "__main__":
    main()
