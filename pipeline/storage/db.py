"""PostgreSQL connections and schema migrations (schemas/sql/NNNN_*.sql, recorded in ``schema_migrations``)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool

from pipeline.config import SCHEMAS_DIR, DatabaseSettings
from pipeline.domain.errors import Unavailable

log = logging.getLogger(__name__)

MIGRATIONS_DIR = SCHEMAS_DIR / "sql"
_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
# Any constant works; it only has to be the same in every process that migrates this database.
_MIGRATION_LOCK = 0x7065_7273_6F6E_61


class StorageError(Unavailable):
    """The database refused or failed an operation (or could not be reached)."""

    code = "database_unavailable"


def connect(settings: DatabaseSettings, *, autocommit: bool = False) -> psycopg.Connection:
    """One dedicated connection (migrations, the buffer consumer's pipelined writer); all else uses `Database`."""
    try:
        return psycopg.connect(settings.url, autocommit=autocommit, connect_timeout=int(settings.connect_timeout_s))
    except psycopg.OperationalError as e:
        raise StorageError(f"cannot connect to PostgreSQL at {redact(settings.url)}: {e}") from e


def one(cursor: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    """The one row of a statement that always returns one (an aggregate, RETURNING of a row known to exist)."""
    row = cursor.fetchone()
    if row is None:
        raise StorageError("the database returned no row where the statement always returns one")
    return tuple(row)


class Database:
    """The process's PostgreSQL connection pool (one per process).

    ``with database.connection() as conn`` commits on success and rolls back on an exception, like a connection's
    own context; a connection that fails (PostgreSQL down or restarting, the pool exhausted for
    ``connect_timeout_s``) raises StorageError, so callers above storage never see a driver exception. Every
    connection is checked before it is handed out: the pool outlives a PostgreSQL restart (the next checkout
    reconnects).
    """

    def __init__(
        self, settings: DatabaseSettings, *, min_size: int = 1, name: str = "persona", wait: bool = True
    ) -> None:
        """Open the pool: with ``wait``, StorageError unless PostgreSQL answers within ``connect_timeout_s``;
        without (long-running servers), it connects in the background and each checkout waits up to
        ``connect_timeout_s`` for a connection (StorageError after that), so a server starts and recovers with
        PostgreSQL down."""
        self.settings = settings
        self.pool = ConnectionPool(
            settings.url,
            min_size=min_size,
            max_size=max(min_size, settings.pool_max),
            kwargs={"connect_timeout": int(settings.connect_timeout_s)},
            check=ConnectionPool.check_connection,
            name=name,
            timeout=settings.connect_timeout_s,
            open=False,
        )
        try:
            self.pool.open(wait=wait, timeout=settings.connect_timeout_s)
        except Exception as e:
            self.pool.close()
            raise StorageError(f"cannot connect to PostgreSQL at {redact(settings.url)}: {e}") from e

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection]:
        """A pooled connection for the block (committed at its end, rolled back if it raises)."""
        try:
            with self.pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as e:
            raise StorageError(f"PostgreSQL at {redact(self.settings.url)} failed: {e}") from e

    def ping(self) -> None:
        """Check that PostgreSQL answers (StorageError when it does not): a health check."""
        with self.connection() as conn:
            conn.execute("SELECT 1")

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@?#]*):.*@(?=[^@]*$)")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact(url: str) -> str:
    """The database URL or conninfo string with every password masked, for logs and messages: in the URL's
    userinfo (up to the last ``@``, so a password holding ``@`` is masked whole), as a ``?password=`` parameter,
    or as a ``password=`` keyword (quoted or not)."""
    if "://" in url:
        return _QUERY_PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1:***@", url))
    return _KEYWORD_PASSWORD.sub(r"\1***", url)


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every migration file, in version order; a misnamed file or a repeated version is an error."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.fullmatch(path.name)
        if not m:
            raise StorageError(f"migration file {path.name!r} must be named NNNN_lower_snake.sql")
        version = int(m.group(1))
        if version in found:
            raise StorageError(f"migration version {version} is used by {found[version].path.name} and {path.name}")
        found[version] = Migration(version, m.group(2), path)
    return [found[v] for v in sorted(found)]


def migrate(settings: DatabaseSettings, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply the migrations not yet applied, each in its own transaction; return those applied now.

    Idempotent and safe to run from several processes at once (an advisory lock serialises them). A migration
    whose file changed after it was applied is an error: migrations are append-only.
    """
    applied_now: list[Migration] = []
    with connect(settings) as conn:
        with conn.transaction():
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " sha256 text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
        for mig in migrations(directory):
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                row = conn.execute(
                    "SELECT sha256 FROM schema_migrations WHERE version = %s", (mig.version,)
                ).fetchone()
                if row is not None:
                    if row[0] != mig.sha256:
                        raise StorageError(
                            f"migration {mig.path.name} changed after it was applied (sha256 {row[0][:12]} in the "
                            f"database, {mig.sha256[:12]} on disk); add a new migration instead"
                        )
                    continue
                log.info("applying migration %s", mig.path.name)
                conn.execute(mig.path.read_text())  # a trusted file of schemas/sql
                conn.execute(
                    "INSERT INTO schema_migrations (version, name, sha256) VALUES (%s, %s, %s)",
                    (mig.version, mig.name, mig.sha256),
                )
                applied_now.append(mig)
    return applied_now


def applied(settings: DatabaseSettings) -> list[tuple[int, str, str]]:
    """(version, name, applied_at) of every applied migration."""
    with connect(settings) as conn:
        rows = conn.execute(
            "SELECT version, name, applied_at::text FROM schema_migrations ORDER BY version"
        ).fetchall()
    return [(int(v), str(n), str(t)) for v, n, t in rows]
