"""The command line's log format: bare messages, warnings and errors prefixed with their level."""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from typing import Any


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def setup_logging(verbosity: int) -> None:
    """``-1`` warnings only, ``0`` info, ``1`` and more debug: on stderr, for the ``cnnkit`` logger."""
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logger = logging.getLogger("cnnkit")
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


def quiet_dead_worker_handshakes() -> None:
    """A data-loading worker killed while a file descriptor is being handed over (a shared
    tensor) leaves multiprocessing's resource-sharer thread, in a surviving forked worker, with an
    EOFError that it prints as a traceback on the shared stderr (through ``sys.excepthook``; a
    thread's uncaught error goes through ``threading.excepthook``). The worker's death is what the
    command reports (one line, exit 8), so that error goes to the debug log instead; any other is
    printed as before. Forked workers inherit both hooks."""
    if getattr(sys.excepthook, "cnnkit_quiet", False):
        return
    previous_sys, previous_thread = sys.excepthook, threading.excepthook

    def quiet(kind: type[BaseException], tb: Any) -> bool:
        if not issubclass(kind, (EOFError, ConnectionError)) or tb is None:
            return False
        if not any(frame.filename.endswith("resource_sharer.py") for frame in traceback.extract_tb(tb)):
            return False
        logging.getLogger("cnnkit").debug("a worker's descriptor handshake broke off: %s", kind.__name__)
        return True

    def sys_hook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not quiet(kind, tb):
            previous_sys(kind, value, tb)

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if not quiet(args.exc_type, args.exc_traceback):
            previous_thread(args)

    sys_hook.cnnkit_quiet = True  # type: ignore[attr-defined]
    sys.excepthook, threading.excepthook = sys_hook, thread_hook


def verbosity_of(level: int) -> int:
    """The :func:`setup_logging` verbosity that gives logging ``level``."""
    return {logging.WARNING: -1, logging.INFO: 0}.get(level, 1)
