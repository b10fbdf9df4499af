"""`persona apps keys create|list|revoke`: application and operator API keys, their scopes and expiry."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.common import JsonOpt, console, err_console, open_stores
from pipeline.domain.apikeys import DEFAULT_APP_SCOPES, SCOPES
from pipeline.domain.errors import InvalidInput

app = typer.Typer(
    help="API keys: an application's (scopes ingest, serve, admin) or the operator's (admin, every application).",
    no_args_is_help=True,
)

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``2w``, ``45s`` (one number and one unit) as a timedelta; InvalidInput otherwise."""
    m = _DURATION.fullmatch(text.strip())
    if m is None or int(m.group(1)) == 0:
        raise InvalidInput(f"a duration is a positive number and one unit of s, m, h, d, w (e.g. 90d), got {text!r}")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


@app.command("create")
def keys_create(
    app_id: Annotated[str | None, typer.Argument(help="The application (registered now if new).")] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", help=f"Repeat for several: {', '.join(SCOPES)} (default: ingest and serve)."),
    ] = None,
    operator: Annotated[bool, typer.Option("--operator", help="An operator key (scope admin, every application).")] = (
        False
    ),
    expires_in: Annotated[
        str | None, typer.Option("--expires-in", help="The key stops working after this long, e.g. 90d, 12h.")
    ] = None,
    description: Annotated[str, typer.Option(help="Free text shown by `keys list`.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Issue a key. It is printed once (stdout); only its sha256 is kept, so store it now."""
    from pipeline.storage import apps

    if operator == (app_id is not None):
        raise InvalidInput("name an application, or pass --operator for an operator key (not both)")
    scopes = tuple(scope) if scope else (("admin",) if operator else DEFAULT_APP_SCOPES)
    expires_at = datetime.now(UTC) + parse_duration(expires_in) if expires_in else None
    with open_stores() as stores, stores.db.connection() as conn:
        key_id, key = apps.create_key(conn, app_id, description, scopes=scopes, expires_at=expires_at)
    owner = "the operator" if operator else f"application {app_id}"
    if as_json:
        print(
            json.dumps(
                {
                    "key_id": key_id,
                    "app_id": app_id,
                    "scopes": list(scopes),
                    "expires_at": expires_at.isoformat() if expires_at else None,
                    "key": key,
                }
            )
        )
    else:
        until = f", expires {expires_at:%Y-%m-%d %H:%M} UTC" if expires_at else ""
        err_console.print(
            f"{owner}: new key {key_id} with scope(s) {', '.join(scopes)}{until} (store it now, it is not shown again)"
        )
        print(key)


@app.command("list")
def keys_list(
    app_id: Annotated[str | None, typer.Argument(help="Only this application's keys.")] = None,
    operator: Annotated[bool, typer.Option("--operator", help="Only the operator's keys.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List keys (ids, owners, scopes, expiry, revocation; never the keys themselves)."""
    from pipeline.storage import apps

    with open_stores() as stores, stores.db.connection() as conn:
        found = apps.list_keys(conn, app_id, operator=operator)
    now = datetime.now(UTC)
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "key_id": k.key_id,
                        "app_id": k.app_id,
                        "scopes": list(k.scopes),
                        "description": k.description,
                        "created_at": k.created_at.isoformat(),
                        "expires_at": k.expires_at.isoformat() if k.expires_at else None,
                        "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                        "active": k.active(now),
                    }
                    for k in found
                ]
            )
        )
        return
    table = Table("key", "owner", "scopes", "state", "created", "expires", "description")
    for k in found:
        state = "revoked" if k.revoked_at else ("active" if k.active(now) else "expired")
        table.add_row(
            k.key_id,
            k.app_id or "(operator)",
            ",".join(k.scopes),
            state,
            f"{k.created_at:%Y-%m-%d %H:%M}",
            f"{k.expires_at:%Y-%m-%d %H:%M}" if k.expires_at else "never",
            k.description,
        )
    console.print(table)


@app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key id (`keys list`).")]) -> None:
    """Revoke one key. The ingest API refuses it at once; serving workers within their key cache's TTL
    (PERSONA_SERVE_KEY_CACHE_TTL_S)."""
    from pipeline.storage import apps

    with open_stores() as stores, stores.db.connection() as conn:
        k = apps.revoke_key(conn, key_id)
    owner = k.app_id or "the operator"
    console.print(f"key {k.key_id} of {owner} is revoked (since {k.revoked_at:%Y-%m-%d %H:%M:%S} UTC)")
