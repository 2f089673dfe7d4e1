"""The ``cnnkit`` command: parse flags, build a config, call one library function, print.

Nothing heavy is imported at module level, so ``cnnkit --help`` answers at once. Every
:class:`~cnnkit.errors.CnnkitError` becomes one line on stderr and its exit code (see
``cnnkit.errors``); a traceback is shown only with ``CNNKIT_DEBUG=1``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

import click

from . import __version__
from .config import PredictConfig, TrainConfig
from .errors import CnnkitError, ConfigError, PartialFailure

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")
EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 internal error, 2 bad usage, 3 data problem, 4 checkpoint problem, "
    "5 weights unavailable, 6 output problem, 7 some inputs failed, 130 interrupted, "
    "141 output pipe closed."
)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def _setup_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logger = logging.getLogger("cnnkit")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


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
    _setup_logging(-1 if quiet else verbose)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("data_dir", type=click.Path())
@click.option("--arch", default="densenet121", show_default=True, help="torchvision architecture (VGG, DenseNet, ResNet/ResNeXt, MobileNet, EfficientNet, ConvNeXt, RegNet...).")
@click.option("--weights", default="DEFAULT", show_default=True, help="Backbone weights: DEFAULT (torchvision's pretrained, from the torch hub cache or downloaded), a weights name such as IMAGENET1K_V2, a path to a local .pth state_dict, or none.")
@click.option("--hidden-units", type=int, default=512, show_default=True, help="Hidden units of the new head; 0 for a single Linear layer.")
@click.option("--dropout", type=float, default=0.2, show_default=True, help="Dropout of the new head.")
@click.option("--learning-rate", "--lr", "learning_rate", type=float, default=1e-3, show_default=True, help="Adam learning rate.")
@click.option("--epochs", type=int, default=5, show_default=True)
@click.option("--batch-size", type=int, default=32, show_default=True)
@workers_option
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same machine: same metrics.")
@device_option
@gpu_option
@click.option("--save-dir", default="checkpoints", show_default=True, type=click.Path(file_okay=False), help="Where best.pt, last.pt and metrics.jsonl go.")
@names_option
@click.option("--freeze/--no-freeze", default=None, help="Freeze the backbone, train only the head [default: freeze iff the weights are pretrained].")
@click.option("--val-split", type=float, default=0.2, show_default=True, help="Share of each class held out for validation when DATA_DIR has no valid/ folder.")
@click.option("--image-size", type=int, default=None, help="Input crop size [default: the architecture's pretrained size, usually 224].")
@click.option("--resize-size", type=int, default=None, help="Eval resize before the centre crop [default: the architecture's, usually 256].")
@click.option("--scheduler", type=click.Choice(["none", "cosine", "step"]), default="cosine", show_default=True, help="Learning-rate schedule over the epochs.")
@click.option("--resume", type=click.Path(dir_okay=False), default=None, help="Continue the run saved in this last.pt (a larger --epochs extends a finished run).")
@click.option("--force", is_flag=True, help="Overwrite best.pt, last.pt and metrics.jsonl already in --save-dir.")
@progress_option
def train(gpu: bool, progress: bool | None, device: str, **options: Any) -> None:
    """Train a classifier on DATA_DIR by transfer learning.

    DATA_DIR holds train/ and valid/ (or val/) ImageFolders (test/ is ignored), or is itself a
    folder of class sub-folders, from which --val-split is held out for validation.

    \b
    Example:
      cnnkit train data/flowers-mini --arch resnet18 --epochs 10 --category-names cat_to_name.json
    """
    from .engine import train as run_training

    cfg = TrainConfig(device=_device(device, gpu), progress=_progress(progress), **options)
    result = run_training(cfg)
    click.echo(
        f"best validation accuracy {result.best_val_acc:.1%} (epoch {result.best_epoch}); "
        f"checkpoint {result.best_checkpoint}"
    )


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
@click.option("-c", "--checkpoint", type=click.Path(dir_okay=False), default=None, help="A checkpoint written by cnnkit train.")
@click.option("-k", "--top-k", type=int, default=1, show_default=True, help="Classes to show per image (capped at the number of classes).")
@names_option
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "json", "jsonl", "csv"]), default="table", show_default=True, help="table for a terminal; json, jsonl and csv print clean data on stdout (logs go to stderr).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@workers_option
@device_option
@gpu_option
@progress_option
def predict(
    inputs: tuple[str, ...], checkpoint: str | None, fmt: str, gpu: bool, device: str, progress: bool | None, **options: Any
) -> None:
    """Top-K classes with names for images, folders (recursed) or - (paths on stdin).

    \b
    Examples:
      cnnkit predict flower.jpg --checkpoint checkpoints/best.pt --top-k 3
      cnnkit predict photos/ -c best.pt --format csv > scores.csv
      find photos -name '*.jpg' | cnnkit predict - -c best.pt --format jsonl

    A file that cannot be scored gets an error row and the others are still scored; the exit
    code is then 7.
    """
    from .predict import predict as run_prediction, write_predictions

    inputs, checkpoint = _split_seed_order(inputs, checkpoint)
    cfg = PredictConfig(
        inputs=inputs, checkpoint=checkpoint, device=_device(device, gpu), progress=_progress(progress), **options
    )
    stream = run_prediction(cfg)
    summary = write_predictions(stream, fmt, sys.stdout, stream.top_k)
    if summary.failed:
        raise PartialFailure(f"{summary.failed} of {summary.failed + summary.scored} inputs could not be scored")


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info(checkpoint: str, as_json: bool) -> None:
    """Show a checkpoint's metadata: arch, classes, preprocessing, training summary."""
    from .checkpoint import describe

    meta = describe(checkpoint)
    if as_json:
        click.echo(json.dumps(meta, indent=2, ensure_ascii=False))
        return
    summary = meta["summary"]
    pre = meta["preprocess"]
    head = meta["head"]
    lines = [
        f"checkpoint   {meta['path']} (format {meta['format_version']}{', resumable' if meta['resumable'] else ''})",
        f"arch         {meta['arch']}, {meta['parameters']:,} parameters",
        f"head         {head['in_features']} -> {head['hidden_units'] or '-'} hidden (dropout {head['dropout']}) -> {head['num_classes']} classes",
        f"preprocess   resize {pre['resize_size']}, crop {pre['image_size']}, {pre['interpolation']}, mean {list(pre['mean'])}, std {list(pre['std'])}",
    ]
    if summary:
        lines.append(
            f"training     {summary.get('epochs')} epochs, best val acc {summary.get('best_val_acc', 0):.1%} "
            f"(epoch {summary.get('best_epoch')}), seed {summary.get('seed')}, weights {summary.get('weights')}"
        )
        lines.append(f"data         {summary.get('data_dir')} ({summary.get('validation')})")
    lines.append("versions     " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()))
    lines.append(f"classes      {len(meta['classes'])}")
    lines += [f"  {c['label']:>12}  {c['name']}" for c in meta["classes"]]
    click.echo("\n".join(lines))
