"""`persona.evaluate.gate`: judge a candidate revision and promote it if it passes the operator's rules."""

from __future__ import annotations

import logging

import psycopg
from kafka.errors import KafkaError

from pipeline.evaluation.gate import judge
from pipeline.evaluation.promotion import AnnounceError
from pipeline.evaluation.rules import load_rules
from pipeline.storage.db import StorageError
from pipeline.storage.objects import ObjectStoreError
from workers.celery_app import app
from workers.tasks.train import worker_settings

log = logging.getLogger(__name__)


@app.task(
    name="persona.evaluate.gate",
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(StorageError, ObjectStoreError, AnnounceError, KafkaError, psycopg.OperationalError),
    retry_backoff=2,
    retry_backoff_max=120,
    max_retries=10,
)
def gate(self, revision_id: str) -> dict:
    """Judge ``revision_id`` under the rules file PERSONA_GATE_RULES (read at each task: edits apply at once)."""
    settings = worker_settings()
    rules_path = settings.gate.rules
    result = judge(revision_id, settings=settings, rules=load_rules(rules_path), rules_source=str(rules_path))
    return {
        "revision_id": result.revision_id,
        "user_id": result.user_id,
        "outcome": result.outcome,
        "reason": result.reason,
    }
