"""The operator console's reads (users list, a user's page, pipeline now) and its audit rows.

Every read takes ``app``: the application the asking principal is restricted to (None: the operator, every
application). A user of another application reads exactly like a user that does not exist.

The users list is paged by keyset, never by offset: by user id (the users primary key, or the partial index of the
status filtered on, which the planner merges in id order), by last event (``user_state_last_event``) or by last
promotion (``aliases_updated``), newest first. A page is at most ``limit`` ids found through one of those indexes,
then a few primary-key probes per row (migration 0009).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, get_args

import psycopg

from pipeline.domain.errors import InvalidInput
from pipeline.storage import tenancy

Status = Literal["serving", "candidate", "rejected", "training", "failing"]
STATUSES: Final[tuple[str, ...]] = get_args(Status)
Sort = Literal["id", "last_event", "last_promotion"]
SORTS: Final[tuple[str, ...]] = get_args(Sort)

#: Ids are compared in the "C" collation (byte order; ids are ASCII): a prefix is then an index range whatever the
#: database's collation, and the console's indexes of migration 0009 are on ``user_id COLLATE "C"``.
_C = 'COLLATE "C"'

#: Status filters that few users match: the page is driven by that status's own partial index (in id order), then
#: joined to users. (serving is driven by the users index and probed per user: most users of a deployment serve.)
_STATUS_DRIVER: Final[dict[str, tuple[str, str]]] = {
    "candidate": ("revisions", "x.status = 'candidate'"),
    # the user's latest decision was a rejection
    "rejected": (
        "decisions",
        "x.outcome = 'rejected' AND NOT EXISTS (SELECT 1 FROM decisions y WHERE y.user_id = x.user_id"
        " AND (y.decided_at, y.id) > (x.decided_at, x.id))",
    ),
    # a worker holds the user's training lease now
    "training": ("user_state", "x.lease_revision_id IS NOT NULL AND x.lease_expires_at > now()"),
    # a training plan that nobody holds: its last attempt failed (lease released) or its worker died (lease lapsed)
    "failing": (
        "user_state",
        "x.lease_revision_id IS NOT NULL AND (x.lease_expires_at IS NULL OR x.lease_expires_at <= now())",
    ),
}

#: The same statuses as a condition on a users row ``u`` (the time-sorted lists filter their scan with it).
_STATUS_SQL: Final[dict[str, str]] = {
    "serving": "EXISTS (SELECT 1 FROM aliases x WHERE x.user_id = u.user_id AND x.alias = 'production')",
    **{
        k: f"EXISTS (SELECT 1 FROM {t} x WHERE x.user_id = u.user_id AND {cond})"
        for k, (t, cond) in _STATUS_DRIVER.items()
    },
}

# One row of the list: a few primary-key probes per user of the page.
_ROW_SQL = """
SELECT u.user_id, u.app, u.created_at, a.revision_id, a.updated_at, s.last_event_at,
       coalesce(s.pending_count, 0), coalesce(s.total_events, 0),
       s.lease_revision_id IS NOT NULL AND s.lease_expires_at > now(),
       s.lease_revision_id IS NOT NULL AND (s.lease_expires_at IS NULL OR s.lease_expires_at <= now()),
       s.lease_step, s.lease_max_steps,
       (SELECT count(*) FROM revisions r WHERE r.user_id = u.user_id AND r.status = 'candidate'),
       (SELECT d.outcome FROM decisions d WHERE d.user_id = u.user_id ORDER BY d.decided_at DESC, d.id DESC LIMIT 1)
FROM users u
LEFT JOIN aliases a ON a.user_id = u.user_id AND a.alias = 'production'
LEFT JOIN user_state s ON s.user_id = u.user_id
"""


@dataclass(frozen=True)
class UserRow:
    """One user in the console's list."""

    user_id: str
    app: str
    created_at: datetime
    production: str | None
    promoted_at: datetime | None
    last_event_at: datetime | None
    pending_events: int
    total_events: int
    training: bool
    failing: bool
    step: int | None
    max_steps: int | None
    candidates: int
    last_decision: str | None

    @property
    def statuses(self) -> list[str]:
        """The list's status words that hold for this user."""
        out = ["serving"] if self.production else []
        out += ["candidate"] if self.candidates else []
        out += ["rejected"] if self.last_decision == "rejected" else []
        out += ["training"] if self.training else []
        out += ["failing"] if self.failing else []
        return out


@dataclass(frozen=True)
class UsersPage:
    rows: list[UserRow]
    next_cursor: str | None  # pass as ``after`` for the next page; None on the last page


def _cursor(after: str) -> tuple[datetime, str]:
    at, _, uid = after.partition("|")
    try:
        return datetime.fromisoformat(at), uid
    except ValueError as e:
        raise InvalidInput(f"the page cursor {after!r} is not one this list made (TIME|USER); start again") from e


