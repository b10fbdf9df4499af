"""The ``persona`` command. Tables by default, ``--json`` where scripts need it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipeline import registry_cli
from pipeline.cli_common import make_console, resolved_db
from pipeline.domain.errors import PersonaError
from pipeline.observability import logs

app = typer.Typer(help="persona: one personal LoRA adapter per user over one shared base model.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
apps_app = typer.Typer(help="Applications that send events, and their API keys.", no_args_is_help=True)
ingest_app = typer.Typer(help="HTTP ingest API.", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(apps_app, name="apps")
app.add_typer(ingest_app, name="ingest")
app.add_typer(config_app, name="config")

console = make_console()
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@app.callback()
def _root(log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO") -> None:
    logs.setup(log_level.upper())


def _mount_stack() -> None:
    from pipeline.stack.cli import app as stack_app

    app.add_typer(stack_app, name="stack", help="Embedded local stack: Kafka protocol, S3, PostgreSQL, Redis.")


_mount_stack()


def _mount_model() -> None:
    from pipeline.models.cli import app as model_app

    app.add_typer(model_app, name="model", help="The shared, frozen base model.")


_mount_model()


def _mount_gate() -> None:
    from pipeline.evaluation.gate_cli import app as gate_app

    app.add_typer(gate_app, name="gate", help="The gate: operator rules, check and replay.")


_mount_gate()
registry_cli.mount(app)


# --- db ---
@db_app.command("migrate")
def db_migrate() -> None:
    """Apply the SQL migrations in schemas/sql that are not applied yet (idempotent)."""
    from pipeline.storage import db

    done = db.migrate(resolved_db())
    if done:
        for m in done:
            console.print(f"applied {m.path.name}")
    else:
        console.print("database is up to date")


@db_app.command("status")
def db_status(as_json: JsonOpt = False) -> None:
    """List the applied migrations."""
    from pipeline.storage import db

    rows = db.applied(resolved_db())
    if as_json:
        print(json.dumps([{"version": v, "name": n, "applied_at": t} for v, n, t in rows]))
        return
    table = Table("version", "name", "applied at")
    for v, n, t in rows:
        table.add_row(f"{v:04d}", n, t)
    console.print(table)


# --- apps ---
@apps_app.command("create")
def apps_create(
    app_id: str, description: Annotated[str, typer.Option(help="Free text shown by `apps list`.")] = ""
) -> None:
    """Register an application (if new) and issue it an API key. The key is printed once; only its hash is kept."""
    from pipeline.storage import apps, db

    with db.connect(resolved_db()) as conn:
        key_id, key = apps.create_key(conn, app_id, description)
    Console(stderr=True).print(f"application {app_id}: new key {key_id} (store it now, it is not shown again)")
    print(key)


@apps_app.command("list")
def apps_list(as_json: JsonOpt = False) -> None:
    """List applications and their keys (ids only)."""
    from pipeline.storage import apps, db

    with db.connect(resolved_db()) as conn:
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
    from pipeline.storage import apps, db

    with db.connect(resolved_db()) as conn:
        revoked = apps.revoke(conn, app_id, key)
    console.print(f"revoked {len(revoked)} key(s) of {app_id}: {', '.join(revoked) or 'none were active'}")


# --- processes ---
@ingest_app.command("serve")
def ingest_serve(
    host: Annotated[str | None, typer.Option(help="Listen address (default PERSONA_INGEST_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default PERSONA_INGEST_PORT).")] = None,
) -> None:
    """Run the HTTP ingest API (POST /v1/events)."""
    from pipeline.config import IngestSettings
    from pipeline.ingest.api import serve

    cfg = IngestSettings()
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    serve(cfg.model_copy(update=overrides) if overrides else cfg, resolved_db())


@app.command("consume")
def consume() -> None:
    """Run one buffer consumer (Kafka -> PostgreSQL) until SIGTERM; run more for more partitions in parallel."""
    from pipeline.ingest.consumer import main

    main(database=resolved_db())


@app.command("worker")
def worker(
    queues: Annotated[str, typer.Option(help="Comma-separated Celery queues to serve.")] = "train",
    name: Annotated[str | None, typer.Option(help="Worker name (default persona-QUEUES@host).")] = None,
) -> None:
    """Run a Celery worker (solo pool: one task at a time, the process owns its model)."""
    from pipeline.config import WorkerSettings

    cfg = WorkerSettings()
    if cfg.metrics_port:
        from prometheus_client import start_http_server

        start_http_server(cfg.metrics_port, addr=cfg.metrics_host)
    from workers.celery_app import app as celery

    celery.worker_main(
        [
            "worker",
            "-Q",
            queues,
            "--pool",
            "solo",
            "--concurrency",
            "1",
            "-n",
            name or f"persona-{queues.replace(',', '-')}@%h",
            "--loglevel",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
    )


@app.command("beat")
def beat(
    once: Annotated[bool, typer.Option("--once", help="Run one tick and exit.")] = False,
    metrics_port: Annotated[int, typer.Option(help="Prometheus port (0 = none).")] = 9103,
) -> None:
    """Run the scheduler: every tick, enqueue the due users' retrains in batches (safe to run more than one)."""
    import signal
    import threading

    import redis

    from pipeline import scheduler
    from pipeline.config import Settings
    from workers.celery_app import QUEUES
    from workers.celery_app import app as celery

    base = Settings()
    settings = Settings(resolved_db(), base.policy)
    broker = redis.Redis.from_url(celery.conf.broker_url)

    enqueue = scheduler.celery_enqueue(celery)  # batches of PERSONA_TRAIN_BATCH_USERS, one task each

    if once:
        users = scheduler.tick(settings, enqueue)
        console.print(f"enqueued {len(users)} user(s){': ' + ', '.join(users) if users else ''}")
        return
    if metrics_port:
        from prometheus_client import start_http_server

        from pipeline.config import WorkerSettings

        start_http_server(metrics_port, addr=WorkerSettings().metrics_host)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    def depths() -> dict[str, int]:
        """Queue depths for the scheduler's gauge; the buffer gauges are set here too, once per tick."""
        from pipeline.observability import metrics
        from pipeline.storage import buffers, db

        with db.connect(settings.db) as conn:
            pending, age = buffers.pending_totals(conn)
        metrics.BUFFER_PENDING.set(pending)
        metrics.BUFFER_OLDEST_PENDING_AGE.set(age)
        return {q: int(broker.llen(q)) for q in QUEUES}

    scheduler.run(settings, enqueue, stop, depths)


