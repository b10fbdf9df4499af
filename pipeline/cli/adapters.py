"""`persona promote|rollback|export|forget`: operator actions on a user's adapter (`pipeline.flows`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from pipeline.cli.common import JsonOpt, console, err_console, open_announcer, open_stores, settings

ActorOpt = Annotated[str, typer.Option(help="Who makes the change (recorded in the alias history).")]


def _warn(warning: str | None) -> None:
    if warning is not None:
        err_console.print(f"[yellow]warning:[/yellow] {warning}")


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
    from pipeline.flows import promotion

    expected: str | promotion.Current | None = promotion.CURRENT
    if expect is not None:
        expected = None if expect.lower() == "none" else expect.upper()
    resolved = settings()
    with open_stores(resolved) as stores, open_announcer(resolved) as announcer:
        done = promotion.promote(stores, announcer, user_id, revision_id, expected=expected, actor=actor)
    if done.move is None:
        console.print(f"{done.revision_id} already serves {user_id}; pointer republished")
    else:
        console.print(
            f"{user_id}: production {done.move.from_revision or 'none'} -> {done.move.to_revision}; pointer published"
        )
    _warn(done.warning)


def rollback(
    user_id: str,
    to: Annotated[str | None, typer.Option("--to", help="Revision to go back to (default: the previous one).")] = None,
    actor: ActorOpt = "operator",
) -> None:
    """Move the user's production alias back (compare-and-swap), record it and republish the pointer."""
    from pipeline.flows import promotion

    resolved = settings()
    with open_stores(resolved) as stores, open_announcer(resolved) as announcer:
        done = promotion.rollback(stores, announcer, user_id, to=to, actor=actor)
    if done.move is not None:
        moved = f"{done.move.from_revision} -> {done.move.to_revision}"
        console.print(f"{user_id}: production {moved} (rollback); pointer published")
    _warn(done.warning)


def export(
    user_id: str,
    directory: Path,
    revision: Annotated[str | None, typer.Option(help="Revision to export (default: production).")] = None,
) -> None:
    """Write a directory that stock `peft.PeftModel.from_pretrained` loads (sha256 verified), plus manifest.json."""
    from pipeline.flows.export import export as export_revision

    with open_stores() as stores:
        rev = export_revision(stores, user_id, directory, revision)
    console.print(f"exported {rev.revision_id} of {user_id} to {directory} (sha256 {rev.sha256[:12]} verified)")


def forget(
    user_id: str,
    as_json: JsonOpt = False,
    actor: Annotated[str, typer.Option(help="Who asked for the forget (recorded in the tombstone).")] = "operator",
) -> None:
    """Delete everything about USER_ID (events, buffer, revisions, alias, history, identity, objects) and leave a
    tombstone, so that late events and running trainings cannot bring it back; then say what was removed and what
    persona could not remove (records in Kafka's topics until their retention ends, caches not told)."""
    from pipeline.flows import promotion

    resolved = settings()
    with open_stores(resolved) as stores, open_announcer(resolved) as announcer:
        report = promotion.forget(stores, announcer, user_id, actor=actor, kafka=resolved.kafka)
    if as_json:
        print(json.dumps(report.to_dict()))
    else:
        at = report.forgotten_at.isoformat() if report.forgotten_at else "?"
        if report.nothing:
            console.print(f"nothing to remove: persona holds no data of {user_id!r}")
        else:
            rows = ", ".join(f"{n} {t}" for t, n in report.rows.items() if n)
            console.print(f"forgot {user_id}: removed {rows or 'no rows'}; {len(report.objects)} object(s)")
            for key in report.objects:
                console.print(f"  deleted {key}")
            if report.announced:
                console.print("  serving workers told to drop their cached copies (forget.v1 on the promotions topic)")
        console.print(
            f"  tombstone at {at} (by {report.actor}): events of this id that occurred until then are dropped"
        )
        if report.remaining:
            console.print("not removed (persona cannot delete these):")
            for r in report.remaining:
                console.print(f"  {r.where}: {r.what}; until {r.until}")
    if report.warning is not None:
        _warn(report.warning)
        raise typer.Exit(1)


COMMANDS = (promote, rollback, export, forget)
