"""Inference: top-K classes with names for images, folders and path lists, scored in batches."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import zlib
from dataclasses import dataclass, field
from typing import IO, Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import Checkpoint, load_checkpoint
from .config import PredictConfig
from .data import ImageDataset, collate, expand_inputs, load_category_names
from .engine import default_workers, resolve_device
from .errors import ConfigError, OutputError, WorkerError, worker_death
from .transforms import build_transforms

log = logging.getLogger(__name__)

FORMATS = ("table", "json", "jsonl", "csv")


@dataclass(frozen=True)
class Guess:
    label: str  # the class label (its folder name)
    name: str  # human-readable name, or the label when none is known
    probability: float


@dataclass(frozen=True)
class Prediction:
    path: str
    top: list[Guess] = field(default_factory=list)
    error: str | None = None
    abstained: bool = False  # top-1 confidence below the checkpoint's abstain threshold

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self, abstain: bool = False) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        row: dict = {"path": self.path}
        if abstain:
            row["predicted"] = "unknown" if self.abstained else self.top[0].label
        # 6 decimals, as in CSV: beyond that, floats differ with the batch an image was in.
        row["predictions"] = [{**g.__dict__, "probability": round(g.probability, 6)} for g in self.top]
        return row


CPU_BATCH_SIZE = 8
GPU_BATCH_SIZE = 32


def scoring_defaults(device: torch.device, batch_size: int | None, workers: int | None) -> tuple[int, int]:
    """Batch size and decoding workers for scoring on ``device``, where not given.

    Measured on a 2-core CPU (benchmarks/RESULTS.md): CPU inference is cache-bound, so batches
    of 4-8 ran 1.3-2x faster than 32; and decoding workers there only take cores from torch's
    threads (0 workers was as fast or faster than 1 or 2). With more cores, or a GPU doing the
    arithmetic, decoding in workers overlaps with the forward pass.
    """
    if batch_size is None:
        batch_size = CPU_BATCH_SIZE if device.type == "cpu" else GPU_BATCH_SIZE
    if workers is None:
        cores = default_workers(None)
        workers = 0 if device.type == "cpu" and cores <= 2 else cores
    return batch_size, workers


class Predictor:
    """A trained model with its own preprocessing and class names, ready to score images."""

    def __init__(
        self,
        checkpoint: Checkpoint | str,
        device: str = "auto",
        category_names: str | None = None,
    ):
        self.backend = None  # an exported ONNX model (cnnkit.export.OnnxBackend) scoring instead of self.model
        if isinstance(checkpoint, str) and checkpoint.lower().endswith(".onnx"):
            from .export import OnnxBackend

            self.backend = OnnxBackend(checkpoint, device)
            checkpoint = self.backend.checkpoint  # weightless: classes, names, preprocessing
        self.checkpoint = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
        self.classes = self.checkpoint.classes
        self.names = dict(self.checkpoint.class_names)
        if category_names:
            self.names = load_category_names(category_names, self.classes)
        self.device = resolve_device(device)
        self.model = self.checkpoint.build_model(self.device) if self.backend is None else None
        # NHWC is 1.3-1.4x faster for these CNNs on CPU (benchmarks/RESULTS.md); MPS lacks kernels.
        self.memory_format = torch.channels_last if self.device.type != "mps" else torch.contiguous_format
        if self.model is not None:
            self.model = self.model.to(memory_format=self.memory_format)
        self.transform = build_transforms(self.checkpoint.preprocess, train=False)

    def abstain_threshold(self) -> float:
        """The confidence below which ``--abstain`` answers unknown (set by ``cnnkit evaluate``)."""
        threshold = self.checkpoint.calibration.get("abstain_threshold")
        if threshold is None:
            raise ConfigError(
                "--abstain: this checkpoint has no abstain threshold; set one with "
                "cnnkit evaluate CKPT DATA_DIR --target-coverage 0.95"
            )
        return float(threshold)

    def cap_top_k(self, top_k: int) -> int:
        """``top_k`` capped at the number of classes (with a warning when it was more)."""
        if top_k > len(self.classes):
            log.warning("--top-k %d is more than the %d classes; showing %d", top_k, len(self.classes), len(self.classes))
        return min(top_k, len(self.classes))

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """Class probabilities (rows sum to 1) for a batch of preprocessed images, with the
        checkpoint's fitted temperature applied unless ``calibrated`` is False."""
        if self.backend is not None:  # the export's output is already (calibrated) probabilities
            return self.backend.probabilities(batch)
        log_probs = self.model(batch.to(self.device, memory_format=self.memory_format)).float()
        if calibrated and self.checkpoint.temperature != 1.0:
            log_probs = torch.log_softmax(log_probs / self.checkpoint.temperature, dim=1)
        return log_probs.exp().cpu()

    def _guesses(self, probs: torch.Tensor, k: int) -> list[list[Guess]]:
        values, indices = probs.topk(k, dim=1)
        return [
            [Guess(self.classes[i], self.names.get(self.classes[i], self.classes[i]), float(p))
             for p, i in zip(row_p.tolist(), row_i.tolist())]
            for row_p, row_i in zip(values, indices)
        ]

    def predict_images(self, images: Sequence[Image.Image], top_k: int = 1) -> list[list[Guess]]:
        """Top-K guesses for decoded RGB images, in one forward pass."""
        if not images:
            return []
        batch = torch.stack([self.transform(image) for image in images])
        return self._guesses(self.probabilities(batch), self.cap_top_k(top_k))

    def score_paths(
        self,
        paths: Sequence[str],
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = False,
        calibrated: bool = True,
    ) -> Iterator[tuple[str, torch.Tensor | None, str | None]]:
        """``(path, class probabilities or None, error or None)`` for each path, in order, as
        batches are scored; images are decoded in DataLoader workers (see :func:`scoring_defaults`)."""
        batch_size, workers = scoring_defaults(self.device, batch_size, workers)
        n_batches = math.ceil(len(paths) / batch_size)
        workers = min(workers, n_batches if n_batches > 1 else 0)
        loader = DataLoader(
            ImageDataset(paths, self.transform, max_pixels=self.checkpoint.preprocess.max_pixels),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate,
        )
        with tqdm(total=len(paths), unit="img", disable=not progress, leave=False, dynamic_ncols=True) as bar:
            for images, indices, errors in loader:
                probs = iter(self.probabilities(images, calibrated) if images is not None else [])
                for index, error in zip(indices.tolist(), errors):
                    if error is not None:
                        yield paths[index], None, error[1]
                    else:
                        yield paths[index], next(probs), None
                bar.update(len(indices))

    def predict_paths(
        self,
        paths: Sequence[str],
        top_k: int = 1,
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = False,
    ) -> Iterator[Prediction]:
        """Predictions for ``paths``, in order, as they are scored; bad files give error rows."""
        k = self.cap_top_k(top_k)
        for path, probs, error in self.score_paths(paths, batch_size, workers, progress):
            if error is not None:
                yield Prediction(path, error=error)
            else:
                yield Prediction(path, self._guesses(probs[None], k)[0])


