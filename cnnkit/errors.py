"""Exceptions raised by the library; the CLI turns each into one line and an exit code.

Exit codes (also listed in the README):

====  ==========================================================
0     success
1     internal error (a bug: please report it)
2     bad usage or configuration (flags, config values)
3     data problem (missing folder, no images, class mismatch, bad names JSON)
4     checkpoint problem (not a checkpoint, corrupt, unsafe, newer format)
5     pretrained weights unavailable (offline and not cached, bad weights file)
6     output problem (would overwrite without --force, unwritable directory, disk full)
7     some inputs could not be scored (the others were)
8     a worker process died (killed, out of memory, crashed); what was written is kept
9     a quantized model failed its accuracy or speed gate; nothing was written
10    cnnkit inspect found images shared across splits (a leak) or under two labels
130   interrupted (Ctrl-C)
====  ==========================================================
"""

from __future__ import annotations

import re


class CnnkitError(Exception):
    """Base class of every error cnnkit reports to a user."""

    exit_code = 1


class ConfigError(CnnkitError, ValueError):
    """A configuration value or flag is invalid."""

    exit_code = 2


class DataError(CnnkitError):
    """The dataset, an input path or a category-names file is unusable."""

    exit_code = 3


class CheckpointError(CnnkitError):
    """A checkpoint cannot be loaded (not cnnkit's, corrupt, unsafe or too new)."""

    exit_code = 4


class WeightsError(CnnkitError):
    """Pretrained backbone weights cannot be obtained or do not fit the architecture."""

    exit_code = 5


class OutputError(CnnkitError):
    """An output cannot be written, or writing it would destroy something the user has."""

    exit_code = 6


class PartialFailure(CnnkitError):
    """Some inputs failed while the rest were processed; the results are still reported."""

    exit_code = 7


class WorkerError(CnnkitError):
    """A DataLoader worker process died (killed, e.g. by the OOM killer, or crashed); what was
    written before is kept."""

    exit_code = 8


class GateError(CnnkitError):
    """A quantized model lost too much accuracy or was not fast enough; nothing was written."""

    exit_code = 9


class LeakError(CnnkitError):
    """The data set has the same (or a near-identical) image in two splits, or under two labels;
    the report was still printed and written."""

    exit_code = 10


class Interrupted(CnnkitError):
    """The user interrupted a run; what could be saved was saved."""

    exit_code = 130


class ImageError(Exception):
    """One image cannot be decoded. Per-file, so not a CnnkitError: callers record it and go on."""


_WORKER_DIED = re.compile(
    r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\) "
    r"(?:is killed by signal: ([^.]+)|exited unexpectedly(?: with exit code (-?\d+))?)"
)


def worker_death(exc: BaseException) -> str | None:
    """What torch's RuntimeError for a dead DataLoader worker means, in one phrase
    ("a data-loading worker process (pid 12) was killed by signal Killed"), or None for any
    other exception. Torch raises it from its SIGCHLD handler or its queue check, wherever the
    main process happens to be while a worker is alive."""
    if not isinstance(exc, RuntimeError):
        return None
    # The queue check's "exited unexpectedly" may chain the SIGCHLD handler's more telling error.
    chain = [e for e in (exc, exc.__cause__, exc.__context__) if isinstance(e, RuntimeError)]
    found = [m for m in (_WORKER_DIED.search(str(e)) for e in chain) if m]
    if not found:
        return None
    pids, signal_name, code = max(found, key=lambda m: m.group(2) is not None or m.group(3) is not None).groups()
    what = (
        f"was killed by signal {signal_name.strip()}" if signal_name
        else f"exited unexpectedly with exit code {code}" if code is not None
        else "exited unexpectedly"
    )
    return f"a data-loading worker process (pid {pids.strip()}) {what} (out of memory, or an image crashed its decoder)"


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def require_extra(extra: str, *modules: str) -> None:
    """Raise a one-line :class:`ConfigError` when an optional extra's modules are not installed."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
            f"this needs cnnkit's '{extra}' extra: pip install 'cnnkit[{extra}]'"
        )
