"""Quantization benchmark (issue 13): int8 ONNX exports against the float32 model, on real photos.

Two parts, for each architecture, in one run on one machine:

**Accuracy** (models that learned something): ``cnnkit train ../shared/data/flowers-20 --weights
none`` at ``--train-size`` px for ``--epochs`` (cached under benchmarks/out/models/ so a re-run
measures again without training again), then ``cnnkit export --int8 --calibration-data
flowers-20`` with the default gate (calibrated on train/, gated on valid/); on test/ (never seen
by training, calibration or gate): top-1 accuracy of the float checkpoint and of the int8 model,
and their top-1 agreement. A gate that refuses the int8 model is recorded as such.

**Speed** (at the architecture's own 224 px; weights random and seeded, as in every speed
benchmark here: throughput does not depend on their values): the float32 torch limit
(``limit.py``: forward-only, best layout and batch size, one process, a thread per core), then
whole-process ``cnnkit predict`` of ``--images`` photos (start-up included, ``--repeats`` runs,
interleaved) with the torch checkpoint, its float ONNX export and its int8 ONNX export (calibrated
on 128 photos the prediction does not score; ``--ignore-gate``, the gate's own speed figure is
reported beside), each as a ratio to the limit.

    python benchmarks/quantize_bench.py      # --archs resnet18 mobilenet_v3_large densenet121
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
    CNNKIT,
    FLOWERS_20,
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
from predict_bench import fmt, predict_cmd, run  # noqa: E402

ENV = subprocess_env()
MODELS = REPO / "benchmarks" / "out" / "models"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CNNKIT, *args], env=ENV, capture_output=True, text=True)


def trained(arch: str, size: int, epochs: int) -> tuple[Path, dict]:
    """A checkpoint trained from scratch on flowers-20 (cached), and how its training went."""
    folder = MODELS / f"{arch}-{size}px-{epochs}ep"
    best = folder / "best.pt"
    record = folder / "bench.json"
    if not best.exists():
        began = time.perf_counter()
        done = cli("train", str(FLOWERS_20), "--arch", arch, "--weights", "none", "--image-size", str(size),
                   "--epochs", str(epochs), "--save-dir", str(folder), "--no-progress", "--seed", "0")
        if done.returncode:
            raise SystemExit(f"training {arch} failed ({done.returncode}): {done.stderr[-2000:]}")
        record.write_text(json.dumps({"train_seconds": round(time.perf_counter() - began)}))
    from cnnkit.models.checkpoint import load_checkpoint

    info = json.loads(record.read_text()) if record.exists() else {}
    outcome = load_checkpoint(best).summary
    return best, {**info, "best_val_acc": outcome.get("best_val_acc"), "best_epoch": outcome.get("best_epoch")}


def export_int8(ckpt: Path, output: Path, calibration: Path, extra: list[str]) -> dict:
    """``cnnkit export --int8``: the gate's figures, or why it refused (exit code and message)."""
    from cnnkit.models.exported import read_metadata

    done = cli("-q", "export", str(ckpt), "--int8", "--calibration-data", str(calibration), "-o", str(output), *extra)
    if done.returncode == 9:
        return {"kept": False, "refused": done.stderr.strip().splitlines()[-1].removeprefix("cnnkit: error: ")}
    if done.returncode:
        raise SystemExit(f"int8 export of {ckpt} failed ({done.returncode}): {done.stderr[-2000:]}")
    return {"kept": True, **read_metadata(output)["quantization"]}


def accuracy_part(arch: str, args, work: Path) -> dict:
    from cnnkit.inference.predictor import Predictor

    ckpt, training = trained(arch, args.train_size, args.epochs)
    int8 = work / f"{arch}-trained.int8.onnx"
    quantized = export_int8(ckpt, int8, FLOWERS_20, [])
    if not quantized["kept"]:  # measure it anyway, to say by how much it failed
        export_int8(ckpt, int8, FLOWERS_20, ["--ignore-gate"])
    test = sorted((FLOWERS_20 / "test").glob("*/*.jpg"))
    truth = [p.parent.name for p in test]
    top1 = {}
    for name, model in (("float", str(ckpt)), ("int8", str(int8))):
        top1[name] = [p.top[0].label for p in Predictor(model, "cpu").predict_paths([str(p) for p in test])]
    accuracy = {k: sum(a == b for a, b in zip(v, truth)) / len(truth) for k, v in top1.items()}
    agreement = sum(a == b for a, b in zip(top1["float"], top1["int8"])) / len(test)
    return {"training": training, "gate": quantized, "test_images": len(test), "test_accuracy": accuracy,
            "test_agreement": agreement}


