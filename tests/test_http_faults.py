"""Slow clients and worker death against a real ``cnnkit serve`` (2 workers x 4 threads, --timeout 2).

Slow clients: reading a request, headers and body, may take at most --timeout seconds; a client
that stalls or trickles gets a JSON 408 and its connection is closed, so it holds a request thread
no longer than that, and the other clients are served meanwhile. Worker death: kill -9 of one
worker; gunicorn starts another, the service keeps answering, and a request in flight on the
other worker completes.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

import pytest

pytest.importorskip("flask")
pytest.importorskip("gunicorn")
pytest.importorskip("prometheus_client")
if not os.path.isdir("/proc/self"):
    pytest.skip("needs /proc (Linux)", allow_module_level=True)

from deploy_helpers import http, image_bytes, make_checkpoint, multipart, post_images  # noqa: E402
from http_server import (  # noqa: E402
    assert_json_error,
    connect,
    predict_head,
    read_answer,
    request_head,
    start_server,
)

TIMEOUT = 2.0  # --timeout: the read deadline of one request
WORKERS, THREADS = 2, 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("http-faults")
    instance = start_server(make_checkpoint(folder / "model.pt"), folder / "server.log",
                            "--threads", str(THREADS), workers=WORKERS, timeout=TIMEOUT)
    yield instance
    instance.stop()


def _predict_body(seed: int = 0) -> tuple[bytes, str]:
    return multipart([("image", "a.png", image_bytes(seed))])


def _timed_get(server, path: str = "/health") -> float:
    started = time.monotonic()
    answer = http(server.base, "GET", path, timeout=30)
    assert answer.status == 200, answer.text
    return time.monotonic() - started


def assert_408(answer) -> None:
    assert_json_error(answer, 408)
    assert "did not arrive" in answer.json["error"], answer


# --- slow clients -------------------------------------------------------------------------------


def test_headers_then_silence_is_a_408_after_the_timeout(server):
    with connect(server, timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
        started = time.monotonic()
        answer = read_answer(sock)
        waited = time.monotonic() - started
        assert sock.recv(1) == b""  # and the connection is closed
    assert_408(answer)
    assert TIMEOUT - 0.5 < waited < TIMEOUT + 3


def test_complete_headers_then_no_body_is_a_408_from_the_app(server):
    data, content_type = _predict_body()
    head = predict_head(content_type, **{"Content-Length": str(len(data))})
    with connect(server, timeout=30) as sock:
        sock.sendall(head + data[:100])
        started = time.monotonic()
        answer = read_answer(sock)
        waited = time.monotonic() - started
    assert_408(answer)
    assert TIMEOUT - 0.5 < waited < TIMEOUT + 3
    logged = [r for r in server.records() if r["status"] == 408]
    assert logged and "did not arrive" in logged[-1]["error"]  # the app's request log has it


def test_a_body_trickled_byte_by_byte_is_cut_at_the_timeout(server):
    """A per-read timeout would never fire here: every read gets a byte in time. The deadline is
    for the whole request."""
    data, content_type = _predict_body()
    head = predict_head(content_type, **{"Content-Length": str(len(data))})
    answer = None
    with connect(server, timeout=30) as sock:
        sock.sendall(head)
        started = time.monotonic()
        try:
            for i in range(len(data)):
                sock.sendall(data[i:i + 1])
                time.sleep(0.05)
                if time.monotonic() - started > TIMEOUT + 10:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_answer(sock)
        waited = time.monotonic() - started
    assert_408(answer)
    assert waited < TIMEOUT + 3


def test_stalled_clients_do_not_stop_the_others(server):
    """A few stalled connections: the others are answered at once. More stalled connections than
    request threads (2 x 4): each is cut at the timeout, so the others wait at most that long."""
    def stall(count: int) -> list[socket.socket]:
        socks = []
        for _ in range(count):
            sock = connect(server, timeout=30)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: the headers never end
            socks.append(sock)
        return socks

    few = stall(2)
    try:
        time.sleep(0.3)  # the stalled requests are in threads now
        assert max(_timed_get(server) for _ in range(5)) < 1.0
        assert post_images(server.base, [image_bytes()]).status == 200
    finally:
        for sock in few:
            sock.close()

    stalled = 2 * WORKERS * THREADS
    many = stall(stalled)
    # The worst case: every stalled connection on one worker, whose THREADS threads each hold one
    # for TIMEOUT, wave after wave; a server without the read deadline would never answer.
    bound = (stalled / THREADS + 1) * TIMEOUT + 3
    try:
        time.sleep(0.3)
        waits = []

        def client() -> None:
            waits.append(_timed_get(server))

        clients = [threading.Thread(target=client) for _ in range(4)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(60)
        assert len(waits) == 4 and max(waits) < bound, waits
        for sock in many:  # each stalled client got its 408
            sock.settimeout(bound)
            assert_408(read_answer(sock))
    finally:
        for sock in many:
            sock.close()
    assert max(_timed_get(server) for _ in range(5)) < 1.0


def test_an_idle_keep_alive_connection_holds_no_thread(server):
    """Connections that send nothing (opened, or kept alive after a response) wait in gunicorn's
    poller, not in a request thread: many of them do not delay anyone."""
    idle = [connect(server, timeout=30) for _ in range(4 * WORKERS * THREADS)]
    try:
        time.sleep(0.2)
        assert max(_timed_get(server) for _ in range(5)) < 1.0
    finally:
        for sock in idle:
            sock.close()


# --- worker death -------------------------------------------------------------------------------


def test_kill_9_of_a_worker_is_survived(server):
    """kill -9 of one worker while a request is in flight on the other: that request completes,
    the service answers throughout, gunicorn starts a replacement that serves too."""
    workers = server.ready_workers()
    assert len(workers) == WORKERS

    # A kept-alive connection stays with the worker that accepted it: find which one it is.
    sock = connect(server, timeout=30)
    try:
        sock.sendall(request_head("GET", "/health", {}))
        survivor = read_answer(sock).json["worker"]
        (victim,) = workers - {survivor}

        # Start a request on the survivor and leave it in flight: headers and half the body sent.
        data, content_type = _predict_body(seed=11)
        sock.sendall(predict_head(content_type, "/predict?top_k=2", **{"Content-Length": str(len(data))}))
        sock.sendall(data[: len(data) // 2])
        started = time.monotonic()

        os.kill(victim, signal.SIGKILL)
        statuses = [http(server.base, "GET", "/health", timeout=10).status for _ in range(5)]
        assert statuses == [200] * 5  # the survivor answers while the victim is gone

        sock.sendall(data[len(data) // 2:])  # within the timeout: the request completes
        assert time.monotonic() - started < TIMEOUT
        answer = read_answer(sock)
        assert answer.status == 200, answer
        assert len(answer.json["results"][0]["predictions"]) == 2
    finally:
        sock.close()

    replaced = server.ready_workers(timeout=60)  # both workers ready again, one of them new
    assert survivor in replaced and victim not in replaced and len(replaced) == WORKERS
    assert server.alive()
    for seed in range(4):
        assert post_images(server.base, [image_bytes(seed)]).status == 200
    metrics = http(server.base, "GET", "/metrics")
    assert metrics.status == 200 and "cnnkit_requests_total" in metrics.text
