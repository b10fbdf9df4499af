"""The serving worker's HTTP API (OpenAI-compatible) over `pipeline.serving.server.Server`.

``POST /v1/completions``, ``POST /v1/chat/completions`` (with ``stream``), ``POST /v1/score``, ``GET /v1/models``,
``GET /healthz``, ``GET /metrics``. Every answer names what served it in the header ``x-persona-revision``
(``base`` for the base) and the worker in ``x-persona-worker``.

Keys: every path but ``/healthz`` and ``/metrics`` needs ``Authorization: Bearer <key>`` of an application key with
the ``serve`` scope (what the ``openai`` client sends as its ``api_key``): none, or one that is unknown, revoked or
expired, is 401 ``invalid_api_key`` (``WWW-Authenticate: Bearer``); a key without ``serve`` is 403
``insufficient_scope``. Keys are verified through `pipeline.serving.auth.KeyCache` (no database round trip per
request; a revocation takes effect within ``PERSONA_SERVE_KEY_CACHE_TTL_S``). A key serves the base and its own
application's users; anything else is the same 404 as a model that does not exist. ``/healthz`` and ``/metrics``
stay open and can move to a listener of their own (``PERSONA_SERVE_ADMIN_PORT``; `create_admin_app`).

Bounds (`pipeline.serving.bodies`, `ServingSettings`): the body size (413 before it is read past the limit), the
context (prompt + max_tokens, score input: 400 ``context_length_exceeded``), max_tokens, stop strings, messages,
sampling ranges and ``n`` are checked before any adapter is acquired, so a streamed request with a bad input gets
its 4xx JSON error and no stream. An error after a stream started is sent as a last SSE event
``data: {"error": {...}}`` (OpenAI's shape), then ``data: [DONE]``.

Errors: every error persona raises on purpose is answered once, from its category (`pipeline.domain.errors`), as
an OpenAI-shaped body ``{"error": {"message", "type", "param", "code"}}``: 400 bad input (``invalid_request``,
``invalid_model``, ``context_length_exceeded``), 401/403 (above), 404 ``model_not_found``, 413
``request_too_large``, 422 ``adapter_not_servable`` (over this worker's rank or target limits), 429
``slots_exhausted`` (every device slot holds an adapter in use; Retry-After), 503 ``database_unavailable``,
``object_store_unavailable`` (Retry-After) or ``adapter_corrupt`` (the stored bytes fail their sha256 check).
Anything else is a bug: 500 ``internal_error``, logged with its traceback.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from tokenizers.decoders import DecodeStream

from pipeline.config import ServingSettings, Settings
from pipeline.domain.apikeys import Principal
from pipeline.domain.errors import InvalidInput, PersonaError, Unauthorized, body_of, error_body
from pipeline.models.base import LoadedBase
from pipeline.serving.adapters import AdapterKey
from pipeline.serving.auth import INVALID_KEY, bearer_key
from pipeline.serving.bodies import (
    ChatBody,
    CompletionBody,
    RequestTooLarge,
    ScoreBody,
    check_sampling,
    completion_budget,
)
from pipeline.serving.engine import Generation
from pipeline.serving.frontends import Frontend
from pipeline.serving.hub import FrontendHub
from pipeline.serving.server import AsyncTokenStream, HttpSide, Server, Target

log = logging.getLogger(__name__)

#: Paths answered without a key (and what a separate admin listener serves).
OPEN_PATHS = frozenset({"/healthz", "/metrics"})


#: An oversized body up to this size is read to its end (and discarded) before the 413 is sent: a server that
#: answers and closes while the peer still sends makes the kernel reset the connection, and the peer (the router's
#: nginx, which streams bodies unbuffered) then sees a reset instead of the 413. The router's own cap.
_DRAIN_MAX_BYTES = 64 << 20


async def _drain(stream: Any, seen: int = 0) -> None:
    """Read and discard what is left of a request body, up to _DRAIN_MAX_BYTES in all."""
    async for chunk in stream:
        seen += len(chunk)
        if seen > _DRAIN_MAX_BYTES:
            return


def _error(status: int, message: str, *, code: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, param), status)


def error_response(e: PersonaError) -> JSONResponse:
    """The answer to an error persona raised on purpose: its category's status and code (module docstring)."""
    headers = {"Retry-After": str(round(e.retry_after_s))} if e.retry_after_s else {}
    if e.http_status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if e.http_status >= 500:
        log.warning("answering %d %s: %s", e.http_status, e.code, e)
    return JSONResponse(body_of(e), e.http_status, headers=headers or None)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/score", "/v1/models", "/healthz", "/metrics"})


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _usage(gen: Generation) -> dict[str, int]:
    prompt, completion = len(gen.request.prompt_ids), len(gen.output_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class Detokenizer:
    """The text of a token stream, piece by piece; the pieces join to the decoding of all tokens, and a character
    split over tokens comes out whole.

    With a fast tokenizer (``backend``: its `tokenizers.Tokenizer`), each token is one step of the tokenizers
    library's `DecodeStream` (Rust, ~2.6 us a token against ~19 us for two Python ``decode`` calls; the streaming
    worker does this for every token under the GIL the engine thread needs). Otherwise, and as the reference: each
    step decodes a short window of recent tokens (the prefix/read offsets of TGI and vLLM) and sends what it adds;
    text that ends in an incomplete character (U+FFFD) waits for the next token. ``flush`` checks the streamed text
    against one decoding of all tokens and sends what is left of it.
    """

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        backend: Any = None,
        vocab: int | None = None,
        whole: Callable[[list[int]], str] | None = None,
    ) -> None:
        self.decode = decode
        #: The decoding of all tokens that `flush` checks against (``decode`` unless a cheaper equal one is given).
        self.whole = whole or decode
        self.ids: list[int] = []
        self.prefix = 0  # window start: context that makes the next tokens decode as they do in the whole
        self.read = 0  # tokens whose text was sent
        self._backend = backend
        self._stream = DecodeStream(skip_special_tokens=True) if backend is not None else None
        self._vocab = vocab
        self._sent: list[str] = []

    def add(self, tokens: list[int]) -> str:
        """The new text once ``tokens`` are appended ("" while it is an incomplete character)."""
        self.ids.extend(tokens)
        if self._stream is None:
            return self._step(final=False)
        vocab = self._vocab
        if vocab is not None and not all(0 <= t < vocab for t in tokens):
            tokens = [t for t in tokens if 0 <= t < vocab]  # an unknown id has no text (as `Engine.decode_text`)
        if not tokens:
            return ""
        # One step for the whole run (one call into Rust a run, not a token): a run that ends inside a character
        # waits whole for the token that completes it, or for `flush`.
        text = self._stream.step(self._backend, tokens if len(tokens) > 1 else tokens[0]) or ""
        if text:
            self._sent.append(text)
        return text

    def flush(self) -> str:
        """What is left at the end of the stream (an incomplete character included)."""
        if self._stream is None:
            return self._step(final=True)
        whole, sent = self.whole(self.ids), "".join(self._sent)
        if whole.startswith(sent):
            return whole[len(sent) :]
        log.warning("streamed text differs from the decoding of its tokens; the stream ended with what was sent")
        return ""

    def _step(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        sent = self.decode(self.ids[self.prefix : self.read])
        text = self.decode(self.ids[self.prefix :])
        if len(text) > len(sent) and (final or not text.endswith("\ufffd")):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(sent) :]
        return ""


