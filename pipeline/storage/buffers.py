"""Per-user event buffers: the events table and the user_state summary, always written together."""

from __future__ import annotations

from contextlib import ExitStack, suppress
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson
import psycopg

from pipeline.domain.events import Event, Split
from pipeline.storage.db import one
from pipeline.storage.tenancy import FORGET_LOCK_BUCKETS, FORGET_LOCK_CLASS


@dataclass(frozen=True, slots=True)
class BufferedEvent:
    """A valid event with its split and where it was read from (Kafka partition and offset)."""

    event: Event
    split: Split
    partition: int | None = None
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class Conflict:
    """A staged event whose event_id is stored with different content (another user, text, time, ...)."""

    event_id: str
    user_id: str
    stored_user_id: str
    partition: int | None
    offset: int | None


@dataclass(frozen=True, slots=True)
class Foreign:
    """A staged event for a user that another application owns (skipped, to be reported)."""

    event_id: str
    user_id: str
    app: str
    owner: str
    partition: int | None
    offset: int | None


@dataclass(frozen=True)
class WriteResult:
    """What a batch did: rows inserted, exact duplicates skipped, id conflicts and events of another application's
    user (skipped, to be reported), and events of forgotten users dropped (occurred at or before the forget)."""

    inserted: int
    duplicates: int
    inserted_by_kind: dict[str, int]
    conflicts: tuple[Conflict, ...] = ()
    foreign: tuple[Foreign, ...] = ()
    forgotten: int = 0


@dataclass(frozen=True)
class UserBuffer:
    """The buffer summary of one user."""

    user_id: str
    pending_count: int
    oldest_pending_at: datetime | None
    total_events: int
    last_event_at: datetime | None


_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS stage_events (
    event_id text, user_id text, app text, kind text, split text, occurred_at timestamptz,
    payload jsonb, meta jsonb, source_partition integer, source_offset bigint
) ON COMMIT DELETE ROWS
"""

# A batch is one transaction of these statements, in this order (each statement of a READ COMMITTED transaction sees
# what other transactions committed before it started):
#
# 1. _LOCK: a shared advisory lock per bucket of the staged user ids. `forget` takes its user's bucket exclusively
#    (`tenancy.lock_for_forget`), so a forget and a batch with events of that user never interleave: a forget that
#    committed first is seen by step 2, and a forget that comes later waits for this batch and then deletes it too.
# 2. _DROP_FORGOTTEN: staged events of a forgotten user id that occurred at or before its forget are dropped.
# 3. _CLAIM: users seen for the first time are registered, owned by the application of their first staged event
#    (written in user_id order so concurrent writers cannot deadlock; a concurrent claim of the same id waits for the
#    other transaction and then finds its row).
# 4. _DROP_FOREIGN: staged events whose user another application owns are dropped and returned (to be reported).
# 5. _MERGE: insert the new events (duplicates skipped), then add exactly the inserted rows to the users' counters.
# 6. _CONFLICTS: staged events whose event_id is stored with other content.
_LOCK = f"""
SELECT pg_advisory_xact_lock_shared({FORGET_LOCK_CLASS}, b)
FROM (SELECT DISTINCT hashtext(user_id) & {FORGET_LOCK_BUCKETS - 1} AS b FROM stage_events ORDER BY 1) buckets
"""

_DROP_FORGOTTEN = """
DELETE FROM stage_events s USING tombstones t
WHERE t.user_sha256 = sha256(convert_to(s.user_id, 'UTF8')) AND s.occurred_at <= t.forgotten_at
RETURNING 1
"""

_CLAIM = """
INSERT INTO users (user_id, app)
SELECT DISTINCT ON (user_id) user_id, app FROM stage_events
ORDER BY user_id, source_partition, source_offset, app
ON CONFLICT (user_id) DO NOTHING
"""

_DROP_FOREIGN = """
DELETE FROM stage_events s USING users u
WHERE u.user_id = s.user_id AND u.app <> s.app
RETURNING s.event_id, s.user_id, s.app, u.app, s.source_partition, s.source_offset
"""

_MERGE = """
WITH ins AS (
    INSERT INTO events (event_id, user_id, app, kind, split, occurred_at, payload, meta,
                        source_partition, source_offset)
    SELECT event_id, user_id, app, kind, split, occurred_at, payload, meta, source_partition, source_offset
    FROM stage_events
    ON CONFLICT (event_id) DO NOTHING
    RETURNING user_id, kind, ingested_at
), per_user AS (
    SELECT user_id, count(*) AS n, min(ingested_at) AS first_at, max(ingested_at) AS last_at
    FROM ins GROUP BY user_id
), upd AS (
    INSERT INTO user_state AS s (user_id, pending_count, oldest_pending_at, total_events, last_event_at)
    SELECT user_id, n, first_at, n, last_at FROM per_user ORDER BY user_id
    ON CONFLICT (user_id) DO UPDATE SET
        pending_count = s.pending_count + EXCLUDED.pending_count,
        oldest_pending_at = COALESCE(s.oldest_pending_at, EXCLUDED.oldest_pending_at),
        total_events = s.total_events + EXCLUDED.total_events,
        last_event_at = GREATEST(s.last_event_at, EXCLUDED.last_event_at),
        updated_at = now()
)
SELECT kind, count(*) FROM ins GROUP BY kind
"""


# A second statement (so that, under READ COMMITTED, it sees rows committed by concurrent writers while the merge
# ran): staged events whose event_id is stored with other content. Rows this transaction inserted match themselves.
# The content compared is what the event says (split, position and ingestion time are the buffer's own).
_CONFLICTS = """
SELECT s.event_id, s.user_id, e.user_id, s.source_partition, s.source_offset
FROM stage_events s
CROSS JOIN LATERAL (
    SELECT user_id, app, kind, occurred_at, payload, meta FROM events WHERE events.event_id = s.event_id
    OFFSET 0  -- not pulled up into a join: one primary-key probe per staged row, never a scan of events
) e
WHERE (s.user_id, s.app, s.kind, s.occurred_at, s.payload, s.meta)
      IS DISTINCT FROM (e.user_id, e.app, e.kind, e.occurred_at, e.payload, e.meta)
