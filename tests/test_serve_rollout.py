"""Canary routing, the shadow's scoring and the batcher's background work, in-process
(``cnnkit.serve.rollout``, ``cnnkit.serve.shadow``, ``cnnkit.serve.batcher``); the same against
the real gunicorn server are in test_serve_canary.py."""

from __future__ import annotations

import hashlib
import threading
import time
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("prometheus_client")

from deploy_helpers import make_checkpoint, metric, metric_values  # noqa: E402

from cnnkit.config import ServeConfig  # noqa: E402
from cnnkit.serve.batcher import MicroBatcher  # noqa: E402
from cnnkit.serve.metrics import Metrics  # noqa: E402
from cnnkit.serve.model import load_served_model  # noqa: E402
from cnnkit.serve.rollout import CANARY, PRIMARY, Models, route, sticky_share  # noqa: E402
from cnnkit.serve.shadow import PASS_IMAGES, ShadowScorer  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two served models of the same classes (a primary and a candidate)."""
    folder = tmp_path_factory.mktemp("rollout")
    cfg = ServeConfig(str(make_checkpoint(folder / "a.pt")), device="cpu")
    return SimpleNamespace(
        primary=load_served_model(cfg, cfg.checkpoint),
        candidate=load_served_model(cfg, str(make_checkpoint(folder / "b.pt", temperature=2.0))),
    )


# --- routing ----------------------------------------------------------------------------------


def test_sticky_shares_are_stable_uniform_and_independent_of_the_process():
    # the first 8 bytes of the key's SHA-256 as a fraction: what every worker, and every restart,
    # computes (Python's own hash() differs between processes)
    assert sticky_share("client-7") == int.from_bytes(hashlib.sha256(b"client-7").digest()[:8], "big") / 2**64
    shares = [sticky_share(f"user-{i}") for i in range(4000)]
    assert all(0 <= s < 1 for s in shares)
    assert abs(sum(s < 0.25 for s in shares) / len(shares) - 0.25) < 0.03  # uniform enough to split traffic


def test_route_sends_the_canary_its_share_and_a_sticky_key_always_the_same_model(served):
    without = Models(primary=served.primary, shadow=served.candidate)
    assert route(without, "anyone") == (served.primary, PRIMARY, served.candidate)  # the shadow gets a copy
    models = Models(primary=served.primary, canary=served.candidate, canary_percent=30.0)
    draws = iter([0.10, 0.29, 0.30, 0.95])
    assert [route(models, None, lambda: next(draws)).role for _ in range(4)] == [CANARY, CANARY, PRIMARY, PRIMARY]
    for key in (f"client-{i}" for i in range(50)):
        expected = CANARY if sticky_share(key) < 0.30 else PRIMARY
        assert {route(models, key, lambda: 0.0).role for _ in range(3)} == {expected}  # the draw is not used
    everyone = route(Models(primary=served.primary, canary=served.candidate, canary_percent=100.0, shadow=served.primary), "x")
    assert everyone == (served.candidate, CANARY, None)  # only the primary's answers are shadowed


def test_a_lineup_without_a_role_drops_it_and_the_canary_share():
    models = Models(primary="p", canary="c", canary_percent=20.0, shadow="s")  # type: ignore[arg-type]
    assert models.without(CANARY).canary is None and models.without(CANARY).canary_percent == 0
    assert models.without("shadow").shadow is None and models.without("shadow").canary_percent == 20.0
    assert [role for role, _ in models.roles()] == ["primary", "canary", "shadow"]


# --- the shadow -------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TimedModel:
    """A served model's stand-in (its preprocessing and classes) whose forward pass takes
    ``seconds`` of the fake clock and answers class 0 for every image (so agreement is known)."""

    def __init__(self, served, clock: FakeClock, seconds: float):
        self.clock, self.seconds, self.passes = clock, seconds, []
        self.version, self.classes = "sha256:" + "1" * 16, served.classes
        self.checkpoint, self.max_pixels = served.checkpoint, served.max_pixels

    def score(self, batch: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.seconds
        self.passes.append(len(batch))
        probs = torch.full((len(batch), 3), 0.1)
        probs[:, 0] = 0.8  # every image: class 0
        return probs


def scorer(served, share: float = 0.5, capacity: int = 8, busy=lambda: False, seconds: float = 0.01):
    clock = FakeClock()
    model = TimedModel(served.candidate, clock, seconds)
    metrics = Metrics(drift=False)
    shadow = ShadowScorer(metrics, capacity, share, window=100, busy=busy, current=lambda: model, clock=clock)
    return shadow, model, clock, metrics


def offer(shadow, model, served, primary_top1: list[int]) -> None:
    batch = torch.zeros(len(primary_top1), 3, 8, 8)
    shadow.offer(model, served.primary, [(None, b"")] * len(primary_top1), batch, primary_top1)


def values(metrics: Metrics) -> dict:
    return metric_values(metrics.render()[0].decode())


def test_the_shadow_scores_copies_within_its_share_of_time_and_counts_agreement(served):
    shadow, model, clock, metrics = scorer(served, share=0.5, seconds=0.01)
    offer(shadow, model, served, [0, 1, 0, 2])
    assert shadow.pending() and not shadow.ready()  # no time earned yet
    clock.now += 0.1  # 0.05 s earned: enough for a pass
    assert shadow.ready()
    shadow.step()
    assert model.passes == [PASS_IMAGES]  # a small pass: a request waits behind one at most
    while shadow.pending():
        clock.now += 0.1
        assert shadow.ready()
        shadow.step()
    found = values(metrics)
    assert metric(found, "cnnkit_shadow_images_total", result="scored", model_version=model.version) == 4
    assert metric(found, "cnnkit_shadow_agreement_total", model_version=model.version) == 2  # the two 0s
    assert metric(found, "cnnkit_shadow_confidence_count") == 4


def test_the_shadow_waits_while_the_worker_holds_a_request_and_drops_what_does_not_fit(served):
    holding = {"busy": True}
    shadow, model, clock, metrics = scorer(served, capacity=3, busy=lambda: holding["busy"])
    offer(shadow, model, served, [0, 0, 0, 0, 0])  # 3 fit
    clock.now += 10
    assert not shadow.ready()  # busy: the primary's requests first
    holding["busy"] = False
    assert shadow.ready()
    found = values(metrics)
    assert metric(found, "cnnkit_shadow_images_total", result="dropped") == 2


def test_a_slow_shadow_pass_is_paid_back_before_the_next(served):
    shadow, model, clock, _ = scorer(served, share=0.1, seconds=0.5)  # each pass: 0.5 s
    offer(shadow, model, served, [0] * 6)
    clock.now += 1.0  # earns at most the burst: 0.1 s
    assert shadow.ready()
    shadow.step()  # spends 0.5 s: 0.4 s in debt
    clock.now += 3.0  # repays 0.3 s
    assert not shadow.ready()
    clock.now += 1.5  # repaid, and earning again
    assert shadow.ready()


def test_copies_made_for_a_replaced_shadow_are_dropped_not_scored(served):
    shadow, model, clock, metrics = scorer(served)
    old = TimedModel(served.candidate, clock, 0.01)
    old.version = "sha256:" + "2" * 16
    offer(shadow, old, served, [0, 1])  # copies made for the old shadow
    clock.now += 1
    shadow.step()  # the shadow served now is `model`
    assert model.passes == [] and old.passes == []
    assert metric(values(metrics), "cnnkit_shadow_images_total", result="dropped", model_version=old.version) == 2


# --- the batcher's background work ------------------------------------------------------------


def test_the_batcher_scores_waiting_jobs_before_background_work_and_does_it_when_idle():
    events: list[str] = []
    entered, release = threading.Event(), threading.Event()

    def score(batch: torch.Tensor, key) -> torch.Tensor:
        events.append(f"job {int(batch[0, 0])}")
        if int(batch[0, 0]) == 0:
            entered.set()
            assert release.wait(10)
        return batch

    class Background:
        left = 3

        def pending(self) -> bool:
            return self.left > 0

        def ready(self) -> bool:
            return True

        def step(self) -> None:
            self.left -= 1
            events.append("step")

    background = Background()
    background.left = 0
    batcher = MicroBatcher(score, max_batch=1, max_wait_ms=0, background=background).start()
    try:
        first = batcher.submit(torch.zeros(1, 3))
        assert entered.wait(10)  # the batcher is busy with job 0
        background.left = 3
        batcher.nudge()
        second = batcher.submit(torch.ones(1, 3))  # waiting, as is the background work
        release.set()
        batcher.wait(first, 10), batcher.wait(second, 10)
        deadline = time.monotonic() + 10
        while background.left and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        batcher.stop()
    assert events == ["job 0", "job 1", "step", "step", "step"]


def test_a_failing_background_step_does_not_stop_the_batcher(caplog):
    class Failing:
        def __init__(self) -> None:
            self.calls = 0

        def pending(self) -> bool:
            return self.calls < 3

        def ready(self) -> bool:
            return True

        def step(self) -> None:
            self.calls += 1
            raise RuntimeError("shadow broke")

    background = Failing()
    batcher = MicroBatcher(lambda batch, key: batch * 2, max_batch=4, max_wait_ms=0, background=background).start()
    try:
        deadline = time.monotonic() + 10
        while background.calls < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert float(batcher.wait(batcher.submit(torch.ones(1, 3)), 10)[0, 0]) == 2.0
    finally:
        batcher.stop()
    assert background.calls == 3 and "background work failed" in caplog.text


# --- in the app: every request is counted under the model it was routed to -----------------------


def test_a_canary_that_fails_is_counted_as_the_canary_not_the_primary(tmp_path, monkeypatch):
    pytest.importorskip("flask")
    from deploy_helpers import image_bytes, multipart

    from cnnkit.models.exported import model_version
    from cnnkit.serve import create_app

    monkeypatch.setenv("CNNKIT_SERVE_TEST_HOOKS", "1")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    primary, canary = make_checkpoint(tmp_path / "a.pt"), make_checkpoint(tmp_path / "b.pt", temperature=2.0)
    app = create_app(primary, canary=str(canary), canary_percent=100.0, torch_threads=1)
    try:
        client = app.test_client()
        body, content_type = multipart([("image", "a.png", image_bytes(0))])
        ok = client.post("/predict", data=body, content_type=content_type)
        assert ok.status_code == 200 and ok.get_json()["model_role"] == "canary"
        failed = client.post("/predict", data=body, content_type=content_type, headers={"X-Cnnkit-Test-Fault": "model"})
        assert failed.status_code == 500 and failed.headers["X-Model-Version"] == model_version(canary)
        found = metric_values(client.get("/metrics").get_data(as_text=True))
    finally:
        app.extensions["cnnkit"].close()
    b = model_version(canary)
    assert metric(found, "cnnkit_requests_total", endpoint="/predict", role="canary", model_version=b, status="500") == 1
    assert metric(found, "cnnkit_requests_total", endpoint="/predict", role="canary", model_version=b, status="200") == 1
    assert metric(found, "cnnkit_requests_total", endpoint="/predict", role="primary") == 0  # (declared at 0)
