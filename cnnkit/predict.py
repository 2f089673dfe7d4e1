"""Inference: top-K classes with names for images, folders and path lists, scored in batches."""

from __future__ import annotations

import csv
import json
import logging
import math
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
from .errors import ConfigError
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

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        return {"path": self.path, "predictions": [g.__dict__ for g in self.top]}


class Predictor:
    """A trained model with its own preprocessing and class names, ready to score images."""

    def __init__(
        self,
        checkpoint: Checkpoint | str,
        device: str = "auto",
        category_names: str | None = None,
    ):
        self.checkpoint = load_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
        self.classes = self.checkpoint.classes
        self.names = dict(self.checkpoint.class_names)
        if category_names:
            self.names = load_category_names(category_names, self.classes)
        self.device = resolve_device(device)
        self.model = self.checkpoint.build_model(self.device)
        self.transform = build_transforms(self.checkpoint.preprocess, train=False)

    def cap_top_k(self, top_k: int) -> int:
        """``top_k`` capped at the number of classes (with a warning when it was more)."""
        if top_k > len(self.classes):
            log.warning("--top-k %d is more than the %d classes; showing %d", top_k, len(self.classes), len(self.classes))
        return min(top_k, len(self.classes))

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities (rows sum to 1) for a batch of preprocessed images."""
        return self.model(batch.to(self.device)).float().exp().cpu()

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

    def predict_paths(
        self,
        paths: Sequence[str],
        top_k: int = 1,
        batch_size: int = 32,
        workers: int | None = None,
        progress: bool = False,
    ) -> Iterator[Prediction]:
        """Predictions for ``paths``, in order, as they are scored; bad files give error rows."""
        k = self.cap_top_k(top_k)
        n_batches = math.ceil(len(paths) / batch_size)
        workers = min(default_workers(workers), n_batches if n_batches > 1 else 0)
        loader = DataLoader(
            ImageDataset(paths, self.transform, max_pixels=self.checkpoint.preprocess.max_pixels),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=collate,
        )
        with tqdm(total=len(paths), unit="img", disable=not progress, leave=False, dynamic_ncols=True) as bar:
            for images, indices, errors in loader:
                guesses = iter(self._guesses(self.probabilities(images), k) if images is not None else [])
                for index, error in zip(indices.tolist(), errors):
                    if error is not None:
                        yield Prediction(paths[index], error=error[1])
                    else:
                        yield Prediction(paths[index], next(guesses))
                bar.update(len(indices))


@dataclass(frozen=True)
class PredictionStream:
    """Predictions as they are scored, with what a writer needs to know up front."""

    rows: Iterator[Prediction]
    total: int  # number of inputs
    top_k: int  # guesses per image, after capping at the number of classes

    def __iter__(self) -> Iterator[Prediction]:
        return self.rows


def predict(cfg: PredictConfig) -> PredictionStream:
    """Everything ``cnnkit predict`` does but printing: load, expand inputs, score in batches."""
    predictor = Predictor(cfg.checkpoint, cfg.device, cfg.category_names)
    paths = list(expand_inputs(cfg.inputs))  # strings only: cheap even for a huge folder
    if not paths:
        log.warning("no images to score")
    top_k = predictor.cap_top_k(cfg.top_k)
    rows = predictor.predict_paths(paths, top_k, cfg.batch_size, cfg.workers, cfg.progress)
    return PredictionStream(rows, len(paths), top_k)


@dataclass
class WriteSummary:
    scored: int = 0
    failed: int = 0


def write_predictions(predictions: Iterable[Prediction], fmt: str, out: IO[str], top_k: int = 1) -> WriteSummary:
    """Write predictions to ``out`` as they arrive, in ``fmt`` (table, json, jsonl or csv).

    ``top_k`` sizes the CSV header, so error rows and short rows line up with the rest.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    summary = WriteSummary()
    csv_writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if csv_writer is not None:
        csv_writer.writerow(_csv_header(top_k))
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
            out.write(json.dumps(pred.to_dict(), ensure_ascii=False) + "\n")
        elif fmt == "json":
            out.write(("\n  " if first else ",\n  ") + json.dumps(pred.to_dict(), ensure_ascii=False))
        elif csv_writer is not None:
            csv_writer.writerow(_csv_row(pred, top_k))
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
        width = max(len(g.name) for g in pred.top)
        for rank, guess in enumerate(pred.top, 1):
            label = f" ({guess.label})" if guess.label != guess.name else ""
            lines.append(f"  {rank:>2}. {guess.name:<{width}}  {guess.probability:7.2%}{label}")
    return "\n".join(lines) + "\n"


def _csv_header(k: int) -> list[str]:
    header = ["path"]
    for rank in range(1, k + 1):
        suffix = "" if rank == 1 else f"_{rank}"
        header += [f"label{suffix}", f"name{suffix}", f"probability{suffix}"]
    return header + ["error"]


def _csv_row(pred: Prediction, top_k: int) -> list[str]:
    row = [pred.path]
    for guess in pred.top:
        row += [guess.label, guess.name, f"{guess.probability:.6f}"]
    row += [""] * (3 * (top_k - len(pred.top)))
    return row + [pred.error or ""]
