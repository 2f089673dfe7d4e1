"""The HTTP contract of ``cnnkit serve``: the OpenAPI document, property-based requests generated
from it (schemathesis), oversized and malformed bodies, and protocol garbage.

One real server (gunicorn, 2 workers, loopback) for the module, with small limits so that every
bad input is cheap to send. Properties checked for every request: never a 5xx, every answer JSON
with the documented schema for its status (``/metrics`` aside: Prometheus text), the server still
answers afterwards. The schemathesis budget follows the hypothesis profile (``ci``: 100 examples
for /predict; ``--hypothesis-profile=long``: 2000).
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import threading
import time
from collections import Counter
from http.client import HTTPException
from pathlib import Path

import pytest

pytest.importorskip("flask")
pytest.importorskip("gunicorn")
pytest.importorskip("prometheus_client")
schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from deploy_helpers import http, image_bytes, make_checkpoint, multipart  # noqa: E402
from fuzz_helpers import fuzz_budget  # noqa: E402
from http_server import (  # noqa: E402
    assert_json_error,
    chunked,
    connect,
    predict_head,
    read_answer,
    send_raw,
    start_server,
)

MAX_BYTES, MAX_IMAGES, MAX_PIXELS = 200_000, 4, 20_000
READ_TIMEOUT = 5
API_KEY = "fuzz-" + "0123456789abcdef" * 2
AUTH = {"Authorization": f"Bearer {API_KEY}"}  # the server asks for a key: every request here brings it


def keyed_head(content_type: str, **headers: str) -> bytes:
    return predict_head(content_type, **AUTH, **headers)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("http-api")
    keys = folder / "keys.txt"
    keys.write_text(f"fuzz {API_KEY}\n")
    keys.chmod(0o600)
    instance = start_server(
        make_checkpoint(folder / "model.pt", unknown=True), folder / "server.log", "--api-key-file", keys,
        "--threads", "8", "--max-batch", "8", "--max-wait-ms", "5", "--max-bytes", str(MAX_BYTES),
        "--max-images", str(MAX_IMAGES), "--max-pixels", str(MAX_PIXELS), timeout=READ_TIMEOUT,
    )
    yield instance
    instance.stop()


@pytest.fixture(scope="module")
def spec(server) -> dict:
    answer = http(server.base, "GET", "/openapi.json")
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("application/json")
    return answer.json


# --- checking an answer against the document ----------------------------------------------


def response_schema(spec: dict, path: str, method: str, status: int) -> tuple[str, dict | None]:
    """(media type, schema) the document gives for this answer; fails if the status is not documented."""
    responses = spec["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, not documented ({sorted(responses)})"
    response = responses[str(status)]
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    ((media, content),) = response["content"].items()
    return media, content.get("schema")


def validate(instance, schema: dict, spec: dict) -> None:
    from openapi_schema_validator import OAS30Validator

    OAS30Validator({**schema, "components": spec["components"]}).validate(instance)


def assert_documented(spec: dict, path: str, method: str, status: int, headers: dict, body: bytes) -> None:
    headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in headers.items()}
    assert status < 500, f"{method} {path}: {status} {body[:500]!r}"
    if method.upper() == "OPTIONS":  # Flask's automatic answer: the Allow header, no body
        assert status == 200 and "allow" in headers and not body, (status, headers)
        return
    if method.upper() == "HEAD" and "get" in spec["paths"][path]:
        assert not body, body[:200]
        method = "GET"
    elif method.lower() not in spec["paths"][path]:  # another method than the documented one(s)
        assert status == 405, f"{method} {path}: {status} {body[:500]!r}"
        media, schema = "application/json", {"$ref": "#/components/schemas/Error"}
    else:
        media, schema = response_schema(spec, path, method, status)
    assert headers.get("content-type", "").split(";")[0] == media, headers
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", headers.get("x-model-version", "")), headers
    if media == "application/json" and body:  # (no body: a HEAD request)
        validate(json.loads(body), schema, spec)


def assert_alive(server) -> None:
    assert server.alive(), server.log_text()[-3000:]
    assert http(server.base, "GET", "/health", timeout=10).status == 200


# --- the document ---------------------------------------------------------------------------


def test_openapi_document_is_valid_shipped_and_served(server, spec):
    from importlib import resources

    from openapi_spec_validator import validate as validate_spec

    import cnnkit
    from cnnkit.config import ServeConfig
    from cnnkit.serve import openapi_spec

    assert resources.files("cnnkit").joinpath("openapi.json").is_file()  # package data
    validate_spec(spec)
    assert spec == openapi_spec(ServeConfig(str(server.checkpoint), max_images=MAX_IMAGES, api_key_file="keys.txt"))
    assert spec["info"]["version"] == cnnkit.__version__
    schemas = spec["components"]["schemas"]
    assert schemas["MultipartPredictRequest"]["properties"]["image"]["maxItems"] == MAX_IMAGES
    assert {"/predict", "/health", "/ready", "/metadata", "/metrics", "/openapi.json"} <= set(spec["paths"])
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '"openapi.json"' in pyproject  # shipped in the wheel, not only in the source tree


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


GOOD = [
    ("GET", "/health", None, None),
    ("GET", "/ready", None, None),
    ("GET", "/metadata", None, None),
    ("GET", "/metrics", None, None),
    ("GET", "/openapi.json", None, None),
    ("POST", "/predict?top_k=2", *multipart([("image", "a.png", image_bytes(1))])),
    ("POST", "/predict", *multipart([("image", f"{i}.png", image_bytes(i)) for i in range(3)], {"top_k": "3"})),
    ("POST", "/predict", json.dumps({"image": _b64(image_bytes(4)), "top_k": 2}).encode(), "application/json"),
    ("POST", "/predict?top_k=9", json.dumps({"images": [_b64(image_bytes(5)), _b64(image_bytes(6))]}).encode(),
     "application/json"),
    ("POST", "/explain?method=gradcam%2B%2B", *multipart([("image", "a.png", image_bytes(1))])),
    ("POST", "/explain?class=dog", image_bytes(2), "image/png"),
]

BAD = [  # (request, expected status)
    (("POST", "/predict", *multipart([("image", "x.txt", b"no picture")])), 422),
    (("POST", "/predict", *multipart([("image", "big.png", image_bytes(size=(200, 200)))])), 422),
    (("POST", "/predict", *multipart([("image", "e.png", b"")])), 400),
    (("POST", "/predict", *multipart([("photo", "a.png", image_bytes())])), 400),
    (("POST", "/predict", *multipart([("image", f"{i}.png", image_bytes(i)) for i in range(MAX_IMAGES + 1)])), 413),
    (("POST", "/predict", b"x" * (MAX_BYTES + 1), "application/json"), 413),
    (("POST", "/predict", b"hello", "text/plain"), 415),
    (("POST", "/predict", b'{"image": ', "application/json"), 400),
    (("POST", "/predict", json.dumps({"image": _b64(b"text")}).encode(), "application/json"), 422),
    (("POST", "/predict?top_k=0", *multipart([("image", "a.png", image_bytes())])), 400),
    (("POST", "/explain?class=wolf", *multipart([("image", "a.png", image_bytes())])), 400),
    (("POST", "/explain", b"hello", "text/plain"), 415),
    # found by review, were 500s: JSON nested past Python's recursion limit, an integer of over
    # 4300 digits (json.loads raises RecursionError / a plain ValueError for those)
    (("POST", "/predict", b"[" * 50_000 + b"]" * 50_000, "application/json"), 400),
    (("POST", "/predict", b'{"image": "%s", "top_k": 1%s}' % (_b64(image_bytes()).encode(), b"0" * 5000),
      "application/json"), 400),
]


@pytest.mark.parametrize("method, path, body, content_type", GOOD, ids=[f"{i}-{m}-{p}" for i, (m, p, _, _) in enumerate(GOOD)])
def test_good_requests_are_answered_as_documented(server, spec, method, path, body, content_type):
    answer = http(server.base, method, path, body, content_type, AUTH)
    assert answer.status == 200, answer.text
    assert_documented(spec, path.split("?")[0], method, answer.status, answer.headers, answer.body)


@pytest.mark.parametrize("request_, status", BAD, ids=[f"{i}-{s}" for i, (_, s) in enumerate(BAD)])
def test_bad_requests_are_answered_as_documented(server, spec, request_, status):
    method, path, body, content_type = request_
    answer = http(server.base, method, path, body, content_type, AUTH)
    assert answer.status == status, answer.text
    assert_documented(spec, path.split("?")[0], method, answer.status, answer.headers, answer.body)


# --- property-based: requests generated from the document -----------------------------------


def _budget(factor: float) -> int:
    """:func:`fuzz_budget`, which CNNKIT_HTTP_EXAMPLES overrides."""
    if os.environ.get("CNNKIT_HTTP_EXAMPLES"):
        return int(os.environ["CNNKIT_HTTP_EXAMPLES"])
    return fuzz_budget(factor)


@pytest.fixture(scope="module")
def api_schema(server, spec):
    schema = schemathesis.openapi.from_dict(spec)
    schema.config.update(base_url=server.base)
    schema.config.generation.update(modes=list(schemathesis.GenerationMode))  # valid and invalid inputs
    return schema


api = schemathesis.pytest.from_fixture("api_schema")
GENERATED: Counter = Counter()  # (operation, status) -> requests sent by the property test


def _checks():
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
            response_schema_conformance]


# ~18 s (100 generated requests to a real server): -m slow, with the long profile for more
@pytest.mark.slow
@api.parametrize()
@settings(max_examples=_budget(1.0),  # deadline and database: the loaded profile's (conftest.py)
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large])
def test_generated_requests_get_documented_json_answers_and_never_a_5xx(case, server, spec):
    response = case.call(headers=AUTH, timeout=30)
    GENERATED[(f"{case.method} {case.path}", response.status_code)] += 1
    case.validate_response(response, checks=_checks())
    assert_documented(spec, case.path, case.method, response.status_code, dict(response.headers), response.content)
    assert server.alive(), server.log_text()[-3000:]


def test_the_server_survived_the_generated_requests(server):
    assert_alive(server)
    errors = server.server_errors()
    assert not errors, errors[:3]


def test_the_generated_requests_reached_every_operation_and_the_model(request):
    """The property test above ran, in this session, and its requests reached the model: it is
    selected here whenever this test is (``-k`` on this name alone is an explicit skip, not a pass)."""
    if not any(item.name == "test_generated_requests_get_documented_json_answers_and_never_a_5xx"
               for item in request.session.items):
        pytest.skip("the property test was not selected in this session; nothing to count")
    per_operation = Counter()
    for (operation, status), n in sorted(GENERATED.items()):
        per_operation[operation] += n
        print(f"generated {operation} -> {status}: {n}")
    print(f"generated requests: {sum(per_operation.values())} {dict(per_operation)}")
    assert per_operation["POST /predict"] >= min(50, _budget(1.0)), dict(per_operation)
    assert GENERATED[("POST /predict", 200)] > 0  # the documented examples reach the model
    admin = {"POST /admin/reload", "POST /admin/promote", "POST /admin/rollback"}
    assert {"GET /health", "GET /ready", "GET /metadata", "POST /explain", *admin} <= set(per_operation), dict(per_operation)
    assert GENERATED[("POST /admin/reload", 200)] > 0 and GENERATED[("POST /admin/reload", 422)] > 0
    # (this server has no canary or shadow: there is nothing to promote or roll back)
    assert GENERATED[("POST /admin/promote", 409)] > 0 and GENERATED[("POST /admin/rollback", 409)] > 0


# --- oversized bodies -------------------------------------------------------------------------


def test_over_max_bytes_is_a_413_from_the_content_length_alone(server):
    """Content-Length over the limit: 413 at once, without waiting for (or reading) the body."""
    with connect(server, timeout=10) as sock:
        sock.sendall(keyed_head("application/json", **{"Content-Length": str(50 * MAX_BYTES)}) + b'{"image": "')
        started = time.monotonic()
        answer = read_answer(sock)
    assert_json_error(answer, 413)
    assert "too large" in answer.json["error"] and time.monotonic() - started < 5
    assert_alive(server)


def test_a_content_length_that_understates_the_body_reads_no_further(server):
    """Content-Length: 64, then over the limit follows: only 64 bytes are the request's body (a
    400: they are not JSON), the rest is not read as part of it; gunicorn then reads it as the
    next request, which is garbage, and answers a JSON 4xx before closing the connection."""
    body = json.dumps({"image": _b64(os.urandom(MAX_BYTES))}).encode()

    def send(sock) -> None:
        try:
            sock.sendall(body)
        except OSError:
            pass  # closed by the server: expected

    with connect(server, timeout=20) as sock:
        sock.sendall(keyed_head("application/json", **{"Content-Length": "64"}))
        sender = threading.Thread(target=send, args=(sock,), daemon=True)
        sender.start()
        first = read_answer(sock)
        assert_json_error(first, 400)
        assert "malformed JSON" in first.json["error"]
        try:
            second = read_answer(sock)
        except (OSError, HTTPException):  # closed before anything more was said
            second = None
        sender.join(20)
    if second is not None:
        assert 400 <= second.status < 500 and second.is_json_error(), second
    assert_alive(server)


def test_a_content_length_that_overstates_the_body_times_out_with_408(server):
    """Content-Length under the limit, but the client sends less and waits: 408 after --timeout."""
    data, content_type = multipart([("image", "a.png", image_bytes())])
    with connect(server, timeout=READ_TIMEOUT + 20) as sock:
        sock.sendall(keyed_head(content_type, **{"Content-Length": str(len(data) + 1000)}) + data)
        started = time.monotonic()
        answer = read_answer(sock)
        waited = time.monotonic() - started
    assert_json_error(answer, 408)
    assert READ_TIMEOUT - 1 < waited < READ_TIMEOUT + 5
    assert_alive(server)


@pytest.mark.parametrize("content_type", ["application/json", "multipart/form-data; boundary=xyz"])
def test_a_chunked_body_over_max_bytes_is_a_413(server, content_type):
    body = b"{" + b" " * (3 * MAX_BYTES) if content_type == "application/json" else (
        b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        + os.urandom(3 * MAX_BYTES) + b"\r\n--xyz--\r\n")
    answer = send_raw(server, keyed_head(content_type, **{"Transfer-Encoding": "chunked"}) + chunked(body))
    assert_json_error(answer, 413)
    assert_alive(server)


def test_a_chunked_body_within_the_limit_is_served(server):
    data, content_type = multipart([("image", "a.png", image_bytes(2))])
    answer = send_raw(server, keyed_head(content_type, **{"Transfer-Encoding": "chunked"}) + chunked(data, 1000))
    assert answer.status == 200, answer
    assert answer.json["results"][0]["filename"] == "a.png"
    assert isinstance(answer.json["results"][0]["unknown"], bool)  # the model has an unknown threshold


@pytest.mark.parametrize("body", [
    b"zz\r\n{}\r\n0\r\n\r\n",  # chunk size not hex
    b"5\r\n{\"ima\r\n",  # ends inside the chunks
    b"2\r\n{}XX0\r\n\r\n",  # no CRLF after the chunk
], ids=["bad-size", "truncated", "no-terminator"])
def test_malformed_chunked_bodies_are_a_json_400(server, body):
    with connect(server, timeout=READ_TIMEOUT + 20) as sock:
        sock.sendall(keyed_head("application/json", **{"Transfer-Encoding": "chunked"}) + body)
        sock.shutdown(socket.SHUT_WR)  # the client has nothing more to say
        answer = read_answer(sock)
    assert_json_error(answer, 400)
    assert_alive(server)


# --- malformed multipart ----------------------------------------------------------------------


def _part(name: str, filename: str | None, content: bytes, boundary: str = "b0undary") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"


PNG = image_bytes(3)
MALFORMED_MULTIPART = {
    # name: (content type, body, expected status)
    "no boundary parameter": ("multipart/form-data", _part("image", "a.png", PNG) + b"--b0undary--\r\n", 400),
    "boundary not in the body": ("multipart/form-data; boundary=other", _part("image", "a.png", PNG) + b"--b0undary--\r\n",
                                 400),
    "empty boundary": ("multipart/form-data; boundary=", _part("image", "a.png", PNG), 400),
    "boundary of 300 characters": ("multipart/form-data; boundary=" + "b" * 300,
                                   _part("image", "a.png", PNG, "b" * 300) + b"--" + b"b" * 300 + b"--\r\n", None),
    "no closing boundary": ("multipart/form-data; boundary=b0undary", _part("image", "a.png", PNG), None),
    "garbage parts": ("multipart/form-data; boundary=b0undary",
                      b"--b0undary\r\n\x00\xff garbage \r\n\r\n" + os.urandom(2000) + b"\r\n--b0undary--\r\n", 400),
    "no part headers": ("multipart/form-data; boundary=b0undary", b"--b0undary\r\n\r\n" + PNG + b"\r\n--b0undary--\r\n",
                        400),
    "random bytes": ("multipart/form-data; boundary=b0undary", os.urandom(5000), 400),
    "only the closing boundary": ("multipart/form-data; boundary=b0undary", b"--b0undary--\r\n", 400),
    "field named file": ("multipart/form-data; boundary=b0undary", _part("file", "a.png", PNG) + b"--b0undary--\r\n",
                         400),
    "image as a text field": ("multipart/form-data; boundary=b0undary", _part("image", None, b"abc") + b"--b0undary--\r\n",
                              400),
    "2000 parts": ("multipart/form-data; boundary=b0undary",
                   b"".join(_part(f"f{i}", None, b"x") for i in range(2000)) + b"--b0undary--\r\n", 413),
    "2000 image parts": ("multipart/form-data; boundary=b0undary",
                         b"".join(_part("image", f"{i}.png", b"x") for i in range(2000)) + b"--b0undary--\r\n", 413),
    "a text field over the form memory limit": (
        "multipart/form-data; boundary=b0undary",
        _part("image", "a.png", PNG) + _part("top_k", None, b"1" * 150_000) + b"--b0undary--\r\n", 400),
}


@pytest.mark.parametrize("case", list(MALFORMED_MULTIPART))
def test_malformed_multipart_is_a_json_4xx_and_the_server_goes_on(server, spec, case):
    content_type, body, status = MALFORMED_MULTIPART[case]
    answer = http(server.base, "POST", "/predict", body, content_type, AUTH, timeout=READ_TIMEOUT + 20)
    if status is None:  # parsers differ on what they forgive: any documented 2xx/4xx
        assert answer.status in (200, 400, 422), answer.text
    else:
        assert answer.status == status, answer.text
    assert_documented(spec, "/predict", "POST", answer.status, answer.headers, answer.body)
    assert_alive(server)


# --- protocol garbage: gunicorn's own answers are JSON too -----------------------------------


@pytest.mark.parametrize("data, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    (b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET /health HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n", 431),
    (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64) + b"\r\n\r\n", 400),  # a TLS hello
], ids=["garbage", "bad-version", "long-uri", "many-headers", "two-lengths", "tls"])
def test_protocol_errors_are_json_and_the_server_goes_on(server, data, status):
    answer = send_raw(server, data, timeout=READ_TIMEOUT + 20)
    assert_json_error(answer, status)
    assert_alive(server)
