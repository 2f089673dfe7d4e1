"""The model's side of serving, one :class:`ModelService` per worker: image bytes in, a plain
dict out (decode → batch → predict → encode), with metrics and drift observed on the way.

No HTTP here: the Flask app (:mod:`cnnkit.serve.app`) parses requests and turns the dicts and
:class:`~cnnkit.serve.parsing.HttpError` into responses.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from contextlib import ExitStack
from typing import Any, Callable, NoReturn, Sequence

import torch

from ..config import ServeConfig
from ..data.transforms import load_image
from ..drift import SIGNALS, image_brightness, reference_confidence_mean
from ..errors import CnnkitError, ImageError
from ..models.exported import model_version
from ..runtime import release_memory
from .admission import Admission
from .batcher import MicroBatcher
from .control import publish_model, published_model, tell_workers
from .metrics import Metrics
from .model import ServedModel, load_served_model, model_file
from .parsing import TEST_FAULT_HEADER, HttpError, which_image
from .sizing import torch_threads

log = logging.getLogger(__name__)

TEST_HOOKS_ENV = "CNNKIT_SERVE_TEST_HOOKS"  # "1" turns the test hook on (see cnnkit.serve); never in production
TEST_SLOW_ENV = "CNNKIT_SERVE_TEST_SLOW_MS"  # with the hooks on: every forward pass takes this much longer
RATE_BATCH = 4  # images per pass when the warm-up measures the forward-pass rate
RELEASE_DELAY_S = 5.0  # after a reload: when the old model's memory is handed back


def first_model(cfg: ServeConfig) -> ServedModel:
    """The model a reload published, for a worker started after it (cnnkit.serve.control), or
    the configured one; the configured one too if the published file is gone or broken."""
    published = published_model()
    if published is not None:
        try:
            return load_served_model(cfg, published, check=False)
        except CnnkitError as exc:
            log.error("worker %d: cannot load %s, the model a reload named (%s); serving %s",
                      os.getpid(), published, exc, cfg.checkpoint)
    return load_served_model(cfg, cfg.checkpoint, check=False)


class ModelService:
    """One worker's model, batcher, admission, metrics and drift monitor; what the Flask routes call.

    The model's side of serving, with no HTTP in it: :meth:`predict` takes a request's image
    bytes and returns its answer as a plain dict, or raises :class:`HttpError`. The batcher and
    the metrics are parts of their own, made by ``batcher`` and ``metrics`` (the classes by
    default), so either can be swapped without touching the service. :meth:`reload` swaps the
    model (:class:`~cnnkit.serve.model.ServedModel`) between requests.
    """

    def __init__(self, cfg: ServeConfig, *, batcher: Callable[..., MicroBatcher] = MicroBatcher,
                 metrics: Callable[..., Metrics] = Metrics):
        self.cfg = cfg
        self.worker = os.getpid()
        self.torch_threads = torch_threads(cfg)
        torch.set_num_threads(self.torch_threads)  # before the model (and ONNX Runtime) is set up
        self.model: ServedModel = first_model(cfg)
        self.test_hooks = os.environ.get(TEST_HOOKS_ENV) == "1"
        self.slow = float(os.environ.get(TEST_SLOW_ENV, "0") or 0) / 1000 if self.test_hooks else 0.0
        if self.test_hooks:
            log.warning("%s=1: test fault injection is ON (header %s); never use this in production",
                        TEST_HOOKS_ENV, TEST_FAULT_HEADER)
        self.metrics = metrics(drift=self.model.drift is not None)
        self.metrics.workers_ready.set(0)  # 1 once warmed up (_warm_up)
        self._show(self.model, None)
        self.admission = Admission(cfg.max_queue, cfg.queue_target_ms, on_shed=self.metrics.shed.inc)
        self._drift_updated = 0.0
        self._drift_reported = False
        self._drift_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self.batcher = batcher(self._score, cfg.max_batch, cfg.max_wait_ms, on_batch=self._on_batch,
                               warmup=self._warm_up).start()

    @property
    def model_version(self) -> str:
        return self.model.version

    def _warm_up(self) -> None:
        self.model.check()
        self._calibrate(self.model)
        self.metrics.workers_ready.set(1)  # (a failed warm-up raises first: the worker stays unready)

    def _calibrate(self, model: ServedModel) -> None:
        """The --max-queue bound from ``model``'s forward-pass rate (at start-up and each reload)."""
        self.admission.calibrate(model.images_per_second(min(RATE_BATCH, self.cfg.max_batch)))
        log.info("worker %d: %.1f images/s per forward pass; holds at most %d images (%s)", self.worker,
                 self.admission.rate, self.admission.max_queue,
                 "--max-queue" if self.cfg.max_queue else f"what it clears in --queue-target-ms {self.cfg.queue_target_ms:g}")
        self.metrics.max_queue.set(self.admission.max_queue or 0)

    def _score(self, batch: torch.Tensor, model: ServedModel | None) -> torch.Tensor:
        if self.slow:
            time.sleep(self.slow)
        return (model or self.model).score(batch)

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.forward.observe(seconds)

    def _show(self, model: ServedModel, previous: ServedModel | None) -> None:
        info = self.metrics.model_info
        if previous is not None:
            info.labels(previous.version, previous.checkpoint.arch, previous.backend).set(0)
        info.labels(model.version, model.checkpoint.arch, model.backend).set(1)
        if model.drift is not None and self.metrics.has_drift:
            self.metrics.reference_confidence.set(reference_confidence_mean(model.drift.reference))

    def close(self) -> None:
        self.batcher.stop()

    # -- /predict --

    def predict(self, read: Callable[[], tuple[list[tuple[str | None, bytes]], int]], started: float,
                fault: bool = False) -> dict[str, Any]:
        """One request, decode → batch → predict → encode: its answer, or HttpError.

        ``read()`` reads and parses the request into ``([(filename or None, bytes), ...], top_k)``.
        It runs holding a batcher ticket, as the decoding does, so a forward pass that starts
        meanwhile waits for this request's images (up to ``max_wait_ms``). A worker that holds
        its ``max_queue`` images refuses the request once parsed, before decoding it (503 with
        Retry-After). ``started`` is the request's ``time.perf_counter()`` on arrival: the
        timeout and ``time_ms`` count from it. ``fault`` is the test hook's (the model raises
        while scoring this request). The model is the one served when the request arrived.
        """
        model = self.model
        with ExitStack() as holding:
            with self.batcher.ticket() as ticket:
                blobs, top_k = read()
                holding.enter_context(self.admission.admit(len(blobs)))
                batch = self.prepare(blobs, model)
                job = ticket.submit(batch, fault, model)
            try:
                probs = self.batcher.wait(job, self.cfg.timeout - (time.perf_counter() - started))
            except HttpError as exc:
                if exc.status == 503:  # timed out (or stopping): when to come back
                    exc.headers.setdefault("Retry-After", str(self.admission.retry_after()))
                raise
        return self.respond(blobs, batch, probs, top_k, started, model)

    def prepare(self, blobs: Sequence[tuple[str | None, bytes]], model: ServedModel | None = None) -> torch.Tensor:
        """Decode and preprocess request images (in the request's thread) into one batch."""
        model = model or self.model
        tensors = []
        for index, (name, data) in enumerate(blobs):
            which = which_image(index, name, len(blobs))
            if not data:
                raise HttpError(400, f"{which} is empty", index=index)
            try:
                image = load_image(io.BytesIO(data), model.max_pixels)
                tensors.append(model.transform(image))
            except ImageError as exc:
                raise HttpError(422, f"{which}: {exc}", index=index) from None
        return torch.stack(tensors)

    def respond(self, blobs: Sequence[tuple[str | None, bytes]], batch: torch.Tensor, probs: torch.Tensor,
                top_k: int, started: float, model: ServedModel | None = None) -> dict[str, Any]:
        model = model or self.model
        predictor = model.predictor
        k = min(top_k, len(predictor.classes))
        values, indices = probs.topk(k, dim=1)
        classes, names = predictor.classes, predictor.names
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
        self._observe(model, batch, values[:, 0], indices[:, 0])
        return {
            "model_version": model.version,
            "top_k": k,
            "results": results,
            "time_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    def _observe(self, model: ServedModel, batch: torch.Tensor, confidence: torch.Tensor, top1: torch.Tensor) -> None:
        m = self.metrics
        m.images.inc(len(top1))
        for label_index, p in zip(top1.tolist(), confidence.tolist()):
            m.predicted.labels(model.classes[label_index]).inc()
            m.confidence.observe(p)
        drift = model.drift
        if drift is None or not m.has_drift:
            return
        drift.add(top1.tolist(), confidence.tolist(), image_brightness(batch).tolist())
        now = time.monotonic()
        with self._drift_lock:  # PSI over the window: at most once a second once it is reported
            if self._drift_reported and now - self._drift_updated < 1.0:
                return
            self._drift_updated = now
        values = drift.psi()
        for signal, value in values.items():
            m.drift.labels(signal).set(value)
        m.drift_window.set(len(drift))
        self._drift_reported = self._drift_reported or bool(values)

    # -- /admin/reload, SIGHUP --

    def reload(self, path: str | None = None, *, tell: bool = True) -> dict[str, Any]:
        """Load ``path`` (default: the file served now, changed on disk), check it and swap it in
        between requests; with ``tell``, then have every other worker do the same.

        The new model must have the same classes. If it fails to load or check, the old one goes
        on serving and :class:`HttpError` 422 says why (nothing changed). Requests already being
        served finish on the model they began with.
        """
        with self._reload_lock:
            previous = self.model
            try:
                target = model_file(path) if path else previous.path
                if not os.path.isfile(target):  # (a device such as /dev/zero would be read forever)
                    return self._reload_failed(target, "no such file (give a checkpoint or an exported .onnx)")
                version = model_version(target)
            except CnnkitError as exc:
                return self._reload_failed(path or previous.path, str(exc))
            except OSError as exc:
                return self._reload_failed(path or previous.path, f"cannot read it: {exc.strerror or exc}")
            if version != previous.version:
                try:
                    candidate = load_served_model(self.cfg, target, version=version)
                except CnnkitError as exc:
                    return self._reload_failed(target, str(exc))
                if candidate.classes != previous.classes:
                    return self._reload_failed(target, f"its classes differ from the model served "
                                               f"({len(candidate.classes)} vs {len(previous.classes)}, or in order); "
                                               "a model with other classes is a new service: start another server")
                self._calibrate(candidate)
                self.model = candidate  # the swap: requests from here on get the new model
                self._show(candidate, previous)
                self._drift_reported = False
                self.metrics.reloads.labels("ok").inc()
                log.info("worker %d: reloaded %s: %s -> %s", self.worker, target, previous.version, candidate.version)
                # Once the requests begun on the old model are answered, its memory goes back to the OS.
                release = threading.Timer(RELEASE_DELAY_S, release_memory)
                release.daemon = True
                release.start()
            told = False
            if tell and (path is not None or version != previous.version):
                publish_model(target)
                told = tell_workers()
        return {
            "status": "reloaded" if version != previous.version else "unchanged",
            "model_version": version,
            "previous_version": previous.version,
            "model_file": os.path.basename(target),
            "workers": "all" if told else "this",
            "worker": self.worker,
        }

    def _reload_failed(self, target: str, reason: str) -> NoReturn:
        self.metrics.reloads.labels("failed").inc()
        message = f"reload of {target} failed, still serving {self.model.version}: {reason}"
        log.error("worker %d: %s", self.worker, message)
        raise HttpError(422, message, model_version=self.model.version)

    def reload_published(self) -> None:
        """SIGHUP's reload (in a thread of its own): the published model, or the same file if
        it changed on disk; a failure is logged and the old model goes on serving."""
        try:
            self.reload(published_model(), tell=False)
        except HttpError:
            pass  # logged by _reload_failed
        except Exception:  # a reload never stops a worker
            log.exception("worker %d: reload failed", self.worker)

    # -- /metadata, /ready --

    def metadata(self) -> dict[str, Any]:
        """``GET /metadata``: the model served and this worker's serving limits."""
        return describe(self)

    def readiness(self) -> tuple[bool, str]:
        if self.batcher.failure:
            return False, self.batcher.failure
        if not self.batcher.alive:
            return False, "the batcher thread is not running"
        if not self.batcher.ready.is_set():
            return False, "warming up"
        if self.admission.saturated:  # a load balancer steers new requests to another worker
            return False, f"saturated: holds {self.admission.held} image(s), at most {self.admission.max_queue}"
        return True, "ready"


def describe(service: ModelService) -> dict[str, Any]:
    """The ``GET /metadata`` document of ``service``."""
    cfg, admission, model = service.cfg, service.admission, service.model
    ckpt, predictor = model.checkpoint, model.predictor
    reference = model.drift.reference if model.drift is not None else None
    return {
        "model_version": model.version,
        "model_file": os.path.basename(model.path),
        "format": "onnx" if predictor.backend is not None else "checkpoint",
        "backend": model.backend,
        "quantization": predictor.backend.quantization if predictor.backend is not None else None,
        "arch": ckpt.arch,
        "num_classes": len(predictor.classes),
        "classes": [{"index": i, "label": c, "name": predictor.names.get(c, c)}
                    for i, c in enumerate(predictor.classes)],
        "preprocess": ckpt.preprocess.to_dict(),
        "calibration": dict(getattr(ckpt, "calibration", {}) or {}),
        "summary": dict(ckpt.summary),
        "versions": dict(ckpt.versions),
        "drift": {
            "reference": reference is not None,
            "reference_images": reference.get("images") if reference else None,
            "window": cfg.drift_window,
            "signals": list(SIGNALS) if reference else [],
        },
        "serving": {
            "worker": service.worker,
            "torch_threads": service.torch_threads,
            "max_batch": cfg.max_batch,
            "max_wait_ms": cfg.max_wait_ms,
            "max_bytes": cfg.max_bytes,
            "max_images": cfg.max_images,
            "max_pixels": model.max_pixels,
            "max_queue": admission.max_queue,
            "images_per_second": round(admission.rate, 2) if admission.rate else None,
            "timeout_s": cfg.timeout,
            "default_top_k": cfg.top_k,
        },
    }
