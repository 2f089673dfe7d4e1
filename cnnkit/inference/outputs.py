"""Prediction rows written as they arrive (table, JSON, JSONL, CSV), resumable outputs, shards."""

from __future__ import annotations

import csv
import json
import os
import zlib
from dataclasses import dataclass
from typing import IO, Iterable

from ..config import PREDICT_FORMATS
from ..errors import ConfigError
from .predictor import Prediction


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


def drop_partial_last_line(path: str) -> None:
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


def check_csv_header(path: str, expected: list[str]) -> None:
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
    if fmt not in PREDICT_FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(PREDICT_FORMATS)}, got {fmt!r}")
    summary = WriteSummary()
    csv_writer = csv.writer(out, lineterminator="\n") if fmt == "csv" else None
    if csv_writer is not None and header:
        csv_writer.writerow(csv_header(top_k, abstain))
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


def csv_header(k: int, abstain: bool = False) -> list[str]:
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
