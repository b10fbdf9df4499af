"""The demo's `persona` processes: started with a log each, watched, and stopped (all of them) at the end."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx

from pipeline.config import ROOT
from pipeline.domain.errors import PersonaError


class DemoError(PersonaError):
    """The demo could not run; the message says which part failed and where its log is."""


class Processes:
    """The `persona` processes of one demo run, each with its log in ``logs_dir``."""

    def __init__(self, env: dict[str, str], logs_dir: Path) -> None:
        self.env, self.logs_dir = env, logs_dir
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        log = self.logs_dir / f"demo-{name}.log"
        out = log.open("ab")
        out.write(f"\n--- {datetime.now(UTC).isoformat()} persona {' '.join(args)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args], env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )
        self.procs[name] = (proc, log)
        return proc

    def log(self, name: str) -> Path:
        return self.procs[name][1]

    def check(self) -> None:
        """DemoError naming the first process that exited, with the end of its log."""
        for name, (proc, log) in self.procs.items():
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-1500:]
                raise DemoError(f"the {name} process exited with {proc.returncode}; its log {log} ends:\n{tail}")

    def stop(self) -> None:
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def free_port(preferred: int) -> int:
    """``preferred`` if it can be bound on 127.0.0.1, else a free port the system picks."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise DemoError("no free TCP port on 127.0.0.1")


def wait_ready(what: str, ready: Callable[[], bool], procs: Processes, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        procs.check()
        try:
            if ready():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.3)
    raise DemoError(f"{what} was not ready within {timeout_s:.0f}s; see {log}")
