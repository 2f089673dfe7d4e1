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
    GET  /ready      readiness: model loaded and warmed up, and not saturated (503 otherwise)
    GET  /metadata   classes, arch, preprocessing, checkpoint summary, serving limits
    GET  /metrics    Prometheus text format, all workers together (gunicorn multi-process mode)
    GET  /openapi.json  the OpenAPI 3 description of all of the above (``cnnkit/openapi.json``)
    GET  /           a page to try the model in a browser (``page.html``: self-contained, offline)
    POST /admin/reload  load the model again (changed on disk) or another one, in every worker,
                     without dropping a request (needs --api-key-file; SIGHUP does the same);
                     {"role": "canary"} or "shadow" loads a candidate instead of the primary
    POST /admin/promote  the canary (or the shadow) becomes the primary model, in every worker
    POST /admin/rollback  drop the canary (or the shadow), in every worker
    GET  /ping       SageMaker's name for /ready
    POST /invocations  SageMaker's name for /predict; also takes the image itself as the body
                     (image/*, application/x-image, application/octet-stream), top_k in the query
                     or in the X-Amzn-SageMaker-Custom-Attributes header (``top_k=3``)

The model may be a folder holding one model file (``model.model_file``: SageMaker unpacks
model.tar.gz into /opt/ml/model); ``cnnkit serve`` also reads it, the host, the port and the
worker count from the environment (CNNKIT_MODEL, CNNKIT_HOST, CNNKIT_PORT or SageMaker's
SAGEMAKER_BIND_TO_PORT, CNNKIT_WORKERS), so a container's only argument can be ``serve``.

Errors are JSON ``{"error": "...", "status": N}``: 400 malformed request (bad JSON or base64, no
image, empty image, bad top_k, a body that ends early or is malformed), 405, 404, 408 a request
that did not arrive within ``timeout`` (a slow or stalled client), 413 body over ``max_bytes``
(whatever Content-Length says, chunked bodies too) or more than ``max_images`` images or too many
multipart parts, 415 wrong content type, 422 an image that cannot be decoded (not an image,
corrupt, truncated, too many pixels, too elongated; or a reload the model named cannot pass), 500
internal failure (logged), 503 not ready, overloaded (the worker holds its ``--max-queue`` images:
answered at once, with Retry-After) or timed out waiting for the model; with ``--api-key-file``,
401 without a known ``Authorization: Bearer`` key, and 403 for /admin/* without it; 409 for
/admin/* naming a role with no model (no canary to promote). Under ``cnnkit serve`` (gunicorn with
:class:`BoundedThreadWorker`), errors gunicorn itself answers (a malformed request line or
headers, bad chunked encoding) are JSON too, and reading one request, headers and body, may take
at most ``timeout`` seconds: a client that stalls or trickles bytes holds a request thread no
longer than that.

Test hook, off by default: with ``CNNKIT_SERVE_TEST_HOOKS=1`` in the server's environment, a
request carrying the header ``X-Cnnkit-Test-Fault: model`` makes the model raise while scoring it,
so tests can check that an internal failure is a 500 and the worker goes on serving. Never set it
in production.

A ``--canary`` model answers ``--canary-percent`` of the requests (routed by a stable hash of the
``--canary-header`` value when a request has one), a ``--shadow`` model scores copies of the
primary's requests while the worker is idle; every request metric is labelled by the model's
role and version.

The package, by layer (imports go one way: launcher → app → service → rollout, shadow, batcher,
admission and metrics → model, control; parsing, auth, page and sizing are leaves that the
others import; gunicorn loads the worker by name)::

    launcher.py  serve(cfg): checks, then gunicorn; gunicorn_options
    worker.py    BoundedThreadWorker (gunicorn gthread: request deadline, JSON errors, accept)
    app.py       create_app: Flask routes, JSON errors, the request log; openapi_spec
    page.py      the browser page (page.html) and its Content-Security-Policy
    service.py   ModelService: image bytes → decode → route → batch → predict → encode → dict
    rollout.py   Models (primary, canary, shadow), route, Rollout (reload, promote, rollback, sync)
    shadow.py    ShadowScorer: copies of the primary's traffic, scored when the worker is idle
    model.py     ServedModel (one model as served, checked), load_served_model, model_file
    admission.py Admission: the --max-queue bound, shedding with Retry-After
    auth.py      ApiKeys (--api-key-file), constant-time Bearer check
    control.py   how a change of models reaches every worker (a shared file + SIGHUP via the master)
    batcher.py   MicroBatcher          metrics.py  Prometheus metrics, the multi-process folder
    parsing.py   request parsing, HttpError, error_body
    sizing.py    worker_count, torch_threads
"""

from __future__ import annotations

from typing import Any

from .app import create_app, openapi_spec
from .batcher import MicroBatcher
from .launcher import gunicorn_options, serve
from .metrics import Metrics, iter_metric_samples
from .parsing import HttpError, error_body
from .service import ModelService
from .sizing import torch_threads, worker_count

# BoundedThreadWorker is not listed: it is made on first use (__getattr__), gunicorn being optional.
__all__ = [
    "HttpError", "Metrics", "MicroBatcher", "ModelService", "create_app", "error_body",
    "gunicorn_options", "iter_metric_samples", "openapi_spec", "serve", "torch_threads", "worker_count",
]


def __getattr__(name: str) -> Any:
    if name == "BoundedThreadWorker":  # "cnnkit.serve.BoundedThreadWorker" for gunicorn's worker_class
        from .worker import bounded_worker_class

        return bounded_worker_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
