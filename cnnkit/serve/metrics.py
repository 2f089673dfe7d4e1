"""The server's Prometheus metrics, and where gunicorn's workers share them.

Under gunicorn every worker writes its values to the folder named by ``PROMETHEUS_MULTIPROC_DIR``
(:func:`multiprocess_dir`, also read by :mod:`cnnkit.gunicorn_conf`), and ``/metrics`` aggregates
them, whichever worker answers. ``prometheus_client`` (the 'serve' extra) is imported on use.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

from ..errors import ConfigError

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def multiprocess_dir() -> str | None:
    """The Prometheus multi-process folder (``PROMETHEUS_MULTIPROC_DIR``), or None outside gunicorn."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


class Metrics:
    """The server's Prometheus metrics, on a registry of its own.

    Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` is set and every worker writes its values there;
    :meth:`render` then aggregates all workers, whichever one answers ``/metrics``.
    """

    def __init__(self, drift: bool = True) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess_dir = multiprocess_dir()
        if self.multiprocess_dir and not os.path.isdir(self.multiprocess_dir):
            raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR is not a folder: {self.multiprocess_dir}")
        r = self.registry = CollectorRegistry()
        model = ["role", "model_version"]  # which model answered: primary or canary, and its version
        self.requests = Counter("cnnkit_requests", "HTTP requests by endpoint, status code and the model that answered.",
                                ["endpoint", "status", *model], registry=r)
        self.latency = Histogram("cnnkit_request_duration_seconds", "HTTP request latency by endpoint and model.",
                                 ["endpoint", *model], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("cnnkit_batch_size", "Images per forward pass.", model, buckets=BATCH_BUCKETS, registry=r)
        self.forward = Histogram("cnnkit_forward_duration_seconds", "Duration of one forward pass.", model,
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("cnnkit_images", "Images scored.", model, registry=r)
        self.predicted = Counter("cnnkit_predicted_class", "Top-1 predictions by class label.", ["label", *model],
                                 registry=r)
        self.confidence = Histogram("cnnkit_prediction_confidence", "Top-1 probability of each scored image.", model,
                                    buckets=CONFIDENCE_BUCKETS, registry=r)
        self.shadow_images = Counter("cnnkit_shadow_images", "Copies of the primary's images for the shadow model, by "
                                     "result (scored; dropped: the shadow was busy or replaced; failed).",
                                     ["model_version", "result"], registry=r)
        self.shadow_agreement = Counter("cnnkit_shadow_agreement", "Shadow-scored images whose top-1 class is the "
                                        "primary's (divide by cnnkit_shadow_images_total{result=\"scored\"}).",
                                        ["model_version"], registry=r)
        self.shadow_confidence = Histogram("cnnkit_shadow_confidence", "The shadow model's top-1 probability.",
                                           ["model_version"], buckets=CONFIDENCE_BUCKETS, registry=r)
        self.shadow_class_psi = Gauge("cnnkit_shadow_class_psi", "PSI of the shadow's top-1 class mix against the "
                                      "primary's on the same recent images (the highest over live workers).",
                                      ["model_version"], multiprocess_mode="livemax", registry=r)
        self.shed = Counter("cnnkit_shed", "Requests refused at once (503, Retry-After) because the worker held "
                            "its --max-queue images.", registry=r)
        self.max_queue = Gauge("cnnkit_max_queue_images", "Images the workers hold at most (summed over live workers).",
                               multiprocess_mode="livesum", registry=r)
        self.reloads = Counter("cnnkit_reloads", "Model reloads by result (ok: swapped in; failed: the old model "
                               "kept serving).", ["result"], registry=r)
        for result in ("ok", "failed"):
            self.reloads.labels(result)
        self.has_drift = drift
        if drift:  # only for a model with reference statistics: otherwise the drift metrics are absent
            self.drift = Gauge("cnnkit_drift_psi",
                               "Population-stability index of a worker's recent images against the model's "
                               "validation-set reference, by signal (the highest over live workers).",
                               ["signal"], multiprocess_mode="livemax", registry=r)
            self.drift_window = Gauge("cnnkit_drift_window_images",
                                      "Images in a worker's drift window (highest over workers).",
                                      multiprocess_mode="livemax", registry=r)
            self.reference_confidence = Gauge(
                "cnnkit_reference_confidence_mean",
                "Mean top-1 probability on the model's validation set (reference statistics, bin midpoints).",
                multiprocess_mode="livemax", registry=r)
        self.workers_ready = Gauge("cnnkit_workers_ready",
                                   "Workers whose model is loaded and warmed up (summed over live workers).",
                                   multiprocess_mode="livesum", registry=r)
        self.model_info = Gauge("cnnkit_model_info", "The models served (value 1), by role: primary, canary, shadow.",
                                ["model_version", "arch", "backend", "role"], multiprocess_mode="livemax", registry=r)

    def declare(self, endpoints: tuple[str, ...], role: str, version: str,
                statuses: tuple[str, ...] = ("200", "500", "503")) -> None:
        """Create a model's series at 0 (its requests to ``endpoints``, its images, batches and
        confidence): a counter that first appears already counting hides its first requests
        from rate(), and an absent 5xx series makes the error ratio absent instead of 0."""
        for endpoint in endpoints:
            self.latency.labels(endpoint, role, version)
            for status in statuses:
                self.requests.labels(endpoint, status, role, version)
        for series in (self.images, self.batch_size, self.forward, self.confidence):
            series.labels(role, version)

    def show_models(self, roles: Iterable[tuple[str, Any]], previous: Iterable[tuple[str, Any]] | None,
                    endpoints: tuple[str, ...]) -> None:
        """``cnnkit_model_info``: 1 for each ``(role, model)`` served, 0 for those of ``previous``
        served no longer; the series of each answering model (not the shadow) declared."""
        roles = list(roles)
        now = {(model.version, model.checkpoint.arch, model.backend, role) for role, model in roles}
        for role, model in previous or ():
            labels = (model.version, model.checkpoint.arch, model.backend, role)
            if labels not in now:
                self.model_info.labels(*labels).set(0)
        for labels in now:
            self.model_info.labels(*labels).set(1)
        for role, model in roles:
            if role != "shadow":
                self.declare(endpoints, role, model.version)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        if self.multiprocess_dir:
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def iter_metric_samples(text: str) -> Iterator[tuple[str, dict[str, str], float]]:
    """``(name, labels, value)`` for each sample of a Prometheus text exposition (for tests, tools)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            yield sample.name, dict(sample.labels), float(sample.value)