ORDER BY s.source_partition, s.source_offset
"""


def _stage(conn: psycopg.Connection, batch: list[BufferedEvent]) -> None:
    conn.execute(_STAGE)
    with conn.cursor().copy(
        "COPY stage_events (event_id, user_id, app, kind, split, occurred_at, payload, meta,"
        " source_partition, source_offset) FROM STDIN"
    ) as copy:
        for b in batch:
            e = b.event
            copy.write_row(
                (
                    e.event_id,
                    e.user_id,
                    e.app,
                    e.kind,
                    b.split,
                    e.occurred_at.astimezone(UTC),  # PostgreSQL refuses offsets beyond +-15:59
                    orjson.dumps(e.payload).decode(),
                    None if e.meta is None else orjson.dumps(e.meta).decode(),
                    b.partition,
                    b.offset,
                )
            )


def _send(conn: psycopg.Connection) -> tuple[psycopg.Cursor, ...]:
    """Steps 1-6 (the comment above _LOCK); the cursors whose results `_result` reads."""
    conn.execute(_LOCK)
    dropped = conn.execute(_DROP_FORGOTTEN)
    conn.execute(_CLAIM)
    return dropped, conn.execute(_DROP_FOREIGN), conn.execute(_MERGE), conn.execute(_CONFLICTS)


def _result(cursors: tuple[psycopg.Cursor, ...], n: int) -> WriteResult:
    dropped, foreign_cur, merge, conflicts_cur = cursors
    forgotten = len(dropped.fetchall())
    foreign = tuple(Foreign(str(r[0]), str(r[1]), str(r[2]), str(r[3]), r[4], r[5]) for r in foreign_cur.fetchall())
    by_kind = {str(k): int(c) for k, c in merge.fetchall()}
    inserted = sum(by_kind.values())
    conflicts = tuple(Conflict(str(r[0]), str(r[1]), str(r[2]), r[3], r[4]) for r in conflicts_cur.fetchall())
    duplicates = n - forgotten - len(foreign) - inserted - len(conflicts)
    return WriteResult(inserted, duplicates, by_kind, conflicts, foreign, forgotten)


def write_events(conn: psycopg.Connection, batch: list[BufferedEvent]) -> WriteResult:
    """Insert a batch of events and update their users' counters, in the caller's transaction.

    Idempotent: an event already stored (same event_id, same content) is skipped and not counted again, so a batch
    that is redelivered after a crash changes nothing. An event whose event_id is stored with different content is
    skipped too and returned in ``conflicts`` (the first writer of an id wins). The caller commits; Kafka offsets
    are committed after that.
    """
    if not batch:
        return WriteResult(0, 0, {})
    _stage(conn, batch)
    return _result(_send(conn), len(batch))


class PendingWrite:
    """A batch whose transaction was sent to the server but whose outcome is not read yet (see ``begin_write``)."""

    def __init__(self, conn: psycopg.Connection, n: int) -> None:
        self._stack = ExitStack()
        self._n = n
        self._conn = conn
        self._stack.enter_context(conn.pipeline())
        self._cursors = _send(conn)
        conn.execute("COMMIT")

    def result(self) -> WriteResult:
        """Wait for the server; the counts of the committed transaction. On error the transaction is rolled back
        and the error raised (the batch may then be written again: it is idempotent)."""
        try:
            result = _result(self._cursors, self._n)
            self._stack.close()  # leaves pipeline mode: waits for the COMMIT
        except BaseException as e:
            self._stack.__exit__(type(e), e, e.__traceback__)
            if not self._conn.closed:
                with suppress(psycopg.Error):
                    self._conn.execute("ROLLBACK")
            raise
        return result


def begin_write(conn: psycopg.Connection, batch: list[BufferedEvent]) -> PendingWrite:
    """Start writing a batch in its own transaction and return without waiting for the server to apply it.

    The rows are staged with COPY, then the merge and the COMMIT are sent in pipeline mode; the caller does other
    work (the consumer polls and decodes the next batch) and then calls ``result()``. ``conn`` must be in
    autocommit mode and idle. Same semantics as ``write_events`` inside a transaction of its own.
    """
    conn.execute("BEGIN")
    try:
        _stage(conn, batch)
        return PendingWrite(conn, len(batch))
    except BaseException:
        if not conn.closed:
            with suppress(psycopg.Error):
                conn.execute("ROLLBACK")
        raise


def kind_counts(conn: psycopg.Connection, user_ids: list[str]) -> dict[tuple[str, str, str], int]:
    """Stored events of ``user_ids`` counted by (user_id, kind, split)."""
    rows = conn.execute(
        "SELECT user_id, kind, split, count(*) FROM events WHERE user_id = ANY(%s) GROUP BY 1, 2, 3", (user_ids,)
    ).fetchall()
    return {(r[0], r[1], r[2]): int(r[3]) for r in rows}


def unconsumed_count(conn: psycopg.Connection, user_ids: list[str]) -> int:
    """Events of ``user_ids`` stored and not yet read by a training (index events_user_pending)."""
    row = one(conn.execute("SELECT count(*) FROM events WHERE user_id = ANY(%s) AND consumed_by IS NULL", (user_ids,)))
    return int(row[0])


def most_overdue(conn: psycopg.Connection, limit: int = 1000) -> list[UserBuffer]:
    """Users with pending events, oldest pending event first (the scheduler's candidates; index user_state_due)."""
    rows = conn.execute(
        "SELECT user_id, pending_count, oldest_pending_at, total_events, last_event_at FROM user_state"
        " WHERE oldest_pending_at IS NOT NULL AND pending_count > 0 ORDER BY oldest_pending_at LIMIT %s",
        (limit,),
    ).fetchall()
    return [UserBuffer(r[0], int(r[1]), r[2], int(r[3]), r[4]) for r in rows]


def pending_totals(conn: psycopg.Connection) -> tuple[int, float]:
    """(events not yet trained on, age in seconds of the oldest of them) over all users; (0, 0.0) when none.

    Reads only the users with pending events (the partial index of the scheduler's claim)."""
    n, age = one(
        conn.execute(
            "SELECT coalesce(sum(pending_count), 0), coalesce(extract(epoch FROM now() - min(oldest_pending_at)), 0)"
            " FROM user_state WHERE oldest_pending_at IS NOT NULL AND pending_count > 0"
        )
    )
    return int(n), float(age)
