"""Shadow scoring: a candidate model scores copies of the primary's traffic, off the request path.

The copy of a request the primary answered (its preprocessed images, or their bytes when the
shadow preprocesses differently, and the primary's top-1 classes) waits in a bounded queue; a
full queue drops the copy. The batcher's thread scores copies only while the worker holds no
request and within ``--shadow-share`` of its time (:meth:`ShadowScorer.ready`), a few images at a
time, so that under load the shadow sheds first and a request never waits behind more than one
small shadow pass. What it measures, per shadow version: images scored, dropped and failed, the
agreement of its top-1 with the primary's, its confidence, and the PSI of its class mix against
the primary's over the last ``window`` images.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data.transforms import load_image
from ..drift import psi
from .model import ServedModel

log = logging.getLogger(__name__)

PASS_IMAGES = 2  # images per shadow pass: how long a request may wait behind one
BURST_S = 1.0  # the most unused time the shadow may save up


class _Copy:
    __slots__ = ("model", "image", "primary_top1")

    def __init__(self, model: ServedModel, image: torch.Tensor | bytes, primary_top1: int):
        self.model = model
        self.image = image  # preprocessed for the shadow, or the bytes to decode
        self.primary_top1 = primary_top1


class ShadowScorer:
    """Copies of the primary's traffic, scored by the shadow model when the worker is idle.

    ``metrics`` is the server's :class:`~cnnkit.serve.metrics.Metrics`; ``busy()`` says whether
    the worker holds a request; ``current()`` is the shadow model served now. :meth:`offer` is
    called from request threads; :meth:`pending`, :meth:`ready` and :meth:`step` from the
    batcher's thread (its background work).
    """

    def __init__(self, metrics: Any, capacity: int, share: float, window: int, busy: Callable[[], bool],
                 current: Callable[[], ServedModel | None], clock: Callable[[], float] = time.monotonic):
        self.metrics = metrics
        self._current = current
        self.capacity = capacity
        self.share = share
        self._busy = busy
        self._clock = clock
        self._queue: deque[_Copy] = deque()
        self._lock = threading.Lock()
        self._credit = 0.0  # seconds of shadow time earned and not spent
        self._earned_at = clock()
        self._pairs: deque[tuple[int, int]] = deque(maxlen=window)  # (primary top-1, shadow top-1)
        self._pairs_of: ServedModel | None = None

    def offer(self, shadow: ServedModel, primary: ServedModel, blobs: Sequence[tuple[str | None, bytes]],
              batch: torch.Tensor, primary_top1: Sequence[int]) -> None:
        """Queue copies of a request the primary answered; those that do not fit are dropped."""
        same_input = shadow.checkpoint.preprocess == primary.checkpoint.preprocess and shadow.max_pixels == primary.max_pixels
        with self._lock:
            room = max(self.capacity - len(self._queue), 0)
            for index, top1 in enumerate(primary_top1[:room]):
                self._queue.append(_Copy(shadow, batch[index] if same_input else blobs[index][1], top1))
        dropped = len(primary_top1) - min(room, len(primary_top1))
        if dropped:
            self.metrics.shadow_images.labels(shadow.version, "dropped").inc(dropped)

    def pending(self) -> bool:
        return bool(self._queue)

    def ready(self) -> bool:
        """Whether a pass may run now: copies wait, the worker holds no request, time is left."""
        now = self._clock()
        self._credit = min(self._credit + (now - self._earned_at) * self.share, BURST_S * self.share)
        self._earned_at = now
        return bool(self._queue) and self._credit > 0 and not self._busy()

    def step(self) -> None:
        """Score up to :data:`PASS_IMAGES` copies with the shadow model served now (copies made
        for another are dropped)."""
        shadow = self._current()
        with self._lock:
            copies = [self._queue.popleft() for _ in range(min(PASS_IMAGES, len(self._queue)))]
        stale = [c for c in copies if c.model is not shadow]
        for copy in stale:
            self.metrics.shadow_images.labels(copy.model.version, "dropped").inc()
        copies = [c for c in copies if c.model is shadow]
        if not copies or shadow is None:
            return
        began = self._clock()
        try:
            probs = shadow.score(torch.stack([self._input(shadow, c.image) for c in copies]))
        except Exception as exc:  # a failing candidate never touches the primary's answers
            self.metrics.shadow_images.labels(shadow.version, "failed").inc(len(copies))
            log.warning("shadow model %s failed on %d image(s): %s: %s", shadow.version, len(copies), type(exc).__name__, exc)
            return
        finally:
            self._credit -= self._clock() - began
        confidence, top1 = probs.max(dim=1)
        self._observe(shadow, [c.primary_top1 for c in copies], top1.tolist(), confidence.tolist())

    @staticmethod
    def _input(shadow: ServedModel, image: torch.Tensor | bytes) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image
        return shadow.transform(load_image(io.BytesIO(image), shadow.max_pixels))

    def _observe(self, shadow: ServedModel, primary: list[int], top1: list[int], confidence: list[float]) -> None:
        m, version = self.metrics, shadow.version
        m.shadow_images.labels(version, "scored").inc(len(top1))
        m.shadow_agreement.labels(version).inc(sum(p == s for p, s in zip(primary, top1)))
        for value in confidence:
            m.shadow_confidence.labels(version).observe(value)
        if self._pairs_of is not shadow:  # a new shadow: a new window
            self._pairs.clear()
            self._pairs_of = shadow
        self._pairs.extend(zip(primary, top1))
        if len(self._pairs) >= min(100, self._pairs.maxlen or 100):
            pairs = np.asarray(self._pairs, dtype=np.int64)
            classes = len(shadow.classes)
            m.shadow_class_psi.labels(version).set(
                psi(np.bincount(pairs[:, 0], minlength=classes), np.bincount(pairs[:, 1], minlength=classes)))
