"""Applications, their API keys and the operator's keys (only sha256 hashes of keys are stored)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime

import psycopg

from pipeline.domain import apikeys
from pipeline.domain.apikeys import DEFAULT_APP_SCOPES, Principal
from pipeline.domain.errors import InvalidInput, NotFound
from pipeline.domain.events import valid_app_id


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    app_id: str | None  # None: an operator key
    scopes: tuple[str, ...]
    description: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


@dataclass(frozen=True)
class App:
    app_id: str
    description: str
    created_at: datetime
    keys: tuple[ApiKey, ...]

    @property
    def active_keys(self) -> int:
        return sum(1 for k in self.keys if k.revoked_at is None)


def create_key(
    conn: psycopg.Connection,
    app_id: str | None,
    description: str = "",
    *,
    scopes: tuple[str, ...] | list[str] = DEFAULT_APP_SCOPES,
    expires_at: datetime | None = None,
) -> tuple[str, str]:
    """Issue a new key: (key_id, key). For an application (registered now if new) with ``scopes``; with
    ``app_id=None`` an operator key (scope ``admin`` only). The key is returned once; only its hash is kept."""
    if app_id is not None and not valid_app_id(app_id):
        raise InvalidInput(f"app id must be 1..64 chars of [A-Za-z0-9._:-], got {app_id!r}")
    checked = apikeys.check_scopes(list(scopes), operator=app_id is None)
    if expires_at is not None and expires_at.tzinfo is None:
        raise InvalidInput(f"expires_at must carry a time zone, got {expires_at.isoformat()}")
    key_id, key = apikeys.new_key()
    with conn.transaction():
        if app_id is not None:
            conn.execute(
                "INSERT INTO apps (app_id, description) VALUES (%s, %s) ON CONFLICT (app_id) DO NOTHING",
                (app_id, description),
            )
        row = conn.execute(
            "INSERT INTO api_keys (key_id, app_id, key_sha256, scopes, expires_at, description)"
            " VALUES (%s, %s, %s, %s, %s, %s) RETURNING expires_at <= now()",
            (key_id, app_id, apikeys.hash_key(key), list(checked), expires_at, description),
        ).fetchone()
        if row is not None and row[0]:
            raise InvalidInput(f"expires_at {expires_at} is in the past; the key would never work")
    return key_id, key


def authenticate(conn: psycopg.Connection, key: str) -> Principal | None:
    """The principal of ``key`` if it is well-formed, known, not revoked and not expired; else None."""
    key_id = apikeys.key_id_of(key)
    if key_id is None:
        return None
    row = conn.execute(
        "SELECT app_id, key_sha256, scopes, expires_at FROM api_keys"
        " WHERE key_id = %s AND revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now())",
        (key_id,),
    ).fetchone()
    if row is None or not hmac.compare_digest(bytes(row[1]), apikeys.hash_key(key)):
        return None
    return Principal(key_id, row[0], frozenset(row[2]), row[3])


def app_exists(conn: psycopg.Connection, app_id: str) -> bool:
    return conn.execute("SELECT 1 FROM apps WHERE app_id = %s", (app_id,)).fetchone() is not None


def app_ids(conn: psycopg.Connection) -> frozenset[str]:
    """Every registered application id (the consumer's check of the ``app`` a Kafka record names)."""
    return frozenset(r[0] for r in conn.execute("SELECT app_id FROM apps").fetchall())


_KEY_COLS = "key_id, app_id, scopes, description, created_at, expires_at, revoked_at"


def _key(row: tuple) -> ApiKey:
    return ApiKey(row[0], row[1], tuple(row[2]), row[3], row[4], row[5], row[6])


def list_apps(conn: psycopg.Connection) -> list[App]:
    rows = conn.execute(
        "SELECT a.app_id, a.description, a.created_at, k.key_id, k.app_id, k.scopes, k.description, k.created_at,"
        " k.expires_at, k.revoked_at FROM apps a LEFT JOIN api_keys k USING (app_id) ORDER BY a.app_id, k.created_at"
    ).fetchall()
    apps: dict[str, tuple[str, datetime, list[ApiKey]]] = {}
    for app_id, desc, created, *key in rows:
        entry = apps.setdefault(app_id, (desc, created, []))
        if key[0] is not None:
            entry[2].append(_key(tuple(key)))
    return [App(a, d, c, tuple(k)) for a, (d, c, k) in apps.items()]


def list_keys(conn: psycopg.Connection, app_id: str | None = None, *, operator: bool = False) -> list[ApiKey]:
    """Keys (never the secrets): of one application, the operator's (``operator=True``), or all, oldest first."""
    if operator:
        rows = conn.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE app_id IS NULL ORDER BY created_at").fetchall()
    elif app_id is not None:
        if not app_exists(conn, app_id):
            raise NotFound(f"no application {app_id!r}; `persona apps list` shows the registered ones")
        rows = conn.execute(
            f"SELECT {_KEY_COLS} FROM api_keys WHERE app_id = %s ORDER BY created_at", (app_id,)
        ).fetchall()
    else:
        rows = conn.execute(f"SELECT {_KEY_COLS} FROM api_keys ORDER BY created_at").fetchall()
    return [_key(r) for r in rows]


def revoke_key(conn: psycopg.Connection, key_id: str) -> ApiKey:
    """Revoke one key by id (application or operator); revoking a revoked key changes nothing. NotFound if unknown."""
    with conn.transaction():
        conn.execute("UPDATE api_keys SET revoked_at = now() WHERE key_id = %s AND revoked_at IS NULL", (key_id,))
        row = conn.execute(f"SELECT {_KEY_COLS} FROM api_keys WHERE key_id = %s", (key_id,)).fetchone()
    if row is None:
        raise NotFound(f"no key {key_id!r}; `persona apps keys list` shows the keys")
    return _key(row)


def revoke(conn: psycopg.Connection, app_id: str, key_id: str | None = None) -> list[str]:
    """Revoke one key of ``app_id`` (or all of its active keys); return the key ids revoked now."""
    with conn.transaction():
        if not app_exists(conn, app_id):
            raise NotFound(f"no application {app_id!r}; `persona apps list` shows the registered ones")
        if key_id is not None:
            rows = conn.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE app_id = %s AND key_id = %s AND revoked_at IS NULL"
                " RETURNING key_id",
                (app_id, key_id),
            ).fetchall()
            if (
                not rows
                and conn.execute(
                    "SELECT 1 FROM api_keys WHERE app_id = %s AND key_id = %s", (app_id, key_id)
                ).fetchone()
                is None
            ):
                raise NotFound(f"application {app_id!r} has no key {key_id!r}")
        else:
            rows = conn.execute(
                "UPDATE api_keys SET revoked_at = now() WHERE app_id = %s AND revoked_at IS NULL RETURNING key_id",
                (app_id,),
            ).fetchall()
    return [str(r[0]) for r in rows]
