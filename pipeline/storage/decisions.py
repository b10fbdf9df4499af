"""Gate decisions: one row per judged candidate, with the metrics and every rule's inputs and outcome."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.types.json import Jsonb


@dataclass(frozen=True)
class StoredDecision:
    """A decision as stored."""

    id: int
    revision_id: str
    user_id: str
    app: str
    current_revision_id: str | None
    outcome: str  # promoted | rejected | stale
    passed: bool
    reason: str
    metrics: dict[str, Any]
    results: dict[str, Any]
    rules_digest: str
    rules_source: str
    decided_at: datetime


_COLS = (
    "id, revision_id, user_id, app, current_revision_id, outcome, passed, reason, metrics, results, rules_digest,"
    " rules_source, decided_at"
)


def insert(
    conn: psycopg.Connection,
    *,
    revision_id: str,
    user_id: str,
    app: str,
    current_revision_id: str | None,
    outcome: str,
    passed: bool,
    reason: str,
    metrics: dict[str, Any],
    results: dict[str, Any],
    rules_digest: str,
    rules_source: str,
) -> StoredDecision | None:
    """Insert the decision of ``revision_id`` in the caller's transaction; None if it was already decided."""
    row = conn.execute(
        f"INSERT INTO decisions (revision_id, user_id, app, current_revision_id, outcome, passed, reason, metrics,"
        f" results, rules_digest, rules_source) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        f" ON CONFLICT (revision_id) DO NOTHING RETURNING {_COLS}",
        (
            revision_id,
            user_id,
            app,
            current_revision_id,
            outcome,
            passed,
            reason,
            Jsonb(metrics),
            Jsonb(results),
            rules_digest,
            rules_source,
        ),
    ).fetchone()
    return None if row is None else StoredDecision(*row)


def get(conn: psycopg.Connection, revision_id: str) -> StoredDecision | None:
    row = conn.execute(f"SELECT {_COLS} FROM decisions WHERE revision_id = %s", (revision_id,)).fetchone()
    return None if row is None else StoredDecision(*row)


def since(conn: psycopg.Connection, t: datetime | None, limit: int = 100_000) -> list[StoredDecision]:
    """Decisions made at or after ``t`` (all when None), oldest first."""
    rows = conn.execute(
        f"SELECT {_COLS} FROM decisions WHERE decided_at >= coalesce(%s, '-infinity'::timestamptz)"
        " ORDER BY decided_at, id LIMIT %s",
        (t, limit),
    ).fetchall()
    return [StoredDecision(*r) for r in rows]


def for_user(conn: psycopg.Connection, user_id: str) -> list[StoredDecision]:
    rows = conn.execute(
        f"SELECT {_COLS} FROM decisions WHERE user_id = %s ORDER BY decided_at, id",
        (user_id,),
    ).fetchall()
    return [StoredDecision(*r) for r in rows]
