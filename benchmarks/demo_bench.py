"""The README demo's training time: this checkout's `cnnkit train` against an earlier commit's.

README command 1 trains resnet18 from scratch on the bundled ``data/flowers-mini`` (64 px). This
runs that ``cnnkit train`` (``--no-progress``, seed 0, a temporary ``--save-dir``) as a
subprocess for the baseline commit (``--baseline REV``, checked out into a temporary git
worktree, with the baseline's flags) and for this checkout (with each ``--candidate``'s flags),
interleaved ``--repeats`` times on the same machine, and reports each one's median wall time
(the whole process: start-up, epochs, checkpoints and the statistics stored at the end), the
median of its epochs' own seconds (metrics.jsonl) and the ratios to the baseline's medians.

    python benchmarks/demo_bench.py --baseline 78b45e8 --repeats 3 \\
        --candidate "--epochs 15" --candidate "--epochs 30 --batch-size 16"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from limit import REPO, finish, machine  # noqa: E402

DEMO = ["train", str(REPO / "data" / "flowers-mini"), "--arch", "resnet18", "--weights", "none", "--image-size", "64",
        "--seed", "0", "--no-progress", "--force"]


def timed_run(checkout: Path, flags: list[str], save_dir: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}  # that checkout's cnnkit, whichever is installed
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cnnkit", *DEMO, *flags, "--save-dir", str(save_dir)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=checkout)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"wall": wall, "epoch_seconds": sum(r["seconds"] for r in rows), "val_best": max(r["val_acc"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="the git revision whose demo is the baseline")
    parser.add_argument("--baseline-flags", default="--epochs 15", help="the baseline's flags over the demo's")
    parser.add_argument("--candidate", action="append", default=[], help="this checkout's flags over the demo's")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    command = "python benchmarks/demo_bench.py " + shlex.join(sys.argv[1:])
    before = machine()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="cnnkit-demo-") as tmp:
        worktree = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), args.baseline],
                       check=True, capture_output=True)
        try:
            runs = {f"{args.baseline}: {args.baseline_flags}": (worktree, shlex.split(args.baseline_flags))}
            runs.update({f"this checkout: {flags}": (REPO, shlex.split(flags)) for flags in args.candidate})
            results: dict[str, list[dict]] = {name: [] for name in runs}
            for repeat in range(args.repeats):
                for name, (checkout, flags) in runs.items():
                    row = timed_run(checkout, flags, Path(tmp) / f"run-{len(results[name])}-{repeat}")
                    results[name].append(row)
                    print(f"{name} #{repeat + 1}: {row}", file=sys.stderr, flush=True)
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=False)
    base_name = next(iter(results))
    base_wall = statistics.median(r["wall"] for r in results[base_name])
    base_epochs = statistics.median(r["epoch_seconds"] for r in results[base_name])
    lines = ["| run | wall seconds, median | epochs' seconds, median | wall / baseline (epochs') | "
             "seed 0's best validation accuracy |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, rows in results.items():
        wall = statistics.median(r["wall"] for r in rows)
        epochs = statistics.median(r["epoch_seconds"] for r in rows)
        lines.append(f"| {name} | {wall:.1f} | {epochs:.1f} | {wall / base_wall:.2f} ({epochs / base_epochs:.2f}) | "
                     f"{100 * rows[0]['val_best']:.1f}% |")
    finish({"command": command, "machine_before": before, "runs": results}, started,
           REPO / "benchmarks" / "out" / "demo_bench.json", "\n".join(lines))


if __name__ == "__main__":
    main()
