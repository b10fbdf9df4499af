"""The adapter registry: users, immutable revisions, the production alias (compare-and-swap) and its history.

Rows are converted to domain objects here and never leave this module. ``Registry`` ties the rows to the object
store: a revision's objects are written and verified before its row is inserted, and read back verified. Moving
the alias in a use case (promote, roll back, gate, forget) is pipeline.flows.promotion's: it calls the SQL here.

Forget is final: `delete_user` locks the identity row, deletes every row and writes the tombstone in one
transaction; every later write of a user's rows (a candidate, a decision, an alias move) first takes
`pipeline.storage.tenancy.lock_alive` in its own transaction, so it either finishes before the forget (whose deletes
then take its rows too) or finds the user gone and writes nothing. The training write path never creates a users
row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from pipeline.domain.errors import Conflict, Forgotten, InvalidInput, NotFound
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
from pipeline.storage import tenancy
from pipeline.storage.db import Database, one
from pipeline.storage.manifest import validate_manifest
from pipeline.storage.objects import ObjectStore, revision_prefix, sha256_hex
from pipeline.storage.training import Lease, lock_plan
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


def known_sha256s(conn: psycopg.Connection, sha256s: list[str]) -> set[str]:
    """Those of ``sha256s`` that are the artifact of some revision in the registry (one query)."""
    if not sha256s:
        return set()
    rows = conn.execute("SELECT DISTINCT sha256 FROM revisions WHERE sha256 = ANY(%s)", (list(sha256s),)).fetchall()
    return {str(r[0]) for r in rows}


def ensure_user(conn: psycopg.Connection, user_id: str, app: str) -> None:
    """Create the identity row of ``user_id`` with owner ``app`` if there is none (a write by hand; events create
    their users themselves)."""
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


def lock_revision(conn: psycopg.Connection, revision_id: str) -> bool:
    """In the caller's transaction: lock the revision's row against deletion (a forget) and say whether it still
    exists; rows of revisions are deleted only by a forget."""
    row = conn.execute("SELECT 1 FROM revisions WHERE revision_id = %s FOR KEY SHARE", (revision_id,)).fetchone()
    return row is not None


def lock_alive_revision(conn: psycopg.Connection, user_id: str, revision_id: str, *, since: datetime) -> str:
    """In the caller's transaction, before a write about ``revision_id`` (a decision, an alias move): lock the user
    against a concurrent forget, check that it was not forgotten since ``since`` (when the revision was written) and
    that the revision still exists. Returns the owner application; raises Forgotten (a NotFound) otherwise."""
    owner = tenancy.lock_alive(conn, user_id, since=since)
    if not lock_revision(conn, revision_id):
        raise Forgotten(f"revision {revision_id} of {user_id!r} was deleted by a forget; nothing is written")
    return owner


#: The tables that hold a user's rows, children first (DELETE order).
USER_TABLES = ("aliases", "alias_history", "decisions", "revisions", "events", "user_state", "users")


@dataclass(frozen=True)
class DeletedUser:
    """What `delete_user` did: rows deleted per table, the distinct sha256 of the deleted revisions' artifacts
    (serving caches are keyed by them), the owner application (None: persona held no identity row) and the
    tombstone's time."""

    rows: dict[str, int]
    sha256s: list[str]
    owner: str | None
    forgotten_at: datetime


