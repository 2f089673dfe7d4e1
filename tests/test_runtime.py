"""cnnkit.runtime: prefetching in a background thread."""

from __future__ import annotations

import threading
import time

import pytest

from cnnkit.runtime import prefetch


def test_prefetch_yields_every_item_in_order_from_another_thread():
    producers = []

    def items():
        for i in range(50):
            producers.append(threading.current_thread().name)
            yield i

    assert list(prefetch(items(), depth=3)) == list(range(50))
    assert set(producers) == {"cnnkit-prefetch"}


def recorded(count: int, produced: list[int]):
    """0, 1, ... ``count - 1``, each appended to ``produced`` as the producer reaches it."""
    for i in range(count):
        produced.append(i)
        yield i


def test_prefetch_produces_the_next_item_while_the_consumer_works():
    produced: list[int] = []
    stream = prefetch(recorded(3, produced), depth=1)
    assert next(stream) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 2 and time.monotonic() < deadline:  # while item 0 is in the consumer's hands
        time.sleep(0.01)
    assert produced[:2] == [0, 1]
    assert list(stream) == [1, 2]


def test_prefetch_raises_the_producers_exception_in_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        raise ValueError("damaged batch")

    stream = prefetch(items())
    assert next(stream) == 1
    with pytest.raises(ValueError, match="damaged batch"):
        next(stream)


def test_prefetch_stops_the_producer_when_the_consumer_stops_early():
    produced: list[int] = []
    stream = prefetch(recorded(1000, produced), depth=2)
    assert next(stream) == 0
    stream.close()  # joins the producer thread
    assert not any(t.name == "cnnkit-prefetch" for t in threading.enumerate())
    assert len(produced) <= 4  # the one handed over, two queued, one in hand when it saw the stop
