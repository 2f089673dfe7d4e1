"""cnnkit.serve: the real server (gunicorn subprocess, 2 workers, loopback) over HTTP, plus the
micro-batcher and the configuration in-process.

One server is started for the whole module (tiny resnet18, 64 px crops, 3 classes) with small
limits so every bad input is cheap to send, and with the test fault hook on.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flask")
pytest.importorskip("gunicorn")
pytest.importorskip("prometheus_client")

from cnnkit import gunicorn_conf  # noqa: E402
from cnnkit.config import ServeConfig  # noqa: E402
from cnnkit.errors import ConfigError  # noqa: E402
from cnnkit.serve import (  # noqa: E402
    HttpError,
    MicroBatcher,
    gunicorn_options,
    torch_threads,
    worker_count,
)

from deploy_helpers import (  # noqa: E402
    CLASSES,
    NAMES,
    free_port,
    http,
    image_bytes,
    make_checkpoint,
    metric,
    metric_values,
    multipart,
    post_images,
    post_json,
)
from helpers import assert_one_line_error, run_cli  # noqa: E402
from http_server import start_server  # noqa: E402

MAX_BYTES, MAX_IMAGES, MAX_PIXELS, DRIFT_WINDOW = 200_000, 4, 20_000, 20
WORKERS = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve") / "model.pt")


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    instance = start_server(
        checkpoint, tmp_path_factory.mktemp("serve-log") / "server.log",
        "--threads", "8", "--max-batch", "8", "--max-wait-ms", "50", "--max-bytes", str(MAX_BYTES),
        "--max-images", str(MAX_IMAGES), "--max-pixels", str(MAX_PIXELS), "--drift-window", str(DRIFT_WINDOW),
        workers=WORKERS, timeout=20, env_extra={"CNNKIT_SERVE_TEST_HOOKS": "1"},
    )
    try:
        yield instance
    finally:
        instance.stop()


# --- happy paths ----------------------------------------------------------------------------


def test_health_ready_and_metadata(server):
    health = http(server.base, "GET", "/health")
    assert health.status == 200 and health.json["status"] == "ok"
    ready = http(server.base, "GET", "/ready")
    assert ready.status == 200 and ready.json["ready"] is True

    meta = http(server.base, "GET", "/metadata").json
    digest = hashlib.sha256(server.checkpoint.read_bytes()).hexdigest()
    assert meta["model_version"] == f"sha256:{digest[:16]}"
    assert meta["arch"] == "resnet18" and meta["backend"] == "torch"
    assert [c["label"] for c in meta["classes"]] == CLASSES
    assert [c["name"] for c in meta["classes"]] == [NAMES[c] for c in CLASSES]
    assert meta["preprocess"]["image_size"] == 64 and meta["preprocess"]["resize_size"] == 72
    assert meta["drift"]["reference"] is True and meta["drift"]["reference_images"] == 12
    assert meta["serving"]["max_batch"] == 8 and meta["serving"]["max_pixels"] == MAX_PIXELS
    assert meta["serving"]["torch_threads"] == max(1, len(os.sched_getaffinity(0)) // WORKERS)


def test_predict_multipart_matches_the_library(server):
    from cnnkit.data.transforms import load_image
    from cnnkit.inference.predictor import Predictor

    data = image_bytes(seed=3)
    answer = post_images(server.base, [data], query="?top_k=2")
    assert answer.status == 200, answer.text
    body = answer.json
    assert body["model_version"] == answer.headers["X-Model-Version"]
    assert body["top_k"] == 2 and body["time_ms"] > 0
    (result,) = body["results"]
    assert result["filename"] == "img0.png"
    top = result["predictions"]
    assert len(top) == 2 and top[0]["probability"] >= top[1]["probability"]

    expected = Predictor(str(server.checkpoint), "cpu").predict_images([load_image(io.BytesIO(data))], top_k=2)[0]
    assert [g["label"] for g in top] == [g.label for g in expected]
    assert [g["name"] for g in top] == [NAMES[g.label] for g in expected]
    for got, want in zip(top, expected):
        assert math.isclose(got["probability"], want.probability, abs_tol=1e-5)


def test_predict_several_files_with_top_k_in_the_form(server):
    answer = post_images(server.base, [image_bytes(seed=s) for s in (1, 2, 3)], fields={"top_k": "3"})
    assert answer.status == 200, answer.text
    results = answer.json["results"]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert [r["filename"] for r in results] == ["img0.png", "img1.png", "img2.png"]
    for result in results:
        probabilities = [g["probability"] for g in result["predictions"]]
        assert sorted(g["label"] for g in result["predictions"]) == CLASSES
        assert math.isclose(sum(probabilities), 1.0, abs_tol=1e-4)


def test_predict_json_base64_single_and_list(server):
    one = base64.b64encode(image_bytes(seed=4)).decode()
    single = post_json(server.base, {"image": one, "top_k": 3})
    assert single.status == 200, single.text
    assert len(single.json["results"]) == 1 and len(single.json["results"][0]["predictions"]) == 3
    assert "filename" not in single.json["results"][0]

    jpeg = base64.b64encode(image_bytes(seed=5, fmt="JPEG")).decode()
    wrapped = "\n".join(jpeg[i:i + 76] for i in range(0, len(jpeg), 76))  # as MIME encoders wrap it
    several = post_json(server.base, {"images": [one, "data:image/jpeg;base64," + wrapped]}, query="?top_k=2")
    assert several.status == 200, several.text
    assert [r["index"] for r in several.json["results"]] == [0, 1]
    assert all(len(r["predictions"]) == 2 for r in several.json["results"])
    batched, alone = several.json["results"][0]["predictions"], single.json["results"][0]["predictions"][:2]
    assert [g["label"] for g in batched] == [g["label"] for g in alone]
    assert all(math.isclose(a["probability"], b["probability"], abs_tol=1e-5) for a, b in zip(batched, alone))


def test_top_k_is_capped_at_the_number_of_classes(server):
    answer = post_images(server.base, [image_bytes()], query="?top_k=50")
    assert answer.status == 200 and answer.json["top_k"] == len(CLASSES)


@pytest.mark.parametrize("top_k", ["0", "-2", "abc", "1.5"])
def test_bad_top_k_in_the_query(server, top_k):
    answer = post_images(server.base, [image_bytes()], query=f"?top_k={top_k}")
    assert answer.status == 400 and "top_k" in answer.json["error"]


@pytest.mark.parametrize("top_k", [0, True, 1.5, "x", [2]])
def test_bad_top_k_in_json(server, top_k):
    answer = post_json(server.base, {"image": base64.b64encode(image_bytes()).decode(), "top_k": top_k})
    assert answer.status == 400 and "top_k" in answer.json["error"]


# --- bad input: a 4xx with a JSON body, and the server goes on ----------------------------


def _truncated_jpeg() -> bytes:
    data = image_bytes(seed=7, fmt="JPEG", size=(64, 64))
    return data[: len(data) // 2]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _multipart_request(files, fields=None):
    body, content_type = multipart(files, fields)
    return "POST", "/predict", body, content_type


BAD_REQUESTS = {
    "not an image": (_multipart_request([("image", "notes.txt", b"this is not a picture\n")]), 422, "not an image"),
    "corrupt": (_multipart_request([("image", "c.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)]), 422, "image"),
    "truncated": (_multipart_request([("image", "t.jpg", _truncated_jpeg())]), 422, "truncated"),
    "empty file": (_multipart_request([("image", "e.jpg", b"")]), 400, "empty"),
    "too many pixels": (_multipart_request([("image", "big.png", image_bytes(size=(200, 200)))]), 422, "too large"),
    "too elongated": (_multipart_request([("image", "long.png", image_bytes(size=(400, 10)))]), 422, "elongated"),
    "over max bytes": (_multipart_request([("image", "huge.bin", os.urandom(MAX_BYTES + 10_000))]), 413, "too large"),
    "too many images": (_multipart_request([("image", f"{i}.png", image_bytes(i)) for i in range(MAX_IMAGES + 1)]),
                        413, "too many images"),
    "no image field": (_multipart_request([("file", "x.png", image_bytes())]), 400, "'image'"),
    "wrong content type": (("POST", "/predict", b"hello", "text/plain"), 415, "content type"),
    "no content type": (("POST", "/predict", b"hello", None), 415, "content type"),
    "malformed JSON": (("POST", "/predict", b'{"image": ', "application/json"), 400, "malformed JSON"),
    "JSON not an object": (("POST", "/predict", b"[1, 2]", "application/json"), 400, "object"),
    "JSON without image": (("POST", "/predict", b'{"picture": "abc"}', "application/json"), 400, '"image"'),
    "images not a list": (("POST", "/predict", b'{"images": "abc"}', "application/json"), 400, "list"),
    "image not a string": (("POST", "/predict", b'{"image": 42}', "application/json"), 400, "base64 string"),
    "malformed base64": (("POST", "/predict", b'{"image": "!!!not base64!!!"}', "application/json"), 400, "base64"),
    "base64 of a non-image": (("POST", "/predict", json.dumps({"image": _b64(b"plain text")}).encode(),
                               "application/json"), 422, "not an image"),
    "one bad image among good ones": (
        ("POST", "/predict", json.dumps({"images": [_b64(image_bytes(1)), _b64(b"")]}).encode(), "application/json"),
        400, "image 1"),
    "GET /predict": (("GET", "/predict", None, None), 405, ""),
    "unknown path": (("GET", "/nowhere", None, None), 404, ""),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_gets_a_json_4xx_and_the_server_goes_on(server, case):
    (method, path, body, content_type), status, fragment = BAD_REQUESTS[case]
    answer = http(server.base, method, path, body, content_type)
    assert answer.status == status, answer.text
    assert answer.headers.get("Content-Type", "").startswith("application/json")
    error = answer.json
    assert error["status"] == status and fragment in error["error"], error
    assert post_images(server.base, [image_bytes()]).status == 200


# --- batching, metrics, drift, failures -----------------------------------------------------


def test_concurrent_requests_are_batched_together(server):
    before = server.metrics()
    n = 16
    barrier = threading.Barrier(n)
    statuses: list[int] = []
    payload = image_bytes(seed=9)

    def client() -> None:
        barrier.wait()
        statuses.append(post_images(server.base, [payload]).status)

    threads = [threading.Thread(target=client) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == [200] * n
    after = server.metrics()
    images = metric(after, "cnnkit_batch_size_sum") - metric(before, "cnnkit_batch_size_sum")
    passes = metric(after, "cnnkit_batch_size_count") - metric(before, "cnnkit_batch_size_count")
    singles = metric(after, "cnnkit_batch_size_bucket", le="1.0") - metric(before, "cnnkit_batch_size_bucket", le="1.0")
    assert images == n
    assert passes < n and singles < n, f"{n} concurrent requests took {passes} forward passes ({singles} of one image)"


def test_metrics_count_requests_images_and_predictions(server):
    before = server.metrics()
    for seed in range(3):
        assert post_images(server.base, [image_bytes(seed), image_bytes(seed + 10)]).status == 200
    assert post_json(server.base, {"image": "%%%"}).status == 400
    after = server.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("cnnkit_requests_total", endpoint="/predict", status="200") == 3
    assert delta("cnnkit_requests_total", endpoint="/predict", status="400") == 1
    assert delta("cnnkit_request_duration_seconds_count", endpoint="/predict") == 4
    assert delta("cnnkit_images_total") == 6
    assert sum(delta("cnnkit_predicted_class_total", label=c) for c in CLASSES) == 6
    assert delta("cnnkit_prediction_confidence_count") == 6
    info = [k for k in after if k[0] == "cnnkit_model_info"]
    assert info and dict(info[0][1])["arch"] == "resnet18"


def test_metrics_aggregate_every_worker(server):
    """gunicorn multi-process mode: whichever worker answers /metrics, it counts all of them."""
    before = server.metrics()
    seen: set[int] = set()
    sent = 0
    while len(seen) < WORKERS and sent < 200:
        seen.add(http(server.base, "GET", "/health").json["worker"])
        sent += 1
    assert len(seen) == WORKERS, "every worker should have answered some requests"
    after = server.metrics()  # answered by one worker
    counted = metric(after, "cnnkit_requests_total", endpoint="/health", status="200") - metric(
        before, "cnnkit_requests_total", endpoint="/health", status="200")
    assert counted == sent


def test_drift_psi_is_exposed_once_the_window_fills(server):
    for attempt in range(40):
        values = server.metrics()
        psi = {dict(k[1])["signal"]: v for k, v in values.items() if k[0] == "cnnkit_drift_psi"}
        if len(psi) == 3:
            break
        post_images(server.base, [image_bytes(100 + 4 * attempt + i) for i in range(MAX_IMAGES)])
    assert set(psi) == {"class", "confidence", "brightness"}, psi
    assert all(math.isfinite(v) and v >= 0 for v in psi.values())
    assert metric(values, "cnnkit_drift_window_images") >= DRIFT_WINDOW // 2


def test_a_model_failure_is_a_500_and_the_worker_survives(server):
    workers = server.worker_pids()
    assert len(workers) == WORKERS
    failed = post_images(server.base, [image_bytes()], headers={"X-Cnnkit-Test-Fault": "model"})
    assert failed.status == 500
    assert failed.json["status"] == 500 and "fault injected" in failed.json["error"]
    for seed in range(6):
        assert post_images(server.base, [image_bytes(seed)]).status == 200
    assert server.worker_pids() == workers  # no worker died or was replaced
    errors = [line for line in server.records() if line["status"] == 500]
    assert errors and "RuntimeError" in errors[-1]["traceback"]


def test_a_failing_request_does_not_fail_the_requests_batched_with_it(server):
    n = 6
    barrier = threading.Barrier(n)
    statuses: dict[int, int] = {}

    def client(i: int) -> None:
        headers = {"X-Cnnkit-Test-Fault": "model"} if i == 0 else None
        barrier.wait()
        statuses[i] = post_images(server.base, [image_bytes(i)], headers=headers).status

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses[0] == 500
    assert [statuses[i] for i in range(1, n)] == [200] * (n - 1)


def test_request_log_is_one_json_object_per_line(server):
    assert post_images(server.base, [image_bytes()]).status == 200
    predicts = [line for line in server.records() if line["path"] == "/predict"]
    assert predicts
    last = predicts[-1]
    assert {"ts", "method", "status", "ms", "worker"} <= set(last)
    assert any(line.get("error") for line in predicts if line["status"] >= 400)


def test_a_model_without_reference_statistics_has_no_drift_metrics(tmp_path):
    from cnnkit.serve import create_app

    app = create_app(make_checkpoint(tmp_path / "old.pt", reference=False), torch_threads=torch.get_num_threads())
    try:
        client = app.test_client()
        assert client.get("/metadata").get_json()["drift"]["reference"] is False
        answer = client.post("/predict", json={"images": [base64.b64encode(image_bytes(s)).decode() for s in range(4)]})
        assert answer.status_code == 200
        text = client.get("/metrics").get_data(as_text=True)
        assert metric(metric_values(text), "cnnkit_images_total") == 4 and "cnnkit_drift" not in text
    finally:
        app.extensions["cnnkit"].close()


# --- command line ---------------------------------------------------------------------------


def test_serve_missing_checkpoint_is_one_line_exit_4(tmp_path, cli_env):
    result = run_cli(["serve", str(tmp_path / "missing.pt"), "--port", str(free_port())], cli_env)
    assert result.returncode == 4
    assert_one_line_error(result.stderr, "checkpoint not found")


def test_serve_bad_option_is_exit_2(checkpoint, cli_env):
    result = run_cli(["serve", str(checkpoint), "--workers", "0"], cli_env)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "--workers")


def test_serve_port_in_use_is_exit_2(checkpoint, cli_env):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(["serve", str(checkpoint), "--port", str(port)], cli_env)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, f"127.0.0.1:{port}", "--port")


# --- in-process: micro-batcher and configuration ------------------------------------------


class GatedScore:
    """A score function that blocks its first call until released, recording batch sizes."""

    def __init__(self, fail_on: float | None = None):
        self.sizes: list[int] = []
        self.keys: list = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, batch: torch.Tensor, key=None) -> torch.Tensor:
        self.sizes.append(len(batch))
        self.keys.append(key)
        if len(self.sizes) == 1:
            self.entered.set()
            assert self.release.wait(10)
        if self.fail_on is not None and (batch[:, 0] == self.fail_on).any():
            raise ValueError("poisoned input")
        return batch[:, :3].clone()


def _items(values) -> list[torch.Tensor]:
    return [torch.full((1, 3), float(v)) for v in values]


def test_batcher_gathers_waiting_requests_up_to_max_batch():
    score = GatedScore()
    batcher = MicroBatcher(score, max_batch=4, max_wait_ms=0).start()
    try:
        first = batcher.submit(_items([0])[0])
        assert score.entered.wait(10)
        jobs = [batcher.submit(item) for item in _items(range(1, 10))]  # queued behind the first
        score.release.set()
        results = [batcher.wait(job, 10) for job in [first, *jobs]]
    finally:
        batcher.stop()
    assert score.sizes == [1, 4, 4, 1]
    assert [float(r[0, 0]) for r in results] == list(range(10))  # each request gets its own rows


def test_batcher_never_batches_jobs_of_different_keys_together():
    """Across a reload, requests prepared for the old model are scored by it, apart from the new."""
    score = GatedScore()
    batcher = MicroBatcher(score, max_batch=8, max_wait_ms=0).start()
    old, new = object(), object()
    try:
        first = batcher.submit(_items([0])[0], key=old)
        assert score.entered.wait(10)
        keys = [old, old, new, new, old]
        jobs = [batcher.submit(item, key=key) for item, key in zip(_items(range(1, 6)), keys)]
        score.release.set()
        results = [batcher.wait(job, 10) for job in [first, *jobs]]
    finally:
        batcher.stop()
    assert score.sizes == [1, 2, 2, 1] and score.keys == [old, old, new, old]
    assert [float(r[0, 0]) for r in results] == list(range(6))


def test_batcher_keeps_a_request_whole_and_splits_one_larger_than_max_batch():
    score = GatedScore()
    score.release.set()
    batcher = MicroBatcher(score, max_batch=4, max_wait_ms=0).start()
    try:
        result = batcher.wait(batcher.submit(torch.arange(10.0)[:, None].repeat(1, 3)), 10)
    finally:
        batcher.stop()
    assert score.sizes[-3:] == [4, 4, 2]
    assert result[:, 0].tolist() == list(range(10))


def test_batcher_waits_for_requests_being_decoded_but_not_when_idle():
    score = GatedScore()
    score.release.set()
    batcher = MicroBatcher(score, max_batch=8, max_wait_ms=2000).start()
    try:
        started = time.perf_counter()
        batcher.wait(batcher.submit(_items([1])[0]), 10)
        assert time.perf_counter() - started < 1.0  # nobody arriving: no wait

        with batcher.ticket() as late:  # a request still decoding when the next one submits
            early = batcher.submit(_items([2])[0])
            time.sleep(0.2)
            job = late.submit(_items([3])[0])
        batcher.wait(early, 10)
        batcher.wait(job, 10)
    finally:
        batcher.stop()
    assert score.sizes[-1] == 2  # the early request waited for the late one


def test_batcher_isolates_a_failing_request():
    score = GatedScore(fail_on=7.0)
    batcher = MicroBatcher(score, max_batch=8, max_wait_ms=0).start()
    try:
        first = batcher.submit(_items([0])[0])
        assert score.entered.wait(10)
        jobs = [batcher.submit(item) for item in _items([5, 7, 6])]
        score.release.set()
        batcher.wait(first, 10)
        assert float(batcher.wait(jobs[0], 10)[0, 0]) == 5
        with pytest.raises(ValueError, match="poisoned"):
            batcher.wait(jobs[1], 10)
        assert float(batcher.wait(jobs[2], 10)[0, 0]) == 6
        assert batcher.alive
    finally:
        batcher.stop()


def test_batcher_times_out_with_503_and_skips_the_abandoned_request():
    score = GatedScore()
    batcher = MicroBatcher(score, max_batch=8, max_wait_ms=0).start()
    try:
        first = batcher.submit(_items([0])[0])
        assert score.entered.wait(10)
        abandoned = batcher.submit(_items([1])[0])
        with pytest.raises(HttpError) as info:
            batcher.wait(abandoned, 0.05)
        assert info.value.status == 503
        score.release.set()
        batcher.wait(first, 10)
        assert batcher.wait(batcher.submit(_items([2])[0]), 10)[0, 0] == 2
    finally:
        batcher.stop()
    assert score.sizes == [1, 1]  # the abandoned request was never scored


def test_gunicorn_options_follow_the_config():
    cfg = ServeConfig("m.pt", host="0.0.0.0", port=9000, workers=3, threads=5, timeout=40)
    options = gunicorn_options(cfg)
    assert options["bind"] == ["0.0.0.0:9000"]
    assert (options["workers"], options["threads"]) == (3, 5)
    # the worker class comes from gunicorn_conf, as for `gunicorn -c python:cnnkit.gunicorn_conf`
    assert {**vars(gunicorn_conf), **options}["worker_class"] == "cnnkit.serve.BoundedThreadWorker"
    assert options["preload_app"] is False  # the model loads after the fork
    assert options["timeout"] >= 40
    assert gunicorn_options(ServeConfig("m.pt", host="::1"))["bind"] == ["[::1]:8000"]


def test_torch_threads_share_the_cores_among_workers(monkeypatch):
    import cnnkit.serve.sizing as sizing

    monkeypatch.setattr(sizing, "available_cores", lambda: 2)
    assert torch_threads(ServeConfig("m.pt", workers=1)) == 2
    assert torch_threads(ServeConfig("m.pt", workers=2)) == 1
    assert torch_threads(ServeConfig("m.pt", workers=4)) == 1  # never 0
    assert torch_threads(ServeConfig("m.pt", workers=2, torch_threads=3)) == 3
    assert worker_count(ServeConfig("m.pt")) == 2  # default: a 1-thread worker per core
    assert torch_threads(ServeConfig("m.pt")) == 1
    monkeypatch.setattr(sizing, "available_cores", lambda: 64)
    assert worker_count(ServeConfig("m.pt")) == 4  # up to 4 copies of the model
    assert torch_threads(ServeConfig("m.pt")) == 16


@pytest.mark.parametrize("field, value, flag", [
    ("port", 0, "--port"), ("workers", 0, "--workers"), ("threads", 0, "--threads"),
    ("max_batch", 0, "--max-batch"), ("max_wait_ms", -1, "--max-wait-ms"), ("max_bytes", 10, "--max-bytes"),
    ("timeout", 0, "--timeout"), ("top_k", 0, "--top-k"), ("host", "bad host!", "--host"),
    ("torch_threads", 0, "--torch-threads"), ("drift_window", 1, "--drift-window"), ("device", "tpu", "--device"),
    ("max_queue", 0, "--max-queue"), ("queue_target_ms", 0, "--queue-target-ms"), ("api_key_file", "", "--api-key-file"),
    ("protect_metrics", True, "--protect-metrics needs --api-key-file"),
])
def test_serve_config_names_the_flag_to_fix(field, value, flag):
    with pytest.raises(ConfigError, match=flag):
        ServeConfig("m.pt", **{field: value})


def test_a_busy_worker_leaves_new_connections_to_an_idler_one(monkeypatch):
    """Load-aware accept (benchmarks/RESULTS.md, Serving): a worker waits a moment per connection
    it holds before accepting, only when there are other workers to take the connection."""
    from types import SimpleNamespace

    from gunicorn.workers.gthread import ThreadWorker

    from cnnkit.serve import worker as serve_worker

    worker_class = serve_worker.bounded_worker_class()
    worker = worker_class.__new__(worker_class)  # only what accept() reads
    slept: list[float] = []
    accepted: list[str] = []
    monkeypatch.setattr(serve_worker.time, "sleep", slept.append)
    monkeypatch.setattr(ThreadWorker, "accept", lambda self, listener: accepted.append(listener))
    for workers, connections in [(2, 0), (2, 3), (2, 50), (1, 3)]:
        worker.cfg, worker.nr_conns = SimpleNamespace(workers=workers), connections
        worker.accept(f"{workers}/{connections}")
    assert slept == [pytest.approx(3 * serve_worker.ACCEPT_DELAY_PER_CONNECTION),
                     pytest.approx(10 * serve_worker.ACCEPT_DELAY_PER_CONNECTION)]
    assert accepted == ["2/0", "2/3", "2/50", "1/3"]  # every connection is still accepted


def test_the_accept_delay_comes_from_the_environment(monkeypatch):
    from cnnkit.serve.worker import ACCEPT_DELAY_PER_CONNECTION, accept_delay_per_connection

    monkeypatch.delenv("CNNKIT_ACCEPT_DELAY_MS", raising=False)
    assert accept_delay_per_connection() == ACCEPT_DELAY_PER_CONNECTION == 0.001
    for value, seconds in [("0", 0.0), ("2.5", 0.0025)]:
        monkeypatch.setenv("CNNKIT_ACCEPT_DELAY_MS", value)
        assert accept_delay_per_connection() == pytest.approx(seconds)
    for bad in ("-1", "soon", "nan"):
        monkeypatch.setenv("CNNKIT_ACCEPT_DELAY_MS", bad)
        with pytest.raises(ValueError, match="CNNKIT_ACCEPT_DELAY_MS"):
            accept_delay_per_connection()


# ~14 s (a 2-worker server and a 1-s accept delay to measure): -m slow; the test above checks the rule
@pytest.mark.slow
def test_load_aware_accept_on_a_real_server(checkpoint, tmp_path):
    """The same on a real 2-worker server, with a delay long enough to measure (CNNKIT_ACCEPT_DELAY_MS):
    the worker holding a keep-alive connection leaves the next one to the idle worker, which answers
    at once; with a connection in each worker, a new one waits the delay before either accepts it."""
    import http.client

    delay = 1.0
    server = start_server(checkpoint, tmp_path / "server.log", workers=2,
                          env_extra={"CNNKIT_ACCEPT_DELAY_MS": str(delay * 1000)})

    def ready(connection: http.client.HTTPConnection) -> tuple[int, float]:
        began = time.monotonic()
        connection.request("GET", "/ready")  # HTTP/1.1: the connection is kept open afterwards
        answer = connection.getresponse()
        return json.loads(answer.read())["worker"], time.monotonic() - began

    try:
        for _ in range(3):
            held = [http.client.HTTPConnection(server.host, server.port, timeout=30) for _ in range(3)]
            try:
                first, _ = ready(held[0])
                second, took_second = ready(held[1])
                time.sleep(delay + 0.2)  # the first worker's wait for the second connection is over
                _, took_third = ready(held[2])
            finally:
                for connection in held:
                    connection.close()
            assert second != first and took_second < delay / 2, (first, second, took_second)
            assert took_third >= delay, took_third
            time.sleep(0.5)  # the closed connections leave both workers
    finally:
        server.stop()
