"""A serving worker's HTTP API in processes of its own (``PERSONA_SERVE_HTTP_PROCESSES``).

With one process, the event loop that streams every response, the request threads that check keys, resolve models
and tokenize, and the engine thread that drives the GPU share one GIL; under load the HTTP side holds it most of the
time and the engine waits for it. With ``http_processes`` = N, N spawned processes each run the same API
(`pipeline.serving.api.create_app`) on the worker's port (``SO_REUSEPORT``: the kernel spreads connections over
them) and do all of the HTTP side themselves: keys (their own `KeyCache`), model resolution and the models list (the
registry, `Resolution`), tokenizing, detokenizing, server-sent events. What needs the engine crosses one duplex
pipe per process (`Link`), in batches (one send per engine step and HTTP process, whatever the number of streams):

- ``gen``: start a generation (the resolved `Target`, prompt token ids, `Sampling`, max_tokens); the serving process
  acquires the adapter (cache tiers, slot) on its request threads and answers ``ok`` or ``err`` (the same error an
  in-process request gets: 404, 422, 429, 503), then the tokens as the engine thread delivers them (the stream
  interval applies, as in process); ``end`` releases it (a consumer gone before the end cancels it).
- ``call``: scoring, the cache's residency (``/healthz``) and the serving process's metrics (``/metrics`` on the API
  port; the HTTP processes' request, refusal and key-lookup counts travel as ``obs`` messages and are counted there).

An HTTP process that dies is restarted (its generations are cancelled and their adapters released); one that stops
cleanly (a signal to it alone) is not, and the worker stops when none is left. The serving process that dies takes
its HTTP processes with it (they see the pipe close and exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from pipeline.config import Settings
from pipeline.domain.backoff import Backoff
from pipeline.domain.errors import PersonaError, Unavailable
from pipeline.serving.auth import KeyCache
from pipeline.serving.bodies import ChatBody, CompletionBody
from pipeline.serving.engine import Generation
from pipeline.serving.engine import Request as EngineRequest
from pipeline.serving.server import (
    AsyncTokenStream,
    Resolution,
    Sampling,
    Server,
    Target,
    _LoopSink,
    _put_all,
    _Tokens,
    score_ids,
)
from pipeline.storage.stores import Stores

log = logging.getLogger(__name__)
T = TypeVar("T")


class HttpProcessGone(Unavailable):
    """The serving process behind this HTTP process went away (it is restarting or stopping)."""

    code = "worker_unavailable"


def _portable(e: BaseException) -> BaseException:
    """An error that crosses the pipe: persona's own as they are (with param and retry hint), anything else (a bug,
    logged here with its traceback) as a RuntimeError the other side answers with 500."""
    if isinstance(e, PersonaError):
        return e
    return RuntimeError(f"{type(e).__name__} in the serving process: {e}")


class _Sender:
    """Messages to one end of a pipe, from any thread, sent by a thread of their own: whatever queued while one
    send ran goes in the next, as one list (one pickle and one write for a step's tokens, however many streams).
    Senders never wait on the peer's reading: a slow HTTP process does not hold up the engine thread."""

    def __init__(self, conn: Connection, name: str) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, message: Any) -> None:
        self._queue.put(message)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        q = self._queue
        while True:
            first = q.get()
            if first is None:
                return
            batch = [first]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 4096:
                    nxt = q.get_nowait()
                    if nxt is None:
                        self._send(batch)
                        return
                    batch.append(nxt)
            if not self._send(batch):
                return

    def _send(self, batch: list[Any]) -> bool:
        try:
            self._conn.send(batch)
            return True
        except (OSError, EOFError, ValueError):  # the peer is gone: its reader notices too
            return False
        except Exception:  # a message that does not pickle: send the others, and an error for that one
            log.exception("a message to the other side of a serving pipe could not be sent")
            for message in batch:
                try:
                    self._conn.send([message])
                except (OSError, EOFError, ValueError):
                    return False
                except Exception:
                    if message[0] in ("ok", "err", "reply"):  # its waiter gets an error instead of nothing
                        error = RuntimeError(f"the serving process's answer could not be sent: {message!r:.200}")
                        reply = (
                            ("reply", message[1], False, error)
                            if message[0] == "reply"
                            else ("err", message[1], error)
                        )
                        self._conn.send([reply])
            return True


