"""How a change of model reaches every worker of ``cnnkit serve``.

gunicorn's workers share nothing but the master. What they should serve (the primary model, the
canary with its share of requests, the shadow) is written to a JSON file in a folder the launcher
makes (``CNNKIT_SERVE_CONTROL_DIR``), then the master is sent SIGHUP, which (under ``cnnkit
serve``'s arbiter) it forwards to every worker; each worker reads the file and loads what differs
from what it serves. A worker started later (after a crash) reads the same file, so it serves the
current models, not the first ones.

Outside ``cnnkit serve`` (plain gunicorn, or in-process) there is no such folder: a change
reaches the one worker that was asked, and :func:`tell_workers` says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import tempfile
from typing import Any

CONTROL_DIR_ENV = "CNNKIT_SERVE_CONTROL_DIR"
STATE_FILE = "models.json"


@dataclasses.dataclass(frozen=True)
class Lineup:
    """The model files a server serves: the primary, an optional canary answering
    ``canary_percent`` % of requests, an optional shadow scoring copies of the primary's traffic."""

    primary: str
    canary: str | None = None
    canary_percent: float = 0.0
    shadow: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def control_dir() -> str | None:
    return os.environ.get(CONTROL_DIR_ENV) or None


def published_lineup() -> Lineup | None:
    """What the workers should serve, if an admin request or a reload named it."""
    folder = control_dir()
    if folder is None:
        return None
    try:
        with open(os.path.join(folder, STATE_FILE), encoding="utf-8") as handle:
            return Lineup(**json.load(handle))
    except FileNotFoundError:
        return None


def publish_lineup(lineup: Lineup) -> None:
    """Name the models every worker should serve (atomically: a reader sees the old or the new)."""
    folder = control_dir()
    if folder is None:
        return
    absolute = {role: os.path.abspath(path) if isinstance(path, str) else path
                for role, path in lineup.to_dict().items()}
    fd, temporary = tempfile.mkstemp(dir=folder, prefix=".models-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(absolute, handle)
    os.replace(temporary, os.path.join(folder, STATE_FILE))


def tell_workers() -> bool:
    """Ask the master to have every worker reload (SIGHUP); False outside ``cnnkit serve``."""
    if control_dir() is None:
        return False
    os.kill(os.getppid(), signal.SIGHUP)
    return True