def _id_range(col: str, prefix: str, after: str) -> tuple[list[str], list[Any]]:
    """Conditions (in the "C" collation) for ids that start with ``prefix`` and come after ``after``."""
    where: list[str] = []
    params: list[Any] = []
    if prefix:
        where.append(f"{col} {_C} >= %s AND {col} {_C} < %s")
        params += [prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1)]
    if after:
        where.append(f"{col} {_C} > %s")
        params.append(after)
    return where, params


def list_users(
    conn: psycopg.Connection,
    *,
    app: str | None,
    app_filter: str = "",
    prefix: str = "",
    status: str = "",
    sort: str = "id",
    after: str = "",
    limit: int = 50,
) -> UsersPage:
    """A page of users (``app``: the principal's restriction; ``app_filter``: the operator's choice)."""
    if status and status not in _STATUS_SQL:
        raise InvalidInput(f"unknown status {status!r}; allowed: {', '.join(STATUSES)}")
    if sort not in SORTS:
        raise InvalidInput(f"unknown sort {sort!r}; allowed: {', '.join(SORTS)}")
    if not 1 <= limit <= 500:
        raise InvalidInput(f"limit {limit} is out of range; allowed: 1..500")
    where: list[str] = []
    params: list[Any] = []
    for value in (app, app_filter or None):
        if value is not None:
            where.append("u.app = %s")
            params.append(value)
    if sort == "id" and status in _STATUS_DRIVER:
        table, cond = _STATUS_DRIVER[status]
        rng, rng_params = _id_range("x.user_id", prefix, after)
        conds = " AND ".join([cond, *rng, *where])
        ids_sql = (
            f"SELECT DISTINCT x.user_id {_C} AS id, NULL::timestamptz AS k FROM {table} x"
            f" JOIN users u ON u.user_id = x.user_id WHERE {conds} ORDER BY 1 LIMIT %s"
        )
        params = rng_params + params
    elif sort == "id":
        rng, rng_params = _id_range("u.user_id", prefix, after)
        conds = " AND ".join([*rng, *where, *([_STATUS_SQL[status]] if status else [])]) or "true"
        ids_sql = (
            f"SELECT u.user_id {_C} AS id, NULL::timestamptz AS k FROM users u WHERE {conds}"
            f" ORDER BY u.user_id {_C} LIMIT %s"
        )
        params = rng_params + params
    else:
        table, col = ("user_state", "last_event_at") if sort == "last_event" else ("aliases", "updated_at")
        rng, rng_params = _id_range("u.user_id", prefix, "")
        where = [*rng, *where] + ([_STATUS_SQL[status]] if status else [])
        params = rng_params + params
        if after:
            at, uid = _cursor(after)
            where.append(f"(t.{col}, t.user_id) < (%s, %s)")
            params += [at, uid]
        extra = "t.alias = 'production'" if table == "aliases" else f"t.{col} IS NOT NULL"
        ids_sql = (
            f"SELECT u.user_id, t.{col} AS k FROM {table} t JOIN users u ON u.user_id = t.user_id"
            f" WHERE {' AND '.join([extra, *where])} ORDER BY t.{col} DESC, t.user_id DESC LIMIT %s"
        )
    params.append(limit + 1)
    found = conn.execute(ids_sql, params).fetchall()
    more = len(found) > limit
    found = found[:limit]
    ids = [r[0] for r in found]
    by_id = {r[0]: UserRow(*r) for r in conn.execute(_ROW_SQL + " WHERE u.user_id = ANY(%s)", (ids,)).fetchall()}
    rows = [by_id[i] for i in ids if i in by_id]
    nxt = None
    if more and found:
        last_id, last_k = found[-1]
        nxt = last_id if sort == "id" else f"{last_k.isoformat()}|{last_id}"
    return UsersPage(rows, nxt)


def user_row(conn: psycopg.Connection, user_id: str, *, app: str | None) -> UserRow | None:
    """One user's list row, or None when persona does not hold it (or it is another application's)."""
    row = conn.execute(_ROW_SQL + " WHERE u.user_id = %s", (user_id,)).fetchone()
    if row is None:
        return None
    found = UserRow(*row)
    return None if app is not None and found.app != app else found


def event_counts(conn: psycopg.Connection, user_id: str) -> dict[str, dict[str, int]]:
    """The user's stored events by kind: ``{kind: {"train": n, "holdout": n, "pending": n}}`` (pending: not yet read
    by a training)."""
    rows = conn.execute(
        "SELECT kind, split, count(*), count(*) FILTER (WHERE consumed_by IS NULL) FROM events WHERE user_id = %s"
        " GROUP BY 1, 2",
        (user_id,),
    ).fetchall()
    out: dict[str, dict[str, int]] = {}
    for kind, split, n, pending in rows:
        slot = out.setdefault(kind, {"train": 0, "holdout": 0, "pending": 0})
        slot[split] = int(n)
        slot["pending"] += int(pending)
    return out


