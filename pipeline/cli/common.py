"""What the `persona` commands share: the console, the `--json` option, and the services the commands talk to.

The CLI is the one place (with the demo) that knows the embedded local stack: an embedded PostgreSQL or Redis
listens on a port of its own, recorded by `persona stack up`, so every command resolves the service URLs through
`settings`, and the processes it starts get them in their environment (`service_env`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from pipeline.config import Settings

if TYPE_CHECKING:
    from pipeline.serving.promotions import Announcer
    from pipeline.storage.stores import Stores

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def make_console() -> Console:
    # Piped output (CI logs, `make demo | tee`) gets wide tables instead of rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 150)


console = make_console()
err_console = Console(stderr=True)


def settings() -> Settings:
    """Settings from the environment, with the service URLs of the embedded stack where `persona stack up` started
    a service of its own (PostgreSQL and Redis may be on other ports than configured)."""
    from pipeline import stack

    base = Settings()
    urls = stack.effective_urls(base)
    return base.replace(
        base.db.model_copy(update={"url": urls["db_url"]}),
        base.redis.model_copy(update={"url": urls["redis_url"]}),
        base.kafka.model_copy(update={"bootstrap_servers": urls["kafka_bootstrap_servers"]}),
        base.s3.model_copy(update={"endpoint": urls["s3_endpoint"]}),
    )


def service_env(resolved: Settings) -> dict[str, str]:
    """The ``PERSONA_*`` variables that point a child process at the services ``resolved`` names."""
    return {
        "PERSONA_DB_URL": resolved.db.url,
        "PERSONA_REDIS_URL": resolved.redis.url,
        "PERSONA_KAFKA_BOOTSTRAP_SERVERS": resolved.kafka.bootstrap_servers,
        "PERSONA_S3_ENDPOINT": resolved.s3.endpoint,
    }


@contextlib.contextmanager
def open_stores(resolved: Settings | None = None) -> Iterator[Stores]:
    """The command's stores (a small pool and the object store), closed when the command ends."""
    from pipeline.storage.stores import Stores

    s = resolved or settings()
    with Stores.open(s.db, s.s3, name="persona-cli") as stores:
        yield stores


@contextlib.contextmanager
def open_announcer(resolved: Settings | None = None) -> Iterator[Announcer]:
    """The command's announcer of the promotions topic, closed when the command ends."""
    from pipeline.serving.promotions import Announcer

    announcer = Announcer((resolved or settings()).kafka)
    try:
        yield announcer
    finally:
        announcer.close()


def exit_with(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` on stderr and return the Exit to raise."""
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)
