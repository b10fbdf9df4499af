"""Fault injection for the integration tests: a broker of a test's own that can be killed, and a TCP proxy that
makes a server look restarted (live connections dropped, new ones refused for a while)."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline import stack
from pipeline.config import DatabaseSettings, KafkaSettings, RedisSettings, Settings, StackSettings
from tests.integration.helpers import Services, free_port


class PrivateBroker:
    """A tansu of the test's own (on a free port, state in ``data_dir``), beside the shared test stack's services
    (its S3 server, PostgreSQL and Redis are reused, not started)."""

    def __init__(self, services: Services, data_dir: Path) -> None:
        self.settings = Settings(
            # memory storage: a second tansu must not share the test stack's bucket; durability is tested with a
            # stack of its own (tests/integration/stack).
            StackSettings(data_dir=data_dir, kafka_storage="memory", postgres="external", redis="external"),
            services.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"}),
            services.s3,
            DatabaseSettings(url=services.db.url),
            RedisSettings(url="redis://127.0.0.1:6379/0"),
        )
        self.kafka: KafkaSettings = self.settings.kafka

    def start(self) -> None:
        stack.up(self.settings)

    def pid(self) -> int:
        for s in stack.status(self.settings):
            if s.name == "kafka" and s.pid:
                return s.pid
        raise AssertionError("the private broker is not running")

    def kill(self) -> None:
        """SIGKILL the broker (a crash: no clean shutdown)."""
        pid = self.pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)

    def stop(self) -> None:
        stack.down(self.settings)


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to ``target``; ``restart(down_s)`` drops every live connection and refuses new
    ones for ``down_s`` seconds, which is what a client sees of a server restart."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._listener: socket.socket | None = None
        self._listen()

    def _listen(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(64)
        self._listener = sock
        threading.Thread(target=self._accept, args=(sock,), daemon=True).start()

    def _accept(self, sock: socket.socket) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                if a.fileno() < 0 or b.fileno() < 0:
                    return
                ready, _, _ = select.select([a, b], [], [], 0.5)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    (b if s is a else a).sendall(data)
        except (OSError, ValueError):
            return
        finally:
            self._drop(a, b)

    def _drop(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._conns.discard(s)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def restart(self, down_s: float) -> None:
        """Drop all connections and refuse new ones for ``down_s`` seconds (then accept again)."""
        listener, self._listener = self._listener, None
        if listener is not None:
            self._close_listener(listener)
        with self._lock:
            conns = list(self._conns)
        self._drop(*conns)
        time.sleep(down_s)
        self._listen()

    @staticmethod
    def _close_listener(listener: socket.socket) -> None:
        # shutdown first: it wakes the thread blocked in accept() and stops the kernel accepting (a bare close
        # leaves the blocked accept holding the listening socket open).
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()

    def close(self) -> None:
        self._stopped.set()
        if self._listener is not None:
            self._close_listener(self._listener)
        with self._lock:
            conns = list(self._conns)
        self._drop(*conns)


def proxied_url(url: str, port: int) -> str:
    """A PostgreSQL URL with its host and port replaced by the proxy's."""
    import psycopg

    return psycopg.conninfo.make_conninfo(url, host="127.0.0.1", port=str(port))


def wait_for(check: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.2) -> float:
    """Poll ``check`` until true; the seconds it took (AssertionError naming ``what`` after ``timeout_s``)."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what} did not happen within {timeout_s}s")
        time.sleep(every_s)
    return time.monotonic() - started


@contextlib.contextmanager
def running(target: Callable[[], None], name: str) -> Iterator[threading.Thread]:
    """Run ``target`` in a daemon thread for the block; re-raise nothing (the test checks the thread is alive)."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    yield thread
