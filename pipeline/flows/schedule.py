"""The scheduler (`persona beat`): every tick, claim the due users (policy in `pipeline.domain.policy`) and
enqueue them in batches of at most PERSONA_TRAIN_BATCH_USERS, one `persona.train.retrain_users` task per batch (a
GPU worker trains a batch's adapters together). Two schedulers at once never enqueue a user twice (the claim is FOR
UPDATE SKIP LOCKED with a queue mark), so running a spare one is safe. Each tick also sets the buffer gauges
(events pending, age of the oldest) and, when given, the queue depths."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pipeline.config import PolicySettings
from pipeline.domain.policy import Policy
from pipeline.observability import metrics
from pipeline.storage import buffers, training
from pipeline.storage.db import Database

log = logging.getLogger(__name__)


def policy_of(p: PolicySettings) -> Policy:
    return Policy(p.min_new_events, p.max_age_s, p.cooldown_s, p.max_in_flight)


def batches(users: list[str], k: int) -> list[list[str]]:
    """``users`` (oldest pending first) cut into batches of at most ``k``."""
    return [users[i : i + k] for i in range(0, len(users), k)]


def tick(
    database: Database, policy: PolicySettings, batch_users: int, enqueue: Callable[[list[str]], None]
) -> list[str]:
    """One scheduler tick: claim due users (committed) and enqueue them in batches; returns the users enqueued.

    The users of a batch whose enqueue fails are unqueued again so that the next tick retries them.
    """
    enqueued: list[str] = []
    with database.connection() as conn:
        with conn.transaction():
            users = training.claim_due(conn, policy_of(policy))
        for batch in batches(users, batch_users):
            try:
                enqueue(batch)
            except Exception:
                log.exception("could not enqueue %s; they will be picked again", ", ".join(batch))
                with conn.transaction():
                    for user_id in batch:
                        training.unqueue(conn, user_id)
                continue
            metrics.SCHEDULER_ENQUEUED.inc(len(batch))
            enqueued.extend(batch)
    if enqueued:
        log.info(
            "enqueued %d user(s) in %d batch(es): %s",
            len(enqueued),
            -(-len(enqueued) // batch_users),
            ", ".join(enqueued[:10]) + (" ..." if len(enqueued) > 10 else ""),
        )
    return enqueued


def gauges(database: Database, queue_depth: Callable[[], dict[str, int]] | None = None) -> None:
    """Set the buffer gauges (pending events, age of the oldest) and, when given, the queue depths."""
    with database.connection() as conn:
        pending, age = buffers.pending_totals(conn)
    metrics.BUFFER_PENDING.set(pending)
    metrics.BUFFER_OLDEST_PENDING_AGE.set(age)
    if queue_depth is not None:
        for queue, n in queue_depth().items():
            metrics.QUEUE_DEPTH.labels(queue).set(n)


def run(
    database: Database,
    policy: PolicySettings,
    batch_users: int,
    enqueue: Callable[[list[str]], None],
    stop: threading.Event,
    queue_depth: Callable[[], dict[str, int]] | None = None,
) -> None:
    """Tick every PERSONA_POLICY_TICK_S seconds until ``stop`` is set; a failed tick is logged and retried."""
    while not stop.is_set():
        try:
            tick(database, policy, batch_users, enqueue)
            gauges(database, queue_depth)
        except Exception:
            log.exception("scheduler tick failed; trying again next tick")
        stop.wait(policy.tick_s)
