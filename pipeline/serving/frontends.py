"""A serving worker's HTTP API in processes of its own (``PERSONA_SERVE_HTTP_PROCESSES``).

With one process, the event loop that streams every response, the request threads that check keys, resolve models
and tokenize, and the engine thread that drives the GPU share one GIL; under load the HTTP side holds it most of the
time and the engine waits for it. With ``http_processes`` = N, N spawned processes each run the same API
(`pipeline.serving.api.create_app`) on the worker's port (``SO_REUSEPORT``: the kernel spreads connections over
them) and do all of the HTTP side themselves: keys (their own `KeyCache`), model resolution and the models list (the
registry, `Resolution`), tokenizing, detokenizing, server-sent events. What needs the engine crosses one duplex
pipe per process (the serving process's side: `pipeline.serving.hub`), in batches (one send per engine step and HTTP
process, whatever the number of streams):

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
import os
import queue
import socket
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any, TypeVar

from pipeline.config import Settings
from pipeline.domain.errors import PersonaError, Unavailable
from pipeline.serving.auth import KeyCache
from pipeline.serving.bodies import ChatBody, CompletionBody
from pipeline.serving.engine import Generation
from pipeline.serving.engine import Request as EngineRequest
from pipeline.serving.server import (
    AsyncTokenStream,
    Resolution,
    Sampling,
    Target,
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


def portable(e: BaseException) -> BaseException:
    """An error that crosses the pipe: persona's own as they are (with param and retry hint), anything else (a bug,
    logged here with its traceback) as a RuntimeError the other side answers with 500."""
    if isinstance(e, PersonaError):
        return e
    return RuntimeError(f"{type(e).__name__} in the serving process: {e}")


class Sender:
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
        self.sender = Sender(conn, "persona-http-send")
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


def frontend_main(
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
