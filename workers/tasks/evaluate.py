"""`persona.evaluate.gate`: judge a candidate revision and promote it if it passes the operator's rules
(`pipeline.flows.gate`); `persona.evaluate.gate_many`: the candidates of one training batch, measured together. A
candidate whose user was forgotten (or that no longer exists) is not retried: there is nothing to judge."""

from __future__ import annotations

import logging
from typing import Any

import psycopg
from kafka.errors import KafkaError

from pipeline.domain.errors import Forgotten, NotFound
from pipeline.domain.tasks import GATE, GATE_MANY
from pipeline.evaluation.rules import load_rules
from pipeline.flows.gate import GateConfig, GateResult, judge, judge_many
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
    config = _config()
    rules_path = r.settings.gate.rules
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


#: What fails one candidate of a `gate_many` for a while: the task is retried with those candidates only.
TRANSIENT = (StorageError, ObjectStoreError, AnnounceError, KafkaError, psycopg.OperationalError)


@app.task(name=GATE_MANY, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def gate_many(self: Any, revision_ids: list[str]) -> dict[str, Any]:
    """Judge the candidates of one training batch together (`pipeline.flows.gate.judge_many`). Candidates whose
    judging met a store or broker outage are judged again by a retry of this task with them only (backoff, no
    limit, as ``gate``); the others' decisions stand."""
    r = resources()
    rules_path = r.settings.gate.rules
    try:
        results = judge_many(
            list(revision_ids),
            stores=r.stores,
            announcer=r.announcer,
            config=_config(),
            rules=load_rules(rules_path),
            rules_source=str(rules_path),
        )
    except TRANSIENT as e:
        raise self.retry(exc=e, countdown=min(float(RETRY_BACKOFF_MAX_S), 2.0 ** (self.request.retries + 1))) from e
    report = []
    again: list[str] = []
    for revision_id, result in zip(revision_ids, results, strict=True):
        if isinstance(result, GateResult):
            report.append({"revision_id": revision_id, "user_id": result.user_id, "outcome": result.outcome})
        elif isinstance(result, NotFound):
            outcome = "forgotten" if isinstance(result, Forgotten) else "not_found"
            report.append({"revision_id": revision_id, "outcome": outcome})
        elif isinstance(result, TRANSIENT):
            log.warning("%s: judging met %r; judged again after a backoff", revision_id, result)
            again.append(revision_id)
        else:
            log.error("%s: judging failed: %r", revision_id, result, exc_info=result)
            report.append({"revision_id": revision_id, "outcome": "failed", "error": repr(result)[:500]})
    if again:  # only those candidates, in this task again (the decided ones would be skipped anyway)
        countdown = min(float(RETRY_BACKOFF_MAX_S), 2.0 ** (self.request.retries + 1))
        raise self.retry(args=[again], countdown=countdown)
    return {"candidates": report}


def _config() -> GateConfig:
    s = resources().settings
    return GateConfig(
        model=s.model,
        probes=s.gate.probes,
        min_preference_pairs=s.gate.min_preference_pairs,
        max_length=s.training.max_length,
        io_threads=min(s.worker.io_threads, s.db.pool_max),  # one pooled connection each
        rows_per_forward=s.gate.rows_per_forward,
        probe_rows_per_forward=s.gate.probe_rows_per_forward,
        shift_events=s.gate.shift_events,
    )
