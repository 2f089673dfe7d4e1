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


def test_a_new_worker_serves_the_published_models_or_the_configured_one_if_they_are_gone(tmp_path, monkeypatch):
    from cnnkit.config import ServeConfig
    from cnnkit.serve.control import CONTROL_DIR_ENV, Lineup, publish_lineup
    from cnnkit.serve.rollout import first_models

    configured, reloaded = make_checkpoint(tmp_path / "a.pt"), make_checkpoint(tmp_path / "b.pt", temperature=2.0)
    canary = make_checkpoint(tmp_path / "c.pt", temperature=3.0)
    monkeypatch.setenv(CONTROL_DIR_ENV, str(tmp_path))
    cfg = ServeConfig(str(configured), device="cpu")
    first = first_models(cfg)  # nothing published yet
    assert first.primary.version == model_version(configured) and first.canary is None and first.shadow is None
    publish_lineup(Lineup(primary=str(reloaded), canary=str(canary), canary_percent=25.0))
    models = first_models(cfg)
    assert (models.primary.version, models.canary.version, models.canary_percent) == (
        model_version(reloaded), model_version(canary), 25.0)
    reloaded.unlink()
    canary.unlink()
    models = first_models(cfg)  # (both logged)
    assert models.primary.version == model_version(configured) and models.canary is None and models.canary_percent == 0


# --- canary and shadow ------------------------------------------------------------------------


def make_flipped(path: Path, source: Path) -> Path:
    """``source`` with its last layer's class rows reversed: it answers class 2 - k where the
    source answers k (so it agrees with it exactly on class 1 of the 3)."""
    ckpt = load_checkpoint(str(source))
    for name in ("fc.3.weight", "fc.3.bias"):
        ckpt.state_dict[name] = ckpt.state_dict[name].flip(0).contiguous()
    ckpt.save(path)
    return path


def admin(server, action: str, body: dict | None = None):
    return http(server.base, "POST", f"/admin/{action}", json.dumps(body or {}).encode(), "application/json",
                bearer(), timeout=60)


def predict_as(server, client: str | None, seed: int = 0):
    headers = {**bearer(), **({"X-Client-Id": client} if client else {})}
    answer, _ = predict(server, seed, headers)
    assert answer.status == 200, answer.body[:300]
    return answer.json