# --- the serving process's side ---------------------------------------------------------------------------------


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
            target=_frontend_main,
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
        self.sender = _Sender(parent, f"persona-http-{index}-send")
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
                server.pool.submit(self._call, *message[1:])
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
            self.sender.put(("err", rid, _portable(e)))
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
            self.sender.put(("reply", rid, False, _portable(e)))
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
        self.links: list[Link] = [Link(self, i) for i in range(processes)]
        deadline = time.monotonic() + start_timeout_s
        for link in self.links:
            if not link.ready.wait(max(0.0, deadline - time.monotonic())) or link.failed or link.gone:
                why = link.failed or ("it exited" if link.gone else f"no answer in {start_timeout_s:.0f} s")
                self.close()
                raise RuntimeError(f"HTTP process {link.index} of the serving worker did not start: {why}")
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
            if self._closing or self.links[link.index] is not link:
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


# --- an HTTP process's side --------------------------------------------------------------------------------------


class _Text:
    """`Engine.decode_text` with the tokenizer alone (ids without a token have no text)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab = len(tokenizer)

    def decode_text(self, ids: list[int]) -> str:
        vocab = self.vocab
        return str(self.tokenizer.decode([i for i in ids if 0 <= i < vocab], skip_special_tokens=True))


class _Started:
    __slots__ = ("future", "generation", "tokens")

    def __init__(self, tokens: _Tokens, generation: Generation) -> None:
        self.tokens = tokens
        self.generation = generation
        self.future: Future[None] = Future()


class Frontend(Resolution):
    """What `pipeline.serving.api.create_app` serves in an HTTP process: keys, resolution and the models list from
    the registry (`Resolution`), tokenizing here; generations, scoring, residency and metrics from the serving
    process over the pipe."""

    def __init__(self, conn: Connection, settings: Settings, tokenizer: Any, info: dict[str, Any], extra: Any) -> None:
        cfg = settings.serving
        self.settings = settings
        self.tokenizer = tokenizer
        self.extra = extra
        self.name: str = info["name"]
        self.base_id: str = info["base_id"]
        self.context: int = info["context"]
        self.index: int = info["index"]
        self.engine = _Text(tokenizer)
        self.stores = self.open_stores()
        self.keys = KeyCache(
            self._authenticate,
            ttl_s=cfg.key_cache_ttl_s,
            max_entries=cfg.key_cache_size,
            counted=lambda source: self.sender.put(("obs", [("lookup", source)])),
        )
        self._models: dict[str, tuple[float, list[tuple[str, int]]]] = {}
        self._models_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=cfg.api_threads, thread_name_prefix="persona-api")
        self._conn = conn
        self._ids = itertools.count(1)
        self._started: dict[int, _Started] = {}
        self._calls: dict[int, Future[Any]] = {}
        self.lost = threading.Event()  # the serving process went away
        self.on_lost: Callable[[], None] = lambda: None
        self.sender = _Sender(conn, "persona-http-send")
        self._reader = threading.Thread(target=self._read, name="persona-http-read", daemon=True)
        self._reader.start()

    def open_stores(self) -> Stores:
        """The registry this process resolves models and keys with (a subclass may resolve without one)."""
        return Stores.open(self.settings.db, self.settings.s3, name="persona-serve-http", wait=False)

    def offload(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` in this process's request thread pool, awaited on the running event loop."""
        return asyncio.get_running_loop().run_in_executor(self.pool, lambda: fn(*args))

    # --- what the serving process does ---
    def generate_async(
        self,
        target: Target,
        prompt_ids: list[int],
        body: CompletionBody | ChatBody,
        max_tokens: int,
        loop: asyncio.AbstractEventLoop,
    ) -> AsyncTokenStream:
        """As `Server.generate_async`: the adapter is acquired (by the serving process) before this returns, and its
        errors raise here."""
        if self.lost.is_set():
            raise HttpProcessGone("the serving worker is restarting; retry shortly")
        rid = next(self._ids)
        started = _Started(_Tokens(loop), Generation(rid, EngineRequest(prompt_ids)))
        self._started[rid] = started
        self.sender.put(("gen", rid, target, prompt_ids, Sampling.of(body), max_tokens))
        try:
            started.future.result()
        except BaseException:
            self._started.pop(rid, None)
            raise
        return AsyncTokenStream(lambda: self._end(rid), started.tokens, started.generation)

    def _end(self, rid: int) -> None:
        if self._started.pop(rid, None) is not None:
            self.sender.put(("end", rid))

    def score(self, target: Target, prompt: str | None, text: str) -> dict[str, Any]:
        prompt_ids, text_ids = score_ids(self.tokenizer, prompt, text, self.context)
        result: dict[str, Any] = self._call("score", target, prompt_ids, text_ids)
        return result

    def resident(self) -> dict[str, int]:
        resident: dict[str, int] = self._call("resident")
        return resident

    def metrics_text(self) -> bytes:
        text: bytes = self._call("metrics")
        return text

    def record_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.sender.put(("obs", [("req", endpoint, status, seconds)]))  # counted in the serving process

    def record_refusal(self, reason: str) -> None:
        self.sender.put(("obs", [("refusal", reason)]))

    def _call(self, name: str, *args: Any) -> Any:
        if self.lost.is_set():
            raise HttpProcessGone("the serving worker is restarting; retry shortly")
        rid = next(self._ids)
        future: Future[Any] = Future()
        self._calls[rid] = future
        self.sender.put(("call", rid, name, args))
        try:
            return future.result()
        finally:
            self._calls.pop(rid, None)

    def _read(self) -> None:
        conn = self._conn
        started = self._started
        while True:
            try:
                batch = conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # a message that does not unpickle here: the next ones still do
                log.exception("HTTP process %d: a message from the serving process could not be read", self.index)
                continue
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Tokens, list[int], bool]]] = {}
            for message in batch:
                kind = message[0]
                try:
                    if kind == "tok":
                        for rid, run, finished, reason, text in message[1]:
                            s = started.get(rid)
                            if s is None:
                                continue
                            gen = s.generation
                            gen.output_ids.extend(run)
                            if finished:
                                gen.finish_reason, gen.text = reason, text
                            by_loop.setdefault(s.tokens.loop, []).append((s.tokens, run, finished))
                    elif kind == "ok":
                        s = started.get(message[1])
                        if s is None:  # its request gave up waiting: end it there too
                            self.sender.put(("end", message[1]))
                        elif not s.future.done():
                            s.future.set_result(None)
                    elif kind == "err":
                        s = started.pop(message[1], None)
                        if s is not None and not s.future.done():
                            s.future.set_exception(message[2])
                    elif kind == "reply":
                        _, rid, ok, value = message
                        future = self._calls.get(rid)
                        if future is not None and not future.done():
                            if ok:
                                future.set_result(value)
                            else:
                                future.set_exception(value)
                except Exception:
                    log.exception("HTTP process %d: handling %r from the serving process failed", self.index, kind)
            for loop, items in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: its streams are gone
                    loop.call_soon_threadsafe(_put_all, items)
        self._gone()

    def _gone(self) -> None:
        """The serving process went away: every waiting request and stream ends with an error."""
        self.lost.set()
        gone = HttpProcessGone("the serving worker's engine process went away")
        for s in list(self._started.values()):
            if not s.future.done():
                s.future.set_exception(gone)
            with contextlib.suppress(RuntimeError):
                s.tokens.loop.call_soon_threadsafe(s.tokens.put, gone)
        self._started.clear()
        for future in list(self._calls.values()):
            if not future.done():
                future.set_exception(gone)
        self.on_lost()

    def close(self) -> None:
        self.lost.set()
        self.sender.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.stores is not None:
            self.stores.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port) that other processes may bind too (SO_REUSEPORT)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
        0
    ]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


