"""The Celery application of persona: Redis broker, queues `train`, `evaluate`, `publish`.

Delivery is at least once and tasks are idempotent (DESIGN.md section 5): a task is acknowledged only after it
ran (`acks_late`); a task whose worker died is given to another worker after the visibility timeout (the
Redis transport restores unacknowledged messages; the restore check runs every few seconds rather than Celery's
default of minutes).
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from pipeline.config import Settings

QUEUES = ("train", "evaluate", "publish")


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from the settings (the broker URL is the effective Redis URL)."""
    from pipeline import stack

    settings = settings or Settings()
    broker = stack.effective_urls(settings)["redis_url"]
    w = settings.worker
    app = Celery("persona", broker=broker, include=["workers.tasks.train", "workers.tasks.evaluate"])
    app.conf.update(
        task_queues=[Queue(q) for q in QUEUES],
        task_default_queue="train",
        task_routes={
            "persona.train.*": {"queue": "train"},
            "persona.evaluate.*": {"queue": "evaluate"},
            "persona.publish.*": {"queue": "publish"},
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


app = make_app()
