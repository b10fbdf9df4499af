"""Training state in PostgreSQL: the scheduler's claim of due users, per-user leases, events to train on, and
marking what a revision consumed. Rows are converted to domain objects here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import psycopg

from pipeline.domain.examples import TrainingEvent
from pipeline.domain.policy import DueState, Policy
from pipeline.domain.revisions import PRODUCTION, new_revision_id
from pipeline.storage import tenancy
from pipeline.storage.db import one

# The policy of domain/policy.py as one statement. FOR UPDATE SKIP LOCKED plus the queued_at mark: two ticks
# running at once never enqueue the same user. Measured at 1M users by bench/registry.py.
_CLAIM = """
WITH busy AS (
    SELECT count(*) AS n FROM user_state
    WHERE (queued_at IS NOT NULL OR lease_expires_at IS NOT NULL)  -- the predicate of index user_state_busy
      AND ((queued_at IS NOT NULL AND queued_at > now() - make_interval(secs => %(queue_timeout)s))
           OR lease_expires_at > now())
), due AS (
    SELECT user_id FROM user_state
    WHERE oldest_pending_at IS NOT NULL AND pending_count > 0  -- index user_state_due
      AND (queued_at IS NULL OR queued_at <= now() - make_interval(secs => %(queue_timeout)s))
      AND (lease_expires_at IS NULL OR lease_expires_at <= now())
      AND (last_trained_at IS NULL OR last_trained_at <= now() - make_interval(secs => %(cooldown)s))
      AND (pending_count >= %(min_new)s OR oldest_pending_at <= now() - make_interval(secs => %(max_age)s))
    ORDER BY oldest_pending_at, user_id
    LIMIT greatest(0, %(max_in_flight)s - (SELECT n FROM busy))
    FOR UPDATE SKIP LOCKED
)
-- ANY(ARRAY(...)): one primary-key probe per claimed user (a join would hash the whole table: the planner cannot
-- know how small the LIMIT above is).
UPDATE user_state s SET queued_at = now() WHERE s.user_id = ANY(ARRAY(SELECT user_id FROM due))
RETURNING s.user_id, s.oldest_pending_at
"""


def claim_due(conn: psycopg.Connection, policy: Policy) -> list[str]:
    """Mark the due users as queued and return them, oldest pending event first (commit to make it stick)."""
    rows = conn.execute(
        _CLAIM,
        {
            "queue_timeout": policy.queue_timeout_s,
            "cooldown": policy.cooldown_s,
            "min_new": policy.min_new_events,
            "max_age": policy.max_age_s,
            "max_in_flight": policy.max_in_flight,
        },
    ).fetchall()
    return [r[0] for r in sorted(rows, key=lambda r: (r[1], r[0]))]


def due_states(conn: psycopg.Connection, user_prefix: str = "") -> list[DueState]:
    rows = conn.execute(
        "SELECT user_id, pending_count, oldest_pending_at, last_trained_at, queued_at, lease_expires_at"
        " FROM user_state WHERE user_id LIKE %s ORDER BY user_id",
        (user_prefix + "%",),
    ).fetchall()
    return [DueState(*r) for r in rows]


def unqueue(conn: psycopg.Connection, user_id: str) -> None:
    conn.execute("UPDATE user_state SET queued_at = NULL WHERE user_id = %s", (user_id,))


@dataclass(frozen=True)
class Lease:
    """One planned training: which revision it writes, from which parent, on events up to which position."""

    user_id: str
    owner: str
    revision_id: str
    parent_id: str | None
    snapshot_seq: int
    expires_at: datetime
    takeover: bool  # the plan was made by an earlier attempt (a redelivered or retried task)
    #: When the plan was made (database time; kept on takeover): a forget at or after it makes the training write
    #: nothing (`pipeline.storage.tenancy.lock_alive`). None only for a Lease built by hand.
    planned_at: datetime | None = None


@dataclass(frozen=True)
class Busy:
    """Another live training holds the user's lease."""

    owner: str
    seconds_left: float


