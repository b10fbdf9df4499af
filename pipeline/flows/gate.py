"""The evaluation gate: judge one candidate revision against the revision serving now, decide, and promote.

Order (each step idempotent, so a redelivered task repeats nothing that was done):

1. a candidate already decided is not judged again (its decision is returned; a promotion is re-announced);
2. a candidate whose parent is not the production revision any more is ``stale``: rejected without metrics;
3. metrics of the candidate, the current production revision and the base on the user's holdout events (the same
   evidence for all three; split into the events from before this round and this round's, at the parent's last
   event), on the general answers and the probe prompts of the probe file, and the round's new training events'
   shift and repeats (`pipeline.evaluation.metrics.evaluate`);
4. the operator's rules decide; the decision row (metrics, every rule's inputs and outcome, one-line reason) and
   the revision's status are written in one transaction, together with the compare-and-swap of the production
   alias from the candidate's parent when it passed (a concurrent move makes the candidate stale instead);
5. after that commit: the pointer users/{user}/production.json is published and the promotion announced on
   persona.promotions.v1 (`pipeline.flows.promotion.announce_serving`).

A user forgotten while its candidate is judged gets no decision, no promotion and no announcement: the transaction
of step 4 first locks the user and checks that it was not forgotten since the candidate was written and that the
candidate still exists (`storage.registry.lock_alive_revision`); `judge` then raises Forgotten (a NotFound, which
the gate task does not retry). Between steps 3 and 4 the failpoint `failpoints.BEFORE_DECISION` fires.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ModelSettings
from pipeline.domain.errors import Conflict, Forgotten, NotFound, PersonaError
from pipeline.domain.examples import TrainingEvent
from pipeline.domain.gating import Decision, RuleSet, decide, ruleset_digest
from pipeline.domain.revisions import Revision
from pipeline.evaluation.metrics import (
    SHIFT_EVENTS,
    SPLIT_BATCH,
    EvalRequest,
    evaluate_many,
    load_general,
    load_probes,
)
from pipeline.flows import failpoints
from pipeline.flows.concurrency import each
from pipeline.flows.promotion import announce_serving
from pipeline.models.base import LoadedBase, load_configured
from pipeline.observability import metrics as prom
from pipeline.serving.promotions import Announcer
from pipeline.storage import decisions, registry, training
from pipeline.storage.stores import Stores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateConfig:
    """What judging needs besides the stores: the base, the probe prompts file, the evidence bounds."""

    model: ModelSettings
    probes: Path
    min_preference_pairs: int
    max_length: int
    io_threads: int = 1  # candidates whose database and object-store work runs at once (`judge_many`)
    rows_per_forward: int = 0  # labelled rows per forward of the batched gate (0: its device's default)
    probe_rows_per_forward: int = 0  # probe rows per forward (0: its device's default)
    shift_events: int = SHIFT_EVENTS  # new events scored for new_shift (0: all; `metrics.shift_examples`)


def _split_batch(base: LoadedBase) -> int | None:
    """The device's default labelled rows per forward: given explicitly, so that setting only the probe rows
    (`evaluate_many`'s ``batch_size``) does not change them."""
    device = next(base.model.parameters()).device.type
    return SPLIT_BATCH.get(device)


@dataclass(frozen=True)
class GateResult:
    revision_id: str
    user_id: str
    outcome: str  # promoted | rejected | stale
    reason: str
    decision: decisions.StoredDecision


def _holdout(events: list[TrainingEvent]) -> tuple[list[TrainingEvent], int]:
    return [e for e in events if e.split == "holdout"], sum(1 for e in events if e.split == "train")


def judge(
    revision_id: str,
    *,
    stores: Stores,
    announcer: Announcer,
    config: GateConfig,
    rules: RuleSet,
    rules_source: str,
) -> GateResult:
    """Judge ``revision_id`` and promote it if it passes. Safe to repeat. Raises NotFound when the revision does not
    exist (a forget deleted it, or a wrong id), Forgotten when its user was forgotten while it was judged."""
    (result,) = judge_many(
        [revision_id], stores=stores, announcer=announcer, config=config, rules=rules, rules_source=rules_source
    )
    if isinstance(result, BaseException):
        raise result
    return result


def judge_many(
    revision_ids: list[str],
    *,
    stores: Stores,
    announcer: Announcer,
    config: GateConfig,
    rules: RuleSet,
    rules_source: str,
) -> list[GateResult | BaseException]:
    """`judge` for several candidates (e.g. those of one training batch), their metrics computed together in one
    pass over the base (`pipeline.evaluation.metrics.evaluate_many`); each candidate's steps 1, 2, 4 and 5 are its
    own, and so is its failure: per candidate in order, its GateResult or the exception that failed it.

    The candidates' database and object-store work (steps 1 and 2, the downloads, the decisions' writes) runs for
    ``config.io_threads`` candidates at a time (one at a time when two candidates are of one user)."""
    started = time.monotonic()
    out: list[GateResult | BaseException | None] = [None] * len(revision_ids)
    pending: list[tuple[int, _Pending]] = []
    digest = ruleset_digest(rules)
    threads = config.io_threads if len(set(revision_ids)) == len(revision_ids) else 1

    def prepare(revision_id: str) -> GateResult | _Pending:
        return _prepare(revision_id, stores, announcer, rules_source, digest, started)

    for i, step in enumerate(each(threads, list(revision_ids), prepare)):
        if isinstance(step, (GateResult, BaseException)):
            out[i] = step
        else:
            pending.append((i, step))
    if len({p.cand.user_id for _, p in pending}) < len(pending):
        threads = 1  # two candidates of one user: their decisions are written in the order given
    if pending:
        base = load_configured(config.model)
        with tempfile.TemporaryDirectory(prefix="persona-gate-") as tmp:
            ready: list[tuple[int, _Pending, EvalRequest]] = []
            reg = stores.registry

            def download(p: _Pending) -> EvalRequest:
                try:
                    cand_dir = reg.download(p.cand, Path(tmp) / p.cand.revision_id / "candidate")
                    cur_dir = (
                        reg.download(p.current, Path(tmp) / p.cand.revision_id / "current")
                        if p.current is not None
                        else None
                    )
                except NotFound as e:  # the objects went with a forget, or the store lost them
                    _raise_if_forgotten(stores, p.cand)
                    raise e
                return p.request(cand_dir, cur_dir)

            for (i, p), request in zip(pending, each(threads, [p for _, p in pending], download), strict=True):
                if isinstance(request, BaseException):
                    out[i] = request
                else:
                    ready.append((i, p, request))
            measured = evaluate_many(
                base,
                [r for _, _, r in ready],
                probes=load_probes(config.probes),
                min_preference_pairs=config.min_preference_pairs,
                max_length=config.max_length,
                general=load_general(config.probes),
                batch_size=config.probe_rows_per_forward or None,
                labelled_batch=config.rows_per_forward or _split_batch(base),
                shift_events=config.shift_events,
            )

        def record(k: int) -> GateResult | BaseException:
            _, p, _ = ready[k]
            m = measured[k]
            if isinstance(m, BaseException):
                return m
            prom.GATE_ROWS_REUSED.inc(int((m.get("scores") or {}).get("reused", 0)))
            decision = decide(rules, m, user_id=p.cand.user_id, app=p.record.app)
            for r in decision.results:
                prom.GATE_RULE_OUTCOMES.labels(r.name, r.outcome).inc()
            outcome = "promoted" if decision.passed else "rejected"
            failpoints.fire(failpoints.BEFORE_DECISION, user_id=p.cand.user_id, revision_id=p.cand.revision_id)
            return p.record(outcome, decision.passed, decision.reason, m, decision.to_dict(), digest, started)

        for (i, _, _), result in zip(ready, each(threads, list(range(len(ready))), record), strict=True):
            out[i] = result
    return [r if r is not None else PersonaError("not judged") for r in out]


@dataclass
class _Pending:
    """A candidate past steps 1 and 2, with the evidence step 3 measures it on."""

    cand: Revision
    current: Revision | None
    record: _Recorder
    holdout: list[TrainingEvent]
    train_count: int
    parent_last: int | None
    new_events: list[TrainingEvent]
    known: dict[str, Any] | None = None

    def request(self, cand_dir: Path, cur_dir: Path | None) -> EvalRequest:
        return EvalRequest(
            candidate_dir=cand_dir,
            current_dir=cur_dir,
            holdout_events=self.holdout,
            train_events_count=self.train_count,
            new_events_count=int(self.cand.manifest["training"].get("new_events", 0)),
            parent_last_seq=self.parent_last,
            new_events=self.new_events,
            known=self.known if cur_dir is not None else None,
        )


def _prepare(
    revision_id: str, stores: Stores, announcer: Announcer, rules_source: str, digest: str, started: float
) -> GateResult | _Pending:
    """Steps 1 and 2 for one candidate (a GateResult when they decide it), else what step 3 needs."""
    with stores.db.connection() as conn:
        cand = registry.get_revision(conn, revision_id)
        done = decisions.get(conn, cand.revision_id)
        if done is not None:
            log.info("%s: %s was already decided (%s)", cand.user_id, cand.revision_id, done.outcome)
            if done.outcome == "promoted":
                announce_serving(stores, announcer, cand.user_id, "gate", only=cand.revision_id, strict=True)
            return GateResult(cand.revision_id, cand.user_id, done.outcome, done.reason, done)
        user = registry.get_user(conn, cand.user_id)
        current = registry.production(conn, cand.user_id)
        events = training.training_events(conn, cand.user_id, 2**62)
        # The serving revision's rows from its own gate (and the base's): reused where their fingerprint matches.
        judged = decisions.get(conn, current.revision_id) if current is not None else None
    known = (judged.metrics or {}).get("scores") if judged is not None else None
    holdout, train_count = _holdout(events)
    # This round: the events after the parent's last one, up to the candidate's (the training's new events).
    parent_last = current.manifest["events"]["last_seq"] if current is not None else None
    cand_last = cand.manifest["events"].get("last_seq")
    new_events = [
        e
        for e in events
        if e.split == "train"
        and (parent_last is None or e.seq > parent_last)
        and (cand_last is None or e.seq <= cand_last)
    ]
    record = _Recorder(stores, announcer, cand, user.app, current.revision_id if current else None, rules_source)
    if cand.parent_id != record.current_id:
        reason = f"stale: its parent {cand.parent_id or 'none'} is not production ({record.current_id or 'none'} is)"
        decision = Decision(passed=False, reason=reason, results=(), rules_digest=digest)
        return record("stale", False, reason, {}, decision.to_dict(), digest, started)
    return _Pending(cand, current, record, holdout, train_count, parent_last, new_events, known)


def _raise_if_forgotten(stores: Stores, cand: Revision) -> None:
    with stores.db.connection() as conn, conn.transaction():
        try:
            registry.lock_alive_revision(conn, cand.user_id, cand.revision_id, since=cand.created_at)
        except Forgotten as e:
            raise _dropped(cand, e) from None


def _dropped(cand: Revision, error: Forgotten) -> Forgotten:
    """Count and log a decision that is not written because its user was forgotten; the error to raise."""
    prom.FORGOTTEN_WRITES_DROPPED.labels("gate").inc()
    log.warning("%s: %s; no decision for %s, nothing promoted or announced", cand.user_id, error, cand.revision_id)
    return error


@dataclass
class _Recorder:
    """Step 4 and 5 for one candidate: the decision row, the status or alias swap, then pointer and announcement."""

    stores: Stores
    announcer: Announcer
    cand: Revision
    app: str
    current_id: str | None
    rules_source: str

    def __call__(
        self,
        outcome: str,
        passed: bool,
        reason: str,
        m: dict[str, Any],
        results: dict[str, Any],
        digest: str,
        started: float,
    ) -> GateResult:
        cand = self.cand
        with self.stores.db.connection() as conn:
            try:
                with conn.transaction():
                    # A forget waits for this transaction, or it committed before and nothing is written.
                    registry.lock_alive_revision(conn, cand.user_id, cand.revision_id, since=cand.created_at)
                    if outcome == "promoted":
                        registry.move_alias(
                            conn, cand.user_id, cand.revision_id, expected=cand.parent_id, reason="gate", actor="gate"
                        )
                    else:
                        registry.set_rejected(conn, cand.revision_id)
                    stored = decisions.insert(
                        conn,
                        revision_id=cand.revision_id,
                        user_id=cand.user_id,
                        app=self.app,
                        current_revision_id=self.current_id,
                        outcome=outcome,
                        passed=passed,
                        reason=reason,
                        metrics=m,
                        results=results,
                        rules_digest=digest,
                        rules_source=self.rules_source,
                    )
                    if stored is None:  # decided meanwhile by another attempt: keep that one
                        raise _AlreadyDecided
            except _AlreadyDecided:
                kept = decisions.get(conn, cand.revision_id)
                if kept is None:  # pragma: no cover - the insert conflicted with this very row
                    raise PersonaError(f"the decision of {cand.revision_id} vanished") from None
                return GateResult(cand.revision_id, cand.user_id, kept.outcome, kept.reason, kept)
            except Forgotten as e:
                raise _dropped(cand, e) from None
            except Conflict:
                # The alias moved between our read and the swap: the candidate is stale now.
                stale = f"stale: production moved while {cand.revision_id} was judged"
                return self("stale", passed, stale, m, results, digest, started)
        prom.GATE_DECISIONS.labels(outcome).inc()
        prom.GATE_SECONDS.observe(time.monotonic() - started)
        log.info("%s: %s %s: %s", cand.user_id, cand.revision_id, outcome, reason)
        if outcome == "promoted":  # a broker failure raises: the task is retried and announces then (step 1)
            announce_serving(self.stores, self.announcer, cand.user_id, "gate", only=cand.revision_id, strict=True)
        return GateResult(cand.revision_id, cand.user_id, outcome, reason, stored)


class _AlreadyDecided(Exception):
    pass