@dataclass(frozen=True)
class PredictionStream:
    """Predictions as they are scored, with what a writer needs to know up front."""

    rows: Iterator[Prediction]
    total: int  # number of inputs
    top_k: int  # guesses per image, after capping at the number of classes
    abstain: bool = False  # rows carry an abstained flag

    def __iter__(self) -> Iterator[Prediction]:
        return self.rows


def predict(cfg: PredictConfig) -> PredictionStream:
    """Load the model, list the inputs (this ``--shard``, less those already in ``--output`` when
    resuming) and return their predictions as they are scored."""
    predictor = Predictor(cfg.checkpoint, cfg.device, cfg.category_names)
    threshold = predictor.abstain_threshold() if cfg.abstain else None
    paths = list(expand_inputs(cfg.inputs))  # strings only: cheap even for a huge folder
    if cfg.shard_spec is not None:
        paths = select_shard(paths, *cfg.shard_spec)
    if cfg.resume and cfg.output:
        done = scored_paths(cfg.output, cfg.output_format)
        before = len(paths)
        paths = [p for p in paths if p not in done]
        log.info("resuming %s: %d inputs already scored, %d to go", cfg.output, before - len(paths), len(paths))
    elif not paths:
        log.warning("no images to score")
    top_k = predictor.cap_top_k(cfg.top_k)
    rows = predictor.predict_paths(paths, top_k, cfg.batch_size, cfg.workers, cfg.progress)
    if threshold is not None:
        rows = (
            dataclasses.replace(row, abstained=True) if row.ok and row.top[0].probability < threshold else row
            for row in rows
        )
    return PredictionStream(rows, len(paths), top_k, abstain=threshold is not None)


def predict_to_output(cfg: PredictConfig, stdout: IO[str]) -> WriteSummary:
    """All of ``cnnkit predict``: score and write to ``--output`` (created, appended to with
    ``--resume``, replaced with ``--force``) or to ``stdout``, row by row as results arrive."""
    fmt = cfg.output_format
    if cfg.output is None:
        stream = predict(cfg)
        return write_predictions(stream, fmt, stdout, stream.top_k, stream.abstain)
    exists = os.path.exists(cfg.output)
    if exists and not (cfg.resume or cfg.force):
        raise OutputError(f"{cfg.output} exists: use --resume to continue it or --force to replace it")
    if cfg.resume and exists:
        _drop_partial_last_line(cfg.output)
    stream = predict(cfg)
    append = cfg.resume and exists and os.path.getsize(cfg.output) > 0
    if append and fmt == "csv":
        _check_csv_header(cfg.output, _csv_header(stream.top_k, stream.abstain))
    try:
        with open(cfg.output, "a" if append else "w", encoding="utf-8", errors="surrogateescape", newline="") as out:
            return write_predictions(stream, fmt, out, stream.top_k, stream.abstain, header=not append)
    except OSError as exc:
        raise OutputError(f"cannot write {cfg.output}: {exc.strerror or exc}; rows written so far are kept, "
                          "continue with --resume") from None
    except RuntimeError as exc:
        died = worker_death(exc)
        if died is None:
            raise
        raise WorkerError(f"{died}; {cfg.output} keeps the rows written so far: continue with --resume "
                          "(--workers 0 decodes in the main process)") from None


