"""The scheduler (`persona beat`): every tick, claim the due users (policy in pipeline/domain/policy.py) and
enqueue one `persona.train.retrain_user` task each. Two schedulers at once never enqueue a user twice (the claim
is FOR UPDATE SKIP LOCKED with a queue mark), so running a spare one is safe."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from pipeline.config import PolicySettings, Settings
from pipeline.domain.policy import Policy
from pipeline.observability import metrics
from pipeline.storage import db, training

log = logging.getLogger(__name__)


def policy_of(p: PolicySettings) -> Policy:
    return Policy(p.min_new_events, p.max_age_s, p.cooldown_s, p.max_in_flight)


def tick(settings: Settings, enqueue: Callable[[str], None]) -> list[str]:
    """One scheduler tick: claim due users (committed) and enqueue them; returns the users enqueued.

    A user whose enqueue fails is unqueued again so that the next tick retries it.
    """
    with db.connect(settings.db) as conn:
        with conn.transaction():
            users = training.claim_due(conn, policy_of(settings.policy))
        for user_id in users:
            try:
                enqueue(user_id)
            except Exception:
                log.exception("could not enqueue %s; it will be picked again", user_id)
                with conn.transaction():
                    training.unqueue(conn, user_id)
                continue
            metrics.SCHEDULER_ENQUEUED.inc()
    if users:
        log.info("enqueued %d user(s): %s", len(users), ", ".join(users[:10]) + (" ..." if len(users) > 10 else ""))
    return users


def run(
    settings: Settings,
    enqueue: Callable[[str], None],
    stop: threading.Event,
    queue_depth: Callable[[], dict[str, int]] | None = None,
) -> None:
    """Tick every PERSONA_POLICY_TICK_S seconds until ``stop`` is set."""
    while not stop.is_set():
        try:
            tick(settings, enqueue)
            if queue_depth is not None:
                for queue, n in queue_depth().items():
                    metrics.QUEUE_DEPTH.labels(queue).set(n)
        except Exception:
            log.exception("scheduler tick failed; trying again next tick")
        stop.wait(settings.policy.tick_s)
