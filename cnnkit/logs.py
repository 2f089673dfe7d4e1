"""The command line's log format: bare messages, warnings and errors prefixed with their level."""

from __future__ import annotations

import logging
import sys
import threading
import traceback


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
    """A data-loading worker killed while the main process hands it a shared tensor's file
    descriptor leaves multiprocessing's resource-sharer thread with an EOFError, which Python
    prints as a traceback on stderr. The worker's death is what the command reports (one line,
    exit 8), so that thread's error goes to the debug log instead; any other thread's error is
    printed as before."""
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback is not None else []
        if issubclass(args.exc_type, (EOFError, ConnectionError)) and any(
                frame.filename.endswith("resource_sharer.py") for frame in frames):
            logging.getLogger("cnnkit").debug("a worker's descriptor handshake broke off: %s", args.exc_type.__name__)
            return
        previous(args)

    if not getattr(threading.excepthook, "cnnkit_quiet", False):
        hook.cnnkit_quiet = True  # type: ignore[attr-defined]
        threading.excepthook = hook


def verbosity_of(level: int) -> int:
    """The :func:`setup_logging` verbosity that gives logging ``level``."""
    return {logging.WARNING: -1, logging.INFO: 0}.get(level, 1)
