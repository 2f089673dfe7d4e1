"""The Flask application: the routes, JSON errors and the one-JSON-line-per-request log around a
:class:`~cnnkit.serve.service.ModelService`, and the OpenAPI document it serves.

``cnnkit.serve:create_app`` is the app spec for gunicorn (re-exported by :mod:`cnnkit.serve`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from typing import Any

from ..config import ServeConfig
from ..errors import require_extra
from .auth import REALM, ApiKeys
from .page import page
from .parsing import (
    EXPLAIN_PATH,
    PREDICT_PATHS,
    TEST_FAULT_HEADER,
    HttpError,
    error_body,
    parse_candidate_request,
    parse_explain_request,
    parse_invocations_request,
    parse_predict_request,
    parse_reload_request,
)
from .service import ModelService

request_log = logging.getLogger("cnnkit.serve.requests")
ADMIN_PREFIX = "/admin/"
PROTECTED_PATHS = (*PREDICT_PATHS, EXPLAIN_PATH, "/metadata")  # with --api-key-file (and /admin/*; /metrics with --protect-metrics)


def authenticate(keys: ApiKeys | None, cfg: ServeConfig, path: str, authorization: str | None) -> str | None:
    """The name of the caller's key, or None where ``path`` is open; raises HttpError 401 (or 403:
    admin endpoints with no keys configured)."""
    admin = path.startswith(ADMIN_PREFIX)
    if keys is None:
        if admin:
            raise HttpError(403, "the admin endpoints need --api-key-file (a reload can also be asked by "
                            "sending the server SIGHUP)")
        return None
    if not (admin or path in PROTECTED_PATHS or (path == "/metrics" and cfg.protect_metrics)):
        return None
    name = keys.identify(authorization)
    if name is None:
        given = bool(authorization)
        challenge = REALM + (', error="invalid_token"' if given else "")
        raise HttpError(401, "invalid API key" if given else "this endpoint needs an API key: Authorization: Bearer <key>",
                        headers={"WWW-Authenticate": challenge})
    return name


def openapi_spec(cfg: ServeConfig | None = None) -> dict[str, Any]:
    """The OpenAPI 3 description of the server (``cnnkit/openapi.json``), as ``GET /openapi.json``
    serves it: with cnnkit's version, and ``cfg``'s image limit when given."""
    from importlib import resources

    from .. import __version__

    spec = json.loads(resources.files("cnnkit").joinpath("openapi.json").read_text(encoding="utf-8"))
    spec["info"]["version"] = __version__
    if cfg is not None:
        schemas = spec["components"]["schemas"]
        schemas["MultipartPredictRequest"]["properties"]["image"]["maxItems"] = cfg.max_images
        schemas["JsonPredictRequest"]["oneOf"][1]["properties"]["images"]["maxItems"] = cfg.max_images
        for path, operations in spec["paths"].items():
            for operation in operations.values():
                if cfg.api_key_file is None:  # nothing asks for a key (the admin endpoints answer 403)
                    operation.pop("security", None)
                elif path == "/metrics" and cfg.protect_metrics:
                    operation["security"] = [{"apiKey": []}]
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
    """The Flask application serving ``checkpoint`` (a checkpoint or an exported ``.onnx`` or OpenVINO ``.xml``).

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
    keys = ApiKeys.from_file(cfg.api_key_file) if cfg.api_key_file else None
    service = ModelService(cfg)
    spec = openapi_spec(cfg)
    app = Flask("cnnkit.serve")  # the name (and app.logger) it had before cnnkit.serve was a package
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
        response = error_response(exc.status, exc.message, **exc.extra)
        response.headers.update(exc.headers)
        return response

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
        g.client = authenticate(keys, cfg, request.path, request.headers.get("Authorization"))

    @app.after_request
    def _finish(response: Response) -> Response:
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        endpoint = request.url_rule.rule if request.url_rule is not None else "unmatched"
        version = g.get("model_version") or service.model_version
        model = (g.get("model_role") or "primary", version)  # the model that answered, or the primary
        service.metrics.requests.labels(endpoint, str(response.status_code), *model).inc()
        service.metrics.latency.labels(endpoint, *model).observe(seconds)
        response.headers["X-Model-Version"] = version
        record: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "event": "request",
            "method": request.method,
            "path": request.path,
            "status": response.status_code,
            "ms": round(seconds * 1000, 2),
            "worker": service.worker,
        }
        if g.get("client"):
            record["client"] = g.client  # the key's name, never the key
        if g.get("images") is not None:
            record["images"] = g.images
        if g.get("error"):
            record["error"] = g.error
        if g.get("traceback"):
            record["traceback"] = g.traceback
        line = json.dumps(record, ensure_ascii=False)
        if response.status_code >= 500 and request.path not in ("/ready", "/ping"):
            request_log.error(line)
        elif request.path in (*PREDICT_PATHS, EXPLAIN_PATH) or response.status_code >= 400:
            request_log.info(line)
        else:
            request_log.debug(line)
        return response

    def scored(parse: Any) -> Response:
        started = g.started
        fault = service.test_hooks and request.headers.get(TEST_FAULT_HEADER) == "model"

        def read() -> tuple[list[tuple[str | None, bytes]], int]:
            blobs, top_k = parse(request, cfg)
            g.images = len(blobs)
            return blobs, top_k

        to = service.route(request.headers.get(cfg.canary_header) or None)
        g.model_version, g.model_role = to.model.version, to.role  # the metrics' labels, errors included
        return jsonify(service.predict(read, started, fault, to))

    @app.post("/predict")
    def predict() -> Response:
        return scored(parse_predict_request)

    @app.post("/invocations")
    def invocations() -> Response:
        """SageMaker's inference contract: /predict, plus a raw image body (image/*, application/x-image)."""
        return scored(parse_invocations_request)

    @app.post(EXPLAIN_PATH)
    def explain() -> Response:
        """A Grad-CAM picture (PNG) of the primary model's evidence for a class of one image."""
        data, target, method = parse_explain_request(request, cfg)
        g.images = 1
        explained = service.explain(data, target, method, g.started)
        g.model_version = explained.version
        response = Response(explained.png, content_type="image/png")
        response.headers.update(explained.headers())
        return response

    @app.post("/admin/reload")
    def reload() -> Response:
        """Load a checkpoint (the one served, changed on disk, or another) in every worker."""
        answer = service.reload(*parse_reload_request(request, cfg))
        g.model_version = answer["model_version"]
        return jsonify(answer)

    @app.post("/admin/promote")
    def promote() -> Response:
        """The canary (or shadow) becomes the primary model, in every worker."""
        answer = service.promote(parse_candidate_request(request, cfg))
        g.model_version = answer["model_version"]
        return jsonify(answer)

    @app.post("/admin/rollback")
    def rollback() -> Response:
        """Drop the canary (or shadow), in every worker."""
        answer = service.rollback(parse_candidate_request(request, cfg))
        g.model_version = answer["model_version"]
        return jsonify(answer)

    @app.get("/")
    def index() -> Response:
        body, policy = page()
        response = Response(body, content_type="text/html; charset=utf-8")
        response.headers["Content-Security-Policy"] = policy
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

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

    app.add_url_rule("/ping", "ping", ready, methods=["GET"])  # SageMaker's name for /ready

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
