"""The adapter registry: users, immutable revisions, the production alias (compare-and-swap) and its history.

Rows are converted to domain objects here and never leave this module. ``Registry`` ties the rows to the object
store: a revision's objects are written and verified before its row is inserted, and read back verified. Moving
the alias in a use case (promote, roll back, gate, forget) is pipeline.flows.promotion's: it calls the SQL here.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pipeline.domain.errors import Conflict, InvalidInput, NotFound
from pipeline.domain.revisions import (
    ADAPTER_FILES,
    PRODUCTION,
    AliasMove,
    BaseModelRef,
    EventsUsed,
    Revision,
    User,
    build_manifest,
    check_revision_id,
    new_revision_id,
)
from pipeline.storage.db import Database, one
from pipeline.storage.manifest import validate_manifest
from pipeline.storage.objects import ObjectStore, revision_prefix, sha256_hex
from pipeline.storage.training import Lease
from pipeline.storage.training import finish as finish_training
from pipeline.version import code_version

log = logging.getLogger(__name__)

_REV_COLS = (
    "revision_id, user_id, parent_id, status, artifact_uri, sha256, size_bytes, manifest, created_at, status_at"
)


def _revision(row: dict[str, Any]) -> Revision:
    return Revision(**row)


# --- queries (each per-user lookup is one index probe) -------------------------------------------------------------
def get_revision(conn: psycopg.Connection, revision_id: str) -> Revision:
    rid = check_revision_id(revision_id)
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(f"SELECT {_REV_COLS} FROM revisions WHERE revision_id = %s", (rid,)).fetchone()
    if row is None:
        raise NotFound(f"no revision {rid}; `persona revisions list USER` shows a user's revisions")
    return _revision(row)


def list_revisions(conn: psycopg.Connection, user_id: str) -> list[Revision]:
    """A user's revisions, oldest first."""
    with conn.cursor(row_factory=dict_row) as cur:
        rows = cur.execute(
            f"SELECT {_REV_COLS} FROM revisions WHERE user_id = %s ORDER BY created_at, revision_id",
            (user_id,),
        ).fetchall()
    return [_revision(r) for r in rows]


def production(conn: psycopg.Connection, user_id: str) -> Revision | None:
    """The revision the user's production alias points at, or None."""
    with conn.cursor(row_factory=dict_row) as cur:
        row = cur.execute(
            f"SELECT {', '.join('r.' + c.strip() for c in _REV_COLS.split(','))} FROM aliases a"
            " JOIN revisions r ON r.revision_id = a.revision_id WHERE a.user_id = %s AND a.alias = %s",
            (user_id, PRODUCTION),
        ).fetchone()
    return None if row is None else _revision(row)


def alias_history(conn: psycopg.Connection, user_id: str) -> list[AliasMove]:
    rows = conn.execute(
        "SELECT user_id, alias, from_revision, to_revision, reason, actor, at FROM alias_history"
        " WHERE user_id = %s AND alias = %s ORDER BY id",
        (user_id, PRODUCTION),
    ).fetchall()
    return [AliasMove(*r) for r in rows]


_USER_SQL = """
SELECT u.user_id, u.app, u.labels, u.created_at, a.revision_id,
       (SELECT count(*) FROM revisions r WHERE r.user_id = u.user_id),
       coalesce(s.pending_count, 0), coalesce(s.total_events, 0)
FROM users u
LEFT JOIN aliases a ON a.user_id = u.user_id AND a.alias = 'production'
LEFT JOIN user_state s ON s.user_id = u.user_id
"""


def get_user(conn: psycopg.Connection, user_id: str) -> User:
    row = conn.execute(_USER_SQL + " WHERE u.user_id = %s", (user_id,)).fetchone()
    if row is None:
        raise NotFound(f"no user {user_id!r}; `persona users list` shows the known users")
    return User(*row)


def list_users(conn: psycopg.Connection, *, prefix: str = "", after: str = "", limit: int = 100) -> list[User]:
    """Users by id (keyset pagination: pass the last id seen as ``after``)."""
    like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    rows = conn.execute(
        _USER_SQL + " WHERE u.user_id LIKE %s AND u.user_id > %s ORDER BY u.user_id LIMIT %s", (like, after, limit)
    ).fetchall()
    return [User(*r) for r in rows]


