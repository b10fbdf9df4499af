"""`persona.train.retrain_user`: retrain one user's adapter from their production revision."""

from __future__ import annotations

import logging
import socket

import psycopg

from pipeline.config import Settings
from pipeline.observability import metrics
from pipeline.storage.db import StorageError
from pipeline.storage.objects import ObjectStoreError
from pipeline.training.job import LeaseBusy, LeaseLost, retrain
from workers.celery_app import app

log = logging.getLogger(__name__)


def worker_settings() -> Settings:
    """Settings of a worker process, with the database the stack resolved (embedded or configured)."""
    from pipeline import stack

    settings = Settings()
    db = settings.db.model_copy(update={"url": stack.effective_urls(settings)["db_url"]})
    return Settings(
        db,
        settings.s3,
        settings.kafka,
        settings.model,
        settings.training,
        settings.policy,
        settings.worker,
        settings.gate,
    )


@app.task(
    name="persona.train.retrain_user",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(StorageError, ObjectStoreError, psycopg.OperationalError),
    retry_backoff=2,
    retry_backoff_max=120,
    max_retries=10,
)
def retrain_user(self, user_id: str) -> dict:
    """Train a candidate for ``user_id`` (if due work is pending) and chain ``persona.evaluate.gate``."""
    owner = f"{socket.gethostname()}/{self.request.id}"
    try:
        outcome = retrain(
            user_id,
            settings=worker_settings(),
            owner=owner,
            on_candidate=lambda rev: app.send_task("persona.evaluate.gate", args=[rev], queue="evaluate"),
        )
    except LeaseBusy as e:
        metrics.TRAINING_OUTCOMES.labels("busy").inc()
        raise self.retry(exc=e, countdown=max(1.0, e.seconds_left + 1), max_retries=60) from e
    except LeaseLost:
        metrics.TRAINING_OUTCOMES.labels("lease_lost").inc()
        log.warning("%s: lease lost mid-training; the attempt that took it over finishes the revision", user_id)
        return {"user_id": user_id, "outcome": "lease_lost"}
    except Exception:
        metrics.TRAINING_OUTCOMES.labels("failed").inc()
        raise
    metrics.TRAINING_OUTCOMES.labels(outcome.outcome).inc()
    return {
        "user_id": user_id,
        "outcome": outcome.outcome,
        "revision_id": outcome.revision_id,
        "parent_id": outcome.parent_id,
        "steps": outcome.steps,
        "seconds": round(outcome.seconds, 2),
    }
