"""One user's retrain, end to end: lease, events, parent, training, candidate revision. Idempotent.

The training itself (pipeline/training/lora.py) never touches the database or the object store; this module does
the I/O around it, in this order:

1. take the user's lease (a plan: revision id, parent = production revision, events up to a snapshot position);
   a redelivered task takes over an expired plan instead of making a new one;
2. if the planned revision already exists (an earlier attempt wrote it), only finish: mark the events consumed,
   release the lease, and chain the evaluation;
3. else build examples from the new train-split events since the parent plus a seeded replay of older ones, load
   the parent's adapter (sha256 verified), train from it, and write the candidate through the registry (objects,
   then the row, the consumed events and the released lease in one transaction); then chain the evaluation.
"""

from __future__ import annotations

import logging
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Settings
from pipeline.domain.errors import NotFound, PersonaError
from pipeline.domain.revisions import EventsUsed, Revision
from pipeline.models.base import load_configured
from pipeline.observability import metrics
from pipeline.storage import db, registry, training
from pipeline.storage.objects import ObjectStore
from pipeline.storage.registry import Registry
from pipeline.training.examples import examples_from_events, select_training_events
from pipeline.training.lora import train_adapter

log = logging.getLogger(__name__)


class LeaseBusy(PersonaError):
    """Another live training holds the user's lease; try again after ``seconds_left``."""

    def __init__(self, user_id: str, owner: str, seconds_left: float) -> None:
        super().__init__(f"{user_id!r} is being trained by {owner} (lease ends in {seconds_left:.0f}s)")
        self.seconds_left = seconds_left


class LeaseLost(PersonaError):
    """The lease expired while training (the worker stalled): another attempt owns the plan now."""


@dataclass(frozen=True)
class Outcome:
    """What a retrain did: ``trained``, ``resumed`` (found its revision written), ``nothing_to_do`` or
    ``no_examples`` (no train-split target among the new events)."""

    user_id: str
    outcome: str
    revision_id: str | None = None
    parent_id: str | None = None
    steps: int = 0
    seconds: float = 0.0


def seed_for(base_seed: int, user_id: str, revision_id: str) -> int:
    """A stable per-retrain seed (the same on a retried attempt, different across users and revisions)."""
    return (base_seed * 1_000_003 + zlib.crc32(f"{user_id}/{revision_id}".encode())) % (2**31)


def retrain(
    user_id: str, *, settings: Settings, owner: str, on_candidate: Callable[[str], None] | None = None
) -> Outcome:
    """Retrain ``user_id`` from their production revision if they have pending events. Safe to repeat."""
    started = time.monotonic()
    store = ObjectStore(settings.s3)
    reg = Registry(settings.db, store)
    lease_s = settings.policy.lease_s
    with db.connect(settings.db) as conn:
        lease = training.acquire_lease(conn, user_id, owner, lease_s)
    if lease is None:
        return Outcome(user_id, "nothing_to_do")
    if isinstance(lease, training.Busy):
        raise LeaseBusy(user_id, lease.owner, lease.seconds_left)

    with db.connect(settings.db) as conn:
        try:
            existing = registry.get_revision(conn, lease.revision_id)
        except NotFound:
            existing = None
        if existing is not None:
            with conn.transaction():
                training.finish(conn, lease)
            log.info(
                "%s: revision %s was already written by an earlier attempt; finished it", user_id, existing.revision_id
            )
            if on_candidate is not None:
                on_candidate(existing.revision_id)
            return Outcome(user_id, "resumed", existing.revision_id, existing.parent_id)
        events = training.training_events(conn, user_id, lease.snapshot_seq)
        parent = registry.get_revision(conn, lease.parent_id) if lease.parent_id else None

    seed = seed_for(settings.training.seed, user_id, lease.revision_id)
    parent_last = parent.manifest["events"]["last_seq"] if parent is not None else None
    new, replay = select_training_events(
        events, parent_last_seq=parent_last, replay_max=settings.training.replay_max, seed=seed
    )
    examples = examples_from_events([*new, *replay])
    new_ids = {n.event_id for n in new}
    if not any(e.event_id in new_ids for e in examples):
        # Nothing new to learn (only holdout events, negative feedback or preference pairs): count the events
        # as seen so the scheduler does not pick the user again for them.
        with db.connect(settings.db) as conn, conn.transaction():
            training.finish(conn, lease)
        log.info("%s: no new training examples among %d pending events; nothing trained", user_id, len(events))
        return Outcome(user_id, "no_examples", parent_id=lease.parent_id)

    try:
        return _train_and_write(
            user_id, lease, parent, settings, reg, new, replay, examples, seed, started, on_candidate
        )
    except LeaseLost:
        raise
    except BaseException:
        # Free the user for the next attempt at once (the plan is kept: it writes the same revision).
        with db.connect(settings.db, autocommit=True) as conn:
            training.release_lease(conn, lease)
        raise


