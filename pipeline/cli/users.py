"""`persona users list|show`: users, their identity, buffers and adapters."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.table import Table

from pipeline.cli.common import JsonOpt, console, open_stores
from pipeline.domain.revisions import User

app = typer.Typer(help="Users: identity, buffers and their adapters.", no_args_is_help=True)


def ts(t: Any) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _user_json(u: User) -> dict[str, Any]:
    return {
        "user_id": u.user_id,
        "app": u.app,
        "labels": u.labels,
        "created_at": u.created_at.isoformat(),
        "production": u.production,
        "revisions": u.revisions,
        "pending_events": u.pending_events,
        "total_events": u.total_events,
    }


@app.command("list")
def users_list(
    prefix: Annotated[str, typer.Option(help="Only users whose id starts with this.")] = "",
    after: Annotated[str, typer.Option(help="Start after this user id (paging).")] = "",
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Users by id: application, production revision, revisions, pending and total events."""
    from pipeline.storage import registry

    with open_stores() as stores, stores.db.connection() as conn:
        found = registry.list_users(conn, prefix=prefix, after=after, limit=limit)
    if as_json:
        print(json.dumps([_user_json(u) for u in found]))
        return
    table = Table("user", "app", "production", "revisions", "pending", "events", "since", title="users")
    for u in found:
        table.add_row(
            u.user_id,
            u.app,
            u.production or "-",
            str(u.revisions),
            str(u.pending_events),
            str(u.total_events),
            ts(u.created_at),
        )
    console.print(table)


@app.command("show")
def users_show(user_id: str, as_json: JsonOpt = False) -> None:
    """One user: identity, buffer by kind and split, production revision and the alias history."""
    from pipeline.storage import buffers, registry

    with open_stores() as stores, stores.db.connection() as conn:
        user = registry.get_user(conn, user_id)
        kinds = buffers.kind_counts(conn, [user_id])
        history = registry.alias_history(conn, user_id)
    if as_json:
        print(
            json.dumps(
                {
                    **_user_json(user),
                    "events": [{"kind": k, "split": s, "count": n} for (_, k, s), n in sorted(kinds.items())],
                    "alias_history": [
                        {
                            "from": m.from_revision,
                            "to": m.to_revision,
                            "reason": m.reason,
                            "actor": m.actor,
                            "at": m.at.isoformat(),
                        }
                        for m in history
                    ],
                }
            )
        )
        return
    console.print(f"[bold]{user.user_id}[/bold]  app {user.app}  since {ts(user.created_at)}  labels {user.labels}")
    console.print(
        f"production: {user.production or 'none'}   revisions: {user.revisions}   "
        f"events: {user.total_events} ({user.pending_events} pending)"
    )
    table = Table("kind", "train", "holdout", title="buffered events")
    for kind in sorted({k for _, k, _ in kinds}):
        table.add_row(kind, str(kinds.get((user_id, kind, "train"), 0)), str(kinds.get((user_id, kind, "holdout"), 0)))
    console.print(table)
    hist = Table("at", "from", "to", "reason", "actor", title="production alias history")
    for m in history:
        hist.add_row(ts(m.at), m.from_revision or "-", m.to_revision, m.reason, m.actor)
    console.print(hist)
