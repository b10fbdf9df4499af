"""One serving worker's engine, its driving thread, its adapter cache and the resolution of ``model`` strings.

``model`` chooses the adapter: ``user:{user_id}`` (the user's production revision), ``user:{user_id}@{revision}``
(a named revision of that user) or the base model's id. One thread drives the engine (it is not thread-safe);
request handlers hand it requests and wait for their tokens; adapter loads into device slots take the same lock.
The HTTP API over it is `pipeline.serving.api`.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, Field

from pipeline.config import Settings
from pipeline.domain.errors import InvalidInput, NotFound
from pipeline.domain.revisions import check_revision_id
from pipeline.models.base import LoadedBase
from pipeline.observability import metrics as obs
from pipeline.serving.adapters import AdapterKey, AdapterLimits, registry_fetch
from pipeline.serving.cache import AdapterCache
from pipeline.serving.engine import Generation
from pipeline.serving.engine import Request as EngineRequest
from pipeline.serving.fast_engine import make_engine
from pipeline.storage import registry
from pipeline.storage.stores import Stores

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


class ModelNotFound(NotFound):
    """``model`` names a user without a served revision, or a revision that is not that user's or not served."""

    code = "model_not_found"


class InvalidModel(InvalidInput):
    """``model`` is none of the accepted forms."""

    code = "invalid_model"


@dataclass(frozen=True)
class Target:
    """What a ``model`` string resolved to: an adapter key (None for the base) and the revision header."""

    key: AdapterKey | None
    revision: str


class Server:
    """The engine, its driving thread, the adapter cache and the model resolution of one serving worker."""

    def __init__(self, settings: Settings, base: LoadedBase, name: str | None = None) -> None:
        cfg = settings.serving
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{cfg.port}:{os.getpid()}"  # header x-persona-worker
        self.base_id = base.ref.model_id
        self.tokenizer = base.tokenizer
        self.engine = make_engine(base, cfg)
        self.lock = threading.Lock()  # the engine: steps, submits and slot loads
        self.wake = threading.Event()
        self.streams: dict[int, queue.Queue[int | None]] = {}
        self.stores = Stores.open(settings.db, settings.s3, name="persona-serve", wait=False)
        self.cache = AdapterCache(
            registry_fetch(self.stores),
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
        self.stores.close()

    # --- resolution ---
    def resolve(self, model: str) -> Target:
        """``model`` to an adapter key: ModelNotFound for an unknown user or revision, InvalidModel for bad syntax
        (StorageError when PostgreSQL fails)."""
        if model == self.base_id:
            return Target(None, "base")
        if not model.startswith("user:"):
            forms = f"'user:{{user_id}}', 'user:{{user_id}}@{{revision}}' or {self.base_id!r}"
            raise InvalidModel(f"model must be {forms}, got {model!r}", param="model")
        user, _, rev_id = model[5:].partition("@")
        try:
            rid = check_revision_id(rev_id) if rev_id else None
        except InvalidInput as e:
            raise InvalidModel(str(e), param="model") from e
        with self.stores.db.connection() as conn:
            if rid is not None:
                try:
                    rev = registry.get_revision(conn, rid)
                except NotFound as e:
                    raise ModelNotFound(str(e), param="model") from e
                if rev.user_id != user:
                    raise ModelNotFound(f"revision {rev.revision_id} is not a revision of {user!r}", param="model")
                if rev.status == "rejected":
                    raise ModelNotFound(
                        f"revision {rev.revision_id} was rejected by the gate and is not served", param="model"
                    )
            else:
                serving = registry.production(conn, user)
                if serving is None:
                    raise ModelNotFound(
                        f"{user!r} has no production revision (unknown user, or none promoted yet)", param="model"
                    )
                rev = serving
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

    def generate(self, target: Target, prompt_ids: list[int], body: CompletionBody | ChatBody) -> TokenStream:
        """Token ids as the engine produces them. The adapter is acquired now (its errors raise here, before a
        response starts) and stays pinned in its slot until the stream ends or is closed."""
        gen, q = self._start(target, prompt_ids, body)
        return TokenStream(lambda: self._end(target, gen), q)

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
            raise InvalidInput("text must have at least one token after the first token of the input", param="text")
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


class TokenStream:
    """The tokens of one generation; closing it (or dropping it unread) releases the request's adapter."""

    def __init__(self, release: Callable[[], None], tokens: queue.Queue[int | None]) -> None:
        self._release: Callable[[], None] | None = release
        self._tokens = tokens

    def __iter__(self) -> Iterator[int]:
        try:
            while (token := self._tokens.get(timeout=300)) is not None:
                yield token
        finally:
            self.close()

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __del__(self) -> None:  # a response that never started iterating still gives its slot back
        self.close()


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
