"""`persona.train.retrain_users`: retrain a batch of users' adapters together (the scheduler's task), and
`persona.train.retrain_user`: one user (a batch of one; operators' manual enqueues)."""

from __future__ import annotations

import logging
import socket

import psycopg

from pipeline.config import Settings
from pipeline.observability import metrics
from pipeline.storage.db import StorageError
from pipeline.storage.objects import ObjectStoreError
from pipeline.training.job import LeaseBusy, LeaseLost, Outcome, retrain, retrain_batch
from workers.celery_app import app

log = logging.getLogger(__name__)

#: Errors worth another attempt of the user later (the database or the object store was unreachable).
TRANSIENT = (StorageError, ObjectStoreError, psycopg.OperationalError)


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
    autoretry_for=TRANSIENT,
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


@app.task(
    name="persona.train.retrain_users",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=60,
)
def retrain_users(self, user_ids: list[str]) -> dict:
    """Train candidates for a batch of users together (at most PERSONA_TRAIN_BATCH_USERS at a time) and chain
    ``persona.evaluate.gate`` for each. A user's failure is that user's alone: busy users and users that hit a
    transient storage error are retried later in a task of their own; the others' outcomes stand."""
    owner = f"{socket.gethostname()}/{self.request.id}"
    settings = worker_settings()
    k = settings.training.batch_users
    report: list[dict] = []
    retry: list[str] = []
    countdown = 1.0
    for start in range(0, len(user_ids), k):
        batch = list(user_ids[start : start + k])
        results = retrain_batch(
            batch,
            settings=settings,
            owner=owner,
            on_candidate=lambda rev: app.send_task("persona.evaluate.gate", args=[rev], queue="evaluate"),
        )
        for user_id, result in zip(batch, results, strict=True):
            if isinstance(result, Outcome):
                metrics.TRAINING_OUTCOMES.labels(result.outcome).inc()
                report.append(
                    {
                        "user_id": user_id,
                        "outcome": result.outcome,
                        "revision_id": result.revision_id,
                        "parent_id": result.parent_id,
                        "steps": result.steps,
                        "seconds": round(result.seconds, 2),
                    }
                )
            elif isinstance(result, LeaseBusy):
                metrics.TRAINING_OUTCOMES.labels("busy").inc()
                retry.append(user_id)
                countdown = max(countdown, result.seconds_left + 1)
            elif isinstance(result, LeaseLost):
                metrics.TRAINING_OUTCOMES.labels("lease_lost").inc()
                log.warning(
                    "%s: lease lost mid-training; the attempt that took it over finishes the revision", user_id
                )
                report.append({"user_id": user_id, "outcome": "lease_lost"})
            else:
                metrics.TRAINING_OUTCOMES.labels("failed").inc()
                log.error("%s: training failed: %r", user_id, result, exc_info=result)
                if isinstance(result, TRANSIENT):
                    retry.append(user_id)
                    countdown = max(countdown, min(120.0, 2.0 ** (self.request.retries + 1)))
                report.append({"user_id": user_id, "outcome": "failed", "error": repr(result)[:500]})
    if retry and self.request.retries < self.max_retries:
        log.info("retrying %d user(s) in %.0f s: %s", len(retry), countdown, ", ".join(retry))
        self.apply_async(args=[retry], countdown=countdown, retries=self.request.retries + 1)
    return {"users": report}
