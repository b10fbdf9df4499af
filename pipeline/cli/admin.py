"""`persona db migrate|status` and `persona apps create|list|revoke`: the database schema and applications."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from pipeline.cli.common import JsonOpt, console, err_console, open_stores, settings

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
apps_app = typer.Typer(help="Applications that send events, and their API keys.", no_args_is_help=True)


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply the SQL migrations in schemas/sql that are not applied yet (idempotent)."""
    from pipeline.storage import db

    done = db.migrate(settings().db)
    if done:
        for m in done:
            console.print(f"applied {m.path.name}")
    else:
        console.print("database is up to date")


@db_app.command("status")
def db_status(as_json: JsonOpt = False) -> None:
    """List the applied migrations."""
    from pipeline.storage import db

    rows = db.applied(settings().db)
    if as_json:
        print(json.dumps([{"version": v, "name": n, "applied_at": t} for v, n, t in rows]))
        return
    table = Table("version", "name", "applied at")
    for v, n, t in rows:
        table.add_row(f"{v:04d}", n, t)
    console.print(table)


@apps_app.command("create")
def apps_create(
    app_id: str, description: Annotated[str, typer.Option(help="Free text shown by `apps list`.")] = ""
) -> None:
    """Register an application (if new) and issue it a key with the scopes ingest and serve (`apps keys create` for
    other scopes or an expiry). The key is printed once; only its hash is kept."""
    from pipeline.storage import apps

    with open_stores() as stores, stores.db.connection() as conn:
        key_id, key = apps.create_key(conn, app_id, description)
    err_console.print(f"application {app_id}: new key {key_id} (store it now, it is not shown again)")
    print(key)


@apps_app.command("list")
def apps_list(as_json: JsonOpt = False) -> None:
    """List applications and their keys (ids only)."""
    from pipeline.storage import apps

    with open_stores() as stores, stores.db.connection() as conn:
        found = apps.list_apps(conn)
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "app_id": a.app_id,
                        "description": a.description,
                        "created_at": a.created_at.isoformat(),
                        "keys": [
                            {
                                "key_id": k.key_id,
                                "created_at": k.created_at.isoformat(),
                                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
                            }
                            for k in a.keys
                        ],
                    }
                    for a in found
                ]
            )
        )
        return
    table = Table("app", "description", "active keys", "revoked keys", "created")
    for a in found:
        table.add_row(
            a.app_id,
            a.description,
            str(a.active_keys),
            str(len(a.keys) - a.active_keys),
            a.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@apps_app.command("revoke")
def apps_revoke(
    app_id: str, key: Annotated[str | None, typer.Option("--key", help="Revoke only this key id.")] = None
) -> None:
    """Revoke an application's keys (all of them, or one with --key). Requests with them then get 401."""
    from pipeline.storage import apps

    with open_stores() as stores, stores.db.connection() as conn:
        revoked = apps.revoke(conn, app_id, key)
    console.print(f"revoked {len(revoked)} key(s) of {app_id}: {', '.join(revoked) or 'none were active'}")
