"""The command line's log format: bare messages, warnings and errors prefixed with their level."""

from __future__ import annotations

import logging
import sys


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


def verbosity_of(level: int) -> int:
    """The :func:`setup_logging` verbosity that gives logging ``level``."""
    return {logging.WARNING: -1, logging.INFO: 0}.get(level, 1)
