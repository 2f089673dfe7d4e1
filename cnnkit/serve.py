"""``cnnkit serve``: an HTTP prediction service with micro-batching, Prometheus metrics and drift.

:func:`create_app` builds the Flask application for one model; :func:`serve` runs it under
gunicorn (``gthread`` workers). Each worker process loads the model once at start-up, after the
fork, sizes torch's intra-op threads to its share of the cores (so workers do not fight over
them), and runs one *micro-batcher* thread: request threads decode and preprocess their images,
the batcher gathers the images of concurrent requests into one forward pass (at most
``max_batch`` images; it waits up to ``max_wait_ms`` for requests that are still being decoded,
and not at all when none are), and hands each request its rows back.

Endpoints::

    POST /predict    multipart field "image" (one or more files), or JSON {"image": "<base64>"} /
                     {"images": ["<base64>", ...]}; top_k in the query string or the body
    GET  /health     liveness: the worker answers
    GET  /ready      readiness: model loaded and warmed up (503 until then)
    GET  /metadata   classes, arch, preprocessing, checkpoint summary, serving limits
    GET  /metrics    Prometheus text format, all workers together (gunicorn multi-process mode)
    GET  /openapi.json  the OpenAPI 3 description of all of the above (``cnnkit/openapi.json``)

Errors are JSON ``{"error": "...", "status": N}``: 400 malformed request (bad JSON or base64, no
image, empty image, bad top_k, a body that ends early or is malformed), 405, 404, 408 a request
that did not arrive within ``timeout`` (a slow or stalled client), 413 body over ``max_bytes``
(whatever Content-Length says, chunked bodies too) or more than ``max_images`` images or too many
multipart parts, 415 wrong content type, 422 an image that cannot be decoded (not an image,
corrupt, truncated, too many pixels, too elongated), 500 internal failure (logged), 503 not ready
or timed out waiting for the model. Under ``cnnkit serve`` (gunicorn with
:class:`BoundedThreadWorker`), errors gunicorn itself answers (a malformed request line or
headers, bad chunked encoding) are JSON too, and reading one request, headers and body, may take
at most ``timeout`` seconds: a client that stalls or trickles bytes holds a request thread no
longer than that.

Test hook, off by default: with ``CNNKIT_SERVE_TEST_HOOKS=1`` in the server's environment, a
request carrying the header ``X-Cnnkit-Test-Fault: model`` makes the model raise while scoring it,
so tests can check that an internal failure is a 500 and the worker goes on serving. Never set it
in production.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import io
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from typing import Any, Callable, Iterator, Sequence

import torch

from .config import ServeConfig
from .drift import SIGNALS, DriftMonitor, check_reference, image_brightness
from .errors import CnnkitError, ConfigError, ImageError, require_extra
from .export import is_onnx_file, model_version
from .transforms import build_transforms, load_image

log = logging.getLogger(__name__)
request_log = logging.getLogger("cnnkit.serve.requests")

TEST_HOOKS_ENV = "CNNKIT_SERVE_TEST_HOOKS"
TEST_FAULT_HEADER = "X-Cnnkit-Test-Fault"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class RequestTimeout(TimeoutError):
    """A client did not send its whole request (headers and body) within the server's timeout."""


class HttpError(Exception):
    """A request the server refuses: becomes a JSON error body with ``status``."""

    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


def error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """Every error's JSON body, whether the app or the gunicorn worker answers."""
    return {"error": message, "status": status, **extra}


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_count(cfg: ServeConfig) -> int:
    """gunicorn workers: as configured, else one per core, up to 4 (each holds a copy of the model).

    Processes rather than threads: a 1-thread forward pass per core keeps every core busy without
    OpenMP threads waiting on one another while request threads decode images.
    """
    return cfg.workers or max(1, min(4, available_cores()))


