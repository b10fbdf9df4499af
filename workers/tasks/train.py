"""`persona.train.retrain_users`: retrain a batch of users' adapters together (the scheduler's task), and
`persona.train.retrain_user`: one user (a batch of one; operators' manual enqueues). Both call
`pipeline.flows.retrain` and chain the gate: `persona.evaluate.gate_many` for a batch's candidates,
`persona.evaluate.gate` for a one-user retrain's. A user forgotten while it trained has the outcome ``forgotten``
(nothing written) and is never retried."""

from __future__ import annotations

import logging
import socket
from typing import Any

import psycopg

from pipeline.domain.errors import Forgotten
from pipeline.domain.tasks import EVALUATE_QUEUE, GATE, GATE_MANY, RETRAIN_USER, RETRAIN_USERS
from pipeline.flows.retrain import LeaseBusy, LeaseLost, Outcome, RetrainConfig, retrain, retrain_batch
from pipeline.observability import metrics
from pipeline.storage.db import StorageError
from pipeline.storage.objects import ObjectStoreError
from workers.celery_app import app
from workers.process import resources, settings

log = logging.getLogger(__name__)

#: Errors worth another attempt of the user later (the database or the object store was unreachable).
TRANSIENT = (StorageError, ObjectStoreError, psycopg.OperationalError)
#: Longest wait between two attempts while a store is down (it bounds how long a training waits once it is back).
RETRY_BACKOFF_MAX_S = 30


def _backoff(retries: int) -> float:
    return min(float(RETRY_BACKOFF_MAX_S), 2.0 ** (retries + 1))


def _config() -> RetrainConfig:
    s = settings()
    io_threads = min(s.worker.io_threads, s.db.pool_max)  # one pooled connection each
    return RetrainConfig(model=s.model, training=s.training, lease_s=s.policy.lease_s, io_threads=io_threads)


def _chain_gate(revision_id: str) -> None:
    app.send_task(GATE, args=[revision_id], queue=EVALUATE_QUEUE)


def _report(o: Outcome) -> dict[str, Any]:
    return {
        "user_id": o.user_id,
        "outcome": o.outcome,
        "revision_id": o.revision_id,
        "parent_id": o.parent_id,
        "steps": o.steps,
        "seconds": round(o.seconds, 2),
    }


@app.task(
    name=RETRAIN_USER,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=TRANSIENT,
    retry_backoff=2,
    retry_backoff_max=RETRY_BACKOFF_MAX_S,
    max_retries=10,
)
def retrain_user(self: Any, user_id: str) -> dict[str, Any]:
    """Train a candidate for ``user_id`` (if due work is pending) and chain ``persona.evaluate.gate``."""
    owner = f"{socket.gethostname()}/{self.request.id}"
    try:
        outcome = retrain(user_id, stores=resources().stores, config=_config(), owner=owner, on_candidate=_chain_gate)
    except LeaseBusy as e:
        metrics.TRAINING_OUTCOMES.labels("busy").inc()
        raise self.retry(exc=e, countdown=max(1.0, e.seconds_left + 1), max_retries=60) from e
    except LeaseLost:
        metrics.TRAINING_OUTCOMES.labels("lease_lost").inc()
        log.warning("%s: lease lost mid-training; the attempt that took it over finishes the revision", user_id)
        return {"user_id": user_id, "outcome": "lease_lost"}
    except Forgotten:  # the flow reports it as an Outcome; should one escape, it is final all the same
        metrics.TRAINING_OUTCOMES.labels("forgotten").inc()
        return {"user_id": user_id, "outcome": "forgotten"}
    except Exception:
        metrics.TRAINING_OUTCOMES.labels("failed").inc()
        raise
    metrics.TRAINING_OUTCOMES.labels(outcome.outcome).inc()
    return _report(outcome)


@app.task(name=RETRAIN_USERS, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=60)
def retrain_users(self: Any, user_ids: list[str]) -> dict[str, Any]:
    """Train candidates for a batch of users together (at most PERSONA_TRAIN_BATCH_USERS at a time) and chain one
    ``persona.evaluate.gate_many`` for the candidates of each batch. A user's failure is that user's alone: busy
    users and users that hit a transient storage error are retried later in a task of their own; the others'
    outcomes stand."""
    owner = f"{socket.gethostname()}/{self.request.id}"
    config = _config()
    try:
        stores = resources().stores
    except TRANSIENT as e:  # the database is down: the whole batch waits
        raise self.retry(exc=e, countdown=_backoff(self.request.retries)) from e
    k = config.training.batch_users
    report: list[dict[str, Any]] = []
    retry: list[str] = []
    countdown = 1.0
    for start in range(0, len(user_ids), k):
        batch = list(user_ids[start : start + k])
        candidates: list[str] = []
        results = retrain_batch(batch, stores=stores, config=config, owner=owner, on_candidate=candidates.append)
        if candidates:  # judged together: one pass over the base for the batch (a redelivery re-chains them)
            app.send_task(GATE_MANY, args=[candidates], queue=EVALUATE_QUEUE)
        for user_id, result in zip(batch, results, strict=True):
            if isinstance(result, Outcome):
                metrics.TRAINING_OUTCOMES.labels(result.outcome).inc()
                report.append(_report(result))
            elif isinstance(result, LeaseBusy):
                metrics.TRAINING_OUTCOMES.labels("busy").inc()
                retry.append(user_id)
                countdown = max(countdown, result.seconds_left + 1)
            elif isinstance(result, Forgotten):  # final: never retried
                metrics.TRAINING_OUTCOMES.labels("forgotten").inc()
                report.append({"user_id": user_id, "outcome": "forgotten"})
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
                    countdown = max(countdown, _backoff(self.request.retries))
                report.append({"user_id": user_id, "outcome": "failed", "error": repr(result)[:500]})
    if retry and self.request.retries < self.max_retries:
        log.info("retrying %d user(s) in %.0f s: %s", len(retry), countdown, ", ".join(retry))
        self.apply_async(args=[retry], countdown=countdown, retries=self.request.retries + 1)
    return {"users": report}