def ensure_user(conn: psycopg.Connection, user_id: str, app: str) -> None:
    conn.execute("INSERT INTO users (user_id, app) VALUES (%s, %s) ON CONFLICT DO NOTHING", (user_id, app))


def move_alias(
    conn: psycopg.Connection, user_id: str, to_revision: str, *, expected: str | None, reason: str, actor: str
) -> AliasMove:
    """Compare-and-swap the production alias from ``expected`` to ``to_revision``, in the caller's transaction.

    Raises Conflict when the alias is not at ``expected`` any more (someone else moved it): nothing is changed.
    Statuses follow: the new revision becomes ``promoted``, the one it replaces ``retired``; a history row is added.
    """
    if expected is None:
        cur = conn.execute(
            "INSERT INTO aliases (user_id, alias, revision_id) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
            (user_id, PRODUCTION, to_revision),
        )
    else:
        cur = conn.execute(
            "UPDATE aliases SET revision_id = %s, updated_at = now()"
            " WHERE user_id = %s AND alias = %s AND revision_id = %s",
            (to_revision, user_id, PRODUCTION, expected),
        )
    if cur.rowcount != 1:
        now = conn.execute(
            "SELECT revision_id FROM aliases WHERE user_id = %s AND alias = %s", (user_id, PRODUCTION)
        ).fetchone()
        raise Conflict(
            f"the production alias of {user_id!r} changed concurrently: expected {expected or 'none'}, "
            f"it is now {now[0] if now else 'none'}; nothing was changed (look again and retry)"
        )
    conn.execute("UPDATE revisions SET status = 'promoted', status_at = now() WHERE revision_id = %s", (to_revision,))
    if expected is not None and expected != to_revision:
        conn.execute("UPDATE revisions SET status = 'retired', status_at = now() WHERE revision_id = %s", (expected,))
    row = one(
        conn.execute(
            "INSERT INTO alias_history (user_id, alias, from_revision, to_revision, reason, actor)"
            " VALUES (%s, %s, %s, %s, %s, %s) RETURNING at",
            (user_id, PRODUCTION, expected, to_revision, reason, actor),
        )
    )
    return AliasMove(user_id, PRODUCTION, expected, to_revision, reason, actor, row[0])


def set_rejected(conn: psycopg.Connection, revision_id: str) -> None:
    """Mark a candidate ``rejected`` (by the gate), in the caller's transaction."""
    conn.execute("UPDATE revisions SET status = 'rejected', status_at = now() WHERE revision_id = %s", (revision_id,))


def alias_updated_at(conn: psycopg.Connection, user_id: str) -> datetime | None:
    """When the user's production alias last moved (the pointer's ``promoted_at``), or None without one."""
    row = conn.execute(
        "SELECT updated_at FROM aliases WHERE user_id = %s AND alias = %s", (user_id, PRODUCTION)
    ).fetchone()
    return None if row is None else row[0]


#: The tables that hold a user's rows, children first (DELETE order).
USER_TABLES = ("aliases", "alias_history", "decisions", "revisions", "events", "user_state", "users")


def delete_user(conn: psycopg.Connection, user_id: str) -> tuple[dict[str, int], list[str]]:
    """Delete every row of ``user_id``, in the caller's transaction: (rows deleted per table, the distinct sha256
    of the deleted revisions' artifacts, which serving caches are keyed by)."""
    shas = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT sha256 FROM revisions WHERE user_id = %s ORDER BY 1", (user_id,)
        ).fetchall()
    ]
    rows = {t: conn.execute(f"DELETE FROM {t} WHERE user_id = %s", (user_id,)).rowcount for t in USER_TABLES}
    return rows, shas


