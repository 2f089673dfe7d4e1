"""Overload shedding: a bound on the work one worker holds, so that past it a request is refused
at once (503 with ``Retry-After``) instead of waiting in line until every request is slow.

The bound is in images (decoding, queued or in a forward pass), ``--max-queue``, or by default
what the worker can clear in ``--queue-target-ms``, from the forward-pass rate it measures at
warm-up. An idle worker admits any request, however many images it holds (``--max-images``
bounds those).
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

from .parsing import HttpError


class Admission:
    """Admits a request's images while the worker holds fewer than :attr:`max_queue`."""

    def __init__(self, max_queue: int | None, target_ms: float, on_shed: Callable[[], None] | None = None):
        self.on_shed = on_shed
        self.configured = max_queue
        self.target_s = target_ms / 1000.0
        self.max_queue: int | None = max_queue  # None until calibrated
        self.rate: float | None = None  # images per second, measured
        self.held = 0  # images admitted and not yet answered
        self._lock = threading.Lock()

    def calibrate(self, images_per_second: float) -> None:
        """Set the bound from the measured rate (unless ``--max-queue`` gave it)."""
        self.rate = images_per_second
        if self.configured is None:
            self.max_queue = max(1, math.ceil(images_per_second * self.target_s))

    @property
    def saturated(self) -> bool:
        limit = self.max_queue
        return limit is not None and self.held >= limit

    def retry_after(self) -> int:
        """Whole seconds (as ``Retry-After`` wants) for the work held now to clear, at least 1."""
        if not self.rate:
            return 1
        return max(1, math.ceil(self.held / self.rate))

    @contextmanager
    def admit(self, images: int) -> Iterator[None]:
        """Hold ``images`` for the block; raises HttpError 503 (with Retry-After) if they do not fit."""
        with self._lock:
            limit = self.max_queue
            if limit is not None and self.held and self.held + images > limit:
                if self.on_shed is not None:
                    self.on_shed()
                raise HttpError(
                    503, f"overloaded: this worker holds {self.held} image(s), at most {limit} (--max-queue); "
                    "retry after the Retry-After seconds", headers={"Retry-After": str(self.retry_after())})
            self.held += images
        try:
            yield
        finally:
            with self._lock:
                self.held -= images
