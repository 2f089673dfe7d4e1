"""Running ``cnnkit serve`` in production, against the real gunicorn server: overload shedding
(a deliberately slow model), API keys, and reloading a model, good or broken, under concurrent
requests, by ``POST /admin/reload`` and by SIGHUP."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("flask")
pytest.importorskip("gunicorn")
pytest.importorskip("prometheus_client")

from deploy_helpers import http, image_bytes, make_checkpoint, metric, metric_values, multipart  # noqa: E402
from http_server import start_server  # noqa: E402

from cnnkit.models.checkpoint import load_checkpoint  # noqa: E402
from cnnkit.models.exported import model_version  # noqa: E402

KEY, OTHER_KEY = "k-" + "a1" * 16, "k-" + "b2" * 16
SLOW_MS = 1000


def write_keys(folder: Path) -> Path:
    path = folder / "keys.txt"
    path.write_text(f"# who may call\nalice {KEY}\n\n{OTHER_KEY}\n")
    path.chmod(0o600)
    return path


def bearer(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def predict(server, seed: int = 0, headers: dict[str, str] | None = None, timeout: float = 60):
    body, content_type = multipart([("image", f"img{seed}.png", image_bytes(seed))])
    began = time.perf_counter()
    answer = http(server.base, "POST", "/predict", body, content_type, headers, timeout=timeout)
    return answer, time.perf_counter() - began


def reload(server, checkpoint: Path | None = None, key: str = KEY):
    body = json.dumps({"checkpoint": str(checkpoint)} if checkpoint else {}).encode()
    return http(server.base, "POST", "/admin/reload", body, "application/json", bearer(key), timeout=60)


# --- overload shedding ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shed")
    instance = start_server(
        make_checkpoint(folder / "model.pt"), folder / "server.log", "--threads", "16", "--max-batch", "2",
        "--max-queue", "2", workers=1, env_extra={"CNNKIT_SERVE_TEST_HOOKS": "1", "CNNKIT_SERVE_TEST_SLOW_MS": str(SLOW_MS)},
    )
    yield instance
    instance.stop()


def test_past_max_queue_requests_are_refused_at_once_with_retry_after(slow_server):
    before = slow_server.metrics()
    readiness: list[tuple[int, str]] = []

    def watch_ready() -> None:  # while the burst is in flight
        time.sleep(SLOW_MS / 4000)
        answer = http(slow_server.base, "GET", "/ready")
        readiness.append((answer.status, answer.json["reason"]))

    with ThreadPoolExecutor(12) as pool:
        watcher = threading.Thread(target=watch_ready)
        watcher.start()
        answers = list(pool.map(lambda seed: predict(slow_server, seed), range(10)))
        watcher.join()
    statuses = Counter(answer.status for answer, _ in answers)
    assert set(statuses) == {200, 503} and statuses[200] >= 2, statuses
    for answer, seconds in answers:
        if answer.status == 503:
            assert answer.json["status"] == 503 and "--max-queue" in answer.json["error"], answer.json
            assert int(answer.headers["Retry-After"]) >= 1
            assert seconds < SLOW_MS / 1000, seconds  # refused before the model, not after a forward pass
    assert readiness and readiness[0][0] == 503 and readiness[0][1].startswith("saturated"), readiness
    assert http(slow_server.base, "GET", "/ready").status == 200  # ready again once the work is done
    after = slow_server.metrics()
    shed = metric(after, "cnnkit_shed_total") - metric(before, "cnnkit_shed_total")
    refused = (metric(after, "cnnkit_requests_total", endpoint="/predict", status="503")
               - metric(before, "cnnkit_requests_total", endpoint="/predict", status="503"))
    assert shed == refused == statuses[503]
    assert metric(after, "cnnkit_max_queue_images") == 2
    assert not [r for r in slow_server.server_errors() if r["status"] != 503]


def test_the_default_queue_bound_is_measured_at_warm_up(tmp_path):
    server = start_server(make_checkpoint(tmp_path / "model.pt"), tmp_path / "server.log", "--max-batch", "4",
                          "--queue-target-ms", "100000", workers=1)
    try:
        serving = http(server.base, "GET", "/metadata").json["serving"]
    finally:
        server.stop()
    assert serving["images_per_second"] > 0
    assert abs(serving["max_queue"] - serving["images_per_second"] * 100) <= 2, serving  # what it scores in 100 s


# --- API keys ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    for name, seed in (("b.pt", 2.0), ("c.pt", 3.0)):
        make_checkpoint(folder / name, temperature=seed)
    broken = folder / "broken.pt"
    broken.write_bytes(b"not a checkpoint at all" * 100)
    other = load_checkpoint(str(make_checkpoint(folder / "other.pt")))
    other.classes = list(reversed(other.classes))
    other.save(folder / "other.pt")
    instance = start_server(make_checkpoint(folder / "a.pt"), folder / "server.log", "--api-key-file",
                            write_keys(folder), "--protect-metrics", "--threads", "8", workers=2)
    instance.folder = folder
    yield instance
    instance.stop()


@pytest.mark.parametrize("path", ["/predict", "/metadata", "/metrics", "/admin/reload"])
def test_without_a_key_protected_endpoints_are_401_with_a_bearer_challenge(keyed_server, path):
    method = "GET" if path in ("/metadata", "/metrics") else "POST"
    for headers, error in (({}, None), (bearer("wrong-" + KEY), "invalid_token"), ({"Authorization": f"Basic {KEY}"}, "invalid_token")):
        answer = http(keyed_server.base, method, path, b"{}" if method == "POST" else None,
                      "application/json" if method == "POST" else None, headers)
        assert answer.status == 401 and answer.json["status"] == 401, (path, headers, answer.body[:200])
        challenge = answer.headers["WWW-Authenticate"]
        assert challenge.startswith('Bearer realm="cnnkit"') and (error is None or f'error="{error}"' in challenge)


def test_with_a_key_every_endpoint_answers_and_the_log_names_the_key_not_its_value(keyed_server):
    for key in (KEY, OTHER_KEY):
        answer, _ = predict(keyed_server, headers=bearer(key))
        assert answer.status == 200, answer.body[:300]
    assert http(keyed_server.base, "GET", "/metadata", headers=bearer()).status == 200
    assert http(keyed_server.base, "GET", "/metrics", headers=bearer(OTHER_KEY)).status == 200
    for path in ("/health", "/ready", "/ping", "/openapi.json", "/"):  # open: probes, the document, the page
        assert http(keyed_server.base, "GET", path).status == 200, path
    time.sleep(0.2)
    log = keyed_server.log_text()
    assert KEY not in log and OTHER_KEY not in log
    clients = {r.get("client") for r in keyed_server.records() if r["path"] == "/predict" and r["status"] == 200}
    assert {"alice", "key-4"} <= clients, clients


def test_a_bad_key_file_is_a_one_line_error_that_never_shows_a_key(tmp_path):
    from helpers import cli_subprocess_env, run_cli

    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice {KEY}\nbob short\n")
    result = run_cli(["serve", str(make_checkpoint(tmp_path / "m.pt")), "--api-key-file", str(keys)],
                     cli_subprocess_env(tmp_path / "th"), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "line 2" in result.stderr and "short" not in result.stderr and KEY not in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- reload under load ------------------------------------------------------------------------


class Load:
    """Clients predicting without pause until stopped; every answer kept."""

    def __init__(self, server, clients: int = 4):
        self.server, self.answers, self.stopping = server, [], threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, seed: int) -> None:
        while not self.stopping.is_set():
            answer, _ = predict(self.server, seed, bearer())
            self.answers.append(answer)

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()


def versions_served(server, expected: str, timeout: float = 60) -> set[int]:
    """Wait until every worker answers /metadata with ``expected``; the workers' pids."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < server.workers:
        assert time.monotonic() < deadline, f"not every worker serves {expected}:\n{server.log_text()[-3000:]}"
        meta = http(server.base, "GET", "/metadata", headers=bearer()).json
        if meta["model_version"] == expected:
            seen.add(meta["serving"]["worker"])
        time.sleep(0.02)
    return seen