def delete_user(conn: psycopg.Connection, user_id: str, *, actor: str, app: str | None = None) -> DeletedUser:
    """Delete every row of ``user_id`` and write its tombstone, in the caller's transaction.

    First the forget's lock (`tenancy.lock_for_forget`): every event batch that writes this user's bucket finishes
    before, and none starts until this transaction ends (a batch after it sees the tombstone); then the identity
    row (FOR UPDATE): a write that holds it (`tenancy.lock_alive`) finishes before the deletes, which then take its
    rows too, and a write that comes after finds the user gone. The tombstone is
    written even when persona holds nothing of the id (the operator was asked to forget it: its late events are
    dropped). With ``app`` (a caller acting for one application), a user owned by another application reads as
    unknown: NotFound, nothing deleted, no tombstone.
    """
    tenancy.lock_for_forget(conn, user_id)
    owner = tenancy.owner_of(conn, user_id)
    if app is not None and owner is not None and owner != app:
        raise NotFound(f"no user {user_id!r}; `persona users list` shows the known users")
    shas = [
        r[0]
        for r in conn.execute(
            "SELECT DISTINCT sha256 FROM revisions WHERE user_id = %s ORDER BY 1", (user_id,)
        ).fetchall()
    ]
    rows = {t: conn.execute(f"DELETE FROM {t} WHERE user_id = %s", (user_id,)).rowcount for t in USER_TABLES}
    # The operator console's audit rows keep what was done and by whom, not the id (its sha256 stays, as here).
    conn.execute("UPDATE operator_audit SET user_id = NULL WHERE user_id = %s", (user_id,))
    # A never-held id has no owner; the tombstone then records the caller's application, or "" for an operator.
    at = tenancy.add_tombstone(conn, user_id, owner or app or "", actor)
    return DeletedUser(rows, shas, owner, at)


def _claim_user(conn: psycopg.Connection, user_id: str, app: str | None) -> None:
    """For a write without a training lease: lock the user's identity row, creating it with owner ``app`` when
    persona does not hold the user (never for a forgotten id: only a new event starts a new life)."""
    if tenancy.owner_of(conn, user_id) is None:
        if tenancy.forgotten_at(conn, user_id) is not None:
            raise Forgotten(f"{user_id!r} was forgotten; a revision does not bring it back")
        if app is None:
            raise NotFound(f"no user {user_id!r}; name its owner application (app=) to create it")
        ensure_user(conn, user_id, app)
    tenancy.lock_alive(conn, user_id)


class PlanGone(Conflict):
    """The training plan of a candidate is no longer its user's (finished by another attempt without this
    revision): nothing is written."""


