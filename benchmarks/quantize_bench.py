"""Quantization benchmark (issue 13): int8 ONNX and OpenVINO exports against the float32 model, on real photos.

Five artefacts of each model: the torch checkpoint, its float ONNX export (``cnnkit export``), its
int8 ONNX export (``--int8``, ONNX Runtime static QDQ), its float OpenVINO IR (``--format
openvino``) and its int8 IR (``--format openvino --int8``, NNCF). Two parts, for each
architecture, in one run on one machine:

**Accuracy** (models that learned something): a checkpoint given with ``--checkpoint ARCH=PATH``,
else ``cnnkit train ../shared/data/flowers-20 --weights none --recipe scratch`` at ``--train-size``
px under ``--time-budget BUDGET`` (or for ``--epochs``; cached under benchmarks/out/models/ so a
re-run measures again without training again); then each export, the int8 ones with
``--calibration-data flowers-20`` and the default gate (calibrated on train/, gated on valid/;
``--gate-flags`` adds export flags); on test/ (never seen by training, calibration or gate): the
top-1 accuracy of every artefact and its top-1 agreement with the float checkpoint. An int8 model
its gate refuses is recorded with the gate's message, and measured anyway (``--ignore-gate``) to
say by how much it failed.

**Speed** (at the architecture's own 224 px): the float32 torch limit
(``limit.py``: forward-only, best layout and batch size, one process, a thread per core), then
whole-process ``cnnkit predict`` of ``--images`` photos (start-up included, ``--repeats`` runs,
interleaved) with each artefact (the int8 ones calibrated on 128 photos the prediction does not
score, ``--ignore-gate``: the gate's own speed figures are reported beside), each as a ratio to
the limit; the int8 IR also with ``--workers 0`` (decoding in turn with scoring instead of in a
thread beside it). ``--accuracy-archs`` with no names runs the speed part alone. The weights are
the accuracy part's trained ones where this run has them, with the architecture's 224-px
preprocessing: the layers an int8 IR reverts to float (``--openvino-flags='--min-agreement 99.5'``)
depend on them, so random weights would time another model; elsewhere random and seeded (the
float runtimes' throughput does not depend on the weights' values).

**The best kept backend** of an architecture is its fastest artefact in the speed part among those
kept: the float ones always, an int8 one when its gate passed: the accuracy part's gate (the
trained model, accuracy and speed) for an architecture that has one, else the speed half of the
speed part's gate (random weights: its accuracy half says nothing). Its ratio to the limit is
checked against the issue's 2.0x target, and its test agreement and accuracy change against
>= 99 % and 1 point.

    python benchmarks/quantize_bench.py      # --archs resnet18 mobilenet_v3_large densenet121
"""

from __future__ import annotations

import argparse
import json
import shlex
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
# The artefacts, in the order they run: name -> (cnnkit export --format, --int8); None: the checkpoint itself.
ARTEFACTS: dict[str, tuple[str, bool] | None] = {
    "torch checkpoint": None,
    "float ONNX": ("onnx", False),
    "int8 ONNX": ("onnx", True),
    "float OpenVINO": ("openvino", False),
    "int8 OpenVINO": ("openvino", True),
}
SERIAL = "int8 OpenVINO, --workers 0"  # the int8 IR decoding in turn with scoring (speed part only)
TARGET_RATIO = 2.0  # whole-process predict with the best kept backend / the float32 limit
TARGET_AGREEMENT = 0.99  # test top-1 agreement with the float checkpoint
TARGET_CHANGE = 0.01  # test accuracy within 1 point of the float checkpoint's


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CNNKIT, *args], env=ENV, capture_output=True, text=True)


def trained(arch: str, args) -> tuple[Path, dict]:
    """The checkpoint of the accuracy part (given, or trained from scratch on flowers-20 with the
    scratch recipe and cached), and how its training went."""
    from cnnkit.models.checkpoint import load_checkpoint

    given = args.checkpoints.get(arch)
    if given is not None:
        best, info = given, {"source": str(given)}
    else:
        schedule = ["--epochs", str(args.epochs)] if args.epochs else ["--time-budget", args.budget]
        folder = MODELS / f"{arch}-{args.train_size}px-scratch-{f'{args.epochs}ep' if args.epochs else args.budget}"
        best, record = folder / "best.pt", folder / "bench.json"
        if not best.exists():
            print(f"[{arch}] training: {' '.join(schedule)}", file=sys.stderr, flush=True)
            began = time.perf_counter()
            done = cli("train", str(FLOWERS_20), "--arch", arch, "--weights", "none", "--recipe", "scratch",
                       "--image-size", str(args.train_size), *schedule, "--save-dir", str(folder), "--no-progress",
                       "--seed", "0")
            if done.returncode:
                raise SystemExit(f"training {arch} failed ({done.returncode}): {done.stderr[-2000:]}")
            record.write_text(json.dumps({"train_seconds": round(time.perf_counter() - began)}))
        info = {"source": "trained here: --recipe scratch " + " ".join(schedule),
                **(json.loads(record.read_text()) if record.exists() else {})}
    ckpt = load_checkpoint(best)
    return best, {**info, "image_size": ckpt.preprocess.image_size, "epochs": ckpt.summary.get("epochs"),
                  "best_val_acc": ckpt.summary.get("best_val_acc"), "best_epoch": ckpt.summary.get("best_epoch")}