def acquire_lease(conn: psycopg.Connection, user_id: str, owner: str, lease_s: float) -> Lease | Busy | None:
    """Take the user's training lease, in one transaction; None when there is nothing to train.

    A lease whose holder died (expired) is taken over with its plan (revision id, parent, snapshot), so a
    redelivered task finishes the same revision instead of starting another one.
    """
    with conn.transaction():
        row = conn.execute(
            "SELECT pending_count, lease_owner, lease_expires_at, lease_revision_id, lease_parent_id,"
            " lease_snapshot_seq, lease_expires_at > now(), extract(epoch FROM lease_expires_at - now())"
            " FROM user_state WHERE user_id = %s FOR UPDATE",
            (user_id,),
        ).fetchone()
        if row is None:
            return None
        pending, holder, _, rev, parent, snap, live, left = row
        if live and holder != owner:
            return Busy(holder, float(left))
        if rev is not None:
            row = one(
                conn.execute(
                    "UPDATE user_state SET lease_owner = %s, lease_expires_at = now() + make_interval(secs => %s),"
                    " lease_planned_at = coalesce(lease_planned_at, now())"
                    " WHERE user_id = %s RETURNING lease_expires_at, lease_planned_at",
                    (owner, lease_s, user_id),
                )
            )
            return Lease(user_id, owner, rev, parent, int(snap), row[0], takeover=True, planned_at=row[1])
        if pending <= 0:
            conn.execute("UPDATE user_state SET queued_at = NULL WHERE user_id = %s", (user_id,))
            return None
        unconsumed = "SELECT max(seq) FROM events WHERE user_id = %s AND consumed_by IS NULL"
        snap = one(conn.execute(unconsumed, (user_id,)))[0]
        if snap is None:  # counters say pending but no unconsumed row: repair the counter
            conn.execute(
                "UPDATE user_state SET pending_count = 0, oldest_pending_at = NULL, queued_at = NULL"
                " WHERE user_id = %s",
                (user_id,),
            )
            return None
        prod = conn.execute(
            "SELECT revision_id FROM aliases WHERE user_id = %s AND alias = %s", (user_id, PRODUCTION)
        ).fetchone()
        rev = new_revision_id()
        row = one(
            conn.execute(
                "UPDATE user_state SET lease_owner = %s, lease_expires_at = now() + make_interval(secs => %s),"
                " lease_revision_id = %s, lease_parent_id = %s, lease_snapshot_seq = %s, lease_planned_at = now(),"
                " lease_step = NULL, lease_max_steps = NULL, lease_loss = NULL"
                " WHERE user_id = %s RETURNING lease_expires_at, lease_planned_at",
                (owner, lease_s, rev, prod[0] if prod else None, snap, user_id),
            )
        )
        parent = prod[0] if prod else None
        return Lease(user_id, owner, rev, parent, int(snap), row[0], takeover=False, planned_at=row[1])


@dataclass(frozen=True)
class Progress:
    """How far one user's training is: optimizer steps made of at most ``max_steps``, and the last loss."""

    step: int
    max_steps: int
    loss: float | None = None


def renew_leases(
    conn: psycopg.Connection, leases: list[Lease], lease_s: float, progress: dict[str, Progress] | None = None
) -> set[str]:
    """`renew_lease` for a batch of users in one statement, recording each user's ``progress`` (by user id) too;
    returns the users whose lease was renewed."""
    if not leases:
        return set()
    progress = progress or {}
    steps = [progress.get(x.user_id) for x in leases]
    rows = conn.execute(
        "UPDATE user_state s SET lease_expires_at = now() + make_interval(secs => %s),"
        " lease_step = coalesce(l.step, s.lease_step), lease_max_steps = coalesce(l.max_steps, s.lease_max_steps),"
        " lease_loss = coalesce(l.loss, s.lease_loss)"
        " FROM unnest(%s::text[], %s::text[], %s::text[], %s::int[], %s::int[], %s::real[])"
        "   AS l(user_id, owner, revision_id, step, max_steps, loss)"
        " WHERE s.user_id = l.user_id AND s.lease_owner = l.owner AND s.lease_revision_id = l.revision_id"
        " RETURNING s.user_id",
        (
            lease_s,
            [x.user_id for x in leases],
            [x.owner for x in leases],
            [x.revision_id for x in leases],
            [p.step if p else None for p in steps],
            [p.max_steps if p else None for p in steps],
            [p.loss if p else None for p in steps],
        ),
    ).fetchall()
    return {r[0] for r in rows}


@dataclass(frozen=True)
class TrainingState:
    """Where one user is in the training loop now: queued (a task is waiting), training (a live lease), and the
    progress its holder last recorded (None before the first record)."""

    queued: bool
    training: bool
    progress: Progress | None


