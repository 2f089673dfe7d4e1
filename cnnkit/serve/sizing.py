"""How many gunicorn workers serve, and how many torch threads each uses: the cores shared out.

Below both the model service (which sizes torch in its worker) and the launcher (which sizes
gunicorn), so that neither imports the other.
"""

from __future__ import annotations

from ..config import ServeConfig
from ..runtime import available_cores


def worker_count(cfg: ServeConfig) -> int:
    """gunicorn workers: as configured, else one per core, up to 4 (each holds a copy of the model).

    Processes rather than threads: a 1-thread forward pass per core keeps every core busy without
    OpenMP threads waiting on one another while request threads decode images.
    """
    return cfg.workers or max(1, min(4, available_cores()))


def torch_threads(cfg: ServeConfig) -> int:
    """Intra-op threads per worker: as configured, else the cores shared among the workers."""
    return cfg.torch_threads or max(1, available_cores() // worker_count(cfg))