def test_reloads_good_and_broken_under_load_fail_no_request(keyed_server):
    folder = keyed_server.folder
    a, b, c = (model_version(folder / name) for name in ("a.pt", "b.pt", "c.pt"))
    with Load(keyed_server) as load:
        time.sleep(0.5)
        answer = reload(keyed_server, folder / "b.pt")
        assert answer.status == 200, answer.body[:500]
        assert answer.json["status"] == "reloaded" and answer.json["workers"] == "all"
        assert (answer.json["previous_version"], answer.json["model_version"]) == (a, b)
        versions_served(keyed_server, b)
        for bad, reason in (("broken.pt", "not a cnnkit checkpoint|cannot|corrupt"), ("other.pt", "classes differ"),
                            ("missing.pt", "cannot read|no such|not found")):
            answer = reload(keyed_server, folder / bad)
            assert answer.status == 422 and answer.json["model_version"] == b, answer.body[:500]
            assert re.search(reason, answer.json["error"], re.I) and "still serving" in answer.json["error"]
        assert reload(keyed_server).json["status"] == "unchanged"  # the same file, unchanged on disk
        # SIGHUP: the file served, changed on disk, is loaded again by every worker
        (folder / "b.pt").write_bytes((folder / "c.pt").read_bytes())
        keyed_server.process.send_signal(signal.SIGHUP)
        versions_served(keyed_server, c)
        time.sleep(0.3)
    versions = Counter(answer.json["model_version"] for answer in load.answers if answer.status == 200)
    assert all(answer.status == 200 for answer in load.answers), Counter(answer.status for answer in load.answers)
    assert set(versions) <= {a, b, c} and versions[b] > 0 and versions[c] > 0, versions
    for answer in load.answers:
        assert answer.headers["X-Model-Version"] == answer.json["model_version"]
    assert keyed_server.alive() and not keyed_server.server_errors()
    values = metric_values(http(keyed_server.base, "GET", "/metrics", headers=bearer()).text)
    assert metric(values, "cnnkit_reloads_total", result="failed") == 3
    assert metric(values, "cnnkit_reloads_total", result="ok") >= 2 * keyed_server.workers
    assert metric(values, "cnnkit_model_info", model_version=c, arch="resnet18", backend="torch") == 1