def states_of(conn: psycopg.Connection, user_ids: list[str]) -> dict[str, TrainingState]:
    """The training state of each of ``user_ids`` that has a buffer."""
    rows = conn.execute(
        "SELECT user_id, queued_at IS NOT NULL, coalesce(lease_expires_at > now(), false), lease_step,"
        " lease_max_steps, lease_loss FROM user_state WHERE user_id = ANY(%s)",
        (user_ids,),
    ).fetchall()
    return {
        r[0]: TrainingState(
            bool(r[1]),
            bool(r[2]),
            Progress(int(r[3]), int(r[4] or 0), None if r[5] is None else float(r[5])) if r[3] is not None else None,
        )
        for r in rows
    }


def release_lease(conn: psycopg.Connection, lease: Lease) -> None:
    """Give the lease up after a failed attempt, keeping its plan (the next attempt writes the same revision).

    The queue mark stays: the user is picked again once it goes stale (PolicySettings queue timeout), which is
    the backoff for a user whose training keeps failing.
    """
    conn.execute(
        "UPDATE user_state SET lease_owner = NULL, lease_expires_at = NULL"
        " WHERE user_id = %s AND lease_owner = %s AND lease_revision_id = %s",
        (lease.user_id, lease.owner, lease.revision_id),
    )


def training_events(conn: psycopg.Connection, user_id: str, through_seq: int) -> list[TrainingEvent]:
    """All of the user's events up to ``through_seq`` (both splits), in ingestion order: only those of the user's
    owner application (``users.app``), so that events another application sent under the same id (stored before
    ownership was enforced) never train or judge this user's adapter; none for a user without an identity row."""
    rows = conn.execute(
        "SELECT e.event_id, e.seq, e.kind, e.split, e.payload FROM events e"
        " JOIN users u ON u.user_id = e.user_id AND u.app = e.app"
        " WHERE e.user_id = %s AND e.seq <= %s ORDER BY e.seq",
        (user_id, through_seq),
    ).fetchall()
    return [TrainingEvent(r[0], int(r[1]), r[2], r[3], r[4]) for r in rows]


def lock_plan(conn: psycopg.Connection, lease: Lease) -> bool:
    """In the caller's transaction: lock the user's buffer row (writers of one plan take their turns) and say
    whether ``lease``'s plan is still the user's. False when it was finished by another attempt, or removed with
    the buffer row by a forget (a user recreated since then has a buffer row without this plan)."""
    row = conn.execute(
        "SELECT lease_revision_id FROM user_state WHERE user_id = %s FOR UPDATE", (lease.user_id,)
    ).fetchone()
    return row is not None and row[0] == lease.revision_id


def forgotten_since_plan(conn: psycopg.Connection, lease: Lease) -> bool:
    """Whether ``lease``'s user is gone or was forgotten since the plan was made (a lost lease's usual cause)."""
    if tenancy.owner_of(conn, lease.user_id) is None:
        return True
    at = tenancy.forgotten_at(conn, lease.user_id)
    return at is not None and (lease.planned_at is None or at >= lease.planned_at)


def finish(conn: psycopg.Connection, lease: Lease) -> int:
    """In the caller's transaction: mark the events the training read as consumed by its revision, recount the
    user's pending events, and clear the lease and the queue mark. Idempotent; returns the events marked now."""
    marked = conn.execute(
        "UPDATE events SET consumed_by = %s WHERE user_id = %s AND seq <= %s AND consumed_by IS NULL",
        (lease.revision_id, lease.user_id, lease.snapshot_seq),
    ).rowcount
    conn.execute(
        "UPDATE user_state SET pending_count = greatest(0, pending_count - %s),"
        " oldest_pending_at = (SELECT min(ingested_at) FROM events"
        "                      WHERE user_id = %s AND consumed_by IS NULL),"
        " last_trained_at = now(), queued_at = NULL, lease_owner = NULL, lease_expires_at = NULL,"
        " lease_revision_id = NULL, lease_parent_id = NULL, lease_snapshot_seq = NULL, lease_planned_at = NULL,"
        " lease_step = NULL, lease_max_steps = NULL, lease_loss = NULL"
        " WHERE user_id = %s AND lease_revision_id = %s",
        (marked, lease.user_id, lease.user_id, lease.revision_id),
    )
    return marked
