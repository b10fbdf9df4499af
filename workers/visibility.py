"""A live worker keeps the Redis visibility of the tasks it holds fresh, so that only a dead worker's tasks return.

Kombu's Redis transport keeps every delivered, unacknowledged message in the hash ``unacked`` and its delivery time
in the sorted set ``unacked_index``; each worker regularly puts back on its queue every message delivered more than
``visibility_timeout`` seconds ago (``QoS.restore_visible``), because the worker that holds it may have died. A task
that runs, or waits for its countdown, longer than the timeout is then delivered a second time while the first
delivery still runs (a CPU training takes minutes; a retry's countdown up to two). So the timeout had to be longer
than any task, and a SIGKILLed worker's task waited that long before another worker took it.

Here a thread of the worker process refreshes the delivery time of every message the process holds (received and
not yet finished: running, or waiting for its ETA) every ``visibility_timeout / 3`` seconds: a live worker's
messages never look abandoned, however long they run, and a dead worker's are restored ``visibility_timeout``
seconds after its last refresh. The timeout then bounds how long a killed worker's task waits, not how long a task
may run.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from celery import Celery, signals

log = logging.getLogger(__name__)

#: Kombu's default name of the sorted set of unacknowledged deliveries (transport option ``unacked_index_key``).
UNACKED_INDEX = "unacked_index"


class VisibilityHeartbeat:
    """The delivery tags this process holds, refreshed in ``unacked_index`` from a thread of its own."""

    def __init__(self, redis_url: str, *, interval_s: float, index_key: str = UNACKED_INDEX) -> None:
        self.redis_url = redis_url
        self.interval_s = max(0.5, interval_s)
        self.index_key = index_key
        self._tags: dict[str, str] = {}  # task id -> delivery tag
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None

    def hold(self, task_id: str, delivery_tag: str) -> None:
        with self._lock:
            self._tags[task_id] = delivery_tag

    def release(self, task_id: str) -> None:
        with self._lock:
            self._tags.pop(task_id, None)

    def held(self) -> dict[str, str]:
        with self._lock:
            return dict(self._tags)

    def beat(self) -> int:
        """Refresh the delivery time of every held message that is still unacknowledged; returns how many.

        A message whose entry is gone (acknowledged, or rejected without its task finishing here) is forgotten,
        and never added back.
        """
        held = self.held()
        if not held:
            return 0
        if self._client is None:
            self._client = redis.Redis.from_url(self.redis_url, socket_timeout=5, socket_connect_timeout=5)
        pipe = self._client.pipeline(transaction=False)
        for tag in held.values():
            pipe.zscore(self.index_key, tag)
        scores = pipe.execute()
        live = [tag for tag, score in zip(held.values(), scores, strict=True) if score is not None]
        gone = {task_id for (task_id, tag), score in zip(held.items(), scores, strict=True) if score is None}
        if live:
            self._client.zadd(self.index_key, dict.fromkeys(live, time.time()), xx=True)
        if gone:
            with self._lock:
                for task_id in gone:
                    self._tags.pop(task_id, None)
        return len(live)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.beat()
            except (redis.RedisError, OSError) as e:
                # Redis down: the broker connection fails too; refreshed again once it answers.
                log.warning("could not refresh the visibility of %d held task(s): %s", len(self.held()), e)
                self._client = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="visibility-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


_installed: VisibilityHeartbeat | None = None


def install(app: Celery) -> VisibilityHeartbeat | None:
    """Track the tasks this worker process receives and refresh their visibility until they finish (Redis
    brokers only; once per process). Called when a worker starts (``worker_init``), never in clients."""
    global _installed
    url = str(app.conf.broker_url or "")
    if _installed is not None or not url.startswith(("redis://", "rediss://")):
        return _installed
    options: dict[str, Any] = dict(app.conf.broker_transport_options or {})
    if options.get("global_keyprefix"):
        log.warning("broker_transport_options.global_keyprefix is set: the visibility heartbeat is off")
        return None
    timeout = float(options.get("visibility_timeout", 3600))
    heartbeat = VisibilityHeartbeat(
        url, interval_s=timeout / 3, index_key=str(options.get("unacked_index_key", UNACKED_INDEX))
    )

    def received(request: Any = None, **_: Any) -> None:
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if request is not None and tag is not None:
            heartbeat.hold(request.id, str(tag))

    def finished(task_id: str | None = None, **_: Any) -> None:
        if task_id is not None:
            heartbeat.release(task_id)

    def dropped(request: Any = None, **_: Any) -> None:
        if request is not None:
            heartbeat.release(request.id)

    signals.task_received.connect(received, weak=False)
    signals.task_postrun.connect(finished, weak=False)
    signals.task_revoked.connect(dropped, weak=False)
    signals.worker_shutdown.connect(lambda **_: heartbeat.stop(), weak=False)
    heartbeat.start()
    log.info(
        "visibility heartbeat: held tasks refreshed every %.1f s (visibility timeout %.0f s)", timeout / 3, timeout
    )
    _installed = heartbeat
    return heartbeat
