"""The stack's public value types and its state file (``<data_dir>/stack.json``)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.domain.errors import PersonaError

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class StackError(PersonaError):
    """A service of the local stack could not be started, reached or stopped."""


@dataclass(frozen=True)
class ServiceStatus:
    """What `up` or `status` found for one service.

    ``managed`` is true when the service was started by `up` and is recorded in the state file (so `down` stops
    it); false for a service that was found already answering (external) or that is not running at all.
    """

    name: str
    address: str
    healthy: bool
    managed: bool
    pid: int | None
    detail: str

    def as_dict(self) -> dict[str, Any]:
        """The status as a JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class ServiceRecord:
    """One service started by `up`, as recorded in the state file."""

    name: str
    pid: int
    #: Process start time (seconds since the epoch, as psutil reports it): tells our process from a later one
    #: that happens to get the same pid.
    started: float
    address: str
    command: list[str]
    log: str
    #: The user the process runs as when not the current one (embedded PostgreSQL when run as root).
    user: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class StackState:
    """Contents of ``stack.json``: the services `up` started and the effective URLs it chose."""

    services: dict[str, ServiceRecord] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": STATE_VERSION,
                "services": {name: asdict(rec) for name, rec in self.services.items()},
                "urls": self.urls,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, path: Path) -> StackState:
        try:
            raw = json.loads(text)
            if raw.get("version") != STATE_VERSION:
                raise ValueError(f"version {raw.get('version')!r}, expected {STATE_VERSION}")
            services = {name: ServiceRecord(**rec) for name, rec in raw.get("services", {}).items()}
            urls = {str(k): str(v) for k, v in raw.get("urls", {}).items()}
        except (ValueError, TypeError, AttributeError) as e:
            raise StackError(f"state file {path} is not a valid stack state ({e}); stop its processes by hand") from e
        return cls(services=services, urls=urls)


def state_path(data_dir: Path) -> Path:
    return data_dir / "stack.json"


def log_path(data_dir: Path, service: str) -> Path:
    return data_dir / "logs" / f"{service}.log"


def load_state(data_dir: Path) -> StackState:
    """The state file's contents; an empty state when there is none."""
    path = state_path(data_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return StackState()
    return StackState.from_json(text, path)


def save_state(data_dir: Path, state: StackState) -> None:
    """Write the state atomically; remove the file when no service is recorded (all URLs are the configured ones)."""
    path = state_path(data_dir)
    if not state.services:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    # 0600: a recorded external URL may carry a password.
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
        fh.write(state.to_json())
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(data_dir: Path, timeout_s: float) -> Iterator[None]:
    """Hold the stack's lock: two concurrent `up`/`down` would otherwise start a service twice."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".lock", "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError as e:
                if time.monotonic() > deadline:
                    raise StackError(f"another `persona stack` command holds {data_dir / '.lock'}") from e
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
