"""A Celery app made by persona's `workers.celery_app.make_app` (settings from PERSONA_* variables), without persona's
tasks, and one slow task that records each of its runs in Redis: what tests/integration/workers/test_visibility.py
runs its worker processes on. ``NO_VISIBILITY_HEARTBEAT=1`` in the environment turns the heartbeat off (the control
case: what the transport does without it)."""

from __future__ import annotations

import os
import time

import redis

from workers import celery_app

app = celery_app.make_app()
app.conf.include = []  # persona's tasks (and torch) are not needed here

if os.environ.get("NO_VISIBILITY_HEARTBEAT") == "1":
    from celery import signals

    signals.worker_init.disconnect(celery_app._visibility_heartbeat)


@app.task(name="test.slow", acks_late=True, reject_on_worker_lost=True)
def slow(key: str, seconds: float) -> None:
    """Note this run (the worker's pid) under ``key``, then take ``seconds``."""
    client = redis.Redis.from_url(str(app.conf.broker_url))
    client.rpush(key, str(os.getpid()))
    time.sleep(seconds)
