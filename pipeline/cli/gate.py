"""`persona gate check|replay`: the operator's gating rules from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.cli.common import console, open_stores
from pipeline.domain.gating import effective_rules, ruleset_digest
from pipeline.evaluation.rules import RulesError, load_rules

app = typer.Typer(help="The gate: operator rules that decide whether a candidate revision is promoted.")


@app.callback()
def _group() -> None:
    """The gate: operator rules that decide whether a candidate revision is promoted."""


@app.command("check")
def check_command(
    rules: Annotated[Path, typer.Argument(help="Rules file (YAML, schemas/gating/rules.v1.json).")],
    user: Annotated[str | None, typer.Option(help="Also print the rules in effect for this user.")] = None,
    app_id: Annotated[str | None, typer.Option("--app", help="Also print the rules in effect for this app.")] = None,
) -> None:
    """Validate a rules file: `ok: ...` and its digest, or every mistake as FILE:LINE:COL: field: message (exit 1)."""
    try:
        ruleset = load_rules(rules)
    except RulesError as e:
        for problem in e.problems:
            typer.echo(str(problem))
        raise typer.Exit(1) from e
    n, o = len(ruleset.rules), len(ruleset.overrides)
    typer.echo(f"ok: {n} rule{'s' * (n != 1)}, {o} override{'s' * (o != 1)}, digest {ruleset_digest(ruleset)}")
    if user is not None or app_id is not None:
        who = " in ".join(s for s in (f"user {user}" if user else "", f"app {app_id}" if app_id else "") if s)
        typer.echo(f"rules in effect for {who}:")
        for r in effective_rules(ruleset, user, app_id):
            fields = ", ".join(f"{k}: {v}" for k, v in r.to_dict().items() if k not in ("name", "kind", "enabled"))
            typer.echo(f"  {r.name} ({r.kind}) {fields}")


@app.command("replay")
def replay_command(
    rules: Annotated[Path, typer.Option("--rules", help="The rules to replay the stored decisions under.")],
    since: Annotated[
        str | None, typer.Option(help="Only decisions made at or after this time (RFC 3339 or YYYY-MM-DD).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Recompute the stored decisions under RULES and print those that would flip. Writes nothing."""
    import json
    from datetime import datetime

    from rich.table import Table

    from pipeline.domain.gating import Decision
    from pipeline.domain.replay import PastDecision, flips
    from pipeline.storage import decisions

    try:
        ruleset = load_rules(rules)
    except RulesError as e:
        for problem in e.problems:
            typer.echo(str(problem), err=True)
        raise typer.Exit(1) from e
    try:
        t = datetime.fromisoformat(since) if since else None
    except ValueError as e:
        raise typer.BadParameter(f"--since must be RFC 3339 or YYYY-MM-DD, got {since!r}") from e
    with open_stores() as stores, stores.db.connection() as conn:
        stored = [d for d in decisions.since(conn, t) if d.outcome != "stale"]  # stale: no rules were applied
    by_id = {d.id: d for d in stored}
    past = [PastDecision(d.id, d.metrics, d.user_id, d.app, d.passed, Decision.from_dict(d.results)) for d in stored]
    found = flips(past, ruleset)
    rows: list[dict[str, Any]] = [
        {
            "revision_id": by_id[f.id].revision_id,
            "user_id": by_id[f.id].user_id,
            "was": by_id[f.id].outcome,
            "would_pass": f.now_passed,
            "reason": f.decision.reason,
            "changed": list(f.changed),
        }
        for f in found
    ]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    table = Table(
        "revision",
        "user",
        "was",
        "would be",
        "reason under the new rules",
        title=f"{len(rows)} of {len(stored)} decisions would flip under {rules} (nothing was written)",
    )
    for r in rows:
        table.add_row(
            r["revision_id"], r["user_id"], r["was"], "promoted" if r["would_pass"] else "rejected", r["reason"]
        )
    console.print(table)