def export(ckpt: Path, stem: Path, fmt: str, int8: bool, calibration: Path | None, flags: list[str]) -> tuple[Path, dict]:
    """``cnnkit export CKPT --format FMT [--int8 --calibration-data CALIBRATION FLAGS]`` to
    ``STEM`` + cnnkit's suffix: the file, and whether it was kept (an int8 model: with its
    quantization metadata, gate figures included; or why the gate refused it)."""
    from cnnkit.export import default_output
    from cnnkit.models.exported import read_metadata

    output = Path(default_output(f"{stem}.pt", fmt, int8))
    extra = ["--int8", "--calibration-data", str(calibration), *flags] if int8 else []
    done = cli("-q", "export", str(ckpt), "--format", fmt, "-o", str(output), *extra)
    if done.returncode == 9:  # the gate refused it
        return output, {"kept": False, "refused": done.stderr.strip().splitlines()[-1].removeprefix("cnnkit: error: ")}
    if done.returncode:
        raise SystemExit(f"{fmt}{' int8' * int8} export of {ckpt} failed ({done.returncode}): {done.stderr[-2000:]}")
    return output, {"kept": True, **(read_metadata(output)["quantization"] if int8 else {})}


def export_all(ckpt: Path, stem: Path, calibration: Path, args, gated: bool) -> dict[str, dict]:
    """Every artefact of ``ckpt`` (:data:`ARTEFACTS`): name -> {"path", "kept", and for int8 the
    gate's figures ("quantization") and, when refused, its message}; an int8 export gets
    ``args.gate_flags``, an int8 IR ``args.openvino_flags`` too. ``gated``: an int8 model
    faces the whole gate and, when refused, is exported again with ``--ignore-gate`` to be
    measured anyway; otherwise it is exported with ``--ignore-gate`` and kept when it passes the
    speed half of its gate (random weights: the accuracy half says nothing)."""
    out = {}
    for name, spec in ARTEFACTS.items():
        if spec is None:
            out[name] = {"path": ckpt, "kept": True}
            continue
        fmt, int8 = spec
        flags = [*args.gate_flags, *(args.openvino_flags if fmt == "openvino" else [])]
        path, verdict = export(ckpt, stem, fmt, int8, calibration, flags if gated else [*flags, "--ignore-gate"])
        if not verdict["kept"]:  # (gated only) measure it anyway, to say by how much it failed
            _, again = export(ckpt, stem, fmt, int8, calibration, [*flags, "--ignore-gate"])
            verdict = {**again, **verdict}
        elif int8 and not gated:
            gate = verdict["gate"]
            if gate["speedup"] < gate["min_speedup"]:
                verdict = {**verdict, "kept": False, "refused": f"the int8 model failed the speed half of its gate: "
                           f"{gate['speedup']:.2f}x the faster float runtime (--min-speedup {gate['min_speedup']:g})"}
        out[name] = {"path": path, **verdict}
    return out


def accuracy_part(arch: str, args, work: Path) -> dict:
    from cnnkit.inference.predictor import Predictor

    ckpt, training = trained(arch, args)
    artefacts = export_all(ckpt, work / f"{arch}-trained", FLOWERS_20, args, gated=True)
    test = [str(p) for p in sorted((FLOWERS_20 / "test").glob("*/*.jpg"))]
    truth = [Path(p).parent.name for p in test]
    top1 = {}
    for name, artefact in artefacts.items():
        print(f"[{arch}] test/ top-1 of the {name}", file=sys.stderr, flush=True)
        top1[name] = [p.top[0].label for p in Predictor(str(artefact["path"]), "cpu", tta="none").predict_paths(test)]
    reference = top1["torch checkpoint"]
    models = {name: {"kept": a["kept"], "refused": a.get("refused"), "gate": a.get("gate"),
                     "method": a.get("method"), "smooth_quant_moved": a.get("smooth_quant_moved"),
                     "test_accuracy": sum(p == t for p, t in zip(top1[name], truth)) / len(truth),
                     "test_agreement": sum(p == r for p, r in zip(top1[name], reference)) / len(reference)}
              for name, a in artefacts.items()}
    return {"training": training, "test_images": len(test), "models": models}


