"""The serving process's side of its HTTP processes (`pipeline.serving.frontends`, which describes the protocol):
`FrontendHub` starts them, awaits them, restarts one that dies and stops them with the worker; a `Link` per process
reads its requests (generations acquired and submitted on the worker's request threads, calls, metrics) and sends
its answers and each engine step's tokens (the engine thread hands them to the link as to an event loop)."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from pipeline.domain.backoff import Backoff
from pipeline.domain.errors import PersonaError
from pipeline.serving.engine import Generation
from pipeline.serving.frontends import Frontend, Sender, frontend_main, portable
from pipeline.serving.server import Sampling, Server, Target, _LoopSink

log = logging.getLogger(__name__)


class _RemoteTokens:
    """Where the engine thread's tokens for one generation of an HTTP process go (`Server._deliver` hands them to
    the link as to an event loop)."""

    __slots__ = ("rid", "sink")

    def __init__(self, rid: int, sink: _LoopSink) -> None:
        self.rid = rid
        self.sink = sink


class Link:
    """One HTTP process as the serving process sees it: its process, its pipe, the generations it started."""

    def __init__(self, hub: FrontendHub, index: int) -> None:
        self.hub = hub
        self.index = index
        server = hub.server
        parent, child = hub._ctx.Pipe(duplex=True)
        info = {
            "name": server.name,
            "base_id": server.base_id,
            "context": server.context,
            "index": index,
        }
        self.process = hub._ctx.Process(
            target=frontend_main,
            args=(child, hub.app_factory, hub.frontend, server.settings, server.tokenizer, info, hub.extra),
            name=f"persona-http-{index}",
            daemon=True,
        )
        self.process.start()
        child.close()  # the child's end, held by the child alone: its death shows as EOF here
        self.conn = parent
        self.started = time.monotonic()
        self.ready = threading.Event()
        self.failed: str | None = None
        self.live: dict[int, tuple[Target, Generation]] = {}
        self.gone = False
        self.cancelled = 0
        self._lock = threading.Lock()
        self.sender = Sender(parent, f"persona-http-{index}-send")
        self._reader = threading.Thread(target=self._read, name=f"persona-http-{index}-read", daemon=True)
        self._reader.start()

    # the engine thread delivers a step's tokens here, as to an event loop (`Server._deliver`)
    def call_soon_threadsafe(self, _fn: Callable[..., None], batch: list[tuple[Any, list[int], bool]]) -> None:
        items = []
        for tokens, run, finished in batch:
            if finished:
                gen = tokens.sink.generation
                items.append(
                    (tokens.rid, run, True, gen.finish_reason if gen else "error", gen.cut_text if gen else None)
                )
            else:
                items.append((tokens.rid, run, False, None, None))
        self.sender.put(("tok", items))

    def _read(self) -> None:
        server = self.hub.server
        conn = self.conn
        while True:
            try:
                batch = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:
                log.exception("HTTP process %d sent what cannot be read; dropping its connection", self.index)
                break
            try:
                for message in batch:
                    self._dispatch(server, message)
            except RuntimeError:  # the request pool is shut down: the worker is stopping
                break
        self._lost()

    def _dispatch(self, server: Server, message: tuple[Any, ...]) -> None:
        kind = message[0]
        try:
            if kind == "gen":
                server.pool.submit(self._gen, *message[1:])
            elif kind == "end":
                self._end(message[1])
            elif kind == "call":
                server.calls.submit(self._call, *message[1:])
            elif kind == "obs":
                self._observe(message[1])
            elif kind == "ready":
                self.ready.set()
            elif kind == "failed":
                self.failed = message[1]
                self.ready.set()
            else:
                log.error("HTTP process %d sent an unknown message %r", self.index, kind)
        except RuntimeError:
            raise
        except Exception:  # one message's failure must not end the link (its process would wait forever)
            log.exception("HTTP process %d: handling %r failed", self.index, kind)

    def _gen(self, rid: int, target: Target, prompt_ids: list[int], sampling: Sampling, max_tokens: int) -> None:
        server = self.hub.server
        sink = _LoopSink(self, None)
        sink.tokens = _RemoteTokens(rid, sink)
        try:
            gen = server._start(target, prompt_ids, sampling, max_tokens, sink)
        except BaseException as e:
            if not isinstance(e, PersonaError):
                log.exception("starting a generation for HTTP process %d failed", self.index)
            self.sender.put(("err", rid, portable(e)))
            return
        with self._lock:
            gone = self.gone
            if not gone:
                self.live[rid] = (target, gen)
        if gone:
            server._end(target, gen)
            return
        self.sender.put(("ok", rid))

    def _end(self, rid: int) -> None:
        with self._lock:
            started = self.live.pop(rid, None)
        if started is not None:
            self.hub.server._end(*started)

    def _call(self, rid: int, name: str, args: tuple[Any, ...]) -> None:
        server = self.hub.server
        try:
            if name == "score":
                value: Any = server.score_ids(*args)
            elif name == "resident":
                value = server.resident()
            elif name == "metrics":
                value = server.metrics_text()
            else:
                raise ValueError(f"unknown call {name!r} from an HTTP process")
        except BaseException as e:
            if not isinstance(e, PersonaError):
                log.exception("%s for HTTP process %d failed", name, self.index)
            self.sender.put(("reply", rid, False, portable(e)))
            return
        self.sender.put(("reply", rid, True, value))

    def _observe(self, observations: list[tuple[Any, ...]]) -> None:
        server = self.hub.server
        for kind, *fields in observations:
            if kind == "req":
                server.record_request(*fields)
            elif kind == "refusal":
                server.record_refusal(*fields)
            elif kind == "lookup":
                server.record_lookup(*fields)

    def _lost(self) -> None:
        """The process's pipe closed: its generations end (cancelled, adapters released)."""
        with self._lock:
            self.gone = True
            live, self.live = self.live, {}
        self.cancelled = len(live)
        for started in live.values():
            with contextlib.suppress(Exception):
                self.hub.server._end(*started)
        self.ready.set()
        self.sender.close()
        with contextlib.suppress(OSError):
            self.conn.close()
        self.hub._lost(self)

    def stop(self, timeout_s: float) -> None:
        if self.process.is_alive():
            self.process.terminate()  # SIGTERM: uvicorn's graceful shutdown (streams in flight finish)
        self.process.join(timeout_s)
        if self.process.is_alive():
            log.warning("HTTP process %s did not stop in %.0f s; killing it", self.process.pid, timeout_s)
            self.process.kill()
            self.process.join(5)


