"""The HTTP request side of serving: reading and parsing a ``/predict`` or ``/invocations``
request into image bytes, and the errors a request gets (:class:`HttpError`, whose JSON body is
:func:`error_body`).

A leaf of :mod:`cnnkit.serve`: the batcher, the model service, the app and the gunicorn worker
raise and answer these errors; this module imports none of them.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Callable

from ..config import EXPLAIN_METHODS, ServeConfig

# The test hook's header (see :mod:`cnnkit.serve`): with CNNKIT_SERVE_TEST_HOOKS=1, a request
# carrying ``X-Cnnkit-Test-Fault: model`` makes the model raise while scoring it.
TEST_FAULT_HEADER = "X-Cnnkit-Test-Fault"
# SageMaker's inference contract (/invocations): raw image bodies, and top_k in this header
RAW_IMAGE_TYPES = ("application/x-image", "application/octet-stream")
CUSTOM_ATTRIBUTES_HEADER = "X-Amzn-SageMaker-Custom-Attributes"


class RequestTimeout(TimeoutError):
    """A client did not send its whole request (headers and body) within the server's timeout."""


PREDICT_PATHS = ("/predict", "/invocations")  # /invocations is SageMaker's name for /predict
EXPLAIN_PATH = "/explain"


class HttpError(Exception):
    """A request the server refuses: becomes a JSON error body with ``status``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}  # of the response (Retry-After, WWW-Authenticate)
        self.extra = extra  # more fields of the JSON body


def error_body(status: int, message: str, **extra: Any) -> dict[str, Any]:
    """Every error's JSON body, whether the app or the gunicorn worker answers."""
    return {"error": message, "status": status, **extra}


def which_image(index: int, name: str | None, count: int) -> str:
    """How an error message names a request's image: by filename, by index, or "the image"."""
    if name:
        return f"image {index} ({name})" if count > 1 else f"image {name}"
    return f"image {index}" if count > 1 else "the image"


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
    which = which_image(index, None, count)
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


