"""Admission: a bounded number of turns, first come first served, a timeout that refuses with 429 overloaded."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.serving.admission import Admission, Overloaded


def waiter(adm: Admission, log: list[int], i: int) -> threading.Thread:
    def run() -> None:
        adm.enter()
        log.append(i)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while adm.waiting < i and time.monotonic() < deadline:  # queued in this order
        time.sleep(0.001)
    return t


def test_turns_up_to_the_limit_then_waiters_in_arrival_order():
    adm = Admission(2, 30)
    adm.enter()
    adm.enter()
    assert adm.held == 2 and adm.waiting == 0
    log: list[int] = []
    threads = [waiter(adm, log, i) for i in (1, 2, 3)]
    assert adm.waiting == 3 and log == []
    adm.leave()
    threads[0].join(5)
    assert log == [1] and adm.held == 2  # the turn passed on
    adm.leave()  # one turn at a time: two turns passed together wake two threads in either order
    threads[1].join(5)
    assert log == [1, 2] and adm.waiting == 1 and threads[2].is_alive()  # the longest waiter took it
    adm.leave()
    threads[2].join(5)
    assert log == [1, 2, 3] and adm.waiting == 0 and adm.held == 2
    for _ in range(2):
        adm.leave()
    assert adm.held == 0
    with pytest.raises(RuntimeError, match="without a matching enter"):
        adm.leave()


def test_a_waiter_past_its_timeout_is_refused_as_overloaded_and_leaves_the_queue():
    adm = Admission(1, 0.05)
    adm.enter()
    start = time.monotonic()
    with pytest.raises(Overloaded) as e:
        adm.enter()
    assert time.monotonic() - start >= 0.05
    assert e.value.http_status == 429 and e.value.code == "overloaded" and e.value.retry_after_s
    assert adm.waiting == 0 and adm.held == 1
    adm.leave()
    adm.enter()  # free again: no wait
    assert adm.held == 1


def test_a_limit_below_one_is_refused():
    with pytest.raises(ValueError, match="limit"):
        Admission(0, 1)