@dataclass(frozen=True)
class StagedRevision:
    """A candidate whose objects are uploaded and verified and whose row is not written yet
    (`Registry.stage_revision`); with ``existing``, the revision an earlier attempt already wrote (nothing staged)."""

    user_id: str
    revision_id: str
    parent_id: str | None
    sha256: str
    size_bytes: int
    uri: str
    manifest: dict[str, Any]
    keys: tuple[str, ...]
    existing: Revision | None = None


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
        """Store a PEFT adapter directory as a new candidate revision of ``user_id``, with its manifest:
        `stage_revision` (the objects) then `commit_revision` (the row). Idempotent for a given ``revision_id``:
        writing the same revision again returns the stored one; other bytes under the same id are a Conflict
        (revisions are immutable). See `commit_revision` for ``app`` and ``lease``."""
        staged = self.stage_revision(
            user_id,
            adapter_dir,
            parent_id=parent_id,
            base=base,
            training=training,
            events=events,
            metrics=metrics,
            revision_id=revision_id,
            lease=lease,
        )
        return self.commit_revision(staged, app=app, lease=lease)

    def stage_revision(
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
        lease: Lease | None = None,
    ) -> StagedRevision:
        """Upload the adapter's files and its manifest under users/{user}/revisions/{revision}/, each read back and
        verified; no row yet. With the training ``lease``, a user forgotten since the plan was made raises Forgotten
        before anything is uploaded. A revision already written with these bytes comes back as ``existing``."""
        files = {name: (adapter_dir / name).read_bytes() for name in ADAPTER_FILES if (adapter_dir / name).exists()}
        missing = [n for n in ADAPTER_FILES if n not in files]
        if missing:
            raise InvalidInput(f"{adapter_dir} is not a PEFT adapter directory: {', '.join(missing)} missing")
        adapter_config = orjson.loads(files[ADAPTER_FILES[0]])
        rid = check_revision_id(revision_id) if revision_id else new_revision_id()
        sha = sha256_hex(files[ADAPTER_FILES[1]])
        prefix = revision_prefix(user_id, rid)
        size = len(files[ADAPTER_FILES[1]])

        with self.db.connection() as conn, conn.transaction():
            try:
                existing = get_revision(conn, rid)
            except NotFound:
                existing = None
            if existing is not None:
                if existing.user_id == user_id and existing.sha256 == sha:
                    return StagedRevision(
                        user_id, rid, parent_id, sha, size, existing.artifact_uri, existing.manifest, (), existing
                    )
                raise Conflict(f"revision {rid} already exists with other content; revisions are immutable")
            if lease is not None:  # a forgotten user's training uploads nothing (the commit checks again)
                tenancy.lock_alive(conn, user_id, since=lease.planned_at)
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
            artifact_size=size,
            code_version=code_version(),
        )
        manifest["files"] = {name: sha256_hex(data) for name, data in files.items()}
        validate_manifest(manifest)
        for name, data in files.items():
            self.store.put_verified(prefix + name, data)
        self.store.put_verified(
            prefix + "manifest.json", orjson.dumps(manifest, option=orjson.OPT_INDENT_2), "application/json"
        )
        keys = [prefix + name for name in files] + [prefix + "manifest.json"]
        return StagedRevision(
            user_id, rid, parent_id, sha, size, self.store.uri(prefix + ADAPTER_FILES[1]), manifest, tuple(keys)
        )

    def commit_revision(
        self, staged: StagedRevision, *, app: str | None = None, lease: Lease | None = None
    ) -> Revision:
        """Write the row of a staged revision, in one transaction that first checks that its user is alive.

        With the training ``lease``: the user must exist and must not have been forgotten since the plan was made,
        and the plan must still be the user's (a forget removes it with the user's buffer row); the events the
        training read are marked consumed and the lease released in the same transaction. The users row is never
        created on this path. Without a lease (an import by hand, tests), a user persona does not hold is created
        with the owner ``app`` when one is given, unless the id was forgotten.

        Raises Forgotten (a NotFound) when the user was forgotten: the staged objects are deleted again and nothing
        points at them. Raises NotFound for an unknown user without ``app``; Conflict when the plan was finished
        by another attempt without writing this revision.
        """
        if staged.existing is not None:
            if lease is not None:
                with self.db.connection() as conn, conn.transaction():
                    finish_training(conn, lease)
            return staged.existing
        try:
            with self.db.connection() as conn, conn.transaction():
                if lease is not None:
                    tenancy.lock_alive(conn, staged.user_id, since=lease.planned_at)
                    if not lock_plan(conn, lease):
                        try:
                            return get_revision(conn, staged.revision_id)  # another attempt of this plan wrote it
                        except NotFound:
                            pass
                        if tenancy.forgotten_at(conn, staged.user_id) is not None:
                            raise Forgotten(
                                f"{staged.user_id!r} was forgotten while {staged.revision_id} was trained (its plan "
                                "went with the user's rows); nothing is written"
                            )
                        raise PlanGone(
                            f"the plan of {staged.revision_id} is no longer {staged.user_id!r}'s; nothing is written"
                        )
                else:
                    _claim_user(conn, staged.user_id, app)
                conn.execute(
                    "INSERT INTO revisions (revision_id, user_id, parent_id, artifact_uri, sha256, size_bytes,"
                    " manifest) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (
                        staged.revision_id,
                        staged.user_id,
                        staged.parent_id,
                        staged.uri,
                        staged.sha256,
                        staged.size_bytes,
                        Jsonb(staged.manifest),
                    ),
                )
                if lease is not None:
                    finish_training(conn, lease)
                return get_revision(conn, staged.revision_id)
        except (Forgotten, PlanGone):
            self.discard(staged)
            raise

    def discard(self, staged: StagedRevision) -> None:
        """Delete the objects of a staged revision that will have no row. A failure is logged, not raised: the
        caller's error says why nothing was written; what is left lies under the user's prefix."""
        if not staged.keys:
            return
        try:
            self.store.delete_keys(list(staged.keys))
        except Exception:
            log.exception(
                "%s: could not delete the staged objects of %s (%s); delete them by hand",
                staged.user_id,
                staged.revision_id,
                ", ".join(staged.keys),
            )
        else:
            log.info(
                "%s: deleted the staged objects of %s (no row will point at them)", staged.user_id, staged.revision_id
            )

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