def speed_part(arch: str, args, work: Path, folder: Path, calibration: Path) -> dict:
    ckpt = make_checkpoint(arch, work / f"{arch}.pt")
    print(f"[{arch}] limit", file=sys.stderr, flush=True)
    limit = measure_limit(ckpt, args.limit_batch_sizes, min_batches=args.limit_batches, min_seconds=args.limit_seconds)
    onnx, int8 = work / f"{arch}.onnx", work / f"{arch}.int8.onnx"
    done = cli("-q", "export", str(ckpt), "-o", str(onnx))
    if done.returncode:
        raise SystemExit(f"export of {ckpt} failed: {done.stderr[-2000:]}")
    gate = export_int8(ckpt, int8, calibration, ["--ignore-gate"])["gate"]
    models = {"torch checkpoint": ckpt, "float ONNX": onnx, "int8 ONNX": int8}
    for model in models.values():  # warm-up: page cache
        run(predict_cmd(folder, model, []))
    seconds: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(args.repeats):
        print(f"[{arch}] whole-process runs, round {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for name, model in models.items():
            seconds[name].append(run(predict_cmd(folder, model, [])))
    n = len(list(folder.glob("*/*.jpg")))
    rows = {name: {"img_s": summary([n / s for s in v]), "ratio": summary([n / s / limit.img_s for s in v])}
            for name, v in seconds.items()}
    return {"limit": limit.to_dict(), "limit_text": limit.describe(), "gate_speed": gate, "predict": rows, "images": n}


def markdown(results: dict) -> str:
    out = ["| arch | trained at | best val acc | gate (valid/) | test top-1 float → int8 | change | "
           "test agreement |", "| --- | --- | ---: | --- | --- | ---: | ---: |"]
    for arch, r in results["archs"].items():
        a = r.get("accuracy")
        if a is None:
            continue
        gate = a["gate"]
        verdict = ("kept: " + f"{gate['gate']['speedup']:.2f}× the faster float" if gate["kept"] else gate["refused"])
        acc = a["test_accuracy"]
        out.append(f"| {arch} | {results['train_size']} px, {results['epochs']} epochs | "
                   f"{a['training']['best_val_acc']:.1%} | {verdict} | {acc['float']:.1%} → {acc['int8']:.1%} | "
                   f"{100 * (acc['int8'] - acc['float']):+.1f} pt | {a['test_agreement']:.1%} |")
    out += ["", "| arch | float32 limit (224 px) | cnnkit predict, whole process | img/s | ratio to the limit | "
            "int8 gate: speed-up vs the faster float |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for arch, r in results["archs"].items():
        s = r.get("speed")
        if s is None:
            continue
        g = s["gate_speed"]
        for name, row in s["predict"].items():
            gate = (f"{g['speedup']:.2f}× ({g['int8_img_s']:.1f} vs {g['torch_img_s']:.1f} torch / "
                    f"{g['onnx_img_s']:.1f} ONNX img/s)" if name == "int8 ONNX" else "")
            out.append(f"| {arch} | {s['limit_text']} | {name} | {fmt(row['img_s'])} | {fmt(row['ratio'], 2)} | {gate} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenet_v3_large", "densenet121"])
    parser.add_argument("--accuracy-archs", nargs="+", default=None,
                        help="archs trained for the accuracy part [default: --archs]")
    parser.add_argument("--train-size", type=int, default=128, help="image size of the trained models")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--images", type=int, default=1000, help="photos scored by each whole-process run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--limit-batches", type=int, default=8)
    parser.add_argument("--limit-seconds", type=float, default=3.0)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "out" / "quantize_bench.json")
    args = parser.parse_args()

    started = time.time()
    results: dict = {"command": "python benchmarks/quantize_bench.py " + " ".join(sys.argv[1:]),
                     "machine_before": machine(), "train_size": args.train_size, "epochs": args.epochs, "archs": {}}
    print(json.dumps(results["machine_before"]), file=sys.stderr, flush=True)
    work = Path(tempfile.mkdtemp(prefix="cnnkit-quantize-bench-"))
    try:
        sources = real_images()
        folder = copy_images(sources[: args.images], work / "photos")
        calibration = work / "calibration"
        calibration.mkdir()
        for src in sources[-128:]:  # valid/'s last photos; the scored ones are the first
            shutil.copyfile(src, calibration / f"{src.parent.name}_{src.name}")
        for arch in args.archs:
            results["archs"][arch] = {"speed": speed_part(arch, args, work, folder, calibration)}
        for arch in args.accuracy_archs or args.archs:
            print(f"[{arch}] accuracy", file=sys.stderr, flush=True)
            results["archs"].setdefault(arch, {})["accuracy"] = accuracy_part(arch, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    finish(results, started, args.output, markdown(results))


if __name__ == "__main__":
    main()
