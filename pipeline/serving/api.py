"""The serving worker's HTTP API (OpenAI-compatible) over `pipeline.serving.server.Server`.

``POST /v1/completions``, ``POST /v1/chat/completions`` (with ``stream``), ``POST /v1/score``, ``GET /v1/models``,
``GET /healthz``, ``GET /metrics``. Every answer names what served it in the header ``x-persona-revision``
(``base`` for the base) and the worker in ``x-persona-worker``.

Errors: every error persona raises on purpose is answered once, from its category (`pipeline.domain.errors`), as
an OpenAI-shaped body ``{"error": {"message", "type", "param", "code"}}``: 400 bad input (``invalid_request``,
``invalid_model``), 404 ``model_not_found``, 422 ``adapter_not_servable`` (over this worker's rank or target
limits), 429 ``slots_exhausted`` (every device slot holds an adapter in use; Retry-After), 503
``database_unavailable``, ``object_store_unavailable`` (Retry-After) or ``adapter_corrupt`` (the stored bytes fail
their sha256 check). Anything else is a bug: 500 ``internal_error``, logged with its traceback. A streamed answer
acquires its adapter before the first byte, so these statuses hold for streams too.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import Settings
from pipeline.domain.errors import InvalidInput, PersonaError, body_of, error_body
from pipeline.models.base import LoadedBase
from pipeline.observability import metrics as obs
from pipeline.serving.adapters import AdapterKey
from pipeline.serving.server import ChatBody, CompletionBody, ScoreBody, Server, Target

log = logging.getLogger(__name__)


def _error(status: int, message: str, *, code: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, param), status)


def error_response(e: PersonaError) -> JSONResponse:
    """The answer to an error persona raised on purpose: its category's status and code (module docstring)."""
    headers = {"Retry-After": str(round(e.retry_after_s))} if e.retry_after_s else None
    if e.http_status >= 500:
        log.warning("answering %d %s: %s", e.http_status, e.code, e)
    return JSONResponse(body_of(e), e.http_status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/score", "/v1/models", "/healthz", "/metrics"})


def create_app(server: Server) -> FastAPI:
    """The OpenAI-compatible app of one serving worker."""
    app = FastAPI(title="persona serving", version="1")
    tok = server.tokenizer

    @app.middleware("http")
    async def worker_header(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        path = request.url.path
        endpoint = path if path in _ENDPOINTS else "other"  # a bounded label set

        def observe(status: int) -> None:
            obs.SERVING_REQUESTS.labels(endpoint, str(status)).inc()
            obs.SERVING_REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - started)

        try:
            response = await call_next(request)
        except Exception:  # not raised on purpose: a bug, answered 500 and logged with its traceback
            log.exception("%s %s failed", request.method, path)
            failed = _error(500, "internal error; see the serving worker's log", code="internal_error")
            failed.headers["x-persona-worker"] = server.name
            observe(500)
            return failed
        response.headers["x-persona-worker"] = server.name  # which worker of the pool answered
        body = response.body_iterator

        async def timed() -> Any:  # observed after the last byte, so a stream counts whole
            try:
                async for chunk in body:
                    yield chunk
            finally:
                observe(response.status_code)

        response.body_iterator = timed()
        return response

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

    def answer(body: Any, target: Target, prompt_ids: list[int], chat: bool) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        headers = {"x-persona-revision": target.revision}
        if body.stream:
            stream = server.generate(target, prompt_ids, body)

            def events() -> Iterator[bytes]:
                ids: list[int] = []
                sent = ""
                for token in stream:
                    # Decode everything so far and send what is new: a character split over tokens comes whole.
                    ids.append(token)
                    text = server.engine.decode_text(ids)
                    piece, sent = text[len(sent) :], text
                    if not piece:
                        continue
                    delta = {"delta": {"content": piece}} if chat else {"text": piece}
                    chunk = {
                        "id": rid,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created,
                        "model": body.model,
                        "choices": [{"index": 0, **delta}],
                    }
                    yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                yield b"data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        gen = server.run(target, prompt_ids, body)
        if gen.finish_reason == "error":
            return _error(500, "the engine failed while generating; see the worker's log", code="engine_error")
        usage = {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": len(gen.output_ids),
            "total_tokens": len(prompt_ids) + len(gen.output_ids),
        }
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

    async def read(request: Request, model_cls: type[BaseModel]) -> tuple[Any, Target]:
        """The validated body and what its ``model`` resolves to (the database lookup runs off the event loop)."""
        body: Any = parse(model_cls, await request.body())
        target = await run_in_threadpool(server.resolve, body.model)
        return body, target

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body, target = await read(request, CompletionBody)
        ids = tok(body.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InvalidInput("prompt is empty", param="prompt")
        return await run_in_threadpool(answer, body, target, ids, False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body, target = await read(request, ChatBody)
        rendered = tok.apply_chat_template(
            [m.model_dump() for m in body.messages], add_generation_prompt=True, tokenize=False
        )
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        return await run_in_threadpool(answer, body, target, list(ids), True)

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        body, target = await read(request, ScoreBody)
        result = await run_in_threadpool(server.score, target, body.prompt, body.text)  # a forward pass
        return JSONResponse({"model": body.model, **result}, headers={"x-persona-revision": target.revision})

    @app.get("/v1/models")
    def models() -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": server.base_id, "object": "model", "owned_by": "persona"},
                    {
                        "id": "user:{user_id}",
                        "object": "model",
                        "owned_by": "persona",
                        "description": "a user's production adapter; user:{user_id}@{revision} names a revision",
                    },
                ],
            }
        )

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "base": server.base_id, "cache": server.cache.stats().resident})

    @app.get("/metrics")
    def prom() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def listen_for_promotions(server: Server, kafka: Any, group_prefix: str = "persona-serving") -> Any:
    """Every serving worker hears every promotion (a consumer group of its own): the promoted user's older
    revisions leave the cache and the new one is prefetched, so the next request serves it."""
    import os
    import socket

    from pipeline.serving.promotions import PromotionListener

    def on_promotion(event: dict) -> None:
        server.cache.invalidate(event["user_id"], keep_revision=event["revision_id"])
        server.cache.prefetch(AdapterKey(event["user_id"], event["revision_id"], event["sha256"]))

    def on_forget(event: dict) -> None:
        server.cache.forget(event["user_id"], event["sha256s"])

    group = f"{group_prefix}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    return PromotionListener(kafka, group, on_promotion, on_forget=on_forget).start()


def serve(settings: Settings, base: LoadedBase) -> None:
    """Run one serving worker until interrupted: engine, cache, promotions listener and the HTTP API."""
    import uvicorn

    server = Server(settings, base)
    listener = listen_for_promotions(server, settings.kafka)
    try:
        uvicorn.run(create_app(server), host=settings.serving.host, port=settings.serving.port, log_level="info")
    finally:
        listener.stop()
        server.close()
