"""`python -m workers worker ...` and `python -m workers beat ...`: the training worker and the scheduler.

`persona worker` and `persona beat` hand their process over to these (with the service URLs of the local stack
in the environment), so the library never imports the worker side. Settings come from ``PERSONA_*`` variables.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable

from pipeline.config import Settings
from pipeline.domain.tasks import QUEUES, TRAIN_QUEUE
from pipeline.observability import logs
from pipeline.storage.db import Database, StorageError

log = logging.getLogger("workers")


def _metrics_server(port: int, host: str) -> None:
    if port:
        from prometheus_client import start_http_server

        start_http_server(port, addr=host)


def worker(queues: str, name: str | None) -> None:
    """A Celery worker on ``queues`` (solo pool: one task at a time, the process owns its model)."""
    from pipeline.models.prepare import needs_prepare, prepare

    settings = Settings()
    if needs_prepare(settings.model.base):  # once per machine, before the first task waits for it
        prepare(settings.model)
    _metrics_server(settings.worker.metrics_port, settings.worker.metrics_host)
    from workers.celery_app import app

    app.worker_main(
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


def _open_database(settings: Settings, stop: threading.Event) -> Database | None:
    """The scheduler's pool, retried with backoff while PostgreSQL does not answer (None if stopped meanwhile)."""
    delay = 1.0
    while not stop.is_set():
        try:
            return Database(settings.db, name="persona-beat")
        except StorageError as e:
            log.warning("%s; retrying in %.0f s", e, delay)
            stop.wait(delay)
            delay = min(delay * 2, 30.0)
    return None


def beat(once: bool, metrics_port: int) -> None:
    """The scheduler: every tick, enqueue the due users' retrains in batches (safe to run more than one)."""
    import redis

    from pipeline.flows import schedule
    from workers.celery_app import make_app, retrain_enqueuer

    settings = Settings()
    enqueue = retrain_enqueuer(make_app(settings))
    stop = threading.Event()
    if once:
        with Database(settings.db, name="persona-beat") as database:
            users = schedule.tick(database, settings.policy, settings.training.batch_users, enqueue)
        print(f"enqueued {len(users)} user(s){': ' + ', '.join(users) if users else ''}")
        return
    _metrics_server(metrics_port, settings.worker.metrics_host)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    opened = _open_database(settings, stop)
    if opened is None:
        return
    broker = redis.Redis.from_url(settings.redis.url)

    def depths() -> dict[str, int]:
        return {q: int(broker.llen(q)) for q in QUEUES}

    try:
        schedule.run(opened, settings.policy, settings.training.batch_users, enqueue, stop, depths)
    finally:
        opened.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m workers", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("worker", help="a Celery worker (training and evaluation)")
    w.add_argument("--queues", default=TRAIN_QUEUE, help="comma-separated Celery queues to serve")
    w.add_argument("--name", default=None, help="worker name (default persona-QUEUES@host)")
    b = sub.add_parser("beat", help="the scheduler")
    b.add_argument("--once", action="store_true", help="run one tick and exit")
    b.add_argument("--metrics-port", type=int, default=9103, help="Prometheus port (0 = none)")
    args = parser.parse_args(argv)
    logs.setup(args.log_level.upper())
    commands: dict[str, Callable[[], None]] = {
        "worker": lambda: worker(args.queues, args.name),
        "beat": lambda: beat(args.once, args.metrics_port),
    }
    try:
        commands[args.command]()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