class Registry:
    """Revisions with their objects: the one writer of revisions and their manifests, and their verified reader."""

    def __init__(self, database: Database, store: ObjectStore) -> None:
        self.db = database
        self.store = store

    # --- writing ---
    def write_revision(
        self,
        user_id: str,
        adapter_dir: Path,
        *,
        parent_id: str | None,
        base: BaseModelRef,
        training: dict[str, Any],
        events: EventsUsed,
        metrics: dict[str, Any] | None = None,
        revision_id: str | None = None,
        app: str | None = None,
        lease: Lease | None = None,
    ) -> Revision:
        """Store a PEFT adapter directory as a new candidate revision of ``user_id``, with its manifest.

        Objects first (each read back and verified), then the row: a row never points at a missing or partial
        object. Idempotent for a given ``revision_id``: writing the same revision again returns the stored one;
        other bytes under the same id are a Conflict (revisions are immutable). With the training ``lease``, the
        events it read are marked consumed and the lease released in the same transaction as the row.
        """
        files = {name: (adapter_dir / name).read_bytes() for name in ADAPTER_FILES if (adapter_dir / name).exists()}
        missing = [n for n in ADAPTER_FILES if n not in files]
        if missing:
            raise InvalidInput(f"{adapter_dir} is not a PEFT adapter directory: {', '.join(missing)} missing")
        adapter_config = orjson.loads(files[ADAPTER_FILES[0]])
        rid = check_revision_id(revision_id) if revision_id else new_revision_id()
        sha = sha256_hex(files[ADAPTER_FILES[1]])

        with self.db.connection() as conn:
            try:
                existing = get_revision(conn, rid)
            except NotFound:
                existing = None
            if existing is not None:
                if existing.user_id == user_id and existing.sha256 == sha:
                    if lease is not None:
                        with conn.transaction():
                            finish_training(conn, lease)
                    return existing
                raise Conflict(f"revision {rid} already exists with other content; revisions are immutable")
            if parent_id is not None:
                parent = get_revision(conn, parent_id)
                if parent.user_id != user_id:
                    raise InvalidInput(f"parent {parent_id} belongs to {parent.user_id!r}, not {user_id!r}")

        manifest = build_manifest(
            user_id=user_id,
            revision_id=rid,
            parent_id=parent_id,
            base=base,
            adapter_config=adapter_config,
            training=training,
            events=events,
            metrics=metrics or {},
            artifact_sha256=sha,
            artifact_size=len(files[ADAPTER_FILES[1]]),
            code_version=code_version(),
        )
        manifest["files"] = {name: sha256_hex(data) for name, data in files.items()}
        validate_manifest(manifest)
        prefix = revision_prefix(user_id, rid)
        for name, data in files.items():
            self.store.put_verified(prefix + name, data)
        self.store.put_verified(
            prefix + "manifest.json", orjson.dumps(manifest, option=orjson.OPT_INDENT_2), "application/json"
        )

        with self.db.connection() as conn, conn.transaction():
            ensure_user(conn, user_id, app or str(training.get("app", "unknown")))
            conn.execute(
                "INSERT INTO revisions (revision_id, user_id, parent_id, artifact_uri, sha256, size_bytes, manifest)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (
                    rid,
                    user_id,
                    parent_id,
                    self.store.uri(prefix + ADAPTER_FILES[1]),
                    sha,
                    len(files[ADAPTER_FILES[1]]),
                    Jsonb(manifest),
                ),
            )
            if lease is not None:
                finish_training(conn, lease)
            return get_revision(conn, rid)

    # --- reading ---
    def adapter_files(self, rev: Revision) -> dict[str, bytes]:
        """The revision's PEFT files, each verified against the sha256 the registry recorded."""
        prefix = revision_prefix(rev.user_id, rev.revision_id)
        recorded = dict(rev.manifest.get("files") or {})
        recorded[ADAPTER_FILES[1]] = rev.sha256
        return {name: self.store.get_verified(prefix + name, recorded[name]) for name in ADAPTER_FILES}

    def download(self, rev: Revision, target: Path) -> Path:
        """Write the revision's PEFT directory to ``target`` (every file verified before anything is written)."""
        files = self.adapter_files(rev)
        target.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (target / name).write_bytes(data)
        return target


def key_of(uri: str) -> str:
    """The object key of an s3://bucket/key URI."""
    return uri.split("/", 3)[3]
