"""The nginx router of a serving pool: its configuration from infra/nginx/persona-serving.conf.template."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import ROOT
from pipeline.domain.errors import InvalidInput

TEMPLATE = ROOT / "infra" / "nginx" / "persona-serving.conf.template"


def nginx_config(workers: list[str], *, listen: str, run_dir: Path) -> str:
    """The nginx configuration for ``workers`` (host:port each), listening on ``listen``, state under ``run_dir``."""
    if not workers:
        raise InvalidInput("a serving pool needs at least one worker (host:port)")
    for w in workers:
        host, _, port = w.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidInput(f"worker {w!r} is not host:port")
    servers = "\n".join(f"        server {w} max_fails=2 fail_timeout=5s;" for w in workers)
    return (
        TEMPLATE.read_text()
        .replace("@SERVERS@", servers)
        .replace("@LISTEN@", listen)
        .replace("@PID@", str(run_dir / "nginx.pid"))
        .replace("@ERRORLOG@", str(run_dir / "error.log"))
        .replace("@TEMP@", str(run_dir))
    )