def _frontend_main(
    conn: Connection,
    app_factory: Callable[..., Any],
    frontend: type[Frontend],
    settings: Settings,
    tokenizer: Any,
    info: dict[str, Any],
    extra: Any,
) -> None:
    import uvicorn

    from pipeline.observability import logs

    logs.setup(os.environ.get("PERSONA_LOG_LEVEL", "INFO"))
    cfg = settings.serving
    try:
        side = frontend(conn, settings, tokenizer, info, extra)
        app = app_factory(side, admin=cfg.admin_port == 0)
        sock = _listen(cfg.host, cfg.port)
    except Exception as e:
        log.exception("HTTP process %s could not start", info["index"])
        with contextlib.suppress(Exception):
            conn.send([("failed", f"{type(e).__name__}: {e}")])
        raise SystemExit(1) from e
    api = uvicorn.Server(
        uvicorn.Config(
            app, log_level="warning", access_log=cfg.access_log, timeout_graceful_shutdown=30, lifespan="off"
        )
    )

    def lost() -> None:
        log.warning("HTTP process %s: the serving process went away; stopping", info["index"])
        api.should_exit = True

    side.on_lost = lost
    gc.freeze()
    sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000)
    side.sender.put(("ready", os.getpid()))
    try:
        api.run(sockets=[sock])
    finally:
        side.close()
