"""The ``cnnkit`` command: parse flags, build a config, call one library function, print.

Nothing heavy is imported at module level, so ``cnnkit --help`` answers at once. Every
:class:`~cnnkit.errors.CnnkitError` becomes one line on stderr and its exit code (see
``cnnkit.errors``); a traceback is shown only with ``CNNKIT_DEBUG=1``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from . import __version__
from .config import (
    AUGMENT_POLICIES,
    CALIBRATION_METHODS,
    DEFAULT_SMOOTH_QUANT,
    EXPLAIN_METHODS,
    EXPORT_FORMATS,
    PREDICT_FORMATS,
    RECIPES,
    TTA_MODES,
    EvaluateConfig,
    PredictConfig,
    TrainConfig,
)
from .errors import CnnkitError, ConfigError, LeakError, PartialFailure, WorkerError, worker_death
from .logs import quiet_dead_worker_handshakes, setup_logging

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".onnx", ".xml")
EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 internal error, 2 bad usage, 3 data problem, 4 checkpoint problem, "
    "5 weights unavailable, 6 output problem, 7 some inputs failed, 8 a worker process died, 9 quantized model failed its gate, "
    "10 data leak or label conflict found (inspect), 130 interrupted, "
    "141 output pipe closed."
)


class _Group(click.Group):
    """Turns library errors into one line and their exit code, in one place."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except CnnkitError as exc:
            self._fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            self._fail("interrupted", 130)
        except BrokenPipeError:  # the reader went away (| head): end quietly, as Unix tools do
            sys.stderr.close()
            os._exit(141)
        except Exception as exc:  # a bug: still one line, with the way to the traceback
            died = worker_death(exc)  # not a bug: commands that can resume say how in their own message
            if died:
                self._fail(f"{died}; run it again, or with --workers 0 to decode in the main process",
                           WorkerError.exit_code)
            if os.environ.get("CNNKIT_DEBUG"):
                raise
            self._fail(f"internal error: {type(exc).__name__}: {exc} (set CNNKIT_DEBUG=1 for the traceback)", 1)

    @staticmethod
    def _fail(message: str, code: int) -> None:
        if os.environ.get("CNNKIT_DEBUG") and sys.exc_info()[0] is not None:
            import traceback

            traceback.print_exc()
        click.echo(f"cnnkit: error: {message}", err=True)
        sys.exit(code)


def _progress(value: bool | None) -> bool:
    return sys.stderr.isatty() if value is None else value


progress_option = click.option(
    "--progress/--no-progress", default=None, help="Progress bars on stderr [default: when stderr is a terminal]."
)
device_option = click.option(
    "--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."
)
gpu_option = click.option("--gpu", is_flag=True, help="Same as --device cuda.")
workers_option = click.option(
    "--workers", type=int, default=None, help="DataLoader worker processes [default: one per core, up to 4]."
)
names_option = click.option(
    "--category-names", type=click.Path(dir_okay=False), default=None,
    help="JSON object mapping class label (folder name) to a human-readable name.",
)


tta_option = click.option("--tta", type=click.Choice(TTA_MODES), default=None, help="Test-time augmentation: average the image with its mirror image (flip), or with every flip and quarter turn (flip+rot90: images with no natural orientation) [default: what the checkpoint was calibrated with by cnnkit evaluate --tta, else none].")


def _augment(options: dict[str, Any]) -> dict[str, Any]:
    """The training options with --no-augment (the flag before the policies) as --augment none."""
    if options.pop("no_augment", False):
        if options.get("augment") not in (None, "none"):
            raise ConfigError(f"--no-augment and --augment {options['augment']} contradict each other: drop one")
        options["augment"] = "none"
    return options


def _device(device: str, gpu: bool) -> str:
    if gpu and device not in ("auto", "cuda") and not device.startswith("cuda"):
        raise ConfigError(f"--gpu contradicts --device {device}")
    return "cuda" if gpu and device == "auto" else device