@app.command("serve")
def serve(
    host: Annotated[str | None, typer.Option(help="Listen address (default PERSONA_SERVE_HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default PERSONA_SERVE_PORT).")] = None,
) -> None:
    """Run a serving worker: OpenAI-compatible API over the base and users' adapters (batched multi-LoRA)."""
    from pipeline.config import Settings
    from pipeline.models.base import load_configured
    from pipeline.serving.api import serve as run_server

    base = Settings()
    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    serving = base.serving.model_copy(update=overrides) if overrides else base.serving
    settings = Settings(resolved_db(), base.s3, base.kafka, base.model, serving)
    run_server(settings, load_configured(settings.model))


router_app = typer.Typer(help="The nginx router of a serving pool.", no_args_is_help=True)
app.add_typer(router_app, name="router")


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


# --- config, demo ---
@config_app.command("table")
def config_table() -> None:
    """Print the configuration table (Markdown) generated from the settings classes."""
    from pipeline.reports import config_markdown

    print(config_markdown())


@app.command("demo")
def demo(
    users: Annotated[int, typer.Option(min=1, max=100, help="Simulated users.")] = 4,
    events: Annotated[int, typer.Option(min=15, max=10000, help="Events per user.")] = 80,
    steps: Annotated[int, typer.Option(min=1, max=10000, help="Training steps per retrain, at most.")] = 30,
    seed: Annotated[int | None, typer.Option(help="Seed of the simulator (default: a new one each run).")] = None,
    prefix: Annotated[
        str | None,
        typer.Option(help="User id prefix (default: new users each run; an earlier run's prefix retrains its users)."),
    ] = None,
    base: Annotated[
        str | None, typer.Option(help="Base model (default: PERSONA_MODEL_BASE, i.e. smollm2-135m).")
    ] = None,
    prompt: Annotated[str, typer.Option(help="The prompt answered side by side at the end.")] = "",
) -> None:
    """The whole loop on the embedded stack: simulated users -> ingest -> buffers -> training -> gate -> serving."""
    from pipeline.demo import DEFAULT_PROMPT, DemoOptions, run

    opts = DemoOptions(users, events, steps, seed, prefix, base, prompt or DEFAULT_PROMPT)
    run(opts, console=console)


def main() -> None:
    """Entry point of the `persona` console script: domain errors become one clear line and exit code 1."""
    try:
        app()
    except PersonaError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
