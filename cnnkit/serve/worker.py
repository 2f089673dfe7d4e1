"""The gunicorn worker of ``cnnkit serve``: :class:`BoundedThreadWorker`, gunicorn's gthread
worker with one deadline for reading each request, JSON bodies for the errors gunicorn answers
itself, and load-aware accept.

The class subclasses gunicorn's, and gunicorn is an optional extra, so it is defined on first use
by :func:`bounded_worker_class`; ``cnnkit.serve.BoundedThreadWorker`` (its dotted name in
:mod:`cnnkit.gunicorn_conf`) calls that.

Environment: ``CNNKIT_ACCEPT_DELAY_MS`` (default 1) is how long a worker waits, per connection it
holds (at most 10), before accepting a new one; ``0`` turns load-aware accept off (first come,
first served), which ``benchmarks/serve_load.py`` uses to measure what it is worth.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from ..config import ServeConfig
from .parsing import RequestTimeout, error_body

if TYPE_CHECKING:
    from .service import ModelService

FIRST_BYTES_WAIT = 0.05  # seconds a new connection may take to send its first bytes before it is parked
ACCEPT_DELAY_PER_CONNECTION = 0.001  # seconds, the default; see BoundedThreadWorker.accept
ACCEPT_DELAY_ENV = "CNNKIT_ACCEPT_DELAY_MS"  # overrides it, in milliseconds (0: first come, first served)


def accept_delay_per_connection() -> float:
    """Seconds a worker waits per connection it holds before accepting: ``CNNKIT_ACCEPT_DELAY_MS``
    (milliseconds) where set, else :data:`ACCEPT_DELAY_PER_CONNECTION`."""
    value = os.environ.get(ACCEPT_DELAY_ENV, "").strip()
    if not value:
        return ACCEPT_DELAY_PER_CONNECTION
    try:
        delay = float(value) / 1000
    except ValueError:
        delay = -1.0
    if not 0 <= delay < 60:  # (nan fails too)
        raise ValueError(f"{ACCEPT_DELAY_ENV}={value!r}: give milliseconds, 0 or more (and under 60000)")
    return delay


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
def bounded_worker_class() -> type:
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

        accept_delay = accept_delay_per_connection()  # seconds per held connection, read once

        def init_signals(self) -> None:
            super().init_signals()  # (gunicorn's leaves SIGHUP at its default: the worker would die)
            signal.signal(signal.SIGHUP, self.handle_hup)
            signal.siginterrupt(signal.SIGHUP, False)

        def handle_hup(self, sig: int, frame: Any) -> None:
            # The master forwards its SIGHUP (cnnkit.serve.control): reload off the signal
            # handler, in a thread, while the request threads go on serving.
            service = self._service()
            if service is not None:
                threading.Thread(target=service.reload_published, name="cnnkit-reload", daemon=True).start()

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
            if self.nr_conns and self.cfg.workers > 1 and self.accept_delay > 0:
                time.sleep(self.accept_delay * min(self.nr_conns, 10))
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

    BoundedThreadWorker.__module__ = "cnnkit.serve"  # where its dotted name points (gunicorn_conf.worker_class)
    return BoundedThreadWorker
