"""Training: :func:`train` (``cnnkit train``), the :class:`~.loop.Trainer` and its callbacks,
``lr-find`` and the ``--nproc`` launcher. See docs/ARCHITECTURE.md for where each behaviour lives."""

from .result import TrainResult
from .run import train

__all__ = ["TrainResult", "train"]
