"""Operator commands of the adapter registry: users, revisions, lineage, promote, rollback, export, forget.

Tables by default, ``--json`` for scripts. Mounted on the `persona` command by pipeline/cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from pipeline.cli_common import make_console, resolved_db
from pipeline.domain.revisions import LineageNode, Revision, User, lineage

users_app = typer.Typer(help="Users: identity, buffers and their adapters.", no_args_is_help=True)
revisions_app = typer.Typer(help="Revisions of users' adapters.", no_args_is_help=True)

console = make_console()
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
ActorOpt = Annotated[str, typer.Option(help="Who makes the change (recorded in the alias history).")]


def _registry():
    from pipeline.storage.objects import ObjectStore
    from pipeline.storage.registry import Registry

    return Registry(resolved_db(), ObjectStore())


def _announce(user_id: str, reason: str) -> None:
    """Tell the serving workers (persona.promotions.v1); the alias and pointer have moved whatever happens here."""
    from pipeline.config import KafkaSettings
    from pipeline.evaluation.promotion import AnnounceError, announce
    from pipeline.observability import metrics
    from pipeline.storage import db, registry

    with db.connect(resolved_db()) as conn:
        rev = registry.production(conn, user_id)
    if rev is None:
        return
    try:
        announce(KafkaSettings(), rev, reason=reason)
        metrics.PROMOTIONS.labels(reason).inc()
    except AnnounceError as e:
        console.print(f"[yellow]warning:[/yellow] {e}; run the command again to re-announce")


def _ts(t: Any) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _rev_json(r: Revision, *, manifest: bool = False) -> dict[str, Any]:
    out = {
        "revision_id": r.revision_id,
        "user_id": r.user_id,
        "parent_id": r.parent_id,
        "status": r.status,
        "artifact_uri": r.artifact_uri,
        "sha256": r.sha256,
        "size_bytes": r.size_bytes,
        "created_at": r.created_at.isoformat(),
        "status_at": r.status_at.isoformat(),
    }
    if manifest:
        out["manifest"] = r.manifest
    return out


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


# --- users ---
@users_app.command("list")
def users_list(
    prefix: Annotated[str, typer.Option(help="Only users whose id starts with this.")] = "",
    after: Annotated[str, typer.Option(help="Start after this user id (paging).")] = "",
    limit: Annotated[int, typer.Option(help="At most this many rows.")] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Users by id: application, production revision, revisions, pending and total events."""
    from pipeline.storage import db, registry

    with db.connect(resolved_db()) as conn:
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
            _ts(u.created_at),
        )
    console.print(table)


@users_app.command("show")
def users_show(user_id: str, as_json: JsonOpt = False) -> None:
    """One user: identity, buffer by kind and split, production revision and the alias history."""
    from pipeline.storage import buffers, db, registry

    with db.connect(resolved_db()) as conn:
        user = registry.get_user(conn, user_id)
        kinds = {k: n for k, n in buffers.kind_counts(conn, user_prefix=user_id).items() if k[0] == user_id}
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
    console.print(f"[bold]{user.user_id}[/bold]  app {user.app}  since {_ts(user.created_at)}  labels {user.labels}")
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
        hist.add_row(_ts(m.at), m.from_revision or "-", m.to_revision, m.reason, m.actor)
    console.print(hist)


# --- revisions ---
@revisions_app.command("list")
def revisions_list(user_id: str, as_json: JsonOpt = False) -> None:
    """A user's revisions, oldest first."""
    from pipeline.storage import db, registry

    with db.connect(resolved_db()) as conn:
        revs = registry.list_revisions(conn, user_id)
        prod = registry.production(conn, user_id)
    if as_json:
        print(json.dumps([_rev_json(r) for r in revs]))
        return
    table = Table(
        "revision", "parent", "status", "serving", "size", "sha256", "created", title=f"revisions of {user_id}"
    )
    for r in revs:
        serving = "yes" if prod and prod.revision_id == r.revision_id else ""
        table.add_row(
            r.revision_id, r.parent_id or "-", r.status, serving, f"{r.size_bytes:,}", r.sha256[:12], _ts(r.created_at)
        )
    console.print(table)


@revisions_app.command("show")
def revisions_show(revision_id: str, as_json: JsonOpt = False) -> None:
    """One revision with its manifest (provenance)."""
    from pipeline.storage import db, registry

    with db.connect(resolved_db()) as conn:
        rev = registry.get_revision(conn, revision_id)
    if as_json:
        print(json.dumps(_rev_json(rev, manifest=True)))
        return
    for k, v in _rev_json(rev).items():
        console.print(f"[bold]{k:>13}[/bold]  {v}")
    console.print_json(json.dumps(rev.manifest))


def _tree_label(n: LineageNode) -> str:
    r = n.revision
    loss = r.manifest.get("metrics", {}).get("holdout_nll")
    extra = f"  holdout_nll {loss:.3f}" if isinstance(loss, int | float) else ""
    mark = "  [green]<- serving[/green]" if n.serving else ""
    return f"{r.revision_id}  [{r.status}]  {_ts(r.created_at)}{extra}{mark}"


