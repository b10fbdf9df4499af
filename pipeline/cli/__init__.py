"""The ``persona`` command: one module per verb group; the only code that prints tables (with the demo's report).

Tables by default, ``--json`` where scripts need it. Domain errors end the command with one clear line and exit
code 1. Heavy libraries (torch, transformers) are imported inside the commands that need them, so ``persona
--help`` and the operator commands start fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from pipeline.cli import adapters, admin, config, demo, gate, keys, model, processes, revisions, stack, users
from pipeline.cli.common import err_console
from pipeline.domain.errors import PersonaError
from pipeline.observability import logs

app = typer.Typer(help="persona: one personal LoRA adapter per user over one shared base model.", no_args_is_help=True)


@app.callback()
def _root(log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO") -> None:
    logs.setup(log_level.upper())


app.add_typer(stack.app, name="stack", help="Embedded local stack: Kafka protocol, S3, PostgreSQL, Redis.")
app.add_typer(admin.db_app, name="db")
admin.apps_app.add_typer(keys.app, name="keys")
app.add_typer(admin.apps_app, name="apps")
app.add_typer(model.app, name="model", help="The shared, frozen base model.")
app.add_typer(processes.ingest_app, name="ingest")
app.add_typer(processes.router_app, name="router")
app.add_typer(users.app, name="users")
app.add_typer(revisions.app, name="revisions")
app.add_typer(gate.app, name="gate", help="The gate: operator rules, check and replay.")
app.add_typer(config.app, name="config")
for command in (*processes.COMMANDS, *adapters.COMMANDS, demo.demo):
    app.command(command.__name__)(command)


def main() -> None:
    """Entry point of the `persona` console script: domain errors become one clear line and exit code 1."""
    try:
        app()
    except PersonaError as e:
        err_console.print(f"[red]error:[/red] {e}")
        sys.exit(1)
