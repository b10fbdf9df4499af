"""Daemon processes of the stack: spawn detached, recognise after a restart of the caller, stop, read logs."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import psutil

from pipeline.stack.state import ServiceRecord, StackError

logger = logging.getLogger(__name__)

#: Loopback names: only services at these addresses may be started locally.
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


def split_host_port(address: str, what: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) -> (host, port), with an error that names the bad value."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise StackError(f"{what} {address!r} is not host:port")
    return host, int(port)


def tcp_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections at host:port (a cheap pre-check before a client probe)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ("" when it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def spawn(
    name: str,
    command: Sequence[str],
    *,
    log: Path,
    env: Mapping[str, str],
    cwd: Path,
    user: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session with output appended to ``log``, so it outlives this process."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"=== {datetime.now(UTC).isoformat()} persona stack: {' '.join(command)}\n".encode())
        fh.flush()
        try:
            return subprocess.Popen(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                user=user,
                start_new_session=True,
            )
        except OSError as e:
            raise StackError(f"{name}: cannot run {command[0]}: {e}") from e


def start_time(pid: int) -> float:
    """The process's start time as psutil reports it (stable for the life of the process); 0.0 once it is gone."""
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _reap(pid: int) -> None:
    # A child of this very process (tests, or `up` then `down` in one process) stays a zombie until waited for.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(record: ServiceRecord) -> bool:
    """Whether the recorded process still runs (and is the same process, not a later one with its pid)."""
    _reap(record.pid)
    try:
        proc = psutil.Process(record.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - record.started) < 1.0
    except psutil.Error:
        return False


def terminate(record: ServiceRecord, grace_s: float = 10.0) -> None:
    """SIGTERM the service's process group, wait up to ``grace_s``, then SIGKILL it."""
    if not alive(record):
        return
    # start_new_session made the service its own process group leader: signal helpers it forked too.
    try:
        group = os.getpgid(record.pid) == record.pid
    except ProcessLookupError:
        return
    sender = os.killpg if group else os.kill
    with contextlib.suppress(ProcessLookupError):
        sender(record.pid, signal.SIGTERM)
    if wait_gone(record, grace_s):
        return
    logger.warning(
        "%s: pid %d did not stop within %.0fs of SIGTERM; sending SIGKILL", record.name, record.pid, grace_s
    )
    with contextlib.suppress(ProcessLookupError):
        sender(record.pid, signal.SIGKILL)
    if not wait_gone(record, 5.0):
        raise StackError(f"{record.name}: pid {record.pid} survived SIGKILL")


def wait_gone(record: ServiceRecord, timeout_s: float) -> bool:
    """Wait until the recorded process has exited; whether it did within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while alive(record):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_healthy(
    name: str,
    probe: Callable[[], tuple[bool, str]],
    *,
    proc: subprocess.Popen[bytes] | None,
    log: Path,
    timeout_s: float,
) -> tuple[float, str]:
    """Poll ``probe`` until it succeeds: (seconds it took, its detail). Fails fast when the process exits."""
    t0 = time.monotonic()
    detail = "no answer yet"
    while True:
        ok, detail = probe()
        if ok:
            return time.monotonic() - t0, detail
        if proc is not None and proc.poll() is not None:
            raise StackError(
                f"{name}: process exited with code {proc.returncode} while starting ({detail}); "
                f"last lines of {log}:\n{tail(log)}"
            )
        if time.monotonic() - t0 > timeout_s:
            raise StackError(
                f"{name}: not healthy after {timeout_s:.0f}s (last check: {detail}); last lines of {log}:\n{tail(log)}"
            )
        time.sleep(0.2)


def ports_busy(host: str, ports: Sequence[int]) -> list[int]:
    """Those of ``ports`` on which something already accepts connections."""
    bind_host = "127.0.0.1" if host == "localhost" else host
    return [p for p in ports if tcp_open(bind_host, p, timeout_s=0.2)]


def wait_ports_closed(host: str, ports: Sequence[int], timeout_s: float = 5.0) -> list[int]:
    """Wait until nothing accepts connections on ``ports`` any more; those still open after ``timeout_s``.

    A stopped server's pid can be gone (or a zombie) a moment before its listening sockets are: a `down` followed at
    once by an `up` would otherwise find the ports taken.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        busy = ports_busy(host, ports)
        if not busy or time.monotonic() > deadline:
            return busy
        time.sleep(0.05)