@revisions_app.command("lineage")
def revisions_lineage(user_id: str, as_json: JsonOpt = False) -> None:
    """The tree of a user's revisions with their status, and which one serves."""
    from pipeline.storage import db, registry

    with db.connect(resolved_db()) as conn:
        revs = registry.list_revisions(conn, user_id)
        prod = registry.production(conn, user_id)
    roots = lineage(revs, prod.revision_id if prod else None)
    if as_json:

        def node(n: LineageNode) -> dict[str, Any]:
            return {
                "revision_id": n.revision.revision_id,
                "status": n.revision.status,
                "serving": n.serving,
                "children": [node(c) for c in n.children],
            }

        print(json.dumps([node(r) for r in roots]))
        return
    tree = Tree(f"[bold]{user_id}[/bold] ({len(revs)} revisions)")

    def add(parent: Tree, n: LineageNode) -> None:
        branch = parent.add(_tree_label(n))
        for c in n.children:
            add(branch, c)

    for r in roots:
        add(tree, r)
    console.print(tree)


# --- alias moves, export, forget ---
def promote(
    user_id: str,
    revision_id: str,
    expect: Annotated[
        str | None,
        typer.Option(
            help="Fail unless production is this revision now ('none': no "
            "production yet). Default: whatever it is when read."
        ),
    ] = None,
    actor: ActorOpt = "operator",
) -> None:
    """Make REVISION_ID the user's production revision (compare-and-swap of the alias) and publish the pointer."""
    from pipeline.storage.registry import _KEEP

    expected: Any = _KEEP if expect is None else (None if expect.lower() == "none" else expect.upper())
    move = _registry().promote(user_id, revision_id, expected=expected, actor=actor)
    if move is None:
        console.print(f"{revision_id.upper()} already serves {user_id}; pointer republished")
    else:
        console.print(f"{user_id}: production {move.from_revision or 'none'} -> {move.to_revision}; pointer published")
    _announce(user_id, "promote")


def rollback(
    user_id: str,
    to: Annotated[str | None, typer.Option("--to", help="Revision to go back to (default: the previous one).")] = None,
    actor: ActorOpt = "operator",
) -> None:
    """Move the user's production alias back (compare-and-swap), record it and republish the pointer."""
    move = _registry().rollback(user_id, to=to, actor=actor)
    console.print(f"{user_id}: production {move.from_revision} -> {move.to_revision} (rollback); pointer published")
    _announce(user_id, "rollback")


def export(
    user_id: str,
    directory: Path,
    revision: Annotated[str | None, typer.Option(help="Revision to export (default: production).")] = None,
) -> None:
    """Write a directory that stock `peft.PeftModel.from_pretrained` loads (sha256 verified), plus manifest.json."""
    rev = _registry().export(user_id, directory, revision)
    console.print(f"exported {rev.revision_id} of {user_id} to {directory} (sha256 {rev.sha256[:12]} verified)")


def forget(user_id: str, as_json: JsonOpt = False) -> None:
    """Delete everything about USER_ID: events, buffer, revisions, alias, history, identity and objects."""
    from pipeline.config import KafkaSettings
    from pipeline.evaluation.promotion import AnnounceError, announce_forget

    report = _registry().forget(user_id)
    warning = None
    if not report.nothing:
        try:  # the serving workers drop their cached copies (host, device slots and disk)
            announce_forget(KafkaSettings(), user_id, report.sha256s)
        except AnnounceError as e:
            warning = (
                f"{e}; serving workers may keep cached copies of {', '.join(s[:12] for s in report.sha256s)} "
                "until they evict them or restart (their disk tier: PERSONA_SERVE_CACHE_DIR/<sha256>)"
            )
    if as_json:
        out = {"user_id": user_id, "rows": report.rows, "objects": report.objects, "sha256s": report.sha256s}
        print(json.dumps({**out, "announced": warning is None and not report.nothing}))
    elif report.nothing:
        console.print(f"nothing to remove: persona holds no data of {user_id!r}")
    else:
        rows = ", ".join(f"{n} {t}" for t, n in report.rows.items() if n)
        console.print(f"forgot {user_id}: removed {rows or 'no rows'}; {len(report.objects)} object(s)")
        for key in report.objects:
            console.print(f"  deleted {key}")
        if warning is None:
            console.print("  serving workers told to drop their cached copies (forget.v1 on the promotions topic)")
    if warning is not None:
        Console(stderr=True).print(f"[yellow]warning:[/yellow] {warning}")
        raise typer.Exit(1)


def mount(app: typer.Typer) -> None:
    """Add the registry commands to the `persona` command."""
    app.add_typer(users_app, name="users")
    app.add_typer(revisions_app, name="revisions")
    for fn in (promote, rollback, export, forget):
        app.command(fn.__name__)(fn)
