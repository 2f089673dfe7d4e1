"""A run's folder: the files a run writes, the checks before it writes them, the metrics log,
and the clean-up of what a killed run left half-written."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

from ..config import TrainConfig
from ..data.features import CACHE_DIR
from ..errors import CheckpointError, OutputError

BEST, LAST, METRICS, CURVES = "best.pt", "last.pt", "metrics.jsonl", "curves.png"


def run_paths(save_dir: str) -> dict[str, str]:
    """The paths of a run's files in ``save_dir``, by file name."""
    return {name: os.path.join(save_dir, name) for name in (BEST, LAST, METRICS, CURVES)}


def same_dir(a: str, b: str) -> bool:
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def prepare_save_dir(cfg: TrainConfig, continuing: bool) -> None:
    """Create ``--save-dir`` (refusing to overwrite another run's files without ``--force``)
    and remove the temporaries of a run killed mid-write there."""
    try:
        os.makedirs(cfg.save_dir, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --save-dir {cfg.save_dir}: {exc.strerror or exc}") from None
    if not os.access(cfg.save_dir, os.W_OK | os.X_OK):
        raise OutputError(f"--save-dir {cfg.save_dir} is not writable")
    existing = [n for n in (BEST, LAST, METRICS) if os.path.exists(os.path.join(cfg.save_dir, n))]
    if existing and not continuing and not cfg.force:
        raise OutputError(
            f"{cfg.save_dir} already holds {', '.join(existing)} from another run; use --force to "
            "overwrite, another --save-dir, or --resume to continue it"
        )
    remove_stray_temporaries(cfg.save_dir)


def remove_stray_temporaries(save_dir: str) -> None:
    """Delete the partial files of a run killed mid-write (writes are atomic: temporary, then
    rename; only a kill -9 or a crash leaves the temporary), which could be as large as a
    checkpoint or the feature cache. Feature-cache temporaries are named by their writer's pid:
    only those of processes no longer running go."""
    folder = glob.escape(save_dir)
    strays = [path for pattern in (f".{BEST}.*.tmp", f".{LAST}.*.tmp", f"{METRICS}.tmp", f"{CURVES}.*.tmp")
              for path in glob.glob(os.path.join(folder, pattern))]
    for path in glob.glob(os.path.join(folder, CACHE_DIR, "*.npy.*.tmp")):
        pid = path.rsplit(".", 2)[-2]
        if pid.isdigit() and not _running(int(pid)):
            strays.append(path)
    for path in strays:
        try:
            os.unlink(path)
        except OSError:
            pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists (another user's)
        return True
    return True


def check_resume_path(path: str) -> None:
    """A run killed before its first epoch finished has no last.pt: say so, and what to do."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(path) == LAST and not os.path.exists(path) and os.path.exists(os.path.join(folder, METRICS)):
        raise CheckpointError(
            f"checkpoint not found: {path}: the run in {folder} stopped before its first epoch finished, so there "
            "is nothing to resume; start it again (without --resume, with --force to replace its files)"
        )


def load_history(path: str, upto: int) -> list[dict[str, Any]]:
    """The metrics rows of epochs up to ``upto``: rows a killed run wrote past its checkpoint go."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(row, dict) and isinstance(row.get("epoch"), int) and row["epoch"] <= upto:
                rows.append(row)
    return rows


def write_history(path: str, rows: list[dict[str, Any]]) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None


def append_history(path: str, row: dict[str, Any]) -> None:
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
