"""What the `persona` commands share: the console and the database the commands talk to."""

from __future__ import annotations

import sys

from rich.console import Console

from pipeline.config import DatabaseSettings


def make_console() -> Console:
    # Piped output (CI logs, `make demo | tee`) gets wide tables instead of rich's 80-column default.
    return Console(width=None if sys.stdout.isatty() else 150)


def resolved_db() -> DatabaseSettings:
    """Database settings, pointed at the embedded PostgreSQL when `persona stack up` started one."""
    from pipeline import stack
    from pipeline.config import Settings

    settings = Settings()
    return settings.db.model_copy(update={"url": stack.effective_urls(settings)["db_url"]})
