"""Soak: minutes of mixed good and bad requests at concurrency 16 against ``cnnkit serve``.

Out of the default run (``-m slow``)::

    python -m pytest -m slow tests/test_soak.py -s            # 5 minutes
    CNNKIT_SOAK_SECONDS=60 python -m pytest -m slow tests/test_soak.py -s

Environment: CNNKIT_SOAK_SECONDS (300), CNNKIT_SOAK_CONCURRENCY (16), CNNKIT_SOAK_REPORT (a path:
the figures as JSON). Checks: no 5xx and nothing but 200 for the good requests, the documented 4xx
for every bad one, no worker died, each worker's RSS flat after warm-up, and the p99 latency of
the last minute not much worse than that of the first.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("flask")
pytest.importorskip("gunicorn")
pytest.importorskip("prometheus_client")

from deploy_helpers import image_bytes, make_checkpoint, multipart  # noqa: E402
from http_server import rss_kib, start_server  # noqa: E402

SECONDS = float(os.environ.get("CNNKIT_SOAK_SECONDS", "300"))
CONCURRENCY = int(os.environ.get("CNNKIT_SOAK_CONCURRENCY", "16"))
REPORT = os.environ.get("CNNKIT_SOAK_REPORT")
WORKERS = 2
MAX_BYTES, MAX_IMAGES = 100_000, 4  # small: an over-limit body is drained whole, no reset
WINDOW = min(60.0, SECONDS / 3)  # "first minute" and "last minute" (shorter for a short soak)
WARMUP = min(60.0, SECONDS / 5)  # RSS is compared from here to the end
RSS_TOLERANCE_KIB = 24 * 1024  # after warm-up, growth of at most 24 MiB per worker ...
RSS_TOLERANCE_SHARE = 0.05  # ... or 5% of its RSS, whichever is larger


def _requests() -> list[tuple[str, str, str, bytes | None, dict[str, str], int, float]]:
    """(kind, method, path, body, headers, expected status, weight)."""
    pngs = [image_bytes(seed) for seed in range(6)]
    jpegs = [image_bytes(seed, fmt="JPEG", size=(120, 90)) for seed in range(6, 10)]
    b64 = [base64.b64encode(p).decode() for p in pngs]

    def mp(files, fields=None):
        body, content_type = multipart(files, fields)
        return body, {"Content-Type": content_type}

    def js(payload):
        return json.dumps(payload).encode(), {"Content-Type": "application/json"}

    items = []
    for i, data in enumerate(pngs + jpegs):
        items.append(("good", "POST", "/predict?top_k=2", *mp([("image", f"{i}.img", data)]), 200, 3.0))
    items += [
        ("good", "POST", "/predict", *mp([("image", f"{i}.png", p) for i, p in enumerate(pngs[:3])], {"top_k": "3"}),
         200, 3.0),
        ("good", "POST", "/predict", *js({"image": b64[0], "top_k": 3}), 200, 4.0),
        ("good", "POST", "/predict?top_k=1", *js({"images": b64[1:4]}), 200, 4.0),
        ("good", "GET", "/health", None, {}, 200, 2.0),
        ("good", "GET", "/metadata", None, {}, 200, 0.5),
        ("good", "GET", "/metrics", None, {}, 200, 0.5),
        ("bad", "POST", "/predict", *mp([("image", "x.txt", b"not a picture")]), 422, 2.0),
        ("bad", "POST", "/predict", *mp([("image", "t.jpg", jpegs[0][: len(jpegs[0]) // 2])]), 422, 2.0),
        ("bad", "POST", "/predict", *mp([("image", "e.png", b"")]), 400, 1.0),
        ("bad", "POST", "/predict", *mp([("photo", "a.png", pngs[0])]), 400, 1.0),
        ("bad", "POST", "/predict", *mp([("image", f"{i}.png", pngs[0]) for i in range(MAX_IMAGES + 1)]), 413, 1.0),
        ("bad", "POST", "/predict", os.urandom(MAX_BYTES + 500), {"Content-Type": "application/json"}, 413, 0.5),
        ("bad", "POST", "/predict", *js({"image": "@@not base64@@"}), 400, 1.0),
        ("bad", "POST", "/predict", b'{"image": [', {"Content-Type": "application/json"}, 400, 1.0),
        ("bad", "POST", "/predict", b"hello", {"Content-Type": "text/plain"}, 415, 1.0),
        ("bad", "POST", "/predict?top_k=zero", *mp([("image", "a.png", pngs[1])]), 400, 1.0),
        ("bad", "GET", "/predict", None, {}, 405, 0.5),
        ("bad", "GET", "/nowhere", None, {}, 404, 0.5),
    ]
    return items


class Client:
    """One keep-alive connection; reconnects when the server closed it (after some errors)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.conn: http.client.HTTPConnection | None = None
        self.reconnects = 0

    def send(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> int:
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
            fresh = attempt == 1 or self.conn.sock is None
            try:
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                response.read()
                if response.will_close:
                    self.conn.close()
                    self.conn = None
                return response.status
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.conn.close()
                self.conn = None
                self.reconnects += 1
                if fresh:
                    raise
        raise AssertionError("unreachable")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


@pytest.mark.slow
def test_soak(tmp_path):
    server = start_server(make_checkpoint(tmp_path / "model.pt"), tmp_path / "server.log",
                          "--threads", "16", "--max-bytes", str(MAX_BYTES), "--max-images", str(MAX_IMAGES),
                          workers=WORKERS, timeout=30)
    try:
        workers = server.ready_workers()
        rss_start = {pid: rss_kib(pid) for pid in workers}
        items = _requests()
        weights = [item[-1] for item in items]
        records: list[tuple[float, str, int, int, float, str]] = []  # (t, kind, expected, status, seconds, path)
        failures: list[str] = []
        lock = threading.Lock()
        began = time.monotonic()
        end = began + SECONDS

        def run(seed: int) -> None:
            rng = random.Random(seed)
            client = Client(server.host, server.port)
            while time.monotonic() < end:
                kind, method, path, body, headers, expected, _ = rng.choices(items, weights)[0]
                started = time.monotonic()
                try:
                    status = client.send(method, path, body, headers)
                except Exception as exc:  # a connection error: counted as a failure
                    with lock:
                        failures.append(f"{method} {path}: {type(exc).__name__}: {exc}")
                    status = -1
                with lock:
                    records.append((started - began, kind, expected, status, time.monotonic() - started,
                                    path.split("?")[0]))

        threads = [threading.Thread(target=run, args=(seed,), daemon=True) for seed in range(CONCURRENCY)]
        for t in threads:
            t.start()
        time.sleep(WARMUP)
        rss_warm = {pid: rss_kib(pid) for pid in workers}
        for t in threads:
            t.join(SECONDS + 180)
        assert not any(t.is_alive() for t in threads), "a client hung"
        elapsed = time.monotonic() - began
        live = server.worker_pids()
        rss_end = {pid: rss_kib(pid) for pid in workers if pid in live}
        server_errors = server.server_errors()
    finally:
        server.stop()

    good = [r for r in records if r[1] == "good"]
    bad = [r for r in records if r[1] == "bad"]
    predicts = [r for r in good if r[5] == "/predict"]
    first = [r[4] for r in predicts if r[0] < WINDOW]
    last = [r[4] for r in predicts if r[0] >= SECONDS - WINDOW]
    by_class = Counter(f"{r[3] // 100}xx" if r[3] > 0 else "connection error" for r in records)
    figures = {
        "seconds": round(elapsed, 1),
        "concurrency": CONCURRENCY,
        "workers": WORKERS,
        "requests": len(records),
        "requests_per_second": round(len(records) / elapsed, 1),
        "good": len(good),
        "bad": len(bad),
        "status_classes": dict(sorted(by_class.items())),
        "statuses": {f"{kind} {status}": n for (kind, status), n in
                     sorted(Counter((r[1], r[3]) for r in records).items())},
        "good_not_200": sum(1 for r in good if r[3] != 200),
        "bad_not_expected": sum(1 for r in bad if r[3] != r[2]),
        "connection_failures": failures[:5],
        "server_5xx_logged": len(server_errors),
        "predict_latency_ms": {
            "first_window_s": WINDOW,
            "first_p50": round(1000 * _percentile(first, 50), 1), "first_p99": round(1000 * _percentile(first, 99), 1),
            "last_p50": round(1000 * _percentile(last, 50), 1), "last_p99": round(1000 * _percentile(last, 99), 1),
            "overall_mean": round(1000 * statistics.fmean(r[4] for r in predicts), 1) if predicts else None,
        },
        "rss_mib": {str(pid): {"start": round(rss_start[pid] / 1024, 1), "after_warmup": round(rss_warm[pid] / 1024, 1),
                               "end": round(rss_end[pid] / 1024, 1) if pid in rss_end else None}
                    for pid in sorted(workers)},
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if REPORT:
        Path(REPORT).write_text(text + "\n", encoding="utf-8")

    assert not failures, failures[:5]
    assert figures["good_not_200"] == 0, figures["statuses"]
    assert figures["bad_not_expected"] == 0, figures["statuses"]
    assert not server_errors, server_errors[:3]
    assert set(rss_end) == set(workers), "a worker died or was replaced during the soak"
    for pid in workers:
        allowed = max(RSS_TOLERANCE_KIB, RSS_TOLERANCE_SHARE * rss_warm[pid])
        assert rss_end[pid] - rss_warm[pid] <= allowed, figures["rss_mib"]
    first_p99, last_p99 = _percentile(first, 99), _percentile(last, 99)
    assert last_p99 <= 1.5 * first_p99 + 0.05, figures["predict_latency_ms"]
