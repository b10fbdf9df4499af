"""The long-running processes of a deployment: `persona ingest serve`, `consume`, `worker`, `beat`, `serve`, and
`persona router config` for a serving pool's nginx.

`worker` and `beat` hand the process over to ``python -m workers`` (the Celery side lives in the workers package,
which the library never imports), with the service URLs of the local stack in its environment.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from pipeline.cli.common import service_env, settings
from pipeline.config import child_env

ingest_app = typer.Typer(help="HTTP ingest API.", no_args_is_help=True)
router_app = typer.Typer(help="The nginx router of a serving pool.", no_args_is_help=True)


def _hand_over(args: list[str]) -> NoReturn:
    """Replace this process by ``python -m workers ARGS`` (same pid: signals reach it directly)."""
    env = child_env(**service_env(settings()))
    level = logging.getLevelName(logging.getLogger().level)
    argv = [sys.executable, "-m", "workers", "--log-level", str(level), *args]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)  # noqa: S606 - a fixed program (this Python), arguments as a list


@ingest_app.command("serve")
def ingest_serve(
    host: Annotated[str | None, typer.Option(help="Listen address (default PERSONA_INGEST_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default PERSONA_INGEST_PORT).")] = None,
) -> None:
    """Run the HTTP ingest API (POST /v1/events)."""
    from pipeline.ingest.api import serve

    resolved = settings()
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    cfg = resolved.ingest.model_copy(update=overrides) if overrides else resolved.ingest
    serve(cfg, resolved.db, resolved.kafka, resolved.events)


def consume() -> None:
    """Run one buffer consumer (Kafka -> PostgreSQL) until SIGTERM; run more for more partitions in parallel."""
    from pipeline.ingest.consumer import main

    resolved = settings()
    main(kafka=resolved.kafka, consumer=resolved.consumer, database=resolved.db, events=resolved.events)


def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated Celery queues to serve.")] = "train",
    name: Annotated[str | None, typer.Option(help="Worker name (default persona-QUEUES@host).")] = None,
) -> None:
    """Run a Celery worker (solo pool: one task at a time, the process owns its model)."""
    _hand_over(["worker", "--queues", queues, *(["--name", name] if name else [])])


def beat(
    once: Annotated[bool, typer.Option("--once", help="Run one tick and exit.")] = False,
    metrics_port: Annotated[int, typer.Option(help="Prometheus port (0 = none).")] = 9103,
) -> None:
    """Run the scheduler: every tick, enqueue the due users' retrains in batches (safe to run more than one)."""
    _hand_over(["beat", "--metrics-port", str(metrics_port), *(["--once"] if once else [])])


def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (default PERSONA_SERVE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default PERSONA_SERVE_PORT).")] = None,
) -> None:
    """Run a serving worker: OpenAI-compatible API over the base and users' adapters (batched multi-LoRA)."""
    from pipeline.models.base import load_configured
    from pipeline.models.prepare import needs_prepare, prepare
    from pipeline.serving.api import serve as run_server

    resolved = settings()
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    if overrides:
        resolved = resolved.replace(resolved.serving.model_copy(update=overrides))
    if needs_prepare(resolved.model.base):  # once per machine
        prepare(resolved.model)
    run_server(resolved, load_configured(resolved.model))


def console(
    host: Annotated[str | None, typer.Option(help="Listen address (default PERSONA_CONSOLE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default PERSONA_CONSOLE_PORT).")] = None,
) -> None:
    """Run the operator console (web pages: users, lineage, decisions, rules what-if, pipeline; promote, roll back,
    forget behind an admin-key login). It hands the process over to ``python -m pipeline.console``."""
    resolved = settings()
    overrides = {
        "PERSONA_CONSOLE_HOST": host or resolved.console.host,
        "PERSONA_CONSOLE_PORT": str(port or resolved.console.port),
    }
    env = child_env(**service_env(resolved), **overrides)
    level = logging.getLevelName(logging.getLogger().level)
    print(f"persona console: http://{overrides['PERSONA_CONSOLE_HOST']}:{overrides['PERSONA_CONSOLE_PORT']}/")
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, "-m", "pipeline.console", "--log-level", str(level)]
    os.execve(sys.executable, argv, env)  # noqa: S606 - a fixed program (this Python), arguments as a list


@router_app.command("config")
def router_config(
    workers: Annotated[str, typer.Option(help="Comma-separated host:port of the `persona serve` workers.")],
    listen: Annotated[str, typer.Option(help="Address nginx listens on.")] = "127.0.0.1:8080",
    run_dir: Annotated[Path, typer.Option(help="Folder for nginx's pid, log and temp files.")] = Path(
        ".persona/router"
    ),
) -> None:
    """Print the nginx configuration of a serving pool (consistent hashing on the user; see infra/nginx/)."""
    from pipeline.serving.router import nginx_config

    print(nginx_config([w.strip() for w in workers.split(",") if w.strip()], listen=listen, run_dir=run_dir))


COMMANDS = (consume, worker, beat, serve, console)
