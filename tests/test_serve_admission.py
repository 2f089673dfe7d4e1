"""Overload shedding's bound (cnnkit.serve.admission), in-process."""

from __future__ import annotations

import threading

import pytest

from cnnkit.serve.admission import Admission
from cnnkit.serve.parsing import HttpError


def test_requests_are_admitted_up_to_the_bound_then_shed_with_retry_after():
    shed = []
    admission = Admission(max_queue=4, target_ms=500, on_shed=lambda: shed.append(1))
    admission.calibrate(2.0)  # 2 images/s; --max-queue given: the bound stays 4
    with admission.admit(3):
        assert admission.held == 3 and not admission.saturated
        with pytest.raises(HttpError) as refused:
            with admission.admit(2):
                pass
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "2"}  # 3 images at 2/s
        with admission.admit(1):
            assert admission.saturated
    assert admission.held == 0 and not admission.saturated and shed == [1]


def test_an_idle_worker_admits_a_request_larger_than_the_bound():
    admission = Admission(max_queue=2, target_ms=500)
    with admission.admit(10):
        assert admission.saturated
    assert admission.held == 0


def test_without_max_queue_the_bound_is_what_the_worker_clears_in_the_target():
    admission = Admission(max_queue=None, target_ms=250)
    assert admission.max_queue is None and not admission.saturated  # before the warm-up measures
    admission.calibrate(100.0)
    assert admission.max_queue == 25
    admission.calibrate(0.5)
    assert admission.max_queue == 1  # at least one image
    assert admission.retry_after() == 1


def test_held_images_are_released_when_the_request_fails():
    admission = Admission(max_queue=4, target_ms=500)
    with pytest.raises(ValueError):
        with admission.admit(3):
            raise ValueError("a bad image")
    assert admission.held == 0


def test_concurrent_admissions_never_exceed_the_bound():
    admission = Admission(max_queue=5, target_ms=500)
    peak, lock, start = [0], threading.Lock(), threading.Barrier(16)

    def request() -> None:
        start.wait()
        for _ in range(200):
            try:
                with admission.admit(1):
                    with lock:
                        peak[0] = max(peak[0], admission.held)
            except HttpError:
                pass

    threads = [threading.Thread(target=request) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert 1 <= peak[0] <= 5 and admission.held == 0
