"""The evaluation gate: judge one candidate revision against the revision serving now, decide, and promote.

Order (each step idempotent, so a redelivered task repeats nothing that was done):

1. a candidate already decided is not judged again (its decision is returned; a promotion is re-announced);
2. a candidate whose parent is not the production revision any more is ``stale``: rejected without metrics;
3. metrics of the candidate, the current production revision and the base on the user's holdout events (the same
   evidence for all three) and the drift of each from the base on fixed probe prompts;
4. the operator's rules decide; the decision row (metrics, every rule's inputs and outcome, one-line reason) and
   the revision's status are written in one transaction, together with the compare-and-swap of the production
   alias from the candidate's parent when it passed (a concurrent move makes the candidate stale instead);
5. after that commit: the pointer users/{user}/production.json is published and the promotion announced on
   persona.promotions.v1.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.domain.errors import Conflict
from pipeline.domain.examples import TrainingEvent
from pipeline.domain.gating import Decision, RuleSet, decide, ruleset_digest
from pipeline.domain.revisions import Revision
from pipeline.evaluation.metrics import evaluate, load_probes
from pipeline.evaluation.promotion import announce
from pipeline.models.base import load_configured
from pipeline.observability import metrics as prom
from pipeline.storage import db, decisions, registry, training
from pipeline.storage.objects import ObjectStore
from pipeline.storage.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateResult:
    revision_id: str
    user_id: str
    outcome: str  # promoted | rejected | stale
    reason: str
    decision: decisions.StoredDecision


def _holdout(conn: Any, user_id: str) -> tuple[list[TrainingEvent], int]:
    events = training.training_events(conn, user_id, 2**62)
    return [e for e in events if e.split == "holdout"], sum(1 for e in events if e.split == "train")


def judge(revision_id: str, *, settings: Settings, rules: RuleSet, rules_source: str) -> GateResult:
    """Judge ``revision_id`` and promote it if it passes. Safe to repeat."""
    started = time.monotonic()
    store = ObjectStore(settings.s3)
    reg = Registry(settings.db, store)
    with db.connect(settings.db) as conn:
        cand = registry.get_revision(conn, revision_id)
        done = decisions.get(conn, cand.revision_id)
        if done is not None:
            log.info("%s: %s was already decided (%s)", cand.user_id, cand.revision_id, done.outcome)
            if done.outcome == "promoted":
                _publish(settings, reg, cand)
            return GateResult(cand.revision_id, cand.user_id, done.outcome, done.reason, done)
        user = registry.get_user(conn, cand.user_id)
        current = registry.production(conn, cand.user_id)
        holdout, train_count = _holdout(conn, cand.user_id)

    current_id = current.revision_id if current else None
    digest = ruleset_digest(rules)
    if cand.parent_id != current_id:
        reason = f"stale: its parent {cand.parent_id or 'none'} is not production ({current_id or 'none'} is)"
        return _record(
            settings,
            cand,
            user.app,
            current_id,
            "stale",
            False,
            reason,
            {},
            Decision(passed=False, reason=reason, results=(), rules_digest=digest).to_dict(),
            digest,
            rules_source,
            started,
        )

    base = load_configured(settings.model)
    with tempfile.TemporaryDirectory(prefix="persona-gate-") as tmp:
        cand_dir = reg.download(cand, Path(tmp) / "candidate")
        cur_dir = reg.download(current, Path(tmp) / "current") if current is not None else None
        m = evaluate(
            base,
            candidate_dir=cand_dir,
            current_dir=cur_dir,
            holdout_events=holdout,
            train_events_count=train_count,
            new_events_count=int(cand.manifest["training"].get("new_events", 0)),
            probes=load_probes(settings.gate.probes),
            min_preference_pairs=settings.gate.min_preference_pairs,
            max_length=settings.training.max_length,
        )
    decision = decide(rules, m, user_id=cand.user_id, app=user.app)
    for r in decision.results:
        prom.GATE_RULE_OUTCOMES.labels(r.name, r.outcome).inc()
    outcome = "promoted" if decision.passed else "rejected"
    return _record(
        settings,
        cand,
        user.app,
        current_id,
        outcome,
        decision.passed,
        decision.reason,
        m,
        decision.to_dict(),
        digest,
        rules_source,
        started,
    )


def _record(
    settings: Settings,
    cand: Revision,
    app: str,
    current_id: str | None,
    outcome: str,
    passed: bool,
    reason: str,
    m: dict[str, Any],
    results: dict[str, Any],
    digest: str,
    rules_source: str,
    started: float,
) -> GateResult:
    reg = Registry(settings.db, ObjectStore(settings.s3))
    with db.connect(settings.db) as conn:
        try:
            with conn.transaction():
                if outcome == "promoted":
                    registry.move_alias(
                        conn, cand.user_id, cand.revision_id, expected=cand.parent_id, reason="gate", actor="gate"
                    )
                else:
                    conn.execute(
                        "UPDATE revisions SET status = 'rejected', status_at = now() WHERE revision_id = %s",
                        (cand.revision_id,),
                    )
                stored = decisions.insert(
                    conn,
                    revision_id=cand.revision_id,
                    user_id=cand.user_id,
                    app=app,
                    current_revision_id=current_id,
                    outcome=outcome,
                    passed=passed,
                    reason=reason,
                    metrics=m,
                    results=results,
                    rules_digest=digest,
                    rules_source=rules_source,
                )
                if stored is None:  # decided meanwhile by another attempt: keep that one
                    raise _AlreadyDecided
        except _AlreadyDecided:
            stored = decisions.get(conn, cand.revision_id)
            return GateResult(cand.revision_id, cand.user_id, stored.outcome, stored.reason, stored)
        except Conflict:
            # The alias moved between our read and the swap: the candidate is stale now.
            return _record(
                settings,
                cand,
                app,
                current_id,
                "stale",
                passed,
                f"stale: production moved while {cand.revision_id} was judged",
                m,
                results,
                digest,
                rules_source,
                started,
            )
    prom.GATE_DECISIONS.labels(outcome).inc()
    prom.GATE_SECONDS.observe(time.monotonic() - started)
    log.info("%s: %s %s: %s", cand.user_id, cand.revision_id, outcome, reason)
    if outcome == "promoted":
        _publish(settings, reg, cand)
    return GateResult(cand.revision_id, cand.user_id, outcome, reason, stored)


class _AlreadyDecided(Exception):
    pass


def _publish(settings: Settings, reg: Registry, cand: Revision) -> None:
    """Pointer and promotion event, if the candidate still serves (a later move announced itself)."""
    with db.connect(settings.db) as conn:
        prod = registry.production(conn, cand.user_id)
    if prod is None or prod.revision_id != cand.revision_id:
        return
    reg.publish(cand.user_id)
    announce(settings.kafka, prod, reason="gate")
    prom.PROMOTIONS.labels("gate").inc()
