"""Applications and their API keys (only sha256 hashes of keys are stored)."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import datetime

import psycopg

from pipeline.domain import apikeys
from pipeline.domain.errors import InvalidInput, NotFound
from pipeline.domain.events import valid_app_id


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class App:
    app_id: str
    description: str
    created_at: datetime
    keys: tuple[ApiKey, ...]

    @property
    def active_keys(self) -> int:
        return sum(1 for k in self.keys if k.revoked_at is None)


def create_key(conn: psycopg.Connection, app_id: str, description: str = "") -> tuple[str, str]:
    """Register ``app_id`` if new and issue it a new key: (key_id, key). An existing app gets one more key."""
    if not valid_app_id(app_id):
        raise InvalidInput(f"app id must be 1..64 chars of [A-Za-z0-9._:-], got {app_id!r}")
    key_id, key = apikeys.new_key()
    with conn.transaction():
        conn.execute(
            "INSERT INTO apps (app_id, description) VALUES (%s, %s) ON CONFLICT (app_id) DO NOTHING",
            (app_id, description),
        )
        conn.execute(
            "INSERT INTO api_keys (key_id, app_id, key_sha256) VALUES (%s, %s, %s)",
            (key_id, app_id, apikeys.hash_key(key)),
        )
    return key_id, key


def authenticate(conn: psycopg.Connection, key: str) -> str | None:
    """The app id that owns ``key`` if the key is valid and not revoked, else None."""
    key_id = apikeys.key_id_of(key)
    if key_id is None:
        return None
    row = conn.execute(
        "SELECT app_id, key_sha256 FROM api_keys WHERE key_id = %s AND revoked_at IS NULL", (key_id,)
    ).fetchone()
    if row is None or not hmac.compare_digest(bytes(row[1]), apikeys.hash_key(key)):
        return None
    return str(row[0])


def list_apps(conn: psycopg.Connection) -> list[App]:
    rows = conn.execute(
        "SELECT a.app_id, a.description, a.created_at, k.key_id, k.created_at, k.revoked_at"
        " FROM apps a LEFT JOIN api_keys k USING (app_id) ORDER BY a.app_id, k.created_at"
    ).fetchall()
    apps: dict[str, tuple[str, datetime, list[ApiKey]]] = {}
    for app_id, desc, created, key_id, k_created, k_revoked in rows:
        entry = apps.setdefault(app_id, (desc, created, []))
        if key_id is not None:
            entry[2].append(ApiKey(key_id, k_created, k_revoked))
    return [App(a, d, c, tuple(k)) for a, (d, c, k) in apps.items()]


def revoke(conn: psycopg.Connection, app_id: str, key_id: str | None = None) -> list[str]:
    """Revoke one key of ``app_id`` (or all of its active keys); return the key ids revoked now."""
    with conn.transaction():
        if conn.execute("SELECT 1 FROM apps WHERE app_id = %s", (app_id,)).fetchone() is None:
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
