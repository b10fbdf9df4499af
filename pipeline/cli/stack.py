"""`persona stack up|down|status`: the embedded local stack from the command line."""

from __future__ import annotations

import json
from typing import Annotated
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.cli.common import console as _out
from pipeline.config import Settings
from pipeline.stack import ServiceStatus, StackError, down, effective_urls, status, up

app = typer.Typer(
    help="The embedded local stack: Kafka protocol (tansu), S3 (SeaweedFS), PostgreSQL and Redis.",
    no_args_is_help=True,
)

_err = Console(stderr=True)


def _progress(message: str) -> None:
    _err.print(message, markup=False, highlight=False, soft_wrap=True)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def _table(statuses: list[ServiceStatus]) -> Table:
    table = Table("service", "address", "managed", "pid", "healthy", "detail")
    for s in statuses:
        table.add_row(
            s.name,
            escape(s.address),
            "managed" if s.managed else "external" if s.healthy else "-",
            str(s.pid) if s.pid is not None else "-",
            "[green]yes[/green]" if s.healthy else "[red]no[/red]",
            escape(s.detail),
            style=None if s.healthy else "dim",
        )
    return table


@app.command("up")
def up_command() -> None:
    """Start what is not already answering (idempotent); create the topics, buckets and database.

    S3 starts first: tansu keeps its topics and consumer offsets in the S3 server's bucket `tansu`
    (PERSONA_STACK_KAFKA_STORAGE=s3, the default), so they survive `down`/`up` and crashes.
    """
    settings = Settings()
    try:
        statuses = up(settings, console_progress=_progress)
    except StackError as e:
        _err.print(f"[red]stack up failed:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e
    _out.print(_table(statuses))
    urls = effective_urls(settings)
    _out.print(f"database: {_redacted(urls['db_url'])}", markup=False, highlight=False)
    _out.print(f"redis: {_redacted(urls['redis_url'])}", markup=False, highlight=False)


@app.command("down")
def down_command() -> None:
    """Stop the services that `up` started; external services are left alone."""
    try:
        stopped = down(Settings(), console_progress=_progress)
    except StackError as e:
        _err.print(f"[red]stack down failed:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e
    _out.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing to stop", highlight=False)


@app.command("status")
def status_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Probe every service; exit code 1 when any of them is unhealthy."""
    settings = Settings()
    try:
        statuses = status(settings)
    except StackError as e:
        _err.print(f"[red]stack status failed:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from e
    if as_json:
        urls = {k: _redacted(v) for k, v in effective_urls(settings).items()}
        payload = {"services": [s.as_dict() for s in statuses], "urls": urls}
        typer.echo(json.dumps(payload, indent=2))
    else:
        _out.print(_table(statuses))
    if not all(s.healthy for s in statuses):
        raise typer.Exit(1)