#: Exit codes of an HTTP process that stopped on purpose (uvicorn's graceful shutdown re-raises its signal).
_STOPPED = frozenset({0, -signal.SIGTERM, -signal.SIGINT})


class FrontendHub:
    """The serving process's HTTP processes: started, awaited (each answers once it listens), restarted when one
    dies, stopped with the worker. ``frontend`` is the class each process builds (`Frontend`, or a subclass that
    resolves models differently, built with ``extra``); ``app_factory`` builds its ASGI app from it."""

    def __init__(
        self,
        server: Server,
        processes: int,
        app_factory: Callable[..., Any],
        *,
        frontend: type[Frontend] | None = None,
        extra: Any = None,
        start_timeout_s: float = 180.0,
    ) -> None:
        if processes < 1:
            raise ValueError("an HTTP process hub needs at least one process")
        if server.settings.serving.port == 0:
            raise ValueError("HTTP processes share the worker's port: PERSONA_SERVE_PORT must not be 0 with them")
        self.server = server
        self.app_factory = app_factory
        self.frontend = frontend or Frontend
        self.extra = extra
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._closing = False
        self.stopped = threading.Event()  # no HTTP process is left (each stopped on its own): the worker stops
        self.restarts = 0
        self._backoff = [Backoff(initial_s=1.0, cap_s=30.0) for _ in range(processes)]
        self._starting = True  # a process lost now fails the start: no restart
        self.links: list[Link] = [Link(self, i) for i in range(processes)]
        deadline = time.monotonic() + start_timeout_s
        for link in self.links:
            if not link.ready.wait(max(0.0, deadline - time.monotonic())) or link.failed or link.gone:
                why = link.failed or ("it exited" if link.gone else f"no answer in {start_timeout_s:.0f} s")
                self.close()
                raise RuntimeError(f"HTTP process {link.index} of the serving worker did not start: {why}")
        self._starting = False
        log.info("serving HTTP API in %d processes (pids %s) on port %d", processes,
                 ", ".join(str(link.process.pid) for link in self.links), server.settings.serving.port)  # fmt: skip

    def pids(self) -> list[int]:
        return [link.process.pid for link in self.links if link.process.pid is not None]

    def _lost(self, link: Link) -> None:
        link.process.join(timeout=10)
        if link.process.is_alive():  # its pipe closed but it runs on: it cannot serve, and holds the port
            link.process.kill()
            link.process.join(timeout=5)
        code = link.process.exitcode
        with self._lock:
            if self._closing or self._starting or self.links[link.index] is not link:
                return
            if code in _STOPPED:
                log.warning("HTTP process %d (pid %s) stopped (exit code %s); not restarted", link.index,
                            link.process.pid, code)  # fmt: skip
                if all(other.gone for other in self.links):
                    log.warning("no HTTP process is left; the serving worker stops")
                    self.stopped.set()
                return
        backoff = self._backoff[link.index]
        if time.monotonic() - link.started > 60:
            backoff.reset()
        wait = backoff.next()
        log.error("HTTP process %d (pid %s) died (exit code %s); %d generation(s) cancelled; restarting it in %.1f s",
                  link.index, link.process.pid, code, link.cancelled, wait)  # fmt: skip
        threading.Thread(target=self._restart, args=(link.index, wait), daemon=True).start()

    def _restart(self, index: int, wait: float) -> None:
        time.sleep(wait)
        with self._lock:
            if self._closing:
                return
            try:
                link = self.links[index] = Link(self, index)
            except Exception:
                wait = self._backoff[index].next()
                log.exception("HTTP process %d could not be started again; retrying in %.1f s", index, wait)
                threading.Thread(target=self._restart, args=(index, wait), daemon=True).start()
                return
            self.restarts += 1
        if link.ready.wait(180) and not link.failed and not link.gone:
            log.info("HTTP process %d restarted (pid %s)", index, link.process.pid)

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop every HTTP process (SIGTERM: their streams in flight finish, up to ``timeout_s``)."""
        with self._lock:
            self._closing = True
            links = list(self.links)
        for link in links:
            if link.process.is_alive():
                link.process.terminate()
        for link in links:
            link.stop(timeout_s)
        for link in links:
            link._reader.join(timeout=5)
