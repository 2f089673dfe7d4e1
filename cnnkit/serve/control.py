"""How a reload reaches every worker of ``cnnkit serve``.

gunicorn's workers share nothing but the master. The model they should serve is written to a
file in a folder the launcher makes (``CNNKIT_SERVE_CONTROL_DIR``), then the master is sent
SIGHUP, which (under ``cnnkit serve``'s arbiter) it forwards to every worker; each worker reads
the file and reloads if the model it names differs from the one it serves. A worker started
later (after a crash) reads the same file, so it serves the current model, not the first one.

Outside ``cnnkit serve`` (plain gunicorn, or in-process) there is no such folder: a reload
reaches the one worker that was asked, and :func:`tell_workers` says so.
"""

from __future__ import annotations

import os
import signal
import tempfile

CONTROL_DIR_ENV = "CNNKIT_SERVE_CONTROL_DIR"
MODEL_FILE = "model"


def control_dir() -> str | None:
    return os.environ.get(CONTROL_DIR_ENV) or None


def published_model() -> str | None:
    """The model the workers should serve, if a reload named one."""
    folder = control_dir()
    if folder is None:
        return None
    try:
        with open(os.path.join(folder, MODEL_FILE), encoding="utf-8") as handle:
            return handle.read().strip() or None
    except FileNotFoundError:
        return None


def publish_model(path: str) -> None:
    """Name the model every worker should serve (atomically: a reader sees the old or the new)."""
    folder = control_dir()
    if folder is None:
        return
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".model-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(os.path.abspath(path))
    os.replace(temporary, os.path.join(folder, MODEL_FILE))


def tell_workers() -> bool:
    """Ask the master to have every worker reload (SIGHUP); False outside ``cnnkit serve``."""
    if control_dir() is None:
        return False
    os.kill(os.getppid(), signal.SIGHUP)
    return True
