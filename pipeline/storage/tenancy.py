"""Who owns a user, and the tombstones that keep a forgotten user forgotten (module docstring of migration 0006).

A user belongs to one application: ``users.app``, set by the first event stored for it. A forgotten user id leaves a
tombstone keyed by the sha256 of the id: events of that id that occurred at or before ``forgotten_at`` are dropped
wherever they arrive, and work that started before it (a training, a gate) writes nothing.
"""

from __future__ import annotations

import hashlib
from datetime import datetime

import psycopg

from pipeline.domain.errors import Forgotten
from pipeline.storage.db import one

#: Advisory lock space of forgets against event writes: a batch of events takes the buckets of its user ids shared
#: (`pipeline.storage.buffers`), a forget takes its user's bucket exclusively (`lock_for_forget`).
FORGET_LOCK_CLASS = 0x7065
FORGET_LOCK_BUCKETS = 64  # a power of two; bounds the locks one batch holds (the lock table is shared and finite)


def lock_for_forget(conn: psycopg.Connection, user_id: str) -> None:
    """In the caller's transaction, before anything else of a forget: wait for every event batch that writes this
    user's bucket, keep new ones out until commit, and lock the identity row (FOR UPDATE: waits for trainings and
    gates holding it with `lock_alive`)."""
    bucket = f"hashtext(%s::text) & {FORGET_LOCK_BUCKETS - 1}"
    conn.execute(f"SELECT pg_advisory_xact_lock({FORGET_LOCK_CLASS}, {bucket})", (user_id,))
    conn.execute("SELECT 1 FROM users WHERE user_id = %s FOR UPDATE", (user_id,))


def user_sha256(user_id: str) -> bytes:
    return hashlib.sha256(user_id.encode()).digest()


def owner_of(conn: psycopg.Connection, user_id: str) -> str | None:
    """The application that owns ``user_id``, or None for a user persona does not hold."""
    row = conn.execute("SELECT app FROM users WHERE user_id = %s", (user_id,)).fetchone()
    return None if row is None else str(row[0])


def app_models(conn: psycopg.Connection, app_id: str, limit: int) -> list[tuple[str, datetime]]:
    """(user_id, when its production alias last moved) of the first ``limit`` users by id that ``app_id`` owns
    and that have a production revision."""
    if limit <= 0:
        return []
    rows = conn.execute(
        "SELECT u.user_id, a.updated_at FROM users u"
        " JOIN aliases a ON a.user_id = u.user_id AND a.alias = 'production'"
        " WHERE u.app = %s ORDER BY u.user_id LIMIT %s",
        (app_id, limit),
    ).fetchall()
    return [(str(r[0]), r[1]) for r in rows]


def owners(conn: psycopg.Connection, user_ids: list[str]) -> dict[str, str]:
    """The owners of those of ``user_ids`` that exist."""
    rows = conn.execute("SELECT user_id, app FROM users WHERE user_id = ANY(%s)", (user_ids,)).fetchall()
    return {str(u): str(a) for u, a in rows}


def forgotten_at(conn: psycopg.Connection, user_id: str) -> datetime | None:
    """When ``user_id`` was last forgotten, or None."""
    row = conn.execute(
        "SELECT forgotten_at FROM tombstones WHERE user_sha256 = %s", (user_sha256(user_id),)
    ).fetchone()
    return None if row is None else row[0]


def forgotten_since(conn: psycopg.Connection, user_ids: list[str]) -> dict[str, datetime]:
    """``forgotten_at`` of those of ``user_ids`` that have a tombstone."""
    by_hash = {user_sha256(u): u for u in user_ids}
    rows = conn.execute(
        "SELECT user_sha256, forgotten_at FROM tombstones WHERE user_sha256 = ANY(%s)", (list(by_hash),)
    ).fetchall()
    return {by_hash[bytes(h)]: at for h, at in rows}


def add_tombstone(conn: psycopg.Connection, user_id: str, app: str, actor: str) -> datetime:
    """Record (or move forward) the tombstone of ``user_id``, in the caller's transaction; returns forgotten_at."""
    row = one(
        conn.execute(
            "INSERT INTO tombstones (user_sha256, app, actor) VALUES (%s, %s, %s)"
            " ON CONFLICT (user_sha256) DO UPDATE SET forgotten_at = now(), app = EXCLUDED.app, actor = EXCLUDED.actor"
            " RETURNING forgotten_at",
            (user_sha256(user_id), app, actor),
        )
    )
    return row[0]


def lock_alive(conn: psycopg.Connection, user_id: str, *, since: datetime | None = None) -> str:
    """In the caller's transaction: lock the user's identity row against a concurrent forget (FOR KEY SHARE: a
    forget's DELETE waits for this transaction) and return its owner. Raises Forgotten when the user is gone, or
    when it was forgotten at or after ``since`` (the start of the work that is about to write: a user forgotten and
    then recreated by a new event is another life, and work begun in the earlier one must not reach it)."""
    row = conn.execute("SELECT app FROM users WHERE user_id = %s FOR KEY SHARE", (user_id,)).fetchone()
    if row is None:
        raise Forgotten(f"{user_id!r} was forgotten (or never existed); nothing is written for it")
    if since is not None:
        at = forgotten_at(conn, user_id)
        if at is not None and at >= since:
            raise Forgotten(
                f"{user_id!r} was forgotten at {at.isoformat()}, after this work began; nothing is written"
            )
    return str(row[0])