@click.group(cls=_Group, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cnnkit")
@click.option("-v", "--verbose", count=True, help="More log output (debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
def main(verbose: int, quiet: bool) -> None:
    """Train, evaluate and use image classifiers built on pretrained torchvision CNNs."""
    setup_logging(-1 if quiet else verbose)
    quiet_dead_worker_handshakes()
    _pass_undecodable_names()


def _pass_undecodable_names() -> None:
    """File names that are not UTF-8 (Python holds their bytes as surrogate escapes) are read
    from stdin and printed back as the same bytes, as Unix tools do, in every locale; a strict
    UTF-8 locale would otherwise crash on the first such name."""
    for stream in (sys.stdin, sys.stdout):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="surrogateescape")


def _options(*decorators: Any) -> Any:
    """Apply several click option decorators, in order, as one."""

    def apply(command: Any) -> Any:
        for decorator in reversed(decorators):
            command = decorator(command)
        return command

    return apply


# Scoring (predict, evaluate) has its own defaults, measured on a 2-core CPU (benchmarks/RESULTS.md).
_scoring_options = _options(
    click.option("--batch-size", type=int, default=None, help="Images per forward pass [default: 8 on a CPU, 32 on a GPU]."),
    click.option(
        "--workers", type=int, default=None,
        help="Decoding worker processes [default: none on a CPU with 2 cores or fewer (an export's images are then "
        "decoded in a thread beside scoring; 0 given: in turn), else one per core, up to 4].",
    ),
)
# The model, data and optimisation options of a training run; lr-find takes them too.
_model_options = _options(
    click.argument("data_dir", type=click.Path()),
    click.option("--arch", default="densenet121", show_default=True, help="torchvision architecture (VGG, DenseNet, ResNet/ResNeXt, MobileNet, EfficientNet, ConvNeXt, RegNet...)."),
    click.option("--weights", default="DEFAULT", show_default=True, help="Backbone weights: DEFAULT (torchvision's pretrained, from the torch hub cache or downloaded), a weights name such as IMAGENET1K_V2, a path to a local .pth state_dict or to a cnnkit checkpoint (its backbone; the classifier is replaced), or none."),
    click.option("--hidden-units", type=int, default=512, show_default=True, help="Hidden units of the new head; 0 for a single Linear layer."),
    click.option("--dropout", type=float, default=0.2, show_default=True, help="Dropout of the new head."),
    click.option("--batch-size", type=int, default=32, show_default=True),
    workers_option,
    click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same machine: same metrics."),
    device_option,
    gpu_option,
    click.option("--freeze/--no-freeze", default=None, help="Freeze the backbone, train only the head [default: freeze iff the weights are pretrained]."),
    click.option("--val-split", type=float, default=0.2, show_default=True, help="Share of each class held out for validation when DATA_DIR has no valid/ folder."),
    click.option("--image-size", type=int, default=None, help="Input crop size [default: the architecture's pretrained size, usually 224]."),
    click.option("--resize-size", type=int, default=None, help="Eval resize before the centre crop [default: the architecture's, usually 256]."),
    click.option("--train-size-ratio", type=float, default=None, metavar="R", help="Train on random crops of R times --image-size's side, in (0, 1]: faster epochs, and evaluation at --image-size then sees objects at about the size the random crops' zoom made them (FixRes) [default: the recipe's]."),
    click.option("--min-scale", type=float, default=None, metavar="AREA", help="The smallest share of an image's area that a random training crop takes, in (0, 1] [default: the recipe's, 0.08 as torchvision's]."),
    click.option("--augment", type=click.Choice(AUGMENT_POLICIES), is_flag=False, flag_value="light", default=None, help="Augmentation of the training images: light = random crops and horizontal flips; trivial / rand = light + TrivialAugmentWide / RandAugment; none. --augment alone: light [default: the recipe's; light while the backbone trains and none while it is frozen, so that its features can be cached]."),
    click.option("--no-augment", is_flag=True, hidden=True),  # (--augment none, as before the policies)
    click.option("--recipe", type=click.Choice(list(RECIPES)), default=None, help="Training recipe: the augmentation and regularisation below, measured (benchmarks/RESULTS.md); their flags override single fields. plain: light augmentation only (before issue 12); scratch: the best measured from random weights (light augmentation on gentler crops, --min-scale 0.25, trained at --train-size-ratio 0.75); transfer: the best measured from pretrained weights (+ label smoothing) [default: scratch with --weights none, else transfer]."),
    click.option("--random-erase", type=float, default=None, metavar="P", help="Erase a random rectangle of a training image with probability P [default: the recipe's]."),
    click.option("--vflip", is_flag=True, help="Vertical flips too: for images with no natural orientation (cells, microscopy, satellite, scans)."),
    click.option("--rot90", is_flag=True, help="Random rotations by multiples of 90 degrees too (the same)."),
    click.option("--mixup", type=float, default=None, metavar="ALPHA", help="MixUp training images in pairs (Beta(ALPHA, ALPHA) weights); 0: off [default: the recipe's]."),
    click.option("--cutmix", type=float, default=None, metavar="ALPHA", help="CutMix training images in pairs; with --mixup too, each batch gets one of the two; 0: off [default: the recipe's]."),
    click.option("--ema", type=float, default=None, metavar="DECAY", help="Validate and save (best.pt) an exponential moving average of the weights, such as 0.999; 0: off [default: the recipe's]."),
    click.option("--label-smoothing", type=float, default=None, metavar="EPS", help="Spread EPS of each training target evenly over the classes (the reported loss stays the plain NLL) [default: the recipe's]."),
    click.option("--cache-features/--no-cache-features", default=None, help="With a frozen backbone, compute each image's backbone features once (kept in SAVE_DIR/feature_cache) and train the head on them: later epochs take a fraction of the first. Augmentation cannot apply to cached features, so --augment turns this off [default: on whenever valid]."),
    click.option("--weight-decay", type=float, default=0.05, show_default=True, help="AdamW weight decay (not applied to biases and normalisation weights)."),
    click.option("--class-weights", type=click.Choice(["none", "balanced"]), default="none", show_default=True, help="balanced: weight each class's loss by its inverse frequency."),
    click.option("--sampler", type=click.Choice(["shuffle", "balanced"]), default="shuffle", show_default=True, help="balanced: draw training images so that every class comes up equally often."),
    click.option("--clip-grad", type=float, default=None, metavar="MAX_NORM", help="Clip the gradients' global L2 norm to MAX_NORM [default: no clipping]."),
    click.option("--amp/--no-amp", default=None, help="Mixed precision: float16 with gradient scaling on CUDA, bfloat16 on the CPU [default: on with CUDA only]."),
)


@main.command(epilog=EXIT_CODES_HELP)
@_model_options
@click.option("--learning-rate", "--lr", "learning_rate", type=float, default=1e-3, show_default=True, help="Peak AdamW learning rate (cnnkit lr-find suggests one).")
@click.option("--epochs", type=int, default=None, help="Epochs of training (the head's, when the backbone is frozen) [default: 5; with --resume, the run's own].")
@click.option("--time-budget", default=None, metavar="DURATION", help="Plan the epochs to end inside DURATION (90s, 25m, 1h30m) from the first epochs' measured speed: the warm-up and cosine schedule complete on time (instead of --epochs).")
@click.option("--scheduler", type=click.Choice(["none", "cosine", "step"]), default="cosine", show_default=True, help="Learning-rate schedule of each phase, per step: cosine decay or /10 at each third, after a linear warm-up; none: constant.")
@click.option("--warmup", type=float, default=None, metavar="EPOCHS", help="Linear warm-up at the start of each phase [default: a tenth of the phase, at most 1 epoch].")
@click.option("--early-stop", type=int, default=None, metavar="PATIENCE", help="End a phase after PATIENCE epochs without a lower validation loss [default: off].")
@click.option("--fine-tune", type=int, default=0, show_default=True, metavar="N", help="After the head has trained on the frozen backbone, unfreeze it and train the whole network N more epochs.")
@click.option("--fine-tune-lr", type=float, default=None, help="Peak learning rate of the fine-tuning epochs [default: a tenth of --learning-rate].")
@click.option("--save-dir", default="checkpoints", show_default=True, type=click.Path(file_okay=False), help="Where best.pt, last.pt, metrics.jsonl and curves.png go.")
@names_option
@click.option("--mlflow", is_flag=True, help="Log params, per-epoch metrics and best.pt to MLflow (needs the mlflow extra; MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME choose where).")
@click.option("--nproc", type=int, default=1, show_default=True, help="Train data-parallel in N processes on this machine (starts torchrun; one per GPU). For several machines run torchrun -m cnnkit train yourself.")
@click.option("--resume", type=click.Path(dir_okay=False), default=None, help="Continue the run saved in this last.pt (a larger --epochs extends a finished run).")
@click.option("--force", is_flag=True, help="Overwrite best.pt, last.pt and metrics.jsonl already in --save-dir.")
@progress_option
def train(gpu: bool, progress: bool | None, device: str, **options: Any) -> None:
    """Train a classifier on DATA_DIR by transfer learning.

    DATA_DIR holds train/ and valid/ (or val/) ImageFolders (test/ is ignored), or is itself a
    folder of class sub-folders, from which --val-split is held out for validation.

    \b
    Examples:
      cnnkit train data/flowers-mini --arch resnet18 --epochs 10 --category-names cat_to_name.json
      cnnkit train photos/ --arch resnet50 --epochs 5 --fine-tune 5 --early-stop 3
      torchrun --nproc-per-node 4 -m cnnkit train photos/ --arch resnet50 --epochs 20
    """
    from .training import train as run_training

    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 reports progress
        setup_logging(-1)
    cfg = TrainConfig(device=_device(device, gpu), progress=_progress(progress), **_augment(options))
    result = run_training(cfg)
    if int(os.environ.get("RANK", "0")) > 0:
        return
    notes = []
    if result.stopped_early is not None:
        notes.append(f"stopped early after epoch {result.stopped_early}")
    if result.curves:
        notes.append(f"curves {result.curves}")
    click.echo(
        f"best validation accuracy {result.best_val_acc:.1%} (epoch {result.best_epoch}); "
        f"checkpoint {result.best_checkpoint}" + "".join(f"; {n}" for n in notes)
    )


@main.command("lr-find", epilog=EXIT_CODES_HELP)
@_model_options
@click.option("--start-lr", type=float, default=1e-7, show_default=True, help="Learning rate of the first step.")
@click.option("--end-lr", type=float, default=10.0, show_default=True, help="Learning rate of the last step (the test stops earlier when the loss diverges).")
@click.option("--steps", type=int, default=100, show_default=True, help="Training steps (batches) over the range; a few hundred give a smoother curve.")
@click.option("--save-dir", default="checkpoints", show_default=True, type=click.Path(file_okay=False), help="Where lr_find.png (and a frozen backbone's feature cache, which cnnkit train reuses) go.")
@click.option("--plot/--no-plot", default=True, show_default=True, help="Write SAVE_DIR/lr_find.png.")
@click.option("--force", is_flag=True, help="Overwrite an existing lr_find.png.")
@progress_option
def lr_find(gpu: bool, progress: bool | None, device: str, start_lr: float, end_lr: float, steps: int,
            plot: bool, force: bool, **options: Any) -> None:
    """Learning-rate range test: train from the initial weights while the learning rate grows
    exponentially, and suggest the one where the loss falls fastest.

    Takes the model and data options of cnnkit train; prints the smoothed loss over the range
    and the suggestion, and plots it.

    \b
    Example:
      cnnkit lr-find data/flowers-mini --arch resnet18 --weights none --image-size 64
    """
    from .config import LRFindConfig
    from .training.lr_find import format_result, lr_find as run_lr_find

    train_cfg = TrainConfig(device=_device(device, gpu), progress=_progress(progress), **_augment(options))
    cfg = LRFindConfig(train_cfg, start_lr=start_lr, end_lr=end_lr, steps=steps, plot=plot, force=force)
    click.echo(format_result(run_lr_find(cfg)))


def _split_seed_order(inputs: tuple[str, ...], checkpoint: str | None) -> tuple[tuple[str, ...], str]:
    """Accept the seed project's ``predict IMAGE CHECKPOINT`` as well as ``--checkpoint``."""
    if checkpoint:
        return inputs, checkpoint
    if len(inputs) == 2 and os.path.isfile(inputs[1]):
        with open(inputs[1], "rb") as handle:
            is_zip = handle.read(4) == b"PK\x03\x04"  # torch.save's container
        if is_zip or inputs[1].lower().endswith(CHECKPOINT_SUFFIXES):
            return inputs[:1], inputs[1]
    raise click.UsageError("give the model with --checkpoint CKPT (or: cnnkit predict IMAGE CHECKPOINT)")


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("inputs", nargs=-1, required=True)
@click.option("-c", "--checkpoint", type=click.Path(), default=None, help="A checkpoint written by cnnkit train, or a model exported with cnnkit export (.onnx, .xml).")
@click.option("-k", "--top-k", type=int, default=1, show_default=True, help="Classes to show per image (capped at the number of classes).")
@names_option
@click.option("-f", "--format", type=click.Choice(PREDICT_FORMATS), default=None, help="table for a terminal; json, jsonl and csv print clean data on stdout (logs go to stderr) [default: from --output's extension, else table].")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Write CSV/JSONL/JSON to this file as results arrive, instead of stdout.")
@click.option("--resume", is_flag=True, help="Skip inputs already in --output and append the rest (after an interruption).")
@click.option("--force", is_flag=True, help="Replace an existing --output.")
@click.option("--shard", default=None, metavar="K/N", help="Score only slice K (0-based) of N, by a stable hash of each path: for array jobs.")
@tta_option
@click.option("--abstain", is_flag=True, help="Answer 'unknown' below the abstain threshold stored by cnnkit evaluate --target-coverage.")
@_scoring_options
@device_option
@gpu_option
@progress_option
def predict(
    inputs: tuple[str, ...], checkpoint: str | None, gpu: bool, device: str, progress: bool | None, **options: Any
) -> None:
    """Top-K classes with names for images, folders (recursed) or - (paths on stdin).

    \b
    Examples:
      cnnkit predict flower.jpg --checkpoint checkpoints/best.pt --top-k 3
      cnnkit predict photos/ -c best.pt --format csv > scores.csv
      find photos -name '*.jpg' | cnnkit predict - -c best.pt --format jsonl
      cnnkit predict photos/ -c best.pt -o scores.csv --shard $SLURM_ARRAY_TASK_ID/8

    A file that cannot be scored gets an error row and the others are still scored; the exit
    code is then 7.
    """
    from .inference.predict import predict_to_output

    inputs, checkpoint = _split_seed_order(inputs, checkpoint)
    cfg = PredictConfig(
        inputs=inputs, checkpoint=checkpoint, device=_device(device, gpu), progress=_progress(progress), **options
    )
    summary = predict_to_output(cfg, sys.stdout)
    if summary.failed:
        raise PartialFailure(f"{summary.failed} of {summary.failed + summary.scored} inputs could not be scored")


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info(checkpoint: str, as_json: bool) -> None:
    """Show a checkpoint's or an exported model's metadata: arch, classes, preprocessing,
    training summary, and for an int8 model its quantization and gate figures."""
    from .models.checkpoint import format_description
    from .models.exported import describe_model

    meta = describe_model(checkpoint)
    if as_json:
        click.echo(json.dumps(meta, indent=2, ensure_ascii=False))
        return
    click.echo(format_description(meta))


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("checkpoint", type=click.Path())  # a folder: load_checkpoint says so
@click.argument("data_dir", type=click.Path())
@click.option("--split", default=None, help="Sub-folder of DATA_DIR to evaluate [default: test/ when present, else DATA_DIR].")
@click.option("-k", "--top-k", type=int, default=5, show_default=True, help="k of the top-k accuracy.")
@names_option
@click.option("--ignore-unknown", is_flag=True, help="Skip class folders the checkpoint does not know, and allow missing ones.")
@click.option("--calibrate", is_flag=True, help="Fit a softmax temperature on these (validation) images and store it, so predict reports calibrated probabilities.")
@click.option("--target-coverage", type=float, default=None, help="Pick and store the threshold that keeps this share of images (predict --abstain uses it): on the combined confidence + feature-distance score when the checkpoint has open-set statistics, else on confidence.")
@click.option("--unknown", type=click.Path(), default=None, help="A folder of images of classes the model never saw: report how well confidence, and the combined score, tell them from DATA_DIR's (AUROC, FPR at 95% TPR).")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None, help="Folder for report.json, confusion_matrix.csv, predictions.csv and PNG pictures.")
@tta_option
@click.option("--worst", type=int, default=12, show_default=True, help="How many of the most confidently wrong images to list and show.")
@click.option("--force", is_flag=True, help="Overwrite an --output report; store calibration in CHECKPOINT itself instead of NAME.calibrated.pt.")
@_scoring_options
@device_option
@gpu_option
@progress_option
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of tables.")
def evaluate(gpu: bool, device: str, progress: bool | None, as_json: bool, **options: Any) -> None:
    """Measure CHECKPOINT on the labelled ImageFolder DATA_DIR.

    Reports accuracy, top-k accuracy, per-class precision/recall/F1, macro and weighted
    averages, the confusion matrix, calibration (ECE, NLL), the most confused classes and the
    most confidently wrong images.

    \b
    Examples:
      cnnkit evaluate checkpoints/best.pt data/flowers-mini --output report/
      cnnkit evaluate checkpoints/best.pt data/flowers-mini --split valid --calibrate --target-coverage 0.9
      cnnkit evaluate checkpoints/best.pt data/flowers-mini --unknown data/other-things
    """
    from .evaluate import evaluate as run_evaluation, format_report

    cfg = EvaluateConfig(device=_device(device, gpu), progress=_progress(progress), **options)
    result = run_evaluation(cfg)
    click.echo(json.dumps(result.report, indent=2, ensure_ascii=False) if as_json else format_report(result.report))
    if result.files:
        click.echo(f"wrote {', '.join(result.files)}", err=True)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("inputs", metavar="IMAGE...", nargs=-1, required=True)
