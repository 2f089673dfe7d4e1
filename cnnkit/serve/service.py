"""The model's side of serving, one :class:`ModelService` per worker: image bytes in, a plain
dict out (decode → batch → predict → encode), with metrics and drift observed on the way.

No HTTP here: the Flask app (:mod:`cnnkit.serve.app`) parses requests and turns the dicts and
:class:`~cnnkit.serve.parsing.HttpError` into responses.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading
import time
from typing import Any, Callable, Sequence

import torch

from ..config import ServeConfig
from ..data.transforms import build_transforms, load_image
from ..drift import SIGNALS, DriftMonitor, check_reference, image_brightness, reference_confidence_mean
from ..errors import ImageError
from ..models.exported import model_version
from .batcher import MicroBatcher
from .metrics import Metrics
from .parsing import TEST_FAULT_HEADER, HttpError, which_image
from .sizing import torch_threads

log = logging.getLogger(__name__)

TEST_HOOKS_ENV = "CNNKIT_SERVE_TEST_HOOKS"  # "1" turns the test hook on (see cnnkit.serve); never in production


class ModelService:
    """One worker's model, batcher, metrics and drift monitor; what the Flask routes call.

    The model's side of serving, with no HTTP in it: :meth:`predict` takes a request's image
    bytes and returns its answer as a plain dict, or raises :class:`HttpError`. The batcher and
    the metrics are parts of their own, made by ``batcher`` and ``metrics`` (the classes by
    default), so either can be swapped without touching the service.
    """

    def __init__(self, cfg: ServeConfig, *, batcher: Callable[..., MicroBatcher] = MicroBatcher,
                 metrics: Callable[..., Metrics] = Metrics):
        from ..inference.predictor import Predictor

        self.cfg = cfg
        self.worker = os.getpid()
        self.torch_threads = torch_threads(cfg)
        torch.set_num_threads(self.torch_threads)  # before the model (and ONNX Runtime) is set up
        self.predictor = Predictor(cfg.checkpoint, cfg.device, cfg.category_names)
        ckpt = self.predictor.checkpoint
        exported = self.predictor.backend
        self.backend = exported.name if exported is not None else "torch"  # onnxruntime, onnxruntime-int8
        self.model_version = model_version(cfg.checkpoint)
        self.max_pixels = min(cfg.max_pixels, ckpt.preprocess.max_pixels)
        self.transform = build_transforms(dataclasses.replace(ckpt.preprocess, max_pixels=self.max_pixels), train=False)
        self.test_hooks = os.environ.get(TEST_HOOKS_ENV) == "1"
        if self.test_hooks:
            log.warning("%s=1: test fault injection is ON (header %s); never use this in production",
                        TEST_HOOKS_ENV, TEST_FAULT_HEADER)
        reference = check_reference(getattr(ckpt, "reference_stats", None), len(self.predictor.classes))
        self.drift = DriftMonitor(reference, cfg.drift_window) if reference is not None else None
        self.metrics = metrics(drift=self.drift is not None)
        self.metrics.model_info.labels(self.model_version, ckpt.arch, self.backend).set(1)
        self.metrics.workers_ready.set(0)  # 1 once warmed up (_warm_up)
        if self.drift is not None:
            self.metrics.reference_confidence.set(reference_confidence_mean(reference))
        self._drift_updated = 0.0
        self._drift_reported = False
        self._drift_lock = threading.Lock()
        size = ckpt.preprocess.image_size
        self.batcher = batcher(
            self._score,
            cfg.max_batch,
            cfg.max_wait_ms,
            on_batch=self._on_batch,
            warmup=lambda: self._warm_up(size),
        ).start()

    def _warm_up(self, size: int) -> None:
        self._score(torch.zeros(1, 3, size, size))
        self.metrics.workers_ready.set(1)  # (a failed warm-up raises first: the worker stays unready)

    def _score(self, batch: torch.Tensor) -> torch.Tensor:
        return self.predictor.probabilities(batch)

    def _on_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.forward.observe(seconds)

    def close(self) -> None:
        self.batcher.stop()

    # -- /predict --

    def predict(self, read: Callable[[], tuple[list[tuple[str | None, bytes]], int]], started: float,
                fault: bool = False) -> dict[str, Any]:
        """One request, decode → batch → predict → encode: its answer, or HttpError.

        ``read()`` reads and parses the request into ``([(filename or None, bytes), ...], top_k)``.
        It runs holding a batcher ticket, as the decoding does, so a forward pass that starts
        meanwhile waits for this request's images (up to ``max_wait_ms``). ``started`` is the
        request's ``time.perf_counter()`` on arrival: the timeout and ``time_ms`` count from it.
        ``fault`` is the test hook's (the model raises while scoring this request).
        """
        with self.batcher.ticket() as ticket:
            blobs, top_k = read()
            batch = self.prepare(blobs)
            job = ticket.submit(batch, fault)
        probs = self.batcher.wait(job, self.cfg.timeout - (time.perf_counter() - started))
        return self.respond(blobs, batch, probs, top_k, started)

    def prepare(self, blobs: Sequence[tuple[str | None, bytes]]) -> torch.Tensor:
        """Decode and preprocess request images (in the request's thread) into one batch."""
        tensors = []
        for index, (name, data) in enumerate(blobs):
            which = which_image(index, name, len(blobs))
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
            "format": "onnx" if self.predictor.backend is not None else "checkpoint",
            "backend": self.backend,
            "quantization": self.predictor.backend.quantization if self.predictor.backend is not None else None,
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
