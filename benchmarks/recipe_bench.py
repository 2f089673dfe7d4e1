"""Training recipes against each other (issue 12): accuracy, calibration and time, over seeds.

Each recipe is a set of ``cnnkit train`` flags on top of the same base command: resnet18 from
scratch (``--weights none``), or from a given backbone. The settings:

- ``--data mini``: the README demo's run, on the bundled ``data/flowers-mini`` (5 classes, 120
  training, 28 validation, 27 test photos), 64-px crops, ``--epochs 15`` (the demo's epochs
  until it took ``scratch+30ep+bs16``'s flags; fixed epochs: a busy machine changes the times,
  not the figures);
- ``--data flowers-20``: ``../shared/data/flowers-20`` (20 classes, 2,044 / 247 / 248 photos),
  128-px crops, every recipe under the same ``--time-budget`` (15m by default): the
  recipes' speed matters there, so run it on a quiet machine.

- ``--data transfer``: the product's main use, measured on features actually learned: the
  backbone of a flowers-20 run (``--backbone best.pt``, e.g. one kept by ``--keep``) trained on
  flowers-mini at 128 px with ``--weights BACKBONE`` (a frozen head on cached features, then
  ``--fine-tune``), against flowers-mini from scratch at the same size and epochs.
- ``--data held-out``: the same recipes on a larger target: flowers-20's last 5 classes (in
  sorted order; 562 / 66 / 68 photos), from the backbone of a model of its other 15
  (``--backbone``: the ``best.pt`` that ``unknown_bench.py --keep`` keeps), which never saw them.

For each recipe and seed: the best epoch's validation accuracy (what ``best.pt`` holds), then
``cnnkit evaluate best.pt`` on the test split: top-1 accuracy and ECE (15 bins); and the run's
wall time (the whole ``cnnkit train`` process: start-up and the statistics stored at the end
included) and its epochs' own seconds. Medians/means with min–max over seeds; raw runs in benchmarks/out/recipe_bench_*.json.

    python benchmarks/recipe_bench.py --data mini --seeds 0 1 2 3 4
    python benchmarks/recipe_bench.py --data flowers-20 --recipes plain scratch --seeds 0 1 2
    python benchmarks/recipe_bench.py --data transfer --backbone DIR/recipe\ scratch-0/best.pt --seeds 0 1 2
    python benchmarks/recipe_bench.py --data held-out --backbone KEEP/best.pt --recipes "scratch, no transfer" \
        "head only (transfer, 5 epochs)" --seeds 0 1 2
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

from limit import CNNKIT, FLOWERS_20, REPO, flowers20_classes, link_classes, machine, subprocess_env  # noqa: E402

MIX = ["--mixup", "0.2", "--cutmix", "1.0"]
PLAIN = ["--recipe", "plain"]  # the recipe before issue 12, named: the default recipes have moved on since
FP32 = ["--no-amp"]  # cnnkit before issue 12 trained in float32 on the CPU, under a time budget too
# Candidates: flags over --recipe plain (light augmentation, random resized crop + flip: the
# recipe before issue 12; "plain" alone is that recipe, the baseline); and the named recipes as
# cnnkit defines them now, with its default precision.
RECIPES = {
    "plain": [*PLAIN, *FP32],
    "trivial": [*PLAIN, "--augment", "trivial", *FP32],
    "trivial+ls": [*PLAIN, "--augment", "trivial", "--label-smoothing", "0.1", *FP32],
    "trivial+mix+ls": [*PLAIN, "--augment", "trivial", *MIX, "--label-smoothing", "0.1", *FP32],
    "trivial+ls+ema": [*PLAIN, "--augment", "trivial", "--label-smoothing", "0.1", "--ema", "0.99", *FP32],
    "trivial+mix+ls+ema": [*PLAIN, "--augment", "trivial", *MIX, "--label-smoothing", "0.1", "--ema", "0.99", *FP32],
    "plain+amp": [*PLAIN, "--amp"],  # bfloat16 autocast: native on CPUs with AMX / AVX512-BF16
    "plain+amp+bs32": [*PLAIN, "--amp", "--batch-size", "32"],  # (over the setting's --batch-size 64) twice the steps
    "trivial+ls+amp": [*PLAIN, "--augment", "trivial", "--label-smoothing", "0.1", "--amp"],
    "rand+erase+ls": [*PLAIN, "--augment", "rand", "--random-erase", "0.25", "--label-smoothing", "0.1", *FP32],
    "recipe scratch": ["--recipe", "scratch"],
    # Over the scratch recipe as it was (plain's fields, in bfloat16 by default under the budget):
    # more epochs in the budget from smaller training crops (96 px, evaluated at 128: FixRes, as
    # torchvision's recipe trains at 176 and evaluates at 224), and gentler crops
    "scratch+train96": [*PLAIN, "--train-size-ratio", "0.75"],
    "scratch+scale0.25": [*PLAIN, "--min-scale", "0.25"],
    "scratch+train96+scale0.25": [*PLAIN, "--train-size-ratio", "0.75", "--min-scale", "0.25"],
    # The README demo's screen (--data mini, float32 there: no budget): one change at a time
    "bs16": [*PLAIN, "--batch-size", "16"],
    "bs8": [*PLAIN, "--batch-size", "8"],
    "bs4": [*PLAIN, "--batch-size", "4"],
    "bs8+lr2e-3": [*PLAIN, "--batch-size", "8", "--learning-rate", "2e-3"],
    "bs8+ema": [*PLAIN, "--batch-size", "8", "--ema", "0.98"],
    "bs8+linear-head": [*PLAIN, "--batch-size", "8", "--hidden-units", "0"],
    "bs8+96px": [*PLAIN, "--batch-size", "8", "--image-size", "96"],  # (over the setting's 64)
    # The default recipe in smaller batches for the demo's epochs or a few more (what fits the
    # former demo's time), and for twice its epochs (over the setting's 15); in float32 (the
    # default without a budget) and in bfloat16
    "scratch+15ep+bs8": ["--recipe", "scratch", "--batch-size", "8"],  # (the setting's 15 epochs)
    "scratch+20ep+bs8": ["--recipe", "scratch", "--epochs", "20", "--batch-size", "8"],
    "scratch+24ep+bs16": ["--recipe", "scratch", "--epochs", "24", "--batch-size", "16"],
    "scratch+30ep": ["--recipe", "scratch", "--epochs", "30"],
    "scratch+30ep+bs16": ["--recipe", "scratch", "--epochs", "30", "--batch-size", "16"],
    "scratch+30ep+bs8": ["--recipe", "scratch", "--epochs", "30", "--batch-size", "8"],
    "scratch+30ep+bs8+amp": ["--recipe", "scratch", "--epochs", "30", "--batch-size", "8", "--amp"],
}
BACKBONE = "{backbone}"  # --data transfer: the flowers-20 checkpoint given by --backbone
TRANSFER_EPOCHS = ["--epochs", "10", "--fine-tune", "10"]
TRANSFER = {
    "scratch, no transfer": ["--weights", "none", "--recipe", "scratch", "--epochs", "20"],
    "head only": ["--weights", BACKBONE, "--recipe", "plain", "--epochs", "20"],
    # The frozen head alone with the transfer recipe (label smoothing 0.1): cnnkit's default epochs
    # (5), 20, and 20 with a linear head
    "head only (transfer, 5 epochs)": ["--weights", BACKBONE, "--recipe", "transfer"],
    "head only (transfer)": ["--weights", BACKBONE, "--recipe", "transfer", "--epochs", "20"],
    "head only (transfer, linear)": ["--weights", BACKBONE, "--recipe", "transfer", "--epochs", "20", "--hidden-units", "0"],
    "head, then fine-tune": ["--weights", BACKBONE, "--recipe", "plain", *TRANSFER_EPOCHS],
    "recipe transfer": ["--weights", BACKBONE, "--recipe", "transfer", *TRANSFER_EPOCHS],
}
MINI = REPO / "data" / "flowers-mini"
SETTINGS = {
    "mini": (MINI, ["--weights", "none", "--image-size", "64", "--epochs", "15"], RECIPES),
    "flowers-20": (FLOWERS_20, ["--weights", "none", "--image-size", "128", "--batch-size", "64"], RECIPES),
    "transfer": (MINI, ["--image-size", "128"], TRANSFER),
    "held-out": (None, ["--image-size", "128"], TRANSFER),  # (a data root of links, made for the run)
}


def run(data: Path, base: list[str], flags: list[str], seed: int, save_dir: Path) -> dict:
    cmd = [*CNNKIT, "train", str(data), "--arch", "resnet18", "--seed", str(seed),
           "--save-dir", str(save_dir), "--force", "--no-progress", *base,
           *(flags if "--recipe" in flags else ["--recipe", "plain", *flags])]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=subprocess_env())
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    done = subprocess.run([*CNNKIT, "evaluate", str(save_dir / "best.pt"), str(data), "--split", "test", "--json",
                           "--no-progress"], check=True, capture_output=True, text=True, env=subprocess_env())
    report = json.loads(done.stdout)
    return {"val_best": max(r["val_acc"] for r in rows), "test_acc": report["accuracy"], "ece": report["ece"],
            "epochs": len(rows), "seconds": round(seconds, 1),
            "epoch_seconds": round(sum(r["seconds"] for r in rows), 1)}  # the epochs alone (feature caching included)


def summary(values: list[float], percent: bool = True) -> str:
    fmt = (lambda v: f"{100 * v:.1f}") if percent else (lambda v: f"{v:.3f}")
    return f"{fmt(statistics.mean(values))} ({fmt(min(values))}–{fmt(max(values))})"


def _median(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if key in r]  # (runs recorded before a key was added lack it)
    return f"{statistics.median(values):.1f}" if values else "–"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=sorted(SETTINGS), default="mini")
    parser.add_argument("--recipes", nargs="+", choices=sorted({*RECIPES, *TRANSFER}),
                        help="the setting's recipes to run (default: all of them)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--time-budget", default="15m", help="flowers-20: every run's --time-budget")
    parser.add_argument("--append", action="store_true", help="add to the runs already in the output file")
    parser.add_argument("--keep", type=Path, help="keep each run's best.pt under KEEP/RECIPE-SEED/")
    parser.add_argument("--backbone", type=Path, help="--data transfer, held-out: the checkpoint whose backbone to transfer")
    args = parser.parse_args()
    data, base, recipes = SETTINGS[args.data]
    names = args.recipes or list(recipes)
    if unknown := [name for name in names if name not in recipes]:
        parser.error(f"not a recipe of --data {args.data}: {', '.join(unknown)}")
    if recipes is TRANSFER:
        if args.backbone is None or not args.backbone.is_file():
            parser.error(f"--data {args.data} needs --backbone, a checkpoint (best.pt) of "
                         f"{'flowers-20' if args.data == 'transfer' else 'the other 15 classes of flowers-20'}")
        recipes = {name: [flag.format(backbone=args.backbone) for flag in flags] for name, flags in recipes.items()}
    if args.data == "flowers-20":
        base = [*base, "--time-budget", args.time_budget]
    command = "python benchmarks/recipe_bench.py " + " ".join(sys.argv[1:])
    output = REPO / "benchmarks" / "out" / f"recipe_bench_{args.data}.json"
    # Runs add to what earlier commands measured (a screen, then more seeds for the finalists);
    # a recipe and seed measured again replaces the old row.
    results: dict = json.loads(output.read_text()) if output.exists() and args.append else {"runs": {}}
    earlier = results.pop("command", None)  # (files written before runs could be added)
    results["commands"] = [*results.get("commands", [earlier] if earlier else []), command]
    results["machine"] = machine()
    with tempfile.TemporaryDirectory(prefix="cnnkit-recipes-") as tmp:
        if args.data == "held-out":
            data = link_classes(Path(tmp) / "held-out", flowers20_classes()[1])
        for seed in args.seeds:  # seeds outermost: a partial run still compares every recipe
            for name in names:
                save_dir = (args.keep or Path(tmp)) / f"{name}-{seed}"
                row = run(data, base, recipes[name], seed, save_dir)
                results["runs"].setdefault(name, {})[str(seed)] = row
                print(f"{name} seed {seed}: {row}", file=sys.stderr, flush=True)
                output.parent.mkdir(parents=True, exist_ok=True)
                output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"`{'`, then `'.join(results['commands'])}`; {results['machine']['cpu']}, {results['machine']['cores']} cores, "
          f"torch {results['machine']['torch']}\n")
    print("| recipe | flags | validation accuracy, best epoch, % | test accuracy, % | test ECE | epochs | seconds | "
          "epochs' seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in results["runs"]:
        rows = list(results["runs"][name].values())
        print(f"| {name} | `{' '.join(SETTINGS[args.data][2][name]) or '(none)'}` | {summary([r['val_best'] for r in rows])} | "
              f"{summary([r['test_acc'] for r in rows])} | {summary([r['ece'] for r in rows], percent=False)} | "
              f"{statistics.median(r['epochs'] for r in rows):.0f} | {statistics.median(r['seconds'] for r in rows):.0f} | "
              f"{_median(rows, 'epoch_seconds')} |")


if __name__ == "__main__":
    main()