@click.option("-c", "--checkpoint", type=click.Path(), required=True, help="A checkpoint written by cnnkit train (not an ONNX export: Grad-CAM needs the torch model).")
@click.option("-o", "--output", type=click.Path(file_okay=False), required=True, help="Folder for the PNG overlays: IMAGE-STEM__RANK_LABEL.png, one per image and class.")
@click.option("-k", "--top-k", type=int, default=1, show_default=True, help="Explain the K most probable classes of each image.")
@click.option("--target", default=None, metavar="LABEL", help="Explain this class (a label or its name) instead, whatever its rank.")
@click.option("--method", type=click.Choice(EXPLAIN_METHODS), default="gradcam", show_default=True, help="gradcam (Selvaraju et al.) or gradcam++ (Chattopadhay et al.: better with several instances of the class).")
@names_option
@click.option("--force", is_flag=True, help="Overwrite pictures of the same images already in --output.")
@device_option
@gpu_option
def explain(gpu: bool, device: str, **options: Any) -> None:
    """Grad-CAM heat maps: where in each IMAGE (a file, a folder, or - for paths on stdin) the
    model found its evidence for a class.

    The map is drawn over the image as the model saw it (resized and centre-cropped by the
    checkpoint's preprocessing), with the class and its probability under it; the target layer
    is the last convolutional block of the architecture. Needs the 'explain' extra (captum).
    An image that cannot be read is listed with its reason and the others are explained; the
    exit code is then 7.

    \b
    Examples:
      cnnkit explain flower.jpg -c checkpoints/best.pt -o heatmaps/ --top-k 3
      cnnkit explain photos/ -c best.pt -o heatmaps/ --target rose --method gradcam++
    """
    from .config import ExplainConfig

    cfg = ExplainConfig(device=_device(device, gpu), **options)  # before the heavy imports
    from .explain import explain as run_explain, format_table

    result = run_explain(cfg)
    click.echo(format_table(result))
    if result.failed:
        raise PartialFailure(f"{result.failed} of {result.images} images could not be explained")


