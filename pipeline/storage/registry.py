"""The adapter registry: users, immutable revisions, the production alias (compare-and-swap) and its history.

Rows are converted to domain objects here and never leave this module. ``Registry`` ties the rows to the object
store: a revision's objects are written and verified before its row is inserted, and read back verified.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pipeline.config import DatabaseSettings
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
    rollback_target,
)
from pipeline.storage import db
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
    row = conn.execute(
        "INSERT INTO alias_history (user_id, alias, from_revision, to_revision, reason, actor)"
        " VALUES (%s, %s, %s, %s, %s, %s) RETURNING at",
        (user_id, PRODUCTION, expected, to_revision, reason, actor),
    ).fetchone()
    return AliasMove(user_id, PRODUCTION, expected, to_revision, reason, actor, row[0])


@dataclass(frozen=True)
class ForgetReport:
    """What ``forget`` removed (all zeros when there was nothing left)."""

    user_id: str
    rows: dict[str, int]
    objects: list[str]
    sha256s: list[str] = field(default_factory=list)  # the artifacts of the deleted revisions (cache keys)

    @property
    def nothing(self) -> bool:
        return not self.objects and not any(self.rows.values())


_KEEP = object()  # ``expected`` default of promote: "whatever the alias points at when I look"


class Registry:
    """Revisions with their objects: the one writer of revisions and manifests, promotion, export, forget."""

    def __init__(self, database: DatabaseSettings, store: ObjectStore) -> None:
        self.database = database
        self.store = store

    def connect(self) -> psycopg.Connection:
        return db.connect(self.database)

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

        with self.connect() as conn:
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

        with self.connect() as conn, conn.transaction():
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

    # --- the production alias ---
    def promote(
        self,
        user_id: str,
        revision_id: str,
        *,
        expected: Any = _KEEP,
        reason: str = "promote",
        actor: str = "operator",
        allow_rejected: bool = False,
    ) -> AliasMove | None:
        """Point the user's production alias at ``revision_id`` (compare-and-swap from ``expected``, by default
        the value read now) and publish the pointer. None when it already pointed there (pointer republished)."""
        with self.connect() as conn:
            rev = get_revision(conn, revision_id)
            if rev.user_id != user_id:
                raise InvalidInput(f"revision {rev.revision_id} belongs to {rev.user_id!r}, not {user_id!r}")
            if rev.status == "rejected" and not allow_rejected:
                raise InvalidInput(f"revision {rev.revision_id} was rejected by the gate; it is not promoted")
            if not self.store.exists(_key(rev.artifact_uri)):
                raise NotFound(f"the artifact of {rev.revision_id} is missing from the object store; not promoted")
            current = production(conn, user_id)
            current_id = current.revision_id if current else None
            exp = current_id if expected is _KEEP else expected
            move = None
            if not (exp == current_id == rev.revision_id):
                with conn.transaction():
                    move = move_alias(conn, user_id, rev.revision_id, expected=exp, reason=reason, actor=actor)
        self.publish(user_id)
        return move

    def rollback(self, user_id: str, *, to: str | None = None, actor: str = "operator") -> AliasMove:
        """Move production back to ``to`` or, by default, to the revision that served before the current one."""
        with self.connect() as conn:
            current = production(conn, user_id)
            if current is None:
                raise InvalidInput(f"{user_id!r} has no production revision; there is nothing to roll back")
            target = (
                check_revision_id(to) if to else rollback_target(alias_history(conn, user_id), current.revision_id)
            )
            if target is None:
                raise InvalidInput(
                    f"{current.revision_id} is the first revision that served {user_id!r}; name one with --to"
                )
            if target == current.revision_id:
                raise InvalidInput(f"{target} is already production for {user_id!r}")
        move = self.promote(user_id, target, expected=current.revision_id, reason="rollback", actor=actor)
        if move is None:  # pragma: no cover - excluded above
            raise Conflict("rollback found the alias already at its target")
        return move

    def publish(self, user_id: str) -> None:
        """(Re)publish users/{user}/production.json from the alias (deleted when the user has no production)."""
        with self.connect() as conn:
            rev = production(conn, user_id)
            row = conn.execute(
                "SELECT updated_at FROM aliases WHERE user_id = %s AND alias = %s", (user_id, PRODUCTION)
            ).fetchone()
        if rev is None:
            self.store.delete_pointer(user_id)
            return
        self.store.publish_pointer(
            user_id, rev.revision_id, rev.sha256, rev.artifact_uri, row[0].astimezone(UTC).isoformat()
        )

    # --- reading ---
    def adapter_files(self, rev: Revision) -> dict[str, bytes]:
        """The revision's PEFT files, each verified against the sha256 the registry recorded."""
        prefix = revision_prefix(rev.user_id, rev.revision_id)
        recorded = dict(rev.manifest.get("files") or {})
        recorded[ADAPTER_FILES[1]] = rev.sha256
        return {name: self.store.get_verified(prefix + name, recorded[name]) for name in ADAPTER_FILES}

    def export(self, user_id: str, target: Path, revision_id: str | None = None) -> Revision:
        """Write a directory that stock ``peft.PeftModel.from_pretrained`` loads (plus manifest.json)."""
        with self.connect() as conn:
            if revision_id is None:
                rev = production(conn, user_id)
                if rev is None:
                    raise NotFound(f"{user_id!r} has no production revision; name one with --revision")
            else:
                rev = get_revision(conn, revision_id)
                if rev.user_id != user_id:
                    raise InvalidInput(f"revision {rev.revision_id} belongs to {rev.user_id!r}, not {user_id!r}")
        self.download(rev, target)
        (target / "manifest.json").write_bytes(orjson.dumps(rev.manifest, option=orjson.OPT_INDENT_2))
        return rev

    def download(self, rev: Revision, target: Path) -> Path:
        """Write the revision's PEFT directory to ``target`` (every file verified before anything is written)."""
        files = self.adapter_files(rev)
        target.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (target / name).write_bytes(data)
        return target

    # --- forgetting ---
    def forget(self, user_id: str) -> ForgetReport:
        """Remove everything persona holds of ``user_id``: events, buffer, revisions, alias and history, identity,
        and every object under users/{user_id}/ (revisions and the pointer). Running it again removes nothing."""
        rows: dict[str, int] = {}
        with self.connect() as conn, conn.transaction():
            shas = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT sha256 FROM revisions WHERE user_id = %s ORDER BY 1", (user_id,)
                ).fetchall()
            ]
            for table in ("aliases", "alias_history", "decisions", "revisions", "events", "user_state", "users"):
                rows[table] = conn.execute(f"DELETE FROM {table} WHERE user_id = %s", (user_id,)).rowcount
        objects = self.store.delete_user(user_id)
        return ForgetReport(user_id, rows, objects, shas)


def _key(uri: str) -> str:
    """The object key of an s3://bucket/key URI."""
    return uri.split("/", 3)[3]