def _rust_decode(backend: Any, vocab: int) -> Callable[[list[int]], str]:
    def decode(ids: list[int]) -> str:
        return str(backend.decode([i for i in ids if 0 <= i < vocab], skip_special_tokens=True))

    return decode


class _Edge:
    """The worker's edge, as pure ASGI middleware: the key check of every path but the open ones (its principal in
    ``request.state.principal``), the ``x-persona-worker`` header on every answer, the request metrics (observed
    once the last byte is sent, so a stream counts whole) and a 500 ``internal_error`` for anything not raised on
    purpose. (Starlette's ``@app.middleware("http")`` runs the app in a task of its own and moves each streamed chunk
    through a memory stream: that cost the event loop, which every stream shares, about a fifth of its time.)"""

    def __init__(
        self,
        app: Any,
        *,
        server: HttpSide,
        open_paths: frozenset[str],
        principal_of: Callable[[Request], Awaitable[Principal]],
    ) -> None:
        self.app = app
        self.open_paths = open_paths
        self.principal_of = principal_of
        self.worker = (b"x-persona-worker", server.name.encode("latin-1", "replace"))
        self.record = server.record_request

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"  # a bounded label set
        status = 500
        began = False

        async def send_named(message: MutableMapping[str, Any]) -> None:
            nonlocal status, began
            if message["type"] == "http.response.start":
                began, status = True, message["status"]
                message = {**message, "headers": [*message.get("headers", ()), self.worker]}
            await send(message)

        try:
            if path not in self.open_paths:
                try:
                    principal = await self.principal_of(Request(scope))
                except PersonaError as e:  # a refused key (or the database behind it failing): nothing else runs
                    await error_response(e)(scope, receive, send_named)
                    return
                scope.setdefault("state", {})["principal"] = principal
            await self.app(scope, receive, send_named)
        except Exception:  # not raised on purpose: a bug, answered 500 and logged with its traceback
            log.exception("%s %s failed", scope.get("method"), path)
            if not began:
                failed = _error(500, "internal error; see the serving worker's log", code="internal_error")
                await failed(scope, receive, send_named)
        finally:
            self.record(endpoint, status, time.perf_counter() - started)


