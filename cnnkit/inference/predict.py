"""``cnnkit predict`` as a library function: list the inputs, score them, write the rows."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import IO, Iterator

from ..config import PredictConfig
from ..data.folders import expand_inputs
from ..errors import OutputError, WorkerError, worker_death
from .outputs import (
    WriteSummary,
    check_csv_header,
    csv_header,
    drop_partial_last_line,
    scored_paths,
    select_shard,
    write_predictions,
)
from .predictor import Prediction, Predictor

log = logging.getLogger(__name__)


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
    predictor = Predictor(cfg.checkpoint, cfg.device, cfg.category_names, tta=cfg.tta)
    threshold, combined = predictor.abstain_rule() if cfg.abstain else (None, False)
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
    rows = predictor.predict_paths(paths, top_k, cfg.batch_size, cfg.workers, cfg.progress, known_score=combined)
    if threshold is not None:
        rows = (
            dataclasses.replace(row, abstained=True)
            if row.ok and (row.known_score if combined else row.top[0].probability) < threshold else row
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
        drop_partial_last_line(cfg.output)
    stream = predict(cfg)
    append = cfg.resume and exists and os.path.getsize(cfg.output) > 0
    if append and fmt == "csv":
        check_csv_header(cfg.output, csv_header(stream.top_k, stream.abstain))
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
