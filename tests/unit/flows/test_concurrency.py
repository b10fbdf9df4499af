"""`pipeline.flows.concurrency.each`: a batch's per-user database and object-store work, several users at a time."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.flows.concurrency import each


@pytest.mark.parametrize("threads", [1, 4])
def test_results_come_back_in_the_items_order_and_a_failure_is_that_items_alone(threads):
    seen: set[str] = set()
    lock = threading.Lock()

    def work(i: int) -> int:
        time.sleep(0.02 * ((7 - i) % 4))  # later items finish first
        with lock:
            seen.add(threading.current_thread().name)
        if i == 3:
            raise ValueError("user 3 is bad")
        return i * 10

    out = each(threads, list(range(8)), work)
    assert [r for i, r in enumerate(out) if i != 3] == [0, 10, 20, 40, 50, 60, 70]
    assert isinstance(out[3], ValueError) and str(out[3]) == "user 3 is bad"
    assert len(seen) == (1 if threads == 1 else 4)  # the users' work ran on that many threads


def test_a_base_exception_is_not_swallowed():
    def work(i: int) -> int:
        if i == 1:
            raise KeyboardInterrupt
        return i

    with pytest.raises(KeyboardInterrupt):
        each(2, [0, 1, 2], work)
