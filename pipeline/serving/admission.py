"""Admission in front of the engine's queue: a bounded number of generations hold an adapter slot at once.

A generation pins its adapter in a device slot from the moment it is queued for the engine until it ends
(`pipeline.serving.cache.AdapterCache.acquire`). When requests arrive faster than the engine serves them, an
unbounded engine queue lets the waiting requests pin ever more slots: with skewed traffic over more adapters than
slots, the queue soon holds more distinct adapters than there are slots, the cache cannot evict anything, and new
requests fail with ``slots_exhausted`` while the hot adapters' slots are taken by requests that wait (measured on an
H200 with 10,000 adapters and 1,024 slots: past capacity, achieved throughput fell from ~750 to ~470 req/s, with
429s). `Admission` keeps at most ``limit`` generations started (running or in the engine's queue); the others wait
here in arrival order, holding nothing, and one goes on each time a started generation ends. A request that waits
longer than its timeout is refused with `Overloaded` (429 with a retry hint).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from pipeline.domain.errors import CapacityExhausted
from pipeline.observability import metrics as obs


class Overloaded(CapacityExhausted):
    """The worker's engine has more requests than it serves; this one waited its turn too long."""

    code = "overloaded"


class Admission:
    """At most ``limit`` holders at once; `enter` waits its turn (first come, first served), `leave` passes the turn
    to the longest waiter."""

    def __init__(self, limit: int, timeout_s: float) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.timeout_s = timeout_s
        self.held = 0
        self._waiters: deque[threading.Event] = deque()
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def enter(self) -> None:
        """Take a turn, waiting for one as long as the timeout allows (`Overloaded` after that)."""
        with self._lock:
            if self.held < self.limit and not self._waiters:
                self.held += 1
                return
            turn = threading.Event()
            self._waiters.append(turn)
            obs.SERVING_ADMISSION_WAITING.set(len(self._waiters))
        start = time.monotonic()
        if turn.wait(self.timeout_s):
            obs.SERVING_ADMISSION_WAIT_SECONDS.observe(time.monotonic() - start)
            return
        with self._lock:
            try:
                self._waiters.remove(turn)
            except ValueError:  # its turn came just as it gave up: take it
                pass
            else:
                obs.SERVING_ADMISSION_WAITING.set(len(self._waiters))
                obs.SERVING_OVERLOADED.inc()
                raise Overloaded(
                    f"the worker has {self.held} requests running or queued (its limit) and {len(self._waiters) + 1} "
                    f"more waiting; this one waited {self.timeout_s:.0f} s for its turn"
                )
        obs.SERVING_ADMISSION_WAIT_SECONDS.observe(time.monotonic() - start)

    def leave(self) -> None:
        """Give a turn back (once per `enter` that returned): the longest waiter takes it."""
        with self._lock:
            if self._waiters:
                self._waiters.popleft().set()  # the turn passes on: held stays
                obs.SERVING_ADMISSION_WAITING.set(len(self._waiters))
            elif self.held > 0:
                self.held -= 1
            else:
                raise RuntimeError("Admission.leave without a matching enter")