@main.command("inspect", epilog=EXIT_CODES_HELP)
@click.argument("data_dir", type=click.Path())
@click.option("--phash-distance", type=int, default=6, show_default=True, help="Near-duplicates: images whose 64-bit perceptual hashes differ in at most this many bits (0: identical hashes only).")
@click.option("-o", "--output", type=click.Path(file_okay=False), default=None, help="Folder for inspect.json (the whole report), pairs.csv (the duplicate pairs), inspect.html, and label_issues.csv and .png.")
@click.option("--force", is_flag=True, help="Overwrite those files in --output.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the summary.")
@click.option("--label-issues", is_flag=True, help="Also rank the images whose label looks wrong (needs the 'labels' extra and a backbone: --checkpoint, or --arch and --weights).")
@click.option("--checkpoint", type=click.Path(), default=None, help="A backbone (with its preprocessing): its features also find similar pictures (a cropped copy, another shot of the same scene), and --label-issues uses them.")
@click.option("--arch", default=None, help="A torchvision backbone instead of --checkpoint (with --weights).")
@click.option("--weights", default=None, help="--arch's weights, as in cnnkit train: DEFAULT, a weights name, a .pth file or cnnkit checkpoint, or none.")
@click.option("--image-size", type=int, default=None, help="With --arch: the input crop [default: the architecture's, usually 224].")
@click.option("--similarity", type=float, default=None, help="With a backbone: pairs whose whitened features have at least this cosine are similar [default: 0.9].")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="With a backbone: keep its features here, and reuse them while the images and weights are the same.")
@click.option("--folds", type=int, default=5, show_default=True, help="Out-of-fold heads (stratified; fewer when a class has fewer images).")
@click.option("--seed", type=int, default=0, show_default=True, help="The folds' shuffle.")
@names_option
@_scoring_options
@device_option
@gpu_option
@progress_option
def inspect_command(as_json: bool, gpu: bool, device: str, progress: bool | None, **options: Any) -> None:
    """What is in DATA_DIR (train/, valid/ or val/, test/ folders of class folders, or one folder
    of class folders): images per split and class, imbalance, sizes and colour modes, unreadable,
    tiny and elongated images, and duplicates.

    Duplicates are the same file content (SHA-256) or a near-identical picture (perceptual hash:
    a re-encoded or resized copy), within a split and across splits. The same picture in two
    splits is a leak, under two labels a label conflict: either makes the exit code 10, so that
    a pipeline can stop on it. Needs the 'inspect' extra (imagehash). With a backbone (--checkpoint,
    or --arch and --weights), a pair whose whitened features are close (--similarity) is a
    duplicate too: a cropped copy or another shot of the same scene, which hashes miss.

    With --label-issues, the images whose folder label looks wrong, most suspicious first, with the
    label suggested: cleanlab's confident learning on out-of-fold probabilities of k-fold logistic
    regressions on a frozen backbone's features (one forward pass per image). Suspects do not
    change the exit code.

    \b
    Examples:
      cnnkit inspect data/flowers-mini
      cnnkit inspect photos/ --output inspect-report/ --phash-distance 4
      cnnkit inspect photos/ --checkpoint checkpoints/best.pt --cache-dir feature-cache/
      cnnkit inspect data/flowers-mini --label-issues --checkpoint checkpoints/best.pt -o report/
    """
    from .config import InspectConfig

    cfg = InspectConfig(device=_device(device, gpu), progress=_progress(progress), **options)
    from .inspect_data import format_summary, inspect_data

    result = inspect_data(cfg)
    click.echo(json.dumps(result.report, indent=2, ensure_ascii=False) if as_json else format_summary(result.report))
    if result.files:
        click.echo(f"wrote {', '.join(result.files)}", err=True)
    if result.leaks or result.label_conflicts:
        raise LeakError(f"{result.leaks} duplicate pairs across splits (leaks) and {result.label_conflicts} "
                        "under two labels (label conflicts)")


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("checkpoint", type=click.Path(), required=False, envvar="CNNKIT_MODEL")  # or a folder holding one model
@click.option("--host", default="127.0.0.1", show_default=True, envvar="CNNKIT_HOST", show_envvar=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=int, default=8000, show_default=True, envvar=["SAGEMAKER_BIND_TO_PORT", "CNNKIT_PORT"], show_envvar=True)
@click.option("--workers", type=int, default=None, envvar="CNNKIT_WORKERS", show_envvar=True, help="gunicorn worker processes, each with its own copy of the model [default: one per core, up to 4].")
@click.option("--threads", type=int, default=64, show_default=True, help="Request threads per worker: requests a worker takes in at once (past --max-queue images it refuses them at once, so keep it above).")
@click.option("--max-batch", type=int, default=16, show_default=True, help="Most images in one forward pass.")
@click.option("--max-wait-ms", type=float, default=5.0, show_default=True, help="How long a batch waits for requests still being decoded (never when none are).")
@click.option("--max-bytes", type=int, default=10 * 1024 * 1024, show_default=True, help="Largest request body; more is refused with 413.")
@click.option("--max-images", type=int, default=32, show_default=True, help="Most images in one request (413 above).")
@click.option("--max-pixels", type=int, default=25_000_000, show_default=True, help="Largest image, decoded and after resizing (422 above).")
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds a request may take to arrive (then 408) and to wait for the model (then 503).")
@click.option("-k", "--top-k", type=int, default=1, show_default=True, help="Classes per image when a request does not say.")
@click.option("--torch-threads", type=int, default=None, help="Intra-op threads per worker [default: cores / workers, at least 1].")
@click.option("--drift-window", type=int, default=1000, show_default=True, help="Recent images the drift PSI is computed over, per worker.")
@click.option("--max-queue", type=int, default=None, help="Images a worker holds at most (decoding, queued, scoring); past it requests get 503 with Retry-After at once [default: what it clears in --queue-target-ms].")
@click.option("--queue-target-ms", type=float, default=500.0, show_default=True, help="Without --max-queue: the queue a worker may hold is what it scores in this time (measured at start-up).")
@click.option("--api-key-file", type=click.Path(dir_okay=False), default=None, help="Keys (one per line: KEY or NAME KEY) that /predict, /invocations, /metadata and /admin/* require as 'Authorization: Bearer KEY'.")
@click.option("--protect-metrics", is_flag=True, help="With --api-key-file: /metrics needs a key too.")
@click.option("--canary", type=click.Path(), default=None, help="A candidate model (same classes) that answers --canary-percent of the requests; POST /admin/promote or /admin/rollback ends the trial.")
@click.option("--canary-percent", type=float, default=10.0, show_default=True, help="The canary's share of requests, in percent.")
@click.option("--canary-header", default="X-Client-Id", show_default=True, help="Requests with this header are routed by its value: the same client always gets the same model.")
@click.option("--shadow", type=click.Path(), default=None, help="A candidate model (same classes) that scores copies of the primary's requests off the request path: agreement, confidence and class-mix PSI in /metrics.")
@click.option("--shadow-share", type=float, default=0.1, show_default=True, help="The most of a worker's time the shadow may use, and only while the worker holds no request (under load the shadow drops copies).")
@tta_option
@click.option("--shadow-queue", type=int, default=32, show_default=True, help="Copies waiting for the shadow, at most; more are dropped (cnnkit_shadow_images_total{result=\"dropped\"}).")
@names_option
@device_option
def serve(**options: Any) -> None:
    """Serve CHECKPOINT (or an exported .onnx) over HTTP with gunicorn, until Ctrl-C.

    POST /predict takes a multipart field "image" (one or more files) or JSON {"image":
    "<base64>"} / {"images": [...]}, with top_k in the query or body; GET / is a page to try it
    in a browser; GET /health, /ready, /metadata and /metrics (Prometheus) watch it. SageMaker's
    contract is answered too: GET /ping, POST /invocations (also a raw image body). CHECKPOINT
    may be a folder holding one model (SageMaker's /opt/ml/model), or come from $CNNKIT_MODEL.
    Needs the 'serve' extra.

    A worker that holds its --max-queue images answers further requests at once with 503 and
    Retry-After (and /ready says not ready meanwhile). POST /admin/reload (with an API key) or
    SIGHUP to the server loads the checkpoint again, or another one, in every worker without
    dropping a request; a model that fails to load or check is refused and the old one serves on.
    A --canary answers a share of the requests and a --shadow scores copies of them, each
    measured by model version in /metrics; POST /admin/promote makes the canary the model
    served, /admin/rollback drops it.

    \b
    Examples:
      cnnkit serve checkpoints/best.pt --port 8000 --workers 2
      curl -F image=@flower.jpg 'http://127.0.0.1:8000/predict?top_k=3'
      cnnkit serve checkpoints/best.pt --api-key-file keys.txt
      curl -H "Authorization: Bearer $KEY" -d '{"checkpoint": "checkpoints/new.pt"}' \\
           -H 'Content-Type: application/json' http://127.0.0.1:8000/admin/reload
      cnnkit serve best.pt --canary new.pt --canary-percent 5 --api-key-file keys.txt
      curl -X POST -H "Authorization: Bearer $KEY" http://127.0.0.1:8000/admin/promote
    """
    from .config import ServeConfig

    if not options.get("checkpoint"):
        raise ConfigError("give the model to serve: CHECKPOINT (a checkpoint, an exported .onnx, or a folder "
                          "holding one) or the CNNKIT_MODEL environment variable")
    cfg = ServeConfig(**options)  # before the heavy imports: a bad flag fails at once
    from .serve import serve as run_server

    run_server(cfg)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("checkpoint", type=click.Path())  # a folder: load_checkpoint says so