def _train_and_write(
    user_id: str,
    lease: training.Lease,
    parent: Revision | None,
    settings: Settings,
    reg: Registry,
    new: list,
    replay: list,
    examples: list,
    seed: int,
    started: float,
    on_candidate: Callable[[str], None] | None,
) -> Outcome:
    base = load_configured(settings.model)
    renew = _renewer(settings, lease, settings.policy.lease_s)
    with tempfile.TemporaryDirectory(prefix="persona-train-") as tmp:
        parent_dir = None
        if parent is not None:
            parent_dir = reg.download(parent, Path(tmp) / "parent")  # sha256 verified
        out = Path(tmp) / "candidate"
        log.info(
            "%s: training %s from %s on %d new + %d replayed events (%d examples), seed %d",
            user_id,
            lease.revision_id,
            lease.parent_id or "scratch",
            len(new),
            len(replay),
            len(examples),
            seed,
        )
        result = train_adapter(
            base, examples, out, settings.training, parent_dir=parent_dir, seed=seed, progress=renew
        )
        used = EventsUsed.of([(e.event_id, e.seq) for e in (*new, *replay)])
        rev = reg.write_revision(
            user_id,
            out,
            parent_id=lease.parent_id,
            base=base.ref,
            training={
                **result.config,
                "seed": seed,
                "new_events": len(new),
                "replayed_events": len(replay),
                "examples": result.examples,
                "steps": result.steps,
                "best_step": result.best_step,
                "stopped_early": result.stopped_early,
            },
            events=used,
            metrics={
                "train_loss": result.train_loss,
                "val_loss": result.val_loss,
                "tokens": result.tokens,
                "tokens_per_s": result.tokens_per_s,
                "train_seconds": result.seconds,
            },
            revision_id=lease.revision_id,
            lease=lease,
        )
    seconds = time.monotonic() - started
    metrics.TRAINING_SECONDS.observe(seconds)
    metrics.TRAINING_TOKENS_PER_SECOND.set(result.tokens_per_s)
    metrics.TRAINING_FINAL_LOSS.set(result.train_loss)
    log.info(
        "%s: candidate %s (parent %s) in %.1fs: %d steps, loss %.3f",
        user_id,
        rev.revision_id,
        rev.parent_id or "none",
        seconds,
        result.steps,
        result.train_loss,
    )
    if on_candidate is not None:
        on_candidate(rev.revision_id)
    return Outcome(user_id, "trained", rev.revision_id, rev.parent_id, result.steps, seconds)


def _renewer(settings: Settings, lease: training.Lease, lease_s: float) -> Callable[[int, float], None]:
    """A progress callback that renews the lease at most every lease_s / 3 seconds, and stops a training whose
    lease was lost (another attempt owns the plan: two trainings must not write one revision)."""
    last = time.monotonic()

    def renew(step: int, loss: float) -> None:
        nonlocal last
        if time.monotonic() - last < lease_s / 3:
            return
        with db.connect(settings.db, autocommit=True) as conn:
            if not training.renew_lease(conn, lease, lease_s):
                raise LeaseLost(f"{lease.user_id}: lease of {lease.revision_id} lost at step {step}")
        last = time.monotonic()

    return renew
