"""`persona.evaluate.gate`: judge a candidate revision and promote it if it passes the operator's rules
(`pipeline.flows.gate`). A candidate whose user was forgotten (or that no longer exists) is not retried: there is
nothing to judge."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from kafka.errors import KafkaError

from pipeline.domain.errors import Forgotten, NotFound
from pipeline.domain.tasks import GATE
from pipeline.evaluation.rules import load_rules
from pipeline.flows.gate import GateConfig, judge
from pipeline.serving.promotions import AnnounceError
from pipeline.storage.db import StorageError
from pipeline.storage.objects import ObjectStoreError
from workers.celery_app import app
from workers.process import resources

log = logging.getLogger(__name__)


#: Longest wait between two attempts while a store is down: it bounds how long a candidate waits after the store is
#: back (the fault benchmark's goal is 30 s from the moment a dependency returns).
RETRY_BACKOFF_MAX_S = 15


@app.task(
    name=GATE,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(StorageError, ObjectStoreError, AnnounceError, KafkaError, psycopg.OperationalError),
    retry_backoff=2,
    retry_backoff_max=RETRY_BACKOFF_MAX_S,
    # No limit: nothing else ever judges a candidate whose gate task gave up (the scheduler enqueues trainings,
    # not gates), so an outage longer than a retry budget would leave it undecided for good.
    max_retries=None,
)
def gate(self: Any, revision_id: str) -> dict[str, Any]:
    """Judge ``revision_id`` under the rules file PERSONA_GATE_RULES (read at each task: edits apply at once)."""
    r = resources()
    s = r.settings
    config = GateConfig(
        model=s.model,
        probes=s.gate.probes,
        min_preference_pairs=s.gate.min_preference_pairs,
        max_length=s.training.max_length,
    )
    rules_path = s.gate.rules
    try:
        result = judge(
            revision_id,
            stores=r.stores,
            announcer=r.announcer,
            config=config,
            rules=load_rules(rules_path),
            rules_source=str(rules_path),
        )
    except NotFound as e:  # the flow counted and logged a forgotten user's; a retry finds nothing either
        outcome = "forgotten" if isinstance(e, Forgotten) else "not_found"
        if outcome == "not_found":
            log.warning("%s: nothing to judge: %s", revision_id, e)
        return {"revision_id": revision_id, "outcome": outcome, "reason": str(e)}
    return {
        "revision_id": result.revision_id,
        "user_id": result.user_id,
        "outcome": result.outcome,
        "reason": result.reason,
    }