def torch_threads(cfg: ServeConfig) -> int:
    """Intra-op threads per worker: as configured, else the cores shared among the workers."""
    return cfg.torch_threads or max(1, available_cores() // worker_count(cfg))


# --- micro-batching -----------------------------------------------------------------------


class _Job:
    __slots__ = ("batch", "fault", "done", "result", "error", "cancelled")

    def __init__(self, batch: torch.Tensor, fault: bool):
        self.batch = batch
        self.fault = fault
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

    def submit(self, batch: torch.Tensor, fault: bool = False) -> _Job:
        self.submitted = True  # no longer arriving, even if the batcher refuses the job
        return self._batcher._enqueue(_Job(batch, fault), arrived=True)


class MicroBatcher:
    """Gathers the images of concurrent requests into forward passes of at most ``max_batch``.

    ``score`` maps a batch of preprocessed images to class probabilities; it runs on the
    batcher's own thread only. A batch that fails is retried request by request, so one request
    that makes the model raise does not fail the others it was batched with.
    """

    def __init__(
        self,
        score: Callable[[torch.Tensor], torch.Tensor],
        max_batch: int,
        max_wait_ms: float,
        on_batch: Callable[[int, float], None] | None = None,
        warmup: Callable[[], None] | None = None,
    ):
        self._score = score
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self._on_batch = on_batch
        self._warmup = warmup
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

    def submit(self, batch: torch.Tensor, fault: bool = False) -> _Job:
        return self._enqueue(_Job(batch, fault), arrived=False)

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

    def _gather(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs and not self._stopping:
                self._cond.wait()
            if not self._jobs:
                return None  # stopping, nothing left
            jobs: list[_Job] = []
            count = 0
            deadline = time.monotonic() + self.max_wait
            while True:
                while self._jobs and (count == 0 or count + len(self._jobs[0]) <= self.max_batch):
                    job = self._jobs.popleft()
                    if not job.cancelled:
                        jobs.append(job)
                        count += len(job)
                full = count >= self.max_batch or bool(self._jobs)  # a waiting job did not fit
                # Wait only for requests already being decoded: an idle server answers at once.
                if full or self._arriving <= 0 or self._stopping:
                    return jobs
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return jobs
                self._cond.wait(remaining)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        parts = []
        for start in range(0, len(batch), self.max_batch):  # one request may hold more than max_batch
            chunk = batch[start:start + self.max_batch]
            began = time.perf_counter()
            parts.append(self._score(chunk))
            if self._on_batch is not None:
                self._on_batch(len(chunk), time.perf_counter() - began)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _execute(self, jobs: list[_Job]) -> None:
        try:
            if any(job.fault for job in jobs):
                raise RuntimeError(f"fault injected by the test hook ({TEST_FAULT_HEADER})")
            batch = jobs[0].batch if len(jobs) == 1 else torch.cat([job.batch for job in jobs])
            probs = self._forward(batch)
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


# --- metrics ------------------------------------------------------------------------------


def _multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class Metrics:
    """The server's Prometheus metrics, on a registry of its own.

    Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` is set and every worker writes its values there;
    :meth:`render` then aggregates all workers, whichever one answers ``/metrics``.
    """

    def __init__(self, drift: bool = True) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess_dir = _multiprocess_dir()
        if self.multiprocess_dir and not os.path.isdir(self.multiprocess_dir):
            raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR is not a folder: {self.multiprocess_dir}")
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cnnkit_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("cnnkit_request_duration_seconds", "HTTP request latency by endpoint.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("cnnkit_batch_size", "Images per forward pass.", buckets=BATCH_BUCKETS, registry=r)
        self.forward = Histogram("cnnkit_forward_duration_seconds", "Duration of one forward pass.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("cnnkit_images", "Images scored.", registry=r)
        self.predicted = Counter("cnnkit_predicted_class", "Top-1 predictions by class label.", ["label"], registry=r)
        self.confidence = Histogram("cnnkit_prediction_confidence", "Top-1 probability of each scored image.",
                                    buckets=CONFIDENCE_BUCKETS, registry=r)
        if drift:  # only for a model with reference statistics: otherwise the drift metrics are absent
            self.drift = Gauge("cnnkit_drift_psi",
                               "Population-stability index of a worker's recent images against the model's "
                               "validation-set reference, by signal (the highest over live workers).",
                               ["signal"], multiprocess_mode="livemax", registry=r)
            self.drift_window = Gauge("cnnkit_drift_window_images",
                                      "Images in a worker's drift window (highest over workers).",
                                      multiprocess_mode="livemax", registry=r)
        self.model_info = Gauge("cnnkit_model_info", "The model served (value 1).", ["model_version", "arch", "backend"],
                                multiprocess_mode="livemax", registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self.multiprocess_dir:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --- the model service (one per worker) ---------------------------------------------------


class ModelService:
    """One worker's model, batcher, metrics and drift monitor; what the Flask routes call."""

    def __init__(self, cfg: ServeConfig):
        from .predict import Predictor

        self.cfg = cfg
        self.worker = os.getpid()
        self.torch_threads = torch_threads(cfg)
        torch.set_num_threads(self.torch_threads)  # before the model (and ONNX Runtime) is set up
        self.predictor = Predictor(cfg.checkpoint, cfg.device, cfg.category_names)
        ckpt = self.predictor.checkpoint
        self.backend = "onnxruntime" if getattr(self.predictor, "backend", None) is not None else "torch"
        self.model_version = model_version(cfg.checkpoint)
        self.max_pixels = min(cfg.max_pixels, ckpt.preprocess.max_pixels)
        self.transform = build_transforms(dataclasses.replace(ckpt.preprocess, max_pixels=self.max_pixels), train=False)
        self.test_hooks = os.environ.get(TEST_HOOKS_ENV) == "1"
        if self.test_hooks:
            log.warning("%s=1: test fault injection is ON (header %s); never use this in production",
                        TEST_HOOKS_ENV, TEST_FAULT_HEADER)
        reference = check_reference(getattr(ckpt, "reference_stats", None), len(self.predictor.classes))
        self.drift = DriftMonitor(reference, cfg.drift_window) if reference is not None else None
        self.metrics = Metrics(drift=self.drift is not None)
        self.metrics.model_info.labels(self.model_version, ckpt.arch, self.backend).set(1)
        self._drift_updated = 0.0
        self._drift_reported = False
        self._drift_lock = threading.Lock()
        size = ckpt.preprocess.image_size
        self.batcher = MicroBatcher(
            self._score,
            cfg.max_batch,
            cfg.max_wait_ms,
            on_batch=self._on_batch,
            warmup=lambda: self._score(torch.zeros(1, 3, size, size)),
        ).start()

    def _score(self, batch: torch.Tensor) -> torch.Tensor:
        return self.predictor.probabilities(batch)

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.forward.observe(seconds)

    def close(self) -> None:
        self.batcher.stop()

    # -- /predict --

    def prepare(self, blobs: Sequence[tuple[str | None, bytes]]) -> torch.Tensor:
        """Decode and preprocess request images (in the request's thread) into one batch."""
        tensors = []
        for index, (name, data) in enumerate(blobs):
            which = _which(index, name, len(blobs))
            if not data:
                raise HttpError(400, f"{which} is empty", index=index)
            try:
                image = load_image(io.BytesIO(data), self.max_pixels)
                tensors.append(self.transform(image))
            except ImageError as exc:
                raise HttpError(422, f"{which}: {exc}", index=index) from None
        return torch.stack(tensors)

    def respond(self, blobs: Sequence[tuple[str | None, bytes]], batch: torch.Tensor, probs: torch.Tensor,
                top_k: int, started: float) -> dict[str, Any]:
        k = min(top_k, len(self.predictor.classes))
        values, indices = probs.topk(k, dim=1)
        classes, names = self.predictor.classes, self.predictor.names
        results = []
        for index, ((name, _), row_p, row_i) in enumerate(zip(blobs, values.tolist(), indices.tolist())):
            item: dict[str, Any] = {"index": index}
            if name is not None:
                item["filename"] = name
            item["predictions"] = [
                {"label": classes[i], "name": names.get(classes[i], classes[i]), "probability": round(p, 6)}
                for p, i in zip(row_p, row_i)
            ]
            results.append(item)
        self._observe(batch, values[:, 0], indices[:, 0])
        return {
            "model_version": self.model_version,
            "top_k": k,
            "results": results,
            "time_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    def _observe(self, batch: torch.Tensor, confidence: torch.Tensor, top1: torch.Tensor) -> None:
        m = self.metrics
        m.images.inc(len(top1))
        for label_index, p in zip(top1.tolist(), confidence.tolist()):
            m.predicted.labels(self.predictor.classes[label_index]).inc()
            m.confidence.observe(p)
        if self.drift is None:
            return
        self.drift.add(top1.tolist(), confidence.tolist(), image_brightness(batch).tolist())
        now = time.monotonic()
        with self._drift_lock:  # PSI over the window: at most once a second once it is reported
            if self._drift_reported and now - self._drift_updated < 1.0:
                return
            self._drift_updated = now
        values = self.drift.psi()
        for signal, value in values.items():
            m.drift.labels(signal).set(value)
        m.drift_window.set(len(self.drift))
        self._drift_reported = self._drift_reported or bool(values)

    # -- /metadata, /ready --

    def metadata(self) -> dict[str, Any]:
        ckpt = self.predictor.checkpoint
        reference = self.drift.reference if self.drift is not None else None
        return {
            "model_version": self.model_version,
            "model_file": os.path.basename(self.cfg.checkpoint),
            "format": "onnx" if self.backend == "onnxruntime" else "checkpoint",
            "backend": self.backend,
            "arch": ckpt.arch,
            "num_classes": len(self.predictor.classes),
            "classes": [{"index": i, "label": c, "name": self.predictor.names.get(c, c)}
                        for i, c in enumerate(self.predictor.classes)],
            "preprocess": ckpt.preprocess.to_dict(),
            "calibration": dict(getattr(ckpt, "calibration", {}) or {}),
            "summary": dict(ckpt.summary),
            "versions": dict(ckpt.versions),
            "drift": {
                "reference": reference is not None,
                "reference_images": reference.get("images") if reference else None,
                "window": self.cfg.drift_window,
                "signals": list(SIGNALS) if reference else [],
            },
            "serving": {
                "worker": self.worker,
                "torch_threads": self.torch_threads,
                "max_batch": self.cfg.max_batch,
                "max_wait_ms": self.cfg.max_wait_ms,
                "max_bytes": self.cfg.max_bytes,
                "max_images": self.cfg.max_images,
                "max_pixels": self.max_pixels,
                "timeout_s": self.cfg.timeout,
                "default_top_k": self.cfg.top_k,
            },
        }

    def readiness(self) -> tuple[bool, str]:
        if self.batcher.failure:
            return False, self.batcher.failure
        if not self.batcher.alive:
            return False, "the batcher thread is not running"
        if not self.batcher.ready.is_set():
            return False, "warming up"
        return True, "ready"


def _which(index: int, name: str | None, count: int) -> str:
    if name:
        return f"image {index} ({name})" if count > 1 else f"image {name}"
    return f"image {index}" if count > 1 else "the image"


# --- request parsing ----------------------------------------------------------------------


def _parse_top_k(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise HttpError(400, f"top_k must be a positive integer, got {json.dumps(value)}")
    try:
        k = int(value)
    except ValueError:
        raise HttpError(400, f"top_k must be a positive integer, got {value!r}") from None
    if k < 1:
        raise HttpError(400, f"top_k must be at least 1, got {k}")
    return k


def _decode_base64(value: Any, index: int, count: int) -> bytes:
    which = _which(index, None, count)
    if not isinstance(value, str):
        raise HttpError(400, f"{which} must be a base64 string, got {type(value).__name__}", index=index)
    if value.startswith("data:") and "," in value:  # a data URL: data:image/png;base64,....
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(400, f"{which} is not valid base64", index=index) from None


def _read_body(read: Callable[[], Any], timeout: float) -> Any:
    """``read()`` (what reads the request body), with a client's failure to send it as a 4xx.

    A body that stops arriving within the timeout is a 408; one that ends early, or whose chunked
    encoding is malformed, a 400 (gunicorn raises its own exceptions for those, and werkzeug turns
    socket errors into ClientDisconnected), never a 500.
    """
    from werkzeug.exceptions import HTTPException

    late = f"the request body did not arrive within {timeout:g} s (--timeout); send it faster or in one go"
    try:
        return read()
    except RequestTimeout:
        raise HttpError(408, late) from None
    except HTTPException as exc:
        cause = exc.__context__
        if isinstance(cause, RequestTimeout):
            raise HttpError(408, late) from None
        if exc.code == 400:  # werkzeug's ClientDisconnected: the stream failed or ended early
            detail = f": {type(cause).__name__}: {cause}" if cause is not None else ""
            raise HttpError(400, f"the request body ended early or could not be read{detail}") from None
        raise  # 413: the body limit
    except Exception as exc:
        if isinstance(exc, OSError) or type(exc).__module__.startswith("gunicorn.http"):
            raise HttpError(400, f"the request body could not be read: {type(exc).__name__}: {exc}") from None
        raise


def parse_predict_request(request: Any, cfg: ServeConfig) -> tuple[list[tuple[str | None, bytes]], int]:
    """``([(filename or None, bytes), ...], top_k)`` from a Flask request, or HttpError."""
    mimetype = request.mimetype or ""
    query_k = request.args.get("top_k")
    if mimetype == "multipart/form-data":
        files = _read_body(lambda: request.files, cfg.timeout).getlist("image")
        if not files:
            if request.form.getlist("image"):
                raise HttpError(400, "the multipart field 'image' is text, not a file: send it with a filename "
                                     "(-F image=@photo.jpg)")
            raise HttpError(400, "no file in the multipart field 'image' (send -F image=@photo.jpg)")
        if len(files) > cfg.max_images:
            raise HttpError(413, f"too many images in one request: {len(files)} (limit {cfg.max_images})")
        blobs = [(f.filename or None, f.read()) for f in files]
        return blobs, _parse_top_k(request.form.get("top_k", query_k), cfg.top_k)
    if mimetype == "application/json" or mimetype.endswith("+json"):
        raw = _read_body(lambda: request.get_data(cache=False), cfg.timeout)
        if request.content_length is None and len(raw) >= cfg.max_bytes and _read_body(
                lambda: request.environ["wsgi.input"].read(1), cfg.timeout):
            # A streamed (chunked) body: werkzeug stops reading at the limit and returns what it
            # read, silently cut; one more byte means the body was over it.
            raise HttpError(413, f"request body too large (limit {cfg.max_bytes:,} bytes, --max-bytes)")
        try:
            body = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
            raise HttpError(400, f"malformed JSON: {exc}") from None
        except RecursionError:
            raise HttpError(400, "malformed JSON: nested too deeply") from None
        if not isinstance(body, dict):
            raise HttpError(400, 'the JSON body must be an object: {"image": "<base64>"} or {"images": [...]}')
        if "image" in body and "images" in body:
            raise HttpError(400, 'give either "image" or "images", not both')
        if "images" in body:
            values = body["images"]
            if not isinstance(values, list) or not values:
                raise HttpError(400, '"images" must be a non-empty list of base64 strings')
        elif "image" in body:
            values = [body["image"]]
        else:
            raise HttpError(400, 'the JSON body has no "image" (base64 string) or "images" (list of them)')
        if len(values) > cfg.max_images:
            raise HttpError(413, f"too many images in one request: {len(values)} (limit {cfg.max_images})")
        blobs = [(None, _decode_base64(v, i, len(values))) for i, v in enumerate(values)]
        return blobs, _parse_top_k(body.get("top_k", query_k), cfg.top_k)
    shown = mimetype or "none"
    raise HttpError(415, f"unsupported content type {shown}: send multipart/form-data with an 'image' "
                         "file field, or application/json with a base64 'image' or 'images'")


# --- the Flask application ----------------------------------------------------------------


def openapi_spec(cfg: ServeConfig | None = None) -> dict[str, Any]:
    """The OpenAPI 3 description of the server (``cnnkit/openapi.json``), as ``GET /openapi.json``
    serves it: with cnnkit's version, and ``cfg``'s image limit when given."""
    from importlib import resources

    from . import __version__

    spec = json.loads(resources.files(__package__).joinpath("openapi.json").read_text(encoding="utf-8"))
    spec["info"]["version"] = __version__
    if cfg is not None:
        schemas = spec["components"]["schemas"]
        schemas["MultipartPredictRequest"]["properties"]["image"]["maxItems"] = cfg.max_images
        schemas["JsonPredictRequest"]["oneOf"][1]["properties"]["images"]["maxItems"] = cfg.max_images
    return spec


def _setup_logging() -> None:
    """Request lines go to stderr as bare JSON objects, whatever formats the rest of cnnkit's log;
    their level threshold is the ``cnnkit`` logger's (INFO unless something configured it)."""
    logger = logging.getLogger("cnnkit")
    if logger.level == logging.NOTSET and not logger.handlers:  # plain gunicorn: nothing set up
        logger.setLevel(logging.INFO)
    if not any(getattr(h, "cnnkit_json", False) for h in request_log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.cnnkit_json = True  # type: ignore[attr-defined]
        request_log.addHandler(handler)
    request_log.propagate = False


def create_app(checkpoint: str | os.PathLike[str], config: ServeConfig | None = None, **options: Any):
    """The Flask application serving ``checkpoint`` (a checkpoint or an exported ``.onnx``).

    ``config`` (or ``options``, as ServeConfig fields) sets batching and limits. The model is
    loaded here, once: under gunicorn this runs in each worker after the fork. It sets torch's
    intra-op thread count for the process (``torch_threads``). The app's :class:`ModelService` is
    ``app.extensions["cnnkit"]`` (call its ``close()`` when done in-process).
    """
    require_extra("serve", "flask", "prometheus_client")
    from flask import Flask, Response, g, jsonify, request
    from werkzeug.exceptions import HTTPException

    if config is None:
        cfg = ServeConfig(checkpoint=os.fspath(checkpoint), **options)
    else:
        cfg = dataclasses.replace(config, checkpoint=os.fspath(checkpoint), **options)
    _setup_logging()
    service = ModelService(cfg)
    spec = openapi_spec(cfg)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["cnnkit"] = service

    def error_response(status: int, message: str, **extra: Any) -> Response:
        g.error = message
        response = jsonify(error_body(status, message, **extra))
        response.status_code = status
        return response

    @app.errorhandler(HttpError)
    def _http_error(exc: HttpError) -> Response:
        return error_response(exc.status, exc.message, **exc.extra)

    @app.errorhandler(HTTPException)
    def _werkzeug_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            length = request.content_length
            if length is not None and length <= cfg.max_bytes:  # the multipart parser's own limits
                parts, memory = app.config.get("MAX_FORM_PARTS"), app.config.get("MAX_FORM_MEMORY_SIZE")
                limits = f" (at most {parts} parts, text fields up to {memory:,} bytes)" if parts and memory else ""
                return error_response(413, f"the multipart body has too many parts or too large a text field{limits}")
            return error_response(413, f"request body too large (limit {cfg.max_bytes:,} bytes, --max-bytes)")
        return error_response(status, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _internal_error(exc: Exception) -> Response:
        g.traceback = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.before_request
    def _start() -> None:
        g.started = time.perf_counter()

    @app.after_request
    def _finish(response: Response) -> Response:
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        service.metrics.latency.labels(endpoint).observe(seconds)
        response.headers["X-Model-Version"] = service.model_version
        record: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "event": "request",
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "ms": round(seconds * 1000, 2),
            "worker": service.worker,
        }
        if g.get("images") is not None:
            record["images"] = g.images
        if g.get("error"):
            record["error"] = g.error
        if g.get("traceback"):
            record["traceback"] = g.traceback
        line = json.dumps(record, ensure_ascii=False)
        if response.status_code >= 500 and request.path != "/ready":
            request_log.error(line)
        elif request.path == "/predict" or response.status_code >= 400:
            request_log.info(line)
        else:
            request_log.debug(line)
        return response

    @app.post("/predict")
    def predict() -> Response:
        started = g.started
        fault = service.test_hooks and request.headers.get(TEST_FAULT_HEADER) == "model"
        with service.batcher.ticket() as ticket:
            blobs, top_k = parse_predict_request(request, cfg)
            g.images = len(blobs)
            batch = service.prepare(blobs)
            job = ticket.submit(batch, fault)
        probs = service.batcher.wait(job, cfg.timeout - (time.perf_counter() - started))
        return jsonify(service.respond(blobs, batch, probs, top_k, started))

    @app.get("/health")
    def health() -> Response:
        return jsonify({"status": "ok", "worker": service.worker})

    @app.get("/ready")
    def ready() -> Response:
        ok, reason = service.readiness()
        response = jsonify({"ready": ok, "reason": reason, "model_version": service.model_version,
                            "worker": service.worker})
        response.status_code = 200 if ok else 503
        return response

    @app.get("/metadata")
    def metadata() -> Response:
        return jsonify(service.metadata())

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, content_type=content_type)

    @app.get("/openapi.json")
    def openapi() -> Response:
        return jsonify(spec)

    return app


# --- gunicorn -----------------------------------------------------------------------------


FIRST_BYTES_WAIT = 0.05  # seconds a new connection may take to send its first bytes before it is parked
ACCEPT_DELAY_PER_CONNECTION = 0.001  # seconds; see BoundedThreadWorker.accept


class _HeaderTimeout(Exception):
    """The request line and headers did not arrive in time (the worker answers 408 itself)."""


class _DeadlineSocket:
    """A client connection whose reads share one deadline per request.

    gunicorn's gthread worker reads a request's line, headers and body with blocking reads and no
    timeout: a client that sends part of a request and stalls, or trickles it a byte at a time,
    holds a request thread until it disconnects, and a few dozen such clients stop the server.
    :class:`BoundedThreadWorker` arms this wrapper for each request: its first read starts the
    clock, and every read waits at most what is left of ``limit`` seconds, then raises. Anything
    else is the socket's own (``__getattr__``); reads for which gunicorn set a timeout itself
    (draining an unread body, closing) are left alone.
    """

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._limit: float | None = None
        self._deadline: float | None = None
        self.reading_body = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def arm(self, limit: float) -> None:
        self._limit, self._deadline, self.reading_body = limit, None, False

    def disarm(self) -> None:
        self._limit = self._deadline = None

    def recv(self, size: int, *flags: int) -> bytes:
        if self._limit is None or self._sock.gettimeout() is not None:
            return self._sock.recv(size, *flags)
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._limit
        remaining = self._deadline - now
        if remaining > 0:
            self._sock.settimeout(remaining)
            try:
                return self._sock.recv(size, *flags)
            except TimeoutError:  # socket.timeout
                pass
            finally:
                self._sock.settimeout(None)
        message = f"the request did not arrive within {self._limit:g} s (--timeout)"
        raise RequestTimeout(message) if self.reading_body else _HeaderTimeout(message)


class _CapturedSocket:
    """Stands in for a client socket to capture the error response gunicorn would write."""

    def __init__(self) -> None:
        self.data = b""

    def gettimeout(self) -> float:
        return 0.0

    def setblocking(self, flag: bool) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.data += data


@functools.cache
def _bounded_worker_class() -> type:
    """:class:`BoundedThreadWorker`, defined on first use (gunicorn is an optional extra)."""
    from gunicorn import util as gunicorn_util
    from gunicorn.workers import gthread
    from gunicorn.workers.gthread import ThreadWorker

    # gunicorn >= 25 gives a new connection's first bytes 5 s in a request thread before it parks
    # the connection in its poller (returning this sentinel): clients that connect and send
    # nothing would hold the threads, 5 s each. They get a moment here, then the poller waits.
    defer = getattr(gthread, "_DEFER", None)

    def write_json_error(sock: Any, status: int, reason: str, message: str, model: str | None) -> None:
        body = json.dumps(error_body(status, message)).encode()
        head = [f"HTTP/1.1 {status} {reason}", "Connection: close", "Content-Type: application/json",
                f"Content-Length: {len(body)}"]
        if model:
            head.append(f"X-Model-Version: {model}")
        gunicorn_util.write_nonblock(sock, ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)

    class BoundedThreadWorker(ThreadWorker):
        """gunicorn's gthread worker with a deadline on reading each request, and JSON errors.

        Reading a request, line, headers and body, may take at most the app's ``timeout``
        (``--timeout``) seconds: a slow or stalled client gets a 408 and its connection is closed,
        so it holds a request thread that long at most. Errors gunicorn answers itself (a
        malformed request line or header, bad chunked encoding, headers too large, the 408) get
        the app's JSON body ``{"error": ..., "status": N}`` instead of gunicorn's HTML page.
        New connections go preferably to the least busy worker (:meth:`accept`).
        """

        def _service(self) -> ModelService | None:
            extensions = getattr(getattr(self, "wsgi", None), "extensions", None)
            return extensions.get("cnnkit") if isinstance(extensions, dict) else None

        @property
        def read_timeout(self) -> float:
            service = self._service()
            return float(service.cfg.timeout) if service is not None else ServeConfig.timeout

        def accept(self, listener: Any) -> None:
            # Every worker's poller wakes for a new connection and the first to call accept()
            # takes it, however many requests it already holds: an unlucky worker then batches
            # more images per forward pass than the others, and its requests make the latency
            # tail. A worker holding connections waits a moment per connection first, so the
            # least busy one usually wins (what nginx's accept_mutex does by lock instead).
            if self.nr_conns and self.cfg.workers > 1:
                time.sleep(ACCEPT_DELAY_PER_CONNECTION * min(self.nr_conns, 10))
            super().accept(listener)

        def handle(self, conn: Any) -> Any:
            if (defer is not None and not getattr(conn, "initialized", True) and not getattr(conn, "data_ready", True)
                    and not conn.wait_for_data(FIRST_BYTES_WAIT)):
                return defer  # silent so far: wait in the poller (up to --keepalive), not in a thread
            if self.cfg.is_ssl:  # the TLS layer must wrap the real socket
                return super().handle(conn)
            if not isinstance(conn.sock, _DeadlineSocket):
                conn.sock = _DeadlineSocket(conn.sock)  # before the connection's parser is made
            sock = conn.sock
            sock.arm(self.read_timeout)
            try:
                return super().handle(conn)
            finally:
                sock.disarm()

        def handle_request(self, req: Any, conn: Any) -> Any:
            if isinstance(conn.sock, _DeadlineSocket):
                conn.sock.reading_body = True  # a timeout now surfaces in the app, as a 408
            return super().handle_request(req, conn)

        def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
            service = self._service()
            model = service.model_version if service is not None else None
            if isinstance(exc, (_HeaderTimeout, RequestTimeout)):
                self.log.info("Request timeout from %s: %s", (addr or ("",))[0], exc)
                try:
                    write_json_error(client, 408, "Request Timeout", f"{exc}; the connection is closed", model)
                except Exception:
                    self.log.debug("Failed to send the 408.")
                return
            captured = _CapturedSocket()
            super().handle_error(req, captured, addr, exc)  # logs, and picks the status
            try:
                _, code, reason = captured.data.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
                status = int(code)
            except ValueError:
                return
            message = f"{reason}: {exc}" if status < 500 else "internal error (logged)"
            try:
                write_json_error(client, status, reason, message, model)
            except Exception:
                self.log.debug("Failed to send error message.")

    BoundedThreadWorker.__module__ = __name__
    return BoundedThreadWorker


def __getattr__(name: str) -> Any:
    if name == "BoundedThreadWorker":  # "cnnkit.serve.BoundedThreadWorker" for gunicorn's worker_class
        return _bounded_worker_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def gunicorn_options(cfg: ServeConfig) -> dict[str, Any]:
    """gunicorn settings for ``cfg`` (on top of those in :mod:`cnnkit.gunicorn_conf`)."""
    host = f"[{cfg.host}]" if ":" in cfg.host and not cfg.host.startswith("[") else cfg.host
    options: dict[str, Any] = {
        "bind": [f"{host}:{cfg.port}"],
        "workers": worker_count(cfg),
        "threads": cfg.threads,
        # A worker whose main loop is silent this long is restarted; requests time out before.
        "timeout": int(max(30, 2 * cfg.timeout)),
        "graceful_timeout": int(max(10, cfg.timeout)),
        "errorlog": "-",
        "loglevel": "info" if logging.getLogger("cnnkit").getEffectiveLevel() <= logging.INFO else "warning",
        "proc_name": "cnnkit-serve",
        "preload_app": False,
        "control_socket_disable": True,  # gunicorn >= 25: one shared control socket would clash between servers
    }
    if os.path.isdir("/dev/shm"):
        options["worker_tmp_dir"] = "/dev/shm"  # heartbeat files off slow or overlay disks
    return options


def _check_model(cfg: ServeConfig) -> str:
    """Fail fast, in the master, on a model file the workers could not load; a one-line summary.

    Reads metadata only: no torch computation happens before gunicorn forks its workers.
    """
    from .data import load_category_names

    if is_onnx_file(cfg.checkpoint):
        require_extra("export", "onnx", "onnxruntime")
        from .export import checkpoint_from_metadata, read_metadata

        ckpt = checkpoint_from_metadata(read_metadata(cfg.checkpoint), cfg.checkpoint)
        kind = "ONNX model"
    else:
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(cfg.checkpoint)
        kind = "checkpoint"
    if cfg.category_names:
        load_category_names(cfg.category_names, ckpt.classes)
    drift = "with" if getattr(ckpt, "reference_stats", None) else "without"
    return f"{kind} {cfg.checkpoint}: {ckpt.arch}, {len(ckpt.classes)} classes, {drift} drift reference"


def _check_port(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or --host") from None


def serve(cfg: ServeConfig) -> None:
    """Run the server in the foreground until stopped (SIGTERM: graceful, requests in flight finish; Ctrl-C: at once)."""
    require_extra("serve", "flask", "gunicorn", "prometheus_client")
    from gunicorn.app.base import BaseApplication

    summary = _check_model(cfg)
    _check_port(cfg.host, cfg.port)

    class Application(BaseApplication):
        def load_config(self) -> None:
            from . import gunicorn_conf

            settings = {k: v for k, v in vars(gunicorn_conf).items() if not k.startswith("_")}
            for key, value in {**settings, **gunicorn_options(cfg)}.items():
                if key in self.cfg.settings:  # as gunicorn's -c: names that are not settings are skipped
                    self.cfg.set(key, value)

        def load(self):
            try:
                return create_app(cfg.checkpoint, cfg)
            except CnnkitError as exc:
                log.error("cannot load the model: %s", exc)
                raise SystemExit(4) from None  # gunicorn: "App failed to load", the master stops

    metrics_dir = tempfile.mkdtemp(prefix="cnnkit-metrics-")
    previous = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client in the workers
    log.info(
        "serving %s on http://%s:%d with %d worker(s) x %d threads, %d torch thread(s) per worker, "
        "batches of up to %d (wait up to %g ms)",
        summary, cfg.host, cfg.port, worker_count(cfg), cfg.threads, torch_threads(cfg), cfg.max_batch, cfg.max_wait_ms,
    )
    try:
        Application().run()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise CnnkitError(f"the server stopped with an error (gunicorn exit status {exc.code}); see the log above") from None
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        if previous is None:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        else:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = previous


def iter_metric_samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` for each sample of a Prometheus text exposition (for tests, tools)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, dict(sample.labels), float(sample.value)
