"""The Celery application of persona: Redis broker, queues `train`, `evaluate`, `publish`.

Delivery is at least once and tasks are idempotent: a task is acknowledged only after it ran (`acks_late`); a task
whose worker died is given to another worker after the visibility timeout (the Redis transport restores
unacknowledged messages; the restore check runs every few seconds rather than Celery's default of minutes). A live
worker refreshes the visibility of the tasks it holds (`workers.visibility`), so a task may run longer than the
timeout without being delivered twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import Celery, signals
from kombu import Queue

from pipeline.config import Settings
from pipeline.domain.tasks import EVALUATE_QUEUE, PUBLISH_QUEUE, QUEUES, RETRAIN_USERS, TRAIN_QUEUE
from workers import visibility


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from the settings (broker: PERSONA_REDIS_URL)."""
    settings = settings or Settings()
    w = settings.worker
    app = Celery("persona", broker=settings.redis.url, include=["workers.tasks.train", "workers.tasks.evaluate"])
    app.conf.update(
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue=TRAIN_QUEUE,
        task_routes={
            "persona.train.*": {"queue": TRAIN_QUEUE},
            "persona.evaluate.*": {"queue": EVALUATE_QUEUE},
            "persona.publish.*": {"queue": PUBLISH_QUEUE},
        },
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": w.visibility_timeout_s,
            "unacked_restore_interval": w.restore_interval_s,
            "unacked_restore_throttle": 1,
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )
    return app


@signals.worker_init.connect(weak=False)
def _visibility_heartbeat(sender: Any = None, **_: Any) -> None:
    """In worker processes only (not in the scheduler or other clients of the app)."""
    if sender is not None:
        visibility.install(sender.app)


def retrain_enqueuer(celery: Celery) -> Callable[[list[str]], None]:
    """The scheduler's ``enqueue``: one `persona.train.retrain_users` task per batch of users."""

    def enqueue(user_ids: list[str]) -> None:
        celery.send_task(RETRAIN_USERS, args=[user_ids], queue=TRAIN_QUEUE)

    return enqueue


app = make_app()