def forgotten_at(conn: psycopg.Connection, user_id: str) -> datetime | None:
    """When ``user_id`` was last forgotten (its tombstone), or None."""
    return tenancy.forgotten_at(conn, user_id)


# --- audit ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AuditRow:
    id: int
    at: datetime
    actor: str
    action: str
    user_id: str | None
    user_sha256: str | None  # hex
    revision_id: str | None
    outcome: str
    message: str


_AUDIT_COLS = "id, at, actor, action, user_id, encode(user_sha256, 'hex'), revision_id, outcome, message"


def add_audit(
    conn: psycopg.Connection,
    *,
    actor: str,
    action: str,
    user_id: str | None,
    revision_id: str | None,
    outcome: str,
    message: str,
    keep_user_id: bool = True,
) -> None:
    """Record an operator action. ``keep_user_id=False`` (a forget) keeps only the sha256 of the id, as the
    tombstone does."""
    sha = tenancy.user_sha256(user_id) if user_id is not None else None
    conn.execute(
        "INSERT INTO operator_audit (actor, action, user_id, user_sha256, revision_id, outcome, message)"
        " VALUES (%s, %s, %s, %s, %s, %s, %s)",
        (actor, action, user_id if keep_user_id else None, sha, revision_id, outcome, message[:2000]),
    )


def audit_for_user(conn: psycopg.Connection, user_id: str, limit: int = 100) -> list[AuditRow]:
    rows = conn.execute(
        f"SELECT {_AUDIT_COLS} FROM operator_audit WHERE user_id = %s ORDER BY id DESC LIMIT %s", (user_id, limit)
    ).fetchall()
    return [AuditRow(*r) for r in rows]


def recent_audit(conn: psycopg.Connection, *, app_actor: str | None, limit: int = 50) -> list[AuditRow]:
    """The latest operator actions (``app_actor``: only those of actors starting with it; None: all)."""
    if app_actor is None:
        rows = conn.execute(f"SELECT {_AUDIT_COLS} FROM operator_audit ORDER BY id DESC LIMIT %s", (limit,))
    else:
        rows = conn.execute(
            f"SELECT {_AUDIT_COLS} FROM operator_audit WHERE starts_with(actor, %s) ORDER BY id DESC LIMIT %s",
            (app_actor, limit),
        )
    return [AuditRow(*r) for r in rows.fetchall()]


# --- pipeline now --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Training:
    user_id: str
    app: str
    revision_id: str | None
    running: bool  # False: the plan's last attempt failed or its worker died
    step: int | None
    max_steps: int | None
    loss: float | None
    expires_at: datetime | None
    queued_at: datetime | None


def trainings(conn: psycopg.Connection, *, app: str | None, limit: int = 100) -> list[Training]:
    """Users with a training plan (running or failing), from the database (index user_state_planned)."""
    rows = conn.execute(
        "SELECT s.user_id, u.app, s.lease_revision_id, coalesce(s.lease_expires_at > now(), false), s.lease_step,"
        " s.lease_max_steps, s.lease_loss, s.lease_expires_at, s.queued_at"
        " FROM user_state s JOIN users u ON u.user_id = s.user_id"
        " WHERE s.lease_revision_id IS NOT NULL AND (%s::text IS NULL OR u.app = %s)"
        " ORDER BY s.user_id LIMIT %s",
        (app, app, limit),
    ).fetchall()
    return [Training(*r) for r in rows]


def queue_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Users queued for training and not yet leased, and users with a live lease (index user_state_busy)."""
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE lease_expires_at IS NULL OR lease_expires_at <= now()),"
        " count(*) FILTER (WHERE lease_expires_at > now())"
        " FROM user_state WHERE queued_at IS NOT NULL OR lease_expires_at IS NOT NULL"
    ).fetchone()
    return {"queued": int(row[0]) if row else 0, "leased": int(row[1]) if row else 0}


@dataclass(frozen=True)
class RecentDecision:
    revision_id: str
    user_id: str
    app: str
    outcome: str
    reason: str
    decided_at: datetime


def recent_decisions(conn: psycopg.Connection, *, app: str | None, limit: int = 20) -> list[RecentDecision]:
    """The latest gate decisions (index decisions_at)."""
    rows = conn.execute(
        "SELECT revision_id, user_id, app, outcome, reason, decided_at FROM decisions"
        " WHERE (%s::text IS NULL OR app = %s) ORDER BY decided_at DESC, id DESC LIMIT %s",
        (app, app, limit),
    ).fetchall()
    return [RecentDecision(*r) for r in rows]


def key_active(conn: psycopg.Connection, key_id: str) -> bool:
    """Whether the key of a console session is still neither revoked nor expired (checked on every request)."""
    row = conn.execute(
        "SELECT 1 FROM api_keys WHERE key_id = %s AND revoked_at IS NULL"
        " AND (expires_at IS NULL OR expires_at > now())",
        (key_id,),
    ).fetchone()
    return row is not None