def select_shard(paths: Iterable[str], k: int, n: int) -> list[str]:
    """The paths whose CRC-32 is K mod N: a slice that stays put when files are added or listed
    in another order, so N array jobs together score every input exactly once."""
    return [p for p in paths if zlib.crc32(p.encode("utf-8", "surrogateescape")) % n == k]


def scored_paths(output: str, fmt: str) -> set[str]:
    """Paths already present in a CSV or JSONL output (header and a cut-off last line excluded)."""
    if not os.path.exists(output):
        return set()
    done: set[str] = set()
    with open(output, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        if fmt == "csv":
            reader = csv.reader(handle)
            next(reader, None)
            done.update(row[0] for row in reader if row)
        else:
            for line in handle:
                try:
                    done.add(json.loads(line)["path"])
                except (ValueError, KeyError, TypeError):
                    continue
    return done


def _drop_partial_last_line(path: str) -> None:
    """A kill mid-write can leave half a row: cut the file back to its last complete line."""
    with open(path, "rb+") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        if size == 0:
            return
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return
        chunk = min(size, 1 << 20)
        handle.seek(size - chunk)
        tail = handle.read(chunk)
        cut = tail.rfind(b"\n")
        handle.truncate(size - chunk + cut + 1 if cut >= 0 else 0)


def _check_csv_header(path: str, expected: list[str]) -> None:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        header = next(csv.reader(handle), None)
    if header is not None and header != expected:
        raise ConfigError(
            f"{path} has columns {','.join(header)} but this run writes {','.join(expected)}: "
            "resume with the same --top-k and --abstain"
        )


@dataclass
class WriteSummary:
    scored: int = 0
    failed: int = 0


def write_predictions(
    predictions: Iterable[Prediction],
    fmt: str,
    out: IO[str],
    top_k: int = 1,
    abstain: bool = False,
    header: bool = True,
) -> WriteSummary:
    """Write predictions to ``out`` as they arrive, in ``fmt`` (table, json, jsonl or csv).

    ``top_k`` sizes the CSV header, so error rows and short rows line up with the rest;
    ``abstain`` adds the top-level label (``unknown`` below the threshold).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    summary = WriteSummary()
    csv_writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if csv_writer is not None and header:
        csv_writer.writerow(_csv_header(top_k, abstain))
    first = True
    if fmt == "json":
        out.write("[")
    for pred in predictions:
        if pred.ok:
            summary.scored += 1
        else:
            summary.failed += 1
        if fmt == "table":
            out.write(_table_block(pred))
        elif fmt == "jsonl":
            out.write(json.dumps(pred.to_dict(abstain), ensure_ascii=False) + "\n")
        elif fmt == "json":
            out.write(("\n  " if first else ",\n  ") + json.dumps(pred.to_dict(abstain), ensure_ascii=False))
        elif csv_writer is not None:
            row = _csv_row(pred, top_k, abstain)
            # csv quotes a field holding "\n" (the line terminator) but not a bare "\r", which
            # readers take as a line break: a path with one would split its row in two.
            (csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL) if any("\r" in f for f in row)
             else csv_writer).writerow(row)
        first = False
        out.flush()
    if fmt == "json":
        out.write("\n]\n" if not first else "]\n")
    return summary


def _table_block(pred: Prediction) -> str:
    lines = [pred.path]
    if pred.error is not None:
        lines.append(f"    error: {pred.error}")
    else:
        if pred.abstained:
            lines.append("    unknown (below the abstain threshold); candidates:")
        width = max(len(g.name) for g in pred.top)
        for rank, guess in enumerate(pred.top, 1):
            label = f" ({guess.label})" if guess.label != guess.name else ""
            lines.append(f"  {rank:>2}. {guess.name:<{width}}  {guess.probability:7.2%}{label}")
    return "\n".join(lines) + "\n"


def _csv_header(k: int, abstain: bool = False) -> list[str]:
    header = ["path", "predicted"] if abstain else ["path"]
    for rank in range(1, k + 1):
        suffix = "" if rank == 1 else f"_{rank}"
        header += [f"label{suffix}", f"name{suffix}", f"probability{suffix}"]
    return header + ["error"]


def _csv_row(pred: Prediction, top_k: int, abstain: bool = False) -> list[str]:
    row = [pred.path]
    if abstain:
        row.append("" if not pred.ok else "unknown" if pred.abstained else pred.top[0].label)
    for guess in pred.top:
        row += [guess.label, guess.name, f"{guess.probability:.6f}"]
    row += [""] * (3 * (top_k - len(pred.top)))
    return row + [pred.error or ""]