def speed_checkpoint(arch: str, args, work: Path) -> tuple[Path, str]:
    """The speed part's checkpoint and what its weights are (module docstring)."""
    import dataclasses

    from cnnkit.data.transforms import resolve_preprocess
    from cnnkit.models.checkpoint import load_checkpoint

    path = work / f"{arch}.pt"
    if arch not in args.accuracy_archs:
        return make_checkpoint(arch, path), "random, seeded"
    ckpt = load_checkpoint(str(trained(arch, args)[0]))
    dataclasses.replace(ckpt, preprocess=resolve_preprocess(arch)).save(path)
    return path, "the accuracy part's trained weights, at 224 px"


def speed_part(arch: str, args, work: Path, folder: Path, calibration: Path) -> dict:
    ckpt, weights = speed_checkpoint(arch, args, work)
    print(f"[{arch}] limit", file=sys.stderr, flush=True)
    limit = measure_limit(ckpt, args.limit_batch_sizes, min_batches=args.limit_batches, min_seconds=args.limit_seconds)
    print(f"[{arch}] exports", file=sys.stderr, flush=True)
    artefacts = export_all(ckpt, work / arch, calibration, args, gated=False)
    # Each artefact with cnnkit's defaults; the int8 IR also with --workers 0 (decoding in turn
    # with scoring, not in a thread beside it), to show what that overlap gives.
    artefacts[SERIAL] = artefacts["int8 OpenVINO"]
    runs = {name: predict_cmd(folder, a["path"], ["--workers", "0"] if name == SERIAL else [])
            for name, a in artefacts.items()}
    for cmd in runs.values():  # warm-up: page cache
        run(cmd)
    seconds: dict[str, list[float]] = {name: [] for name in artefacts}
    for repeat in range(args.repeats):
        print(f"[{arch}] whole-process runs, round {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
        for name, cmd in runs.items():  # interleaved: a slow minute of the machine hits every one alike
            seconds[name].append(run(cmd))
    n = len(list(folder.glob("*/*.jpg")))
    rows = {name: {"img_s": summary([n / s for s in v]), "ratio": summary([n / s / limit.img_s for s in v]),
                   "kept": artefacts[name]["kept"], "refused": artefacts[name].get("refused"),
                   "gate": artefacts[name].get("gate")}
            for name, v in seconds.items()}
    return {"limit": limit.to_dict(), "limit_text": limit.describe(), "predict": rows, "images": n, "weights": weights}


def best_kept(result: dict) -> dict | None:
    """The fastest kept artefact of an architecture's speed part (kept: by the accuracy part's
    gate where there is one, else by the speed part's), with the targets' verdicts."""
    speed, accuracy = result.get("speed"), result.get("accuracy")
    if speed is None:
        return None
    verdicts = accuracy["models"] if accuracy else speed["predict"]
    name = max((n for n in speed["predict"] if n != SERIAL and verdicts[n]["kept"]), key=lambda n: speed["predict"][n]["img_s"]["median"])
    row = speed["predict"][name]
    best = {"name": name, "gate_from": "accuracy part (trained model)" if accuracy else "speed part (speed half)",
            "img_s": row["img_s"], "ratio": row["ratio"], "ratio_met": row["ratio"]["median"] >= TARGET_RATIO}
    if accuracy:
        model, reference = accuracy["models"][name], accuracy["models"]["torch checkpoint"]
        change = model["test_accuracy"] - reference["test_accuracy"]
        best.update(test_agreement=model["test_agreement"], test_change=change,
                    accuracy_met=model["test_agreement"] >= TARGET_AGREEMENT and abs(change) <= TARGET_CHANGE + 1e-9)
    return best


def gate_text(gate: dict) -> str:
    """The gate's speed figures: int8 against each float runtime, at the gate's batch size."""
    openvino = f" / {gate['openvino_img_s']:.1f} OpenVINO" if gate.get("openvino_img_s") is not None else ""
    return (f"{gate['speedup']:.2f}× ({gate['int8_img_s']:.1f} vs {gate['torch_img_s']:.1f} torch / "
            f"{gate['onnx_img_s']:.1f} ONNX{openvino} img/s)")


def verdict_text(model: dict) -> str:
    if model["gate"] is None:
        return "float: kept"
    return f"kept: {gate_text(model['gate'])}" if model["kept"] else f"**refused**: {model['refused']}"


def markdown(results: dict) -> str:
    out = ["| arch | trained | best val acc | model | gate (valid/) | test top-1 | change vs float | "
           "test agreement with float |", "| --- | --- | ---: | --- | --- | ---: | ---: | ---: |"]
    for arch, r in results["archs"].items():
        a = r.get("accuracy")
        if a is None:
            continue
        t = a["training"]
        trained_text = f"{t['image_size']} px, {t['epochs']} epochs ({t['source']})"
        reference = a["models"]["torch checkpoint"]["test_accuracy"]
        for name, m in a["models"].items():
            out.append(f"| {arch} | {trained_text} | {t['best_val_acc']:.1%} | {name} | {verdict_text(m)} | "
                       f"{m['test_accuracy']:.1%} | {100 * (m['test_accuracy'] - reference):+.1f} pt | "
                       f"{m['test_agreement']:.1%} |")
    out += ["", "| arch | weights | float32 limit (224 px) | cnnkit predict, whole process | img/s | ratio to the limit | "
            "int8 gate: speed-up vs the faster float |", "| --- | --- | --- | --- | ---: | ---: | --- |"]
    for arch, r in results["archs"].items():
        s = r.get("speed")
        if s is None:
            continue
        for name, row in s["predict"].items():
            gate = "" if row["gate"] is None else gate_text(row["gate"]) + ("" if row["kept"] else ", refused")
            out.append(f"| {arch} | {s.get('weights', 'random, seeded')} | {s['limit_text']} | {name} | "
                       f"{fmt(row['img_s'])} | {fmt(row['ratio'], 2)} | {gate} |")
    out += ["", f"| arch | best kept backend | gates from | img/s | ratio to the limit (target ≥ {TARGET_RATIO:g}×) | "
            f"test agreement (≥ {TARGET_AGREEMENT:.0%}), change (within {100 * TARGET_CHANGE:g} pt) |",
            "| --- | --- | --- | ---: | --- | --- |"]
    met = []
    for arch, r in results["archs"].items():
        best = r.get("best_kept")
        if best is None:
            continue
        met += [best["ratio_met"]]
        accuracy = "-" if "test_agreement" not in best else (
            f"{best['test_agreement']:.1%}, {100 * best['test_change']:+.1f} pt "
            f"({'met' if best['accuracy_met'] else 'missed'})")
        out.append(f"| {arch} | {best['name']} | {best['gate_from']} | {fmt(best['img_s'])} | "
                   f"**{best['ratio']['median']:.2f}×** ({'met' if best['ratio_met'] else 'missed'}) | {accuracy} |")
    if met:
        out += ["", f"Whole-process predict ≥ {TARGET_RATIO:g}× the limit with the best kept backend: "
                f"{sum(met)} of {len(met)} archs (target: at least two of three)."]
    return "\n".join(out)


def checkpoint_option(value: str) -> tuple[str, Path]:
    arch, sep, path = value.partition("=")
    if not sep or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{value!r}: expected ARCH=PATH of an existing checkpoint")
    return arch, Path(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="*", default=["resnet18", "mobilenet_v3_large", "densenet121"],
                        help="archs of the speed part (none: the accuracy part only)")
    parser.add_argument("--accuracy-archs", nargs="*", default=None,
                        help="archs of the accuracy part [default: --archs; with --checkpoint, those archs too; "
                        "none: the speed part only]")
    parser.add_argument("--checkpoint", type=checkpoint_option, action="append", default=[], metavar="ARCH=PATH",
                        help="a checkpoint trained on flowers-20, used by the accuracy part instead of training "
                        "(repeatable)")
    parser.add_argument("--train-size", type=int, default=128, help="image size of the trained models")
    parser.add_argument("--budget", default="15m", help="cnnkit train --time-budget of the trained models [default: 15m]")
    parser.add_argument("--epochs", type=int, default=None, help="train for this many epochs instead of --budget")
    parser.add_argument("--gate-flags", type=shlex.split, default=[], metavar="FLAGS",
                        help="more cnnkit export flags for every int8 export, as one string: "
                        "--gate-flags='--min-speedup 1.5'")
    parser.add_argument("--openvino-flags", type=shlex.split, default=[], metavar="FLAGS",
                        help="more cnnkit export flags for the int8 IRs only: --openvino-flags='--min-agreement 99.5'")
    parser.add_argument("--images", type=int, default=1000, help="photos scored by each whole-process run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit-batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--limit-batches", type=int, default=8)
    parser.add_argument("--limit-seconds", type=float, default=3.0)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "out" / "quantize_bench.json")
    args = parser.parse_args()
    args.checkpoints = dict(args.checkpoint)
    args.accuracy_archs = accuracy_archs = list(dict.fromkeys(
        [*(args.archs if args.accuracy_archs is None else args.accuracy_archs), *args.checkpoints]))

    started = time.time()
    results: dict = {"command": "python benchmarks/quantize_bench.py " + shlex.join(sys.argv[1:]),
                     "machine_before": machine(), "archs": {}}
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
        for arch in accuracy_archs:
            print(f"[{arch}] accuracy", file=sys.stderr, flush=True)
            results["archs"].setdefault(arch, {})["accuracy"] = accuracy_part(arch, args, work)
        for result in results["archs"].values():
            result["best_kept"] = best_kept(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    finish(results, started, args.output, markdown(results))


if __name__ == "__main__":
    main()
