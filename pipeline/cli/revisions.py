"""`persona revisions list|show|lineage`: the revisions of users' adapters and their provenance."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.table import Table
from rich.tree import Tree

from pipeline.cli.common import JsonOpt, console, open_stores
from pipeline.cli.users import ts
from pipeline.domain.revisions import LineageNode, Revision, lineage

app = typer.Typer(help="Revisions of users' adapters.", no_args_is_help=True)


def _rev_json(r: Revision, *, manifest: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
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


@app.command("list")
def revisions_list(user_id: str, as_json: JsonOpt = False) -> None:
    """A user's revisions, oldest first."""
    from pipeline.storage import registry

    with open_stores() as stores, stores.db.connection() as conn:
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
            r.revision_id, r.parent_id or "-", r.status, serving, f"{r.size_bytes:,}", r.sha256[:12], ts(r.created_at)
        )
    console.print(table)


@app.command("show")
def revisions_show(revision_id: str, as_json: JsonOpt = False) -> None:
    """One revision with its manifest (provenance)."""
    from pipeline.storage import registry

    with open_stores() as stores, stores.db.connection() as conn:
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
    return f"{r.revision_id}  [{r.status}]  {ts(r.created_at)}{extra}{mark}"


@app.command("lineage")
def revisions_lineage(user_id: str, as_json: JsonOpt = False) -> None:
    """The tree of a user's revisions with their status, and which one serves."""
    from pipeline.storage import registry

    with open_stores() as stores, stores.db.connection() as conn:
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