@click.option("--format", type=click.Choice(EXPORT_FORMATS), default="onnx", show_default=True, help="onnx (ONNX Runtime), openvino (an OpenVINO IR: .xml + .bin), both for cnnkit predict/evaluate/serve; or torchscript (torch.jit.load).")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="File to write [default: CHECKPOINT with .onnx, .xml or .torchscript.pt].")
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset version.")
@click.option("--check/--no-check", default=True, show_default=True, help="Verify the export matches PyTorch (probabilities within 1e-4, same top-1).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("--int8", is_flag=True, help="Quantize to int8 (ONNX Runtime static QDQ, or NNCF for openvino) and keep it only if it passes the accuracy and speed gate.")
@click.option("--calibration-data", type=click.Path(), default=None, help="With --int8: images like the training data (a folder, a labelled folder or a data root with train/ and valid/ or test/).")
@click.option("--calibration-images", type=int, default=300, show_default=True, help="At most this many images calibrate the activation ranges.")
@click.option("--gate-images", type=int, default=500, show_default=True, help="At most this many held-out images measure the gate.")
@click.option("--calibration-method", type=click.Choice(CALIBRATION_METHODS), default="minmax", show_default=True, help="How activation ranges are set from the calibration images.")
@click.option("--max-accuracy-drop", type=float, default=1.0, show_default=True, help="Percentage points of top-1 accuracy the int8 model may lose (unlabelled images: of agreement with the float model).")
@click.option("--min-speedup", type=float, default=1.2, show_default=True, help="The int8 model must be this many times as fast as the faster float runtime, measured here.")
@click.option("--min-agreement", type=float, default=0.0, show_default=True, help="With --format openvino --int8: NNCF reverts the layers that change the most answers to float until this percentage of the held-out images keep the float model's top-1 (99.5 kept 99.2% of a resnet18's test answers, against 98.8%; each layer group is tried in turn: minutes for deep models); 0: every layer int8.")
@click.option("--smooth-quant", default=DEFAULT_SMOOTH_QUANT, show_default=True, metavar="auto|off|ALPHA", help="With --format openvino --int8: SmoothQuant on the convolutions' inputs before NNCF quantizes (ALPHA: the share of each input's range moved into the weights). auto: quantize with it off and at 0.5, keep the model whose held-out probabilities moved less from the float model's (it kept 99.6% of a densenet121's test answers, against 98.8%, at about 0.75x the int8 speed); off: the fastest int8 model.")
@click.option("--seed", type=int, default=0, show_default=True, help="Which images calibrate and which are held out.")
@click.option("--ignore-gate", is_flag=True, help="With --int8: keep the model even if it fails the gate (its metadata says it failed).")
def export(**options: Any) -> None:
    """Export CHECKPOINT as a standalone model: softmax probabilities out, any batch size.

    Class names and preprocessing travel in the file (ONNX metadata_props, OpenVINO rt_info, TorchScript
    extra file cnnkit.json). ONNX needs the 'export' extra, OpenVINO the 'openvino' one. With --int8 the
    model is quantized, calibrated on --calibration-data, then measured on held-out images against the
    float model; it is written only if it passes that gate (exit code 9 otherwise).

    \b
    Examples:
      cnnkit export checkpoints/best.pt --format onnx
      cnnkit predict flower.jpg -c checkpoints/best.onnx --top-k 3
      cnnkit export checkpoints/best.pt --format openvino --int8 --calibration-data data/flowers-mini
    """
    from .config import ExportConfig

    cfg = ExportConfig(**options)  # before the heavy imports: a bad flag fails at once
    from .export import export as run_export

    result = run_export(cfg)
    click.echo(f"wrote {result.path} ({result.format}{', int8' if cfg.int8 else ''}, {result.bytes / 1e6:.1f} MB) "
               f"in {result.seconds:.1f}s")
    if result.parity is not None:
        click.echo(str(result.parity))
    if result.gate is not None:
        click.echo(str(result.gate))