def _read_whole_body(request: Any, cfg: ServeConfig) -> bytes:
    """The request's body as bytes, at most ``max_bytes`` of it (413 above), or HttpError."""
    raw = _read_body(lambda: request.get_data(cache=False), cfg.timeout)
    if request.content_length is None and len(raw) >= cfg.max_bytes and _read_body(
            lambda: request.environ["wsgi.input"].read(1), cfg.timeout):
        # A streamed (chunked) body: werkzeug stops reading at the limit and returns what it
        # read, silently cut; one more byte means the body was over it.
        raise HttpError(413, f"request body too large (limit {cfg.max_bytes:,} bytes, --max-bytes)")
    return raw


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise HttpError(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise HttpError(400, "malformed JSON: nested too deeply") from None


def is_raw_image_type(mimetype: str) -> bool:
    """A body that is one image file as it is (``/invocations``): ``image/*``, SageMaker's
    ``application/x-image``, or ``application/octet-stream``."""
    return mimetype.startswith("image/") or mimetype in RAW_IMAGE_TYPES


def sagemaker_top_k(header: str | None) -> str | None:
    """``top_k`` from SageMaker's ``X-Amzn-SageMaker-Custom-Attributes`` header (``top_k=3``,
    among other ``key=value`` pairs separated by commas or semicolons), or None."""
    for item in (header or "").replace(";", ",").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip() == "top_k":
            return value.strip()
    return None


def parse_invocations_request(request: Any, cfg: ServeConfig) -> tuple[list[tuple[str | None, bytes]], int]:
    """``/invocations`` (SageMaker's contract): a raw image body, or whatever ``/predict`` takes.

    ``top_k`` comes from the query string, else from ``X-Amzn-SageMaker-Custom-Attributes``
    (SageMaker passes no query string; ``invoke_endpoint(CustomAttributes="top_k=3")`` sets it).
    """
    mimetype = request.mimetype or ""
    query_k = request.args.get("top_k") or sagemaker_top_k(request.headers.get(CUSTOM_ATTRIBUTES_HEADER))
    if is_raw_image_type(mimetype):
        top_k = _parse_top_k(query_k, cfg.top_k)  # before the body: a bad top_k costs no upload
        return [(None, _read_whole_body(request, cfg))], top_k
    return parse_predict_request(request, cfg, query_k=query_k, raw_allowed=True)


def parse_predict_request(request: Any, cfg: ServeConfig, query_k: str | None = None,
                          raw_allowed: bool = False) -> tuple[list[tuple[str | None, bytes]], int]:
    """``([(filename or None, bytes), ...], top_k)`` from a Flask request, or HttpError.

    ``query_k`` replaces the query string's ``top_k`` (``/invocations``); ``raw_allowed`` only
    changes the 415 message, which then names the raw image types too.
    """
    mimetype = request.mimetype or ""
    if query_k is None:
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
        body = _parse_json(_read_whole_body(request, cfg))
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
    raw = ", or the image itself as image/jpeg, image/png, ... or application/x-image" if raw_allowed else ""
    raise HttpError(415, f"unsupported content type {shown}: send multipart/form-data with an 'image' "
                         f"file field, or application/json with a base64 'image' or 'images'{raw}")


def parse_explain_request(request: Any, cfg: ServeConfig) -> tuple[bytes, str | None, str]:
    """``POST /explain``'s ``(image bytes, class or None, method)``: one image, sent as
    ``/invocations`` takes it (multipart, JSON base64 or the raw body), with the class (a label
    or a name; default: the top class) and the method in the query string; or HttpError."""
    method = request.args.get("method", "gradcam")
    if method not in EXPLAIN_METHODS:  # (before the body: a bad query costs no upload)
        raise HttpError(400, f"method must be one of {', '.join(EXPLAIN_METHODS)}, got {method!r}")
    target = request.args.get("class")
    if target is not None and not target.strip():
        raise HttpError(400, "class must be a class label or name (or left out: the top class)")
    blobs, _ = parse_invocations_request(request, cfg)
    if len(blobs) != 1:
        raise HttpError(400, f"{EXPLAIN_PATH} takes one image, got {len(blobs)}")
    return blobs[0][1], target, method


def _admin_body(request: Any, cfg: ServeConfig, fields: set[str], shape: str) -> dict[str, Any]:
    raw = _read_whole_body(request, cfg)  # (a slow or oversized body: 408 or 413, as for /predict)
    if not raw.strip():
        return {}
    body = _parse_json(raw)
    if not isinstance(body, dict) or set(body) - fields:
        raise HttpError(400, f"the body must be {shape}")
    return body


def _role(body: dict[str, Any], default: str, allowed: tuple[str, ...]) -> str:
    role = body.get("role")
    if role is None:
        return default
    if role not in allowed:
        raise HttpError(400, f'"role" must be one of {", ".join(allowed)}')
    return role


def parse_reload_request(request: Any, cfg: ServeConfig) -> tuple[str | None, str]:
    """``POST /admin/reload``'s ``(path, role)``: the model named (``{"checkpoint": "path"}``) or
    None (no body, or no "checkpoint": the role's file, reread), and the role it is loaded into
    (``"role"``: primary by default, canary or shadow); or HttpError."""
    body = _admin_body(request, cfg, {"checkpoint", "role"},
                       '{} or {"checkpoint": "<path on the server>", "role": "primary|canary|shadow"}')
    role = _role(body, "primary", ("primary", "canary", "shadow"))
    path = body.get("checkpoint")
    if path is None:
        return None, role
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise HttpError(400, '"checkpoint" must be a path on the server (a non-empty string)')
    return path, role


def parse_candidate_request(request: Any, cfg: ServeConfig) -> str:
    """The candidate role ``POST /admin/promote`` and ``/admin/rollback`` act on: ``{"role":
    "canary"}`` (the default, also for no body) or ``"shadow"``; or HttpError."""
    body = _admin_body(request, cfg, {"role"}, '{} or {"role": "canary|shadow"}')
    return _role(body, "canary", ("canary", "shadow"))