class EventStream(StreamingResponse):
    """Server-sent events, each chunk sent as it comes, straight to the server (a `StreamingResponse` on an ASGI
    server of spec < 2.4, uvicorn's, runs each response in an anyio task group with a disconnect listener of its
    own). A client that goes away calls ``on_disconnect`` (which ends the chunks: the generation is then
    cancelled)."""

    def __init__(
        self, chunks: AsyncIterator[bytes], headers: dict[str, str], on_disconnect: Callable[[], None]
    ) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers=headers)
        self._on_disconnect = on_disconnect

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()

    async def _watch(self, receive: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self._on_disconnect()


def _add_open_routes(app: FastAPI, server: HttpSide, *, metrics: bool) -> None:
    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "base": server.base_id, "cache": server.resident()})

    if metrics:

        @app.get("/metrics")
        def prom() -> Response:
            return Response(server.metrics_text(), media_type=CONTENT_TYPE_LATEST)


def create_admin_app(server: Server) -> FastAPI:
    """``/healthz`` and ``/metrics`` alone, without keys: the app of the separate admin listener."""
    app = FastAPI(title="persona serving admin", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    _add_open_routes(app, server, metrics=True)
    return app


def create_app(server: HttpSide, *, admin: bool = True) -> FastAPI:
    """The OpenAI-compatible app of one serving worker. ``admin``: also serve ``/metrics`` here (``/healthz`` is
    always served: the router's and the orchestrator's health checks use it)."""
    app = FastAPI(title="persona serving", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    tok = server.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)  # the fast tokenizer's `tokenizers.Tokenizer`, if any
    vocab = len(tok)  # (a tokenizer's len() builds its whole vocabulary: once, not per request)
    # `Engine.decode_text` straight from the Rust tokenizer, where transformers adds no clean-up (the same text; its
    # Python wrapper cost the event loop ~20 us a streamed request)
    plain = backend is not None and not getattr(tok, "clean_up_tokenization_spaces", False)
    whole = _rust_decode(backend, vocab) if plain else None
    cfg = server.settings.serving
    open_paths = OPEN_PATHS if admin else frozenset({"/healthz"})

    async def principal_of(request: Request) -> Principal:
        """The key's principal, with the ``serve`` scope; Unauthorized or Forbidden otherwise."""
        try:
            key = bearer_key(request.headers.get("authorization"))
        except Unauthorized:
            server.record_refusal("missing_key")
            raise
        known, principal = server.keys.cached(key)
        if not known:
            principal = await server.offload(server.keys.principal, key)  # the database, once per TTL
        if principal is None:
            server.record_refusal("invalid_key")
            raise Unauthorized(INVALID_KEY)
        try:
            principal.require("serve")
        except PersonaError:
            server.record_refusal("insufficient_scope")
            raise
        return principal

    app.add_middleware(_Edge, server=server, open_paths=open_paths, principal_of=principal_of)

    @app.exception_handler(PersonaError)
    async def persona_error(_: Request, e: PersonaError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # Routing errors (an unknown path, a wrong method) in the same shape as every other error.
        return _error(e.status_code, str(e.detail), code=_HTTP_CODES.get(e.status_code, "http_error"))

    def parse(model_cls: type[BaseModel], raw: bytes) -> BaseModel:
        try:
            return model_cls.model_validate_json(raw)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(map(str, err["loc"]))
            raise InvalidInput(f"{where}: {err['msg']}", param=where or None) from e

    async def body_bytes(request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to pass ``max_request_bytes``: from Content-Length
        before reading anything, else (chunked) while reading, never holding more than the limit."""
        limit = cfg.max_request_bytes
        too_large = RequestTooLarge(f"the request body is larger than {limit} bytes, the limit of this server")
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise InvalidInput(f"Content-Length must be a number of bytes, got {declared[:40]!r}")
            if int(declared) > limit:
                if int(declared) <= _DRAIN_MAX_BYTES:
                    await _drain(request.stream())
                raise too_large
        chunks: list[bytes] = []
        size = 0
        stream = request.stream()
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                await _drain(stream, size)
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    async def read(request: Request, model_cls: type[BaseModel]) -> Any:
        """The validated body."""
        body: Any = parse(model_cls, await body_bytes(request))
        if isinstance(body, CompletionBody | ChatBody):
            check_sampling(body, cfg)
        return body

    def start(
        body: CompletionBody | ChatBody, target: Target, prompt_ids: list[int], loop: asyncio.AbstractEventLoop
    ) -> AsyncTokenStream:
        """Queue the generation (acquiring its adapter may read disk: this runs in the thread pool)."""
        max_tokens = completion_budget(body, len(prompt_ids), server.context, cfg)
        return server.generate_async(target, prompt_ids, body, max_tokens, loop)

    async def answer(body: Any, target: Target, stream: AsyncTokenStream, chat: bool) -> Response:
        """Stream the tokens as server-sent events, or wait for the end and answer once; no thread waits for
        tokens meanwhile (they arrive on the event loop, `Server.generate_async`)."""
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        headers = {"x-persona-revision": target.revision}
        gen = stream.generation
        if body.stream:

            def chunk(choice: dict[str, Any]) -> bytes:
                return _sse(
                    {
                        "id": rid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created,
                        "model": body.model,
                        "choices": [{"index": 0, **choice}],
                    }
                )

            # A text event is its piece between these bytes (what `chunk` makes of {"delta": {"content": piece}} or
            # {"text": piece}): one small JSON encoding per event, the event loop's work for every token.
            head = chunk({"text": 0}).partition(b'"text":0')[0] + (b'"delta":{"content":' if chat else b'"text":')
            tail = b"}}]}\n\n" if chat else b"}]}\n\n"

            async def events() -> AsyncIterator[bytes]:
                text = Detokenizer(server.engine.decode_text, backend, vocab, whole)
                try:
                    # Tokens that arrived together go out as one event; a character split over tokens comes whole.
                    async for run in stream.runs():
                        piece = text.add(run)
                        if piece:
                            yield head + orjson.dumps(piece) + tail
                    piece = text.flush()
                    if piece:
                        yield head + orjson.dumps(piece) + tail
                    failed = gen.finish_reason == "error"
                    if not failed and body.stream_options is not None and body.stream_options.include_usage:
                        yield _sse(
                            {
                                "id": rid,
                                "object": "chat.completion.chunk" if chat else "text_completion",
                                "created": created,
                                "model": body.model,
                                "choices": [],
                                "usage": _usage(gen),
                            }
                        )
                except Exception:
                    log.exception("a streamed generation failed after its first byte")
                    failed = True
                finally:
                    stream.close()
                if failed:  # the status line is sent already: the error travels as the last event
                    yield _sse(
                        error_body(500, "engine_error", "the engine failed while generating; see the worker's log")
                    )
                yield b"data: [DONE]\n\n"

            return EventStream(events(), headers, stream.disconnect)
        try:
            async for _ in stream.runs():
                pass
        finally:
            stream.close()
        if gen.finish_reason == "error":
            return _error(500, "the engine failed while generating; see the worker's log", code="engine_error")
        usage = _usage(gen)
        text = gen.text if gen.text is not None else server.engine.decode_text(gen.output_ids)
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": gen.finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": gen.finish_reason}
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": body.model,
                "choices": [choice],
                "usage": usage,
            },
            headers=headers,
        )

    # Off the event loop, in one hand-over to the thread pool: the model's resolution (the database), tokenizing (up
    # to max_request_bytes of text takes a while) and the adapter's acquisition (disk, the object store); the
    # tokens are then awaited on the event loop.
    def complete(
        body: CompletionBody, principal: Principal, loop: asyncio.AbstractEventLoop
    ) -> tuple[Target, AsyncTokenStream]:
        target = server.resolve(body.model, principal)
        ids = tok(body.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidInput("prompt is empty", param="prompt")
        return target, start(body, target, list(ids), loop)

    def complete_chat(
        body: ChatBody, principal: Principal, loop: asyncio.AbstractEventLoop
    ) -> tuple[Target, AsyncTokenStream]:
        target = server.resolve(body.model, principal)
        try:
            rendered = tok.apply_chat_template(body.rendered_messages(), add_generation_prompt=True, tokenize=False)
        except TemplateError as e:  # the template refuses this conversation (e.g. roles out of order)
            raise InvalidInput(f"messages: the model's chat template refuses them: {e}", param="messages") from e
        return target, start(body, target, list(tok(rendered, add_special_tokens=False)["input_ids"]), loop)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await read(request, CompletionBody)
        loop = asyncio.get_running_loop()
        target, stream = await server.offload(complete, body, request.state.principal, loop)
        return await answer(body, target, stream, False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await read(request, ChatBody)
        loop = asyncio.get_running_loop()
        target, stream = await server.offload(complete_chat, body, request.state.principal, loop)
        return await answer(body, target, stream, True)

    def score_of(body: ScoreBody, principal: Principal) -> tuple[Target, dict[str, Any]]:
        target = server.resolve(body.model, principal)
        return target, server.score(target, body.prompt, body.text)  # a forward pass

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        body = await read(request, ScoreBody)
        target, result = await server.offload(score_of, body, request.state.principal)
        return JSONResponse({"model": body.model, **result}, headers={"x-persona-revision": target.revision})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        listed = await server.offload(server.models, request.state.principal)
        data = [{"id": server.base_id, "object": "model", "created": 0, "owned_by": "persona"}]
        owner = request.state.principal.app_id or "persona"
        data += [{"id": m, "object": "model", "created": at, "owned_by": owner} for m, at in listed]
        return JSONResponse({"object": "list", "data": data})

    _add_open_routes(app, server, metrics=admin)
    return app


def worker_id(cfg: ServingSettings) -> str:
    """This worker's stable name: ``PERSONA_SERVE_WORKER_ID``, else ``{hostname}-{port}``."""
    return cfg.worker_id or f"{socket.gethostname()}-{cfg.port}"


def listen_for_promotions(
    server: Server, kafka: Any, group_prefix: str = "persona-serving", *, group_id: str | None = None
) -> Any:
    """Every serving worker hears every promotion and forget: a consumer group of its own, named after the worker
    (`worker_id`) and committing its position, so a restarted worker first hears what it missed while down (a
    forget included). The promoted user's older revisions leave the cache and the new one is prefetched into host
    memory, packed for the slots, so the next request serves it and pays only the copy into a slot; a forgotten
    user's adapters leave every tier."""
    from pipeline.serving.promotions import PromotionListener

    def on_promotion(event: dict) -> None:
        server.cache.invalidate(event["user_id"], keep_revision=event["revision_id"])
        server.cache.prefetch(AdapterKey(event["user_id"], event["revision_id"], event["sha256"]))

    def on_forget(event: dict) -> None:
        server.cache.forget(event["user_id"], event["sha256s"])

    group = group_id or f"{group_prefix}-{worker_id(server.settings.serving)}"
    return PromotionListener(kafka, group, on_promotion, on_forget=on_forget).start()


def uvicorn_servers(server: Server) -> tuple[Any, Any | None]:
    """(the API's uvicorn server, the admin listener's or None), as `ServingSettings` places them."""
    import uvicorn

    cfg = server.settings.serving
    separate = cfg.admin_port != 0
    # What is alive now (the base, the engine, the libraries) lives as long as the worker: keep it out of the cyclic
    # garbage collector's full passes, which otherwise stall the engine thread for tens of milliseconds.
    gc.freeze()
    # The engine thread gives the GIL away at each torch call of a step; under load the event loop holds it for up
    # to the switch interval each time (Python's default 5 ms), so a step waited tens of milliseconds.
    sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000)
    api = uvicorn.Server(
        uvicorn.Config(
            create_app(server, admin=not separate),
            host=cfg.host,
            port=cfg.port,
            log_level="info",
            access_log=cfg.access_log,
        )
    )
    if not separate:
        return api, None
    return api, _admin_server(server)


def _admin_server(server: Server) -> Any:
    import uvicorn

    cfg = server.settings.serving
    return uvicorn.Server(
        uvicorn.Config(create_admin_app(server), host=cfg.admin_host, port=cfg.admin_port, log_level="warning")
    )


def serve(settings: Settings, base: LoadedBase) -> None:
    """Run one serving worker until interrupted: engine, cache, promotions listener, the HTTP API (`run_http`)."""
    server = Server(settings, base)
    listener = listen_for_promotions(server, settings.kafka)
    try:
        run_http(server)
    finally:
        listener.stop()
        server.close()


def run_http(server: Server, *, frontend: type[Frontend] | None = None, extra: Any = None) -> None:
    """Serve ``server``'s HTTP API until SIGINT or SIGTERM: in this process, or in ``http_processes`` processes of
    its own (`pipeline.serving.frontends`; ``frontend`` and ``extra``: what each builds), and (when configured) the
    admin listener in a thread of this process."""
    cfg = server.settings.serving
    hub = None
    if cfg.http_processes:
        api, admin = None, _admin_server(server) if cfg.admin_port != 0 else None
    else:
        api, admin = uvicorn_servers(server)
    admin_thread = None
    if admin is not None:
        admin_thread = threading.Thread(target=admin.run, name="persona-admin-http", daemon=True)
        admin_thread.start()
    try:
        if api is not None:
            api.run()  # uvicorn keeps the signal handling
            return
        stop = threading.Event()
        previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            gc.freeze()
            sys.setswitchinterval(cfg.gil_switch_interval_ms / 1000)
            hub = FrontendHub(server, cfg.http_processes, create_app, frontend=frontend, extra=extra)
            while not stop.wait(0.5) and not hub.stopped.is_set():
                pass
            log.info("stopping the HTTP processes")
        finally:
            if hub is not None:
                hub.close()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if admin is not None and admin_thread is not None:
            admin.should_exit = True
            admin_thread.join(timeout=10)
