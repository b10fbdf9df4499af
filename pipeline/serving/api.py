"""The serving worker's HTTP API (OpenAI-compatible) over the engine and the adapter cache.

``model`` chooses the adapter: ``user:{user_id}`` (the user's production revision), ``user:{user_id}@{revision}``
(a named revision of that user) or the base model's id. Every answer names what served it in the header
``x-persona-revision`` (``base`` for the base). One thread drives the engine (it is not thread-safe); request
handlers hand it requests and wait for their tokens; adapter loads into device slots take the same lock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from pipeline.config import Settings
from pipeline.domain.errors import InvalidInput, NotFound
from pipeline.domain.revisions import check_revision_id
from pipeline.models.base import LoadedBase
from pipeline.observability import metrics as obs
from pipeline.serving.adapters import AdapterKey, AdapterLimits, registry_fetch
from pipeline.serving.cache import AdapterCache
from pipeline.serving.engine import EngineError, Generation
from pipeline.serving.engine import Request as EngineRequest
from pipeline.serving.fast_engine import make_engine
from pipeline.storage import db, registry
from pipeline.storage.objects import ObjectStore
from pipeline.storage.registry import Registry

log = logging.getLogger(__name__)


class _Sampling(BaseModel):
    """The sampling parameters both completion endpoints take (OpenAI's names and meanings)."""

    model: str
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class CompletionBody(_Sampling):
    prompt: str


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(64, ge=1)


class ScoreBody(BaseModel):
    model: str
    text: str = Field(min_length=1)
    prompt: str | None = None


def _error(status: int, message: str, *, code: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


@dataclass(frozen=True)
class Target:
    """What a ``model`` string resolved to: an adapter key (None for the base) and the revision header."""

    key: AdapterKey | None
    revision: str


class Server:
    """The engine, its driving thread, the adapter cache and the model resolution of one serving worker."""

    def __init__(self, settings: Settings, base: LoadedBase, name: str | None = None) -> None:
        import os
        import socket

        cfg = settings.serving
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{cfg.port}:{os.getpid()}"  # header x-persona-worker
        self.base_id = base.ref.model_id
        self.tokenizer = base.tokenizer
        self.engine = make_engine(base, cfg)
        self.lock = threading.Lock()  # the engine: steps, submits and slot loads
        self.wake = threading.Event()
        self.streams: dict[int, queue.Queue[int | None]] = {}
        self.registry = Registry(settings.db, ObjectStore(settings.s3))
        self.cache = AdapterCache(
            registry_fetch(self.registry),
            disk_dir=cfg.cache_dir,
            disk_bytes=cfg.disk_cache_bytes,
            host_bytes=cfg.host_cache_bytes,
            slots=cfg.slots,
            limits=AdapterLimits(cfg.max_rank, frozenset(cfg.targets)),
            loader=_LockedSlots(self),
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="persona-engine", daemon=True)
        self._thread.start()

    # --- the engine thread ---
    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.engine.has_work():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                with self.lock:
                    outputs = self.engine.step()
            except Exception:
                # A failed step must not stop the worker: its requests end with finish_reason "error".
                log.exception("engine step failed; aborting the requests in flight")
                with self.lock:
                    aborted = self.engine.abort_all()
                for gen in aborted:
                    q = self.streams.get(gen.id)
                    if q is not None:
                        q.put(None)
                continue
            for out in outputs:
                q = self.streams.get(out.generation.id)
                if q is not None:
                    q.put(out.token_id)
                    if out.finished:
                        q.put(None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.cache.close()
        self.engine.close()

    # --- resolution ---
    def resolve(self, model: str) -> Target:
        """``model`` to an adapter key; NotFound for an unknown user or revision, InvalidInput for bad syntax."""
        if model == self.base_id:
            return Target(None, "base")
        if not model.startswith("user:"):
            raise InvalidInput(
                f"model must be 'user:{{user_id}}', 'user:{{user_id}}@{{revision}}' or {self.base_id!r}, got {model!r}"
            )
        user, _, rev_id = model[5:].partition("@")
        with db.connect(self.settings.db) as conn:
            if rev_id:
                rev = registry.get_revision(conn, check_revision_id(rev_id))
                if rev.user_id != user:
                    raise NotFound(f"revision {rev.revision_id} is not a revision of {user!r}")
                if rev.status == "rejected":
                    raise NotFound(f"revision {rev.revision_id} was rejected by the gate and is not served")
            else:
                rev = registry.production(conn, user)
                if rev is None:
                    raise NotFound(f"{user!r} has no production revision (unknown user, or none promoted yet)")
        return Target(AdapterKey(user, rev.revision_id, rev.sha256), rev.revision_id)

    # --- generation ---
    def _start(
        self, target: Target, prompt_ids: list[int], body: CompletionBody | ChatBody
    ) -> tuple[Generation, queue.Queue]:
        """Pin the adapter in a slot and queue the request for the engine thread."""
        max_tokens = min(body.max_tokens, self.settings.serving.max_tokens)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        slot = self.cache.acquire(target.key) if target.key is not None else -1
        q: queue.Queue[int | None] = queue.Queue()
        try:
            req = EngineRequest(prompt_ids, slot, max_tokens, body.temperature, body.top_p, (), stop, body.seed)
            with self.lock:
                gen = self.engine.submit(req)
                self.streams[gen.id] = q
        except BaseException:
            if target.key is not None:
                self.cache.release(target.key)
            raise
        self.wake.set()
        return gen, q

    def _end(self, target: Target, gen: Generation) -> None:
        obs.SERVING_TOKENS.labels("prompt").inc(len(gen.request.prompt_ids))
        obs.SERVING_TOKENS.labels("completion").inc(len(gen.output_ids))
        self.streams.pop(gen.id, None)
        if target.key is not None:
            self.cache.release(target.key)

    def generate(self, target: Target, prompt_ids: list[int], body: CompletionBody | ChatBody) -> Iterator[int]:
        """Token ids as the engine produces them (the adapter stays pinned in its slot until the last one)."""
        gen, q = self._start(target, prompt_ids, body)
        try:
            while (token := q.get(timeout=300)) is not None:
                yield token
        finally:
            self._end(target, gen)

    def run(self, target: Target, prompt_ids: list[int], body: CompletionBody | ChatBody) -> Generation:
        """Generate to the end and return the finished generation."""
        gen, q = self._start(target, prompt_ids, body)
        try:
            while q.get(timeout=300) is not None:
                pass
        finally:
            self._end(target, gen)
        return gen

    def score(self, target: Target, prompt: str | None, text: str) -> dict[str, Any]:
        """Per-token log-likelihood of ``text`` (after ``prompt``, if given) under the target."""
        prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        text_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + text_ids
        if len(ids) < 2 or not text_ids:
            raise InvalidInput("text must have at least one token after the first token of the input")
        slot = self.cache.acquire(target.key) if target.key is not None else -1
        try:
            with self.lock:
                logits = self.engine.logits(torch.tensor([ids]), None, [slot])[0].float()
        finally:
            if target.key is not None:
                self.cache.release(target.key)
        logprobs = torch.log_softmax(logits[:-1], dim=-1)
        start = max(len(prompt_ids), 1)
        picked = [float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids))]
        tokens = [self.engine.decode_text([t]) for t in ids[start:]]
        return {
            "tokens": tokens,
            "token_logprobs": picked,
            "sum_logprob": sum(picked),
            "mean_logprob": sum(picked) / len(picked),
        }


class _LockedSlots:
    """The cache's SlotLoader: loads into the engine's slots under the engine lock."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def load(self, slot: int, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        with self.server.lock:
            self.server.engine.load_adapter_state(slot, tensors, config)

    def clear(self, slot: int) -> None:
        with self.server.lock:
            self.server.engine.clear_adapter(slot)


_ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/score", "/v1/models", "/healthz", "/metrics"})


def create_app(server: Server) -> FastAPI:
    """The OpenAI-compatible app of one serving worker."""
    app = FastAPI(title="persona serving", version="1")
    tok = server.tokenizer

    @app.middleware("http")
    async def worker_header(request: Request, call_next: Any) -> Response:
        started = time.perf_counter()
        response = await call_next(request)
        response.headers["x-persona-worker"] = server.name  # which worker of the pool answered
        path = request.url.path
        endpoint = path if path in _ENDPOINTS else "other"  # a bounded label set
        body = response.body_iterator  # type: ignore[attr-defined]

        async def timed() -> Any:  # observed after the last byte, so a stream counts whole
            try:
                async for chunk in body:
                    yield chunk
            finally:
                obs.SERVING_REQUESTS.labels(endpoint, str(response.status_code)).inc()
                obs.SERVING_REQUEST_SECONDS.labels(endpoint).observe(time.perf_counter() - started)

        response.body_iterator = timed()  # type: ignore[attr-defined]
        return response

    def parse(model_cls: type[BaseModel], raw: bytes) -> BaseModel | JSONResponse:
        try:
            return model_cls.model_validate_json(raw)
        except ValidationError as e:
            err = e.errors()[0]
            return _error(
                400,
                f"{'.'.join(map(str, err['loc']))}: {err['msg']}",
                code="invalid_request",
                param=".".join(map(str, err["loc"])),
            )

    def resolve(model: str) -> Target | JSONResponse:
        try:
            return server.resolve(model)
        except NotFound as e:
            return _error(404, str(e), code="model_not_found", param="model")
        except InvalidInput as e:
            return _error(400, str(e), code="invalid_model", param="model")

    def answer(body: Any, target: Target, prompt_ids: list[int], chat: bool) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        headers = {"x-persona-revision": target.revision}
        if body.stream:

            def events() -> Iterator[bytes]:
                ids: list[int] = []
                sent = ""
                for token in server.generate(target, prompt_ids, body):
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
        try:
            gen = server.run(target, prompt_ids, body)
        except EngineError as e:
            return _error(400, str(e), code="invalid_request")
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

    async def read(request: Request, model_cls: type[BaseModel]) -> tuple[Any, Target] | JSONResponse:
        """The validated body and what its ``model`` resolves to (the database lookup runs off the event loop)."""
        body = parse(model_cls, await request.body())
        if isinstance(body, JSONResponse):
            return body
        target = await run_in_threadpool(resolve, body.model)
        return target if isinstance(target, JSONResponse) else (body, target)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        got = await read(request, CompletionBody)
        if isinstance(got, JSONResponse):
            return got
        body, target = got
        ids = tok(body.prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            return _error(400, "prompt is empty", code="invalid_request", param="prompt")
        return await run_in_threadpool(answer, body, target, ids, False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        got = await read(request, ChatBody)
        if isinstance(got, JSONResponse):
            return got
        body, target = got
        rendered = tok.apply_chat_template(
            [m.model_dump() for m in body.messages], add_generation_prompt=True, tokenize=False
        )
        ids = tok(rendered, add_special_tokens=False)["input_ids"]
        return await run_in_threadpool(answer, body, target, list(ids), True)

    @app.post("/v1/score")
    async def score(request: Request) -> Response:
        got = await read(request, ScoreBody)
        if isinstance(got, JSONResponse):
            return got
        body, target = got
        try:  # a forward pass: off the event loop
            result = await run_in_threadpool(server.score, target, body.prompt, body.text)
        except InvalidInput as e:
            return _error(400, str(e), code="invalid_request", param="text")
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
