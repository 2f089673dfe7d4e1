"""The micro-batcher: one thread per worker that gathers the images of concurrent requests into
forward passes of at most ``max_batch`` images, and hands each request its rows back.

Request threads take a *ticket* before they read and decode their images, so the batcher knows
a request is on its way and waits for it (up to ``max_wait_ms``), and not at all when none is.
A job may carry a *key* (the model it was prepared for, across a reload, or the canary): jobs
of different keys are never batched together, and the key is passed to ``score``.

*Background* work (the shadow model's scoring) runs on the batcher's thread only when no job is
queued or on its way, and only when it says it is :meth:`~Background.ready`; one step at a time,
so a request that arrives meanwhile waits for one step at most.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Protocol

import torch

from .parsing import TEST_FAULT_HEADER, HttpError

log = logging.getLogger(__name__)


Score = Callable[[torch.Tensor, Any], torch.Tensor]  # (batch, the jobs' key) -> probabilities
BACKGROUND_POLL_S = 0.02  # while background work waits but may not run yet: how often to ask again


class Background(Protocol):
    """Work the batcher's thread does when it has no job (see the module's docstring)."""

    def pending(self) -> bool:
        """Work is waiting (the batcher then asks :meth:`ready` every BACKGROUND_POLL_S)."""

    def ready(self) -> bool:
        """It may run now."""

    def step(self) -> None:
        """Do a short piece of it."""


class _Job:
    __slots__ = ("batch", "fault", "key", "done", "result", "error", "cancelled")

    def __init__(self, batch: torch.Tensor, fault: bool, key: Any):
        self.batch = batch
        self.fault = fault
        self.key = key
        self.done = threading.Event()
        self.result: torch.Tensor | None = None
        self.error: BaseException | None = None
        self.cancelled = False

    def __len__(self) -> int:
        return len(self.batch)


class _Ticket:
    """A request on its way to the batcher: counted as arriving until it submits or gives up."""

    def __init__(self, batcher: "MicroBatcher"):
        self._batcher = batcher
        self.submitted = False

    def submit(self, batch: torch.Tensor, fault: bool = False, key: Any = None) -> _Job:
        self.submitted = True  # no longer arriving, even if the batcher refuses the job
        return self._batcher._enqueue(_Job(batch, fault, key), arrived=True)


class MicroBatcher:
    """Gathers the images of concurrent requests into forward passes of at most ``max_batch``.

    ``score(batch, key)`` maps a batch of preprocessed images to class probabilities, ``key``
    being the jobs' (see :meth:`submit`); it runs on the batcher's own thread only. A batch that
    fails is retried request by request, so one request that makes the model raise does not fail
    the others it was batched with.
    """

    def __init__(
        self,
        score: Score,
        max_batch: int,
        max_wait_ms: float,
        on_batch: Callable[[int, float, Any], None] | None = None,
        warmup: Callable[[], None] | None = None,
        background: Background | None = None,
    ):
        self._score = score
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._warmup = warmup
        self._background = background
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._arriving = 0
        self._stopping = False
        self.ready = threading.Event()
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name="cnnkit-batcher", daemon=True)

    def start(self) -> "MicroBatcher":
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def ticket(self) -> "_TicketContext":
        """``with batcher.ticket() as t: ...decode...; job = t.submit(batch)``, then :meth:`wait`."""
        return _TicketContext(self)

    def submit(self, batch: torch.Tensor, fault: bool = False, key: Any = None) -> _Job:
        """Queue ``batch`` to be scored with jobs of the same ``key`` (compared by identity)."""
        return self._enqueue(_Job(batch, fault, key), arrived=False)

    def nudge(self) -> None:
        """Background work was added: the batcher looks at it if idle."""
        with self._cond:
            self._cond.notify_all()

    def _enqueue(self, job: _Job, arrived: bool) -> _Job:
        with self._cond:
            if arrived:
                self._arriving -= 1
            if self._stopping or not self._thread.is_alive():
                raise HttpError(503, "the model is not running (server stopping or failed); retry on another worker")
            self._jobs.append(job)
            self._cond.notify_all()
        return job

    def wait(self, job: _Job, timeout: float) -> torch.Tensor:
        """The job's probabilities; raises its error, or HttpError 503 after ``timeout`` seconds."""
        if not job.done.wait(max(timeout, 0.0)):
            job.cancelled = True
            raise HttpError(503, f"timed out after {timeout:.1f}s waiting for the model; the server is overloaded, retry later")
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _arrive(self, delta: int) -> None:
        with self._cond:
            self._arriving += delta
            self._cond.notify_all()

    def _run(self) -> None:
        if self._warmup is not None:
            try:
                self._warmup()
            except Exception as exc:  # requests will get 500s; /ready says why
                self.failure = f"warm-up failed: {type(exc).__name__}: {exc}"
                log.error(self.failure)
        if self.failure is None:
            self.ready.set()
        while True:
            jobs = self._gather()
            if jobs is None:
                return
            if jobs:
                self._execute(jobs)
            elif self._background is not None and self._background.ready():  # (not: every job popped was cancelled)
                try:
                    self._background.step()
                except Exception:  # background work never stops the batcher
                    log.exception("background work failed")

    def _gather(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs and not self._stopping:
                background = self._background
                if background is None or self._arriving > 0 or not background.pending():
                    self._cond.wait()
                elif background.ready():
                    return []  # idle: time for a step of background work
                else:
                    self._cond.wait(BACKGROUND_POLL_S)
            if not self._jobs:
                return None  # stopping, nothing left
            jobs: list[_Job] = []
            count = 0
            deadline = time.monotonic() + self.max_wait
            while True:
                while self._jobs and (count == 0 or (count + len(self._jobs[0]) <= self.max_batch
                                                     and self._jobs[0].key is jobs[0].key)):
                    job = self._jobs.popleft()
                    if not job.cancelled:
                        jobs.append(job)
                        count += len(job)
                full = count >= self.max_batch or bool(self._jobs)  # a waiting job did not fit (or is another model's)
                # Wait only for requests already being decoded: an idle server answers at once.
                if full or self._arriving <= 0 or self._stopping:
                    return jobs
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return jobs
                self._cond.wait(remaining)

    def _forward(self, batch: torch.Tensor, key: Any) -> torch.Tensor:
        parts = []
        for start in range(0, len(batch), self.max_batch):  # one request may hold more than max_batch
            chunk = batch[start:start + self.max_batch]
            began = time.perf_counter()
            parts.append(self._score(chunk, key))
            if self._on_batch is not None:
                self._on_batch(len(chunk), time.perf_counter() - began, key)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _execute(self, jobs: list[_Job]) -> None:
        try:
            if any(job.fault for job in jobs):
                raise RuntimeError(f"fault injected by the test hook ({TEST_FAULT_HEADER})")
            batch = jobs[0].batch if len(jobs) == 1 else torch.cat([job.batch for job in jobs])
            probs = self._forward(batch, jobs[0].key)
        except Exception as exc:
            if len(jobs) > 1:
                log.warning("a batch of %d requests failed (%s: %s); scoring them one by one",
                            len(jobs), type(exc).__name__, exc)
                for job in jobs:
                    self._execute([job])
                return
            jobs[0].error = exc
            jobs[0].done.set()
            return
        offset = 0
        for job in jobs:
            job.result = probs[offset:offset + len(job)]
            offset += len(job)
            job.done.set()


class _TicketContext:
    def __init__(self, batcher: MicroBatcher):
        self._batcher = batcher
        self._ticket = _Ticket(batcher)

    def __enter__(self) -> _Ticket:
        self._batcher._arrive(+1)
        return self._ticket

    def __exit__(self, *exc: Any) -> None:
        if not self._ticket.submitted:  # gave up before submitting (a bad request)
            self._batcher._arrive(-1)
