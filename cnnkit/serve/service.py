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
from typing import Any, Callable, Sequence

import torch

from ..config import ServeConfig
from ..data.transforms import load_image
from ..drift import SIGNALS, image_brightness, reference_confidence_mean
from ..errors import ImageError
from ..runtime import release_memory
from .admission import Admission
from .batcher import MicroBatcher
from .explainer import Explained, Explainer
from .metrics import Metrics
from .model import ServedModel
from .parsing import PREDICT_PATHS, TEST_FAULT_HEADER, HttpError, which_image
from .rollout import CANARY, PRIMARY, Models, Rollout, Route, first_models, route
from .shadow import ShadowScorer
from .sizing import torch_threads

log = logging.getLogger(__name__)

TEST_HOOKS_ENV = "CNNKIT_SERVE_TEST_HOOKS"  # "1" turns the test hook on (see cnnkit.serve); never in production
TEST_SLOW_ENV = "CNNKIT_SERVE_TEST_SLOW_MS"  # with the hooks on: every forward pass takes this much longer
RATE_BATCH = 4  # images per pass when the warm-up measures the forward-pass rate
RELEASE_DELAY_S = 5.0  # after a reload: when the old model's memory is handed back


class ModelService:
    """One worker's models, batcher, admission, metrics and drift monitor; what the Flask routes call.

    The model's side of serving, with no HTTP in it: :meth:`predict` takes a request's image
    bytes and returns its answer as a plain dict, or raises :class:`HttpError`. The batcher and
    the metrics are parts of their own, made by ``batcher`` and ``metrics`` (the classes by
    default), so either can be swapped without touching the service. Which models answer, and
    the operator's changes to them (reload, promote, rollback), are :attr:`rollout`'s; the
    shadow's scoring is :attr:`shadow`'s, run by the batcher when the worker is idle.
    """

    def __init__(self, cfg: ServeConfig, *, batcher: Callable[..., MicroBatcher] = MicroBatcher,
                 metrics: Callable[..., Metrics] = Metrics):
        self.cfg = cfg
        self.worker = os.getpid()
        self.torch_threads = torch_threads(cfg)
        torch.set_num_threads(self.torch_threads)  # before the model (and ONNX Runtime) is set up
        models = first_models(cfg)
        self.test_hooks = os.environ.get(TEST_HOOKS_ENV) == "1"
        self.slow = float(os.environ.get(TEST_SLOW_ENV, "0") or 0) / 1000 if self.test_hooks else 0.0
        if self.test_hooks:
            log.warning("%s=1: test fault injection is ON (header %s); never use this in production",
                        TEST_HOOKS_ENV, TEST_FAULT_HEADER)
        self.metrics = metrics(drift=models.primary.drift is not None)
        self.metrics.workers_ready.set(0)  # 1 once warmed up (_warm_up)
        self.rollout = Rollout(cfg, models, on_swap=self._swapped, on_reload=lambda result: self.metrics.reloads.labels(result).inc())
        self._show(models, None)
        self.admission = Admission(cfg.max_queue, cfg.queue_target_ms, on_shed=self.metrics.shed.inc)
        self.shadow = ShadowScorer(self.metrics, cfg.shadow_queue, cfg.shadow_share, cfg.drift_window,
                                   busy=lambda: self.admission.held > 0, current=lambda: self.rollout.models.shadow)
        self._drift_updated = 0.0
        self._drift_reported = False
        self._drift_lock = threading.Lock()
        self.explainer = Explainer()
        self.batcher = batcher(self._score, cfg.max_batch, cfg.max_wait_ms, on_batch=self._on_batch,
                               warmup=self._warm_up, background=self.shadow).start()

    @property
    def model(self) -> ServedModel:
        """The primary model."""
        return self.rollout.models.primary

    @property
    def model_version(self) -> str:
        return self.model.version

    def _warm_up(self) -> None:
        for _, model in self.rollout.models.roles():
            model.check()
        self._calibrate(self.model)
        self.metrics.workers_ready.set(1)  # (a failed warm-up raises first: the worker stays unready)

    def _calibrate(self, model: ServedModel) -> None:
        """The --max-queue bound from ``model``'s forward-pass rate (at start-up and each reload)."""
        self.admission.calibrate(model.images_per_second(min(RATE_BATCH, self.cfg.max_batch)))
        log.info("worker %d: %.1f images/s per forward pass; holds at most %d images (%s)", self.worker,
                 self.admission.rate, self.admission.max_queue,
                 "--max-queue" if self.cfg.max_queue else f"what it clears in --queue-target-ms {self.cfg.queue_target_ms:g}")
        self.metrics.max_queue.set(self.admission.max_queue or 0)

    def role_of(self, model: ServedModel) -> str:
        return CANARY if model is self.rollout.models.canary else PRIMARY

    def _score(self, batch: torch.Tensor, model: ServedModel | None) -> torch.Tensor:
        if self.slow:
            time.sleep(self.slow)
        return (model or self.model).score(batch, with_known=True)

    def _on_batch(self, size: int, seconds: float, model: ServedModel | None) -> None:
        model = model or self.model
        labels = (self.role_of(model), model.version)
        self.metrics.batch_size.labels(*labels).observe(size)
        self.metrics.forward.labels(*labels).observe(seconds)

    def _show(self, models: Models, previous: Models | None) -> None:
        self.metrics.show_models(models.roles(), previous.roles() if previous is not None else None, PREDICT_PATHS)
        primary = models.primary
        if primary.drift is not None and self.metrics.has_drift:
            self.metrics.reference_confidence.set(reference_confidence_mean(primary.drift.reference))

    def _swapped(self, previous: Models, models: Models) -> None:
        """After a reload, promotion or rollback: metrics, the queue bound, memory."""
        self._show(models, previous)
        if models.primary is not previous.primary:
            if self.batcher.ready.is_set():  # (before the warm-up, it calibrates)
                self._calibrate(models.primary)
            self._drift_reported = False
        # Once the requests begun on a dropped model are answered, its memory goes back to the OS.
        release = threading.Timer(RELEASE_DELAY_S, release_memory)
        release.daemon = True
        release.start()

    def close(self) -> None:
        self.batcher.stop()

    # -- /predict --

    def route(self, sticky: str | None = None) -> Route:
        """The model that answers a request now (the canary's share by ``sticky``, the request's
        canary routing key, if any), and the shadow that gets a copy of its answer."""
        return route(self.rollout.models, sticky)

    def predict(self, read: Callable[[], tuple[list[tuple[str | None, bytes]], int]], started: float,
                fault: bool = False, to: Route | None = None) -> dict[str, Any]:
        """One request, decode → batch → predict → encode: its answer, or HttpError.

        ``read()`` reads and parses the request into ``([(filename or None, bytes), ...], top_k)``.
        It runs holding a batcher ticket, as the decoding does, so a forward pass that starts
        meanwhile waits for this request's images (up to ``max_wait_ms``). A worker that holds
        its ``max_queue`` images refuses the request once parsed, before decoding it (503 with
        Retry-After). ``started`` is the request's ``time.perf_counter()`` on arrival: the
        timeout and ``time_ms`` count from it. ``fault`` is the test hook's (the model raises
        while scoring this request). ``to`` is the request's :meth:`route` (default: routed now);
        the answer's ``model_role`` says which model gave it (primary or canary).
        """
        model, role, shadow = to or self.route()
        with ExitStack() as holding:
            with self.batcher.ticket() as ticket:
                blobs, top_k = read()
                holding.enter_context(self.admission.admit(len(blobs)))
                batch = self.prepare(blobs, model)
                job = ticket.submit(batch, fault, model)
            try:
                scored = self.batcher.wait(job, self.cfg.timeout - (time.perf_counter() - started))
            except HttpError as exc:
                if exc.status == 503:  # timed out (or stopping): when to come back
                    exc.headers.setdefault("Retry-After", str(self.admission.retry_after()))
                raise
        answer = self.respond(blobs, batch, scored, top_k, started, model, role)
        if shadow is not None:
            self.shadow.offer(shadow, model, blobs, batch, model.unknown_flags(scored)[0].argmax(dim=1).tolist())
            self.batcher.nudge()
        return answer

    # -- /explain --

    def explain(self, data: bytes, target: str | None, method: str, started: float) -> Explained:
        """``POST /explain``: the primary model's Grad-CAM picture of one image for a class (see
        :class:`Explainer`), or HttpError. The image counts against the worker's ``max_queue``."""
        model = self.model
        with self.admission.admit(1):
            image = self.prepare([(None, data)], model)[0]
            return self.explainer.explain(model, image, target, method,
                                          self.cfg.timeout - (time.perf_counter() - started))

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
                top_k: int, started: float, model: ServedModel | None = None, role: str = PRIMARY) -> dict[str, Any]:
        model = model or self.model
        probs, unknown = model.unknown_flags(probs)  # (the known score's column, where the model has one)
        predictor = model.predictor
        k = min(top_k, len(predictor.classes))
        values, indices = probs.topk(k, dim=1)
        classes, names = predictor.classes, predictor.names
        results = []
        for index, ((name, _), row_p, row_i) in enumerate(zip(blobs, values.tolist(), indices.tolist())):
            item: dict[str, Any] = {"index": index} if unknown is None else {"index": index, "unknown": unknown[index]}
            if name is not None:
                item["filename"] = name
            item["predictions"] = [
                {"label": classes[i], "name": names.get(classes[i], classes[i]), "probability": round(p, 6)}
                for p, i in zip(row_p, row_i)
            ]
            results.append(item)
        self._observe(model, role, batch, values[:, 0], indices[:, 0])
        return {
            "model_version": model.version,
            "model_role": role,
            "top_k": k,
            "results": results,
            "time_ms": round((time.perf_counter() - started) * 1000, 2),
        }

    def _observe(self, model: ServedModel, role: str, batch: torch.Tensor, confidence: torch.Tensor,
                 top1: torch.Tensor) -> None:
        m, labels = self.metrics, (role, model.version)
        m.images.labels(*labels).inc(len(top1))
        for label_index, p in zip(top1.tolist(), confidence.tolist()):
            m.predicted.labels(model.classes[label_index], *labels).inc()
            m.confidence.labels(*labels).observe(p)
        drift = model.drift
        if drift is None or not m.has_drift or role != PRIMARY:  # (drift: the primary's traffic against its reference)
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

    # -- /admin/*, SIGHUP --

    def reload(self, path: str | None = None, role: str = PRIMARY) -> dict[str, Any]:
        """``POST /admin/reload``: load ``path`` (default: the role's file, changed on disk) into
        ``role``, check it, swap it in between requests, then have every other worker follow.
        HttpError 422 if it cannot serve (the models served are unchanged)."""
        return self.rollout.reload(path, role)

    def promote(self, role: str = CANARY) -> dict[str, Any]:
        """``POST /admin/promote``: the canary (or shadow) becomes the primary, in every worker."""
        return self.rollout.promote(role)

    def rollback(self, role: str = CANARY) -> dict[str, Any]:
        """``POST /admin/rollback``: drop the canary (or shadow), in every worker."""
        return self.rollout.rollback(role)

    def reload_published(self) -> None:
        """SIGHUP (in a thread of its own): serve what was published, or reread the files
        served if they changed on disk; a model that cannot serve is logged and not swapped in."""
        try:
            self.rollout.sync()
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
    cfg, admission, models = service.cfg, service.admission, service.rollout.models
    model = models.primary
    ckpt, predictor = model.checkpoint, model.predictor
    reference = model.drift.reference if model.drift is not None else None
    return {
        "model_version": model.version,
        "model_file": os.path.basename(model.path),
        "format": predictor.backend.format if predictor.backend is not None else "checkpoint",
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
            "tta": predictor.tta,
        },
        "rollout": {
            "canary": None if models.canary is None else {
                **_candidate(models.canary), "percent": models.canary_percent, "sticky_header": cfg.canary_header},
            "shadow": None if models.shadow is None else {
                **_candidate(models.shadow), "share": cfg.shadow_share, "queue": cfg.shadow_queue},
        },
    }


def _candidate(model: ServedModel) -> dict[str, Any]:
    return {"model_version": model.version, "model_file": os.path.basename(model.path), "backend": model.backend}