def rollout_served(server, primary: str, canary: str | None, timeout: float = 60) -> None:
    """Wait until every worker serves ``primary`` with ``canary`` (a version, or None)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < server.workers:
        assert time.monotonic() < deadline, f"not every worker serves {primary} + {canary}:\n{server.log_text()[-3000:]}"
        meta = http(server.base, "GET", "/metadata", headers=bearer()).json
        served = meta["rollout"]["canary"]
        if meta["model_version"] == primary and (served["model_version"] if served else None) == canary:
            seen.add(meta["serving"]["worker"])
        time.sleep(0.02)


@pytest.fixture(scope="module")
def canary_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("canary")
    make_checkpoint(folder / "b.pt", temperature=2.0)
    make_checkpoint(folder / "c.pt", temperature=3.0)
    other = load_checkpoint(str(make_checkpoint(folder / "other.pt")))
    other.classes = list(reversed(other.classes))
    other.save(folder / "other.pt")
    instance = start_server(make_checkpoint(folder / "a.pt"), folder / "server.log", "--api-key-file", write_keys(folder),
                            "--canary", folder / "b.pt", "--canary-percent", "30", "--threads", "8", workers=2)
    instance.folder = folder
    yield instance
    instance.stop()


def test_the_canary_answers_its_share_and_a_sticky_client_always_gets_the_same_model(canary_server):
    from cnnkit.serve.rollout import sticky_share

    a, b = (model_version(canary_server.folder / name) for name in ("a.pt", "b.pt"))
    before = canary_server.metrics()
    meta = http(canary_server.base, "GET", "/metadata", headers=bearer()).json
    assert meta["rollout"]["canary"] == {"model_version": b, "model_file": "b.pt", "backend": "torch", "percent": 30.0,
                                         "sticky_header": "X-Client-Id"}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda seed: predict_as(canary_server, None, seed), range(160)))
    roles = Counter((answer["model_role"], answer["model_version"]) for answer in answers)
    assert set(roles) == {("primary", a), ("canary", b)}, roles
    # 160 draws at 30 %: 48 expected, sd 5.8; 4 sd either side fails one run in 15,000
    assert abs(roles[("canary", b)] - 48) <= 24, roles
    for client in (f"client-{i}" for i in range(24)):
        expected = "canary" if sticky_share(client) < 0.30 else "primary"
        assert {predict_as(canary_server, client, seed)["model_role"] for seed in range(3)} == {expected}, client
    after = canary_server.metrics()
    for role, version in (("primary", a), ("canary", b)):
        counted = (metric(after, "cnnkit_requests_total", endpoint="/predict", status="200", role=role, model_version=version)
                   - metric(before, "cnnkit_requests_total", endpoint="/predict", status="200", role=role, model_version=version))
        images = (metric(after, "cnnkit_images_total", role=role, model_version=version)
                  - metric(before, "cnnkit_images_total", role=role, model_version=version))
        assert counted >= roles[(role, version)] and counted == images, (role, counted, images)
    assert metric(after, "cnnkit_model_info", model_version=b, role="canary") == 1


def test_promote_reload_and_rollback_switch_every_worker_and_fail_no_request(canary_server):
    folder = canary_server.folder
    a, b, c = (model_version(folder / name) for name in ("a.pt", "b.pt", "c.pt"))
    with Load(canary_server) as load:
        time.sleep(0.3)
        answer = admin(canary_server, "promote")
        assert answer.status == 200, answer.body[:500]
        assert (answer.json["status"], answer.json["model_version"], answer.json["previous_version"]) == ("promoted", b, a)
        rollout_served(canary_server, b, None)
        assert admin(canary_server, "promote").status == 409  # no canary left
        bad = admin(canary_server, "reload", {"checkpoint": str(folder / "other.pt"), "role": "canary"})
        assert bad.status == 422 and "classes differ" in bad.json["error"], bad.body[:300]
        answer = admin(canary_server, "reload", {"checkpoint": str(folder / "c.pt"), "role": "canary"})
        assert answer.status == 200 and (answer.json["role"], answer.json["role_version"]) == ("canary", c), answer.body[:300]
        rollout_served(canary_server, b, c)
        time.sleep(0.3)
        answer = admin(canary_server, "rollback")
        assert answer.status == 200 and answer.json["status"] == "rolled back" and answer.json["previous_version"] == c
        rollout_served(canary_server, b, None)
        time.sleep(0.3)
    assert all(answer.status == 200 for answer in load.answers), Counter(answer.status for answer in load.answers)
    versions = Counter((answer.json["model_role"], answer.json["model_version"]) for answer in load.answers)
    assert set(versions) <= {("primary", a), ("canary", b), ("primary", b), ("canary", c)}, versions
    assert versions[("primary", b)] > 0 and versions[("canary", c)] > 0, versions
    assert canary_server.alive() and not canary_server.server_errors()
    after = canary_server.metrics()
    assert metric(after, "cnnkit_model_info", model_version=b, role="primary") == 1
    assert metric(after, "cnnkit_model_info", model_version=c, role="canary") == 0  # rolled back


def test_the_shadow_scores_copies_off_the_request_path_and_reports_agreement(tmp_path):
    primary = make_checkpoint(tmp_path / "a.pt")
    flipped = make_flipped(tmp_path / "flipped.pt", primary)
    server = start_server(primary, tmp_path / "server.log", "--shadow", flipped, "--shadow-share", "1",
                          "--shadow-queue", "4", workers=1)
    try:
        a, s = model_version(primary), model_version(flipped)
        answers = [predict(server, seed)[0].json for seed in range(12)]  # one at a time: idle between them
        assert {(x["model_role"], x["model_version"]) for x in answers} == {("primary", a)}  # the primary answers
        deadline = time.monotonic() + 30
        while metric(server.metrics(), "cnnkit_shadow_images_total", result="scored") < 12:
            assert time.monotonic() < deadline, server.log_text()[-3000:]
            time.sleep(0.05)
        found = server.metrics()
        middle = sum(x["results"][0]["predictions"][0]["label"] == "dog" for x in answers)  # class 1 of 3
        assert metric(found, "cnnkit_shadow_agreement_total", model_version=s) == middle
        assert metric(found, "cnnkit_shadow_images_total", model_version=s, result="scored") == 12
        assert metric(found, "cnnkit_shadow_confidence_count", model_version=s) == 12
        assert metric(found, "cnnkit_model_info", model_version=s, role="shadow") == 1
        assert http(server.base, "GET", "/metadata").json["rollout"]["shadow"]["model_version"] == s
        # 8 images in one request, 4 places in the shadow's queue: 4 copies are dropped, at once
        body, content_type = multipart([("image", f"i{i}.png", image_bytes(i)) for i in range(8)])
        assert http(server.base, "POST", "/predict", body, content_type).status == 200
        time.sleep(0.2)
        assert metric(server.metrics(), "cnnkit_shadow_images_total", model_version=s, result="dropped") == 4
        assert not server.server_errors()
    finally:
        server.stop()


def test_a_candidate_with_other_classes_is_refused_at_start_in_one_line(tmp_path):
    from helpers import cli_subprocess_env, run_cli

    other = load_checkpoint(str(make_checkpoint(tmp_path / "other.pt")))
    other.classes = list(reversed(other.classes))
    other.save(tmp_path / "other.pt")
    for flag in ("--canary", "--shadow"):
        result = run_cli(["serve", str(make_checkpoint(tmp_path / "m.pt")), flag, str(tmp_path / "other.pt")],
                         cli_subprocess_env(tmp_path / "th"), timeout=120)
        assert result.returncode == 2, result.stderr
        assert "classes differ" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