def test_a_worker_started_after_a_reload_serves_the_reloaded_model(keyed_server):
    folder = keyed_server.folder
    current = http(keyed_server.base, "GET", "/metadata", headers=bearer()).json["model_version"]
    old = keyed_server.worker_pids()
    os.kill(sorted(old)[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while not (keyed_server.worker_pids() - old) or len(keyed_server.worker_pids()) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    seen = versions_served(keyed_server, current)
    assert seen - old, (seen, old)  # the new worker answered with the reloaded model
    assert current != model_version(folder / "a.pt")


def test_a_new_worker_serves_the_published_model_or_the_configured_one_if_it_is_gone(tmp_path, monkeypatch):
    from cnnkit.config import ServeConfig
    from cnnkit.serve.control import CONTROL_DIR_ENV, publish_model
    from cnnkit.serve.service import first_model

    configured, reloaded = make_checkpoint(tmp_path / "a.pt"), make_checkpoint(tmp_path / "b.pt", temperature=2.0)
    monkeypatch.setenv(CONTROL_DIR_ENV, str(tmp_path))
    cfg = ServeConfig(str(configured), device="cpu")
    assert first_model(cfg).version == model_version(configured)  # nothing published yet
    publish_model(str(reloaded))
    assert first_model(cfg).version == model_version(reloaded)
    reloaded.unlink()
    assert first_model(cfg).version == model_version(configured)  # (logged)
