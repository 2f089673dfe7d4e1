"""A real ``cnnkit serve`` (gunicorn subprocess on a free loopback port) for the HTTP robustness
tests (test_http_api, test_http_faults, test_soak), and raw-socket HTTP for the requests that
urllib cannot send: lying Content-Length, chunked bodies, stalls, garbage.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from http.client import HTTPResponse
from pathlib import Path

import pytest

from deploy_helpers import Response, free_port, http, metric_values
from helpers import cli_subprocess_env, cnnkit_command


class Server:
    def __init__(self, process: subprocess.Popen, port: int, log: Path, checkpoint: Path, workers: int):
        self.process = process
        self.host = "127.0.0.1"
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        self.checkpoint = checkpoint
        self.workers = workers

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def worker_pids(self) -> set[int]:
        """The gunicorn master's child processes (from /proc: Linux)."""
        if not os.path.isdir("/proc/self"):
            pytest.skip("needs /proc")
        children = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue  # gone meanwhile
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.process.pid:  # field 4: parent pid
                    children.add(int(entry))
        return children

    def ready_workers(self, timeout: float = 90) -> set[int]:
        """Wait until ``workers`` distinct worker pids have answered /ready with 200, return them."""
        ready: set[int] = set()
        deadline = time.monotonic() + timeout
        while True:
            assert self.alive(), f"server exited with {self.process.returncode}:\n{self.log_text()[-5000:]}"
            live = self.worker_pids()
            ready &= live
            if len(ready) >= self.workers and len(live) == self.workers:
                return ready
            assert time.monotonic() < deadline, f"server not ready in time:\n{self.log_text()[-5000:]}"
            try:
                answer = http(self.base, "GET", "/ready", timeout=5)
                if answer.status == 200:
                    ready.add(answer.json["worker"])
            except OSError:
                pass
            time.sleep(0.05)

    def server_errors(self) -> list[dict]:
        """The request log's 5xx lines, but /ready's 503 while the workers warm up."""
        return [r for r in self.records() if r["status"] >= 500 and r["path"] != "/ready"]

    def records(self) -> list[dict]:
        """The server's JSON request log lines."""
        return request_records(self.log_text())

    def metrics(self) -> dict:
        answer = http(self.base, "GET", "/metrics")
        assert answer.status == 200
        return metric_values(answer.text)

    def stop(self) -> None:
        stop_process(self.process)


def start_server(checkpoint: Path, log: Path, *options: str, workers: int = 2, timeout: float = 20,
                 wait: bool = True, env_extra: dict[str, str] | None = None) -> Server:
    """``cnnkit serve checkpoint --workers N --timeout T *options`` on a free port, ready to serve."""
    port = free_port()
    env = cli_subprocess_env(log.parent / "torch-home")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # cnnkit serve makes its own
    env.update(env_extra or {})
    args = cnnkit_command("serve", checkpoint, "--port", port, "--device", "cpu", "--workers", workers,
                          "--timeout", timeout, *options)
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = Server(process, port, log, checkpoint, workers)
    if wait:
        try:
            server.ready_workers()
        except BaseException:
            server.stop()
            raise
    return server


# --- raw HTTP -------------------------------------------------------------------------------


class RawAnswer(Response):
    def is_json_error(self) -> bool:
        """A JSON error body ``{"error": "...", "status": <this status>}``."""
        if not self.headers.get("content-type", "").startswith("application/json"):
            return False
        body = self.json
        return isinstance(body.get("error"), str) and body.get("status") == self.status

    def __repr__(self) -> str:
        return f"RawAnswer({self.status}, {self.body[:300]!r})"


def connect(server: Server, timeout: float = 30) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=timeout)


def read_answer(sock: socket.socket) -> RawAnswer:
    """Read one HTTP response from ``sock`` (left open)."""
    response = HTTPResponse(sock)
    response.begin()
    body = response.read()
    return RawAnswer(response.status, {k.lower(): v for k, v in response.getheaders()}, body)


def send_raw(server: Server, data: bytes, timeout: float = 30) -> RawAnswer:
    """Send ``data`` (a whole HTTP request, as bytes) on a new connection; read the answer."""
    with connect(server, timeout) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (and closed) before reading everything: read its answer
        return read_answer(sock)


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def predict_head(content_type: str, path: str = "/predict", **headers: str) -> bytes:
    return request_head("POST", path, {"Content-Type": content_type, **headers})


def assert_json_error(answer: RawAnswer, status: int) -> None:
    assert answer.status == status, answer
    assert answer.is_json_error(), answer


def chunked(body: bytes, size: int = 8192) -> bytes:
    """``body`` in HTTP/1.1 chunked transfer encoding."""
    pieces = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(pieces) + b"0\r\n\r\n"


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS in /proc/<pid>/status), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def request_records(log_text: str) -> list[dict]:
    """The JSON request log lines of a server's log (other lines skipped)."""
    found = []
    for line in log_text.splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line still being written
    return found


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM (a graceful stop), then SIGKILL if it is still running 30 s later."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
