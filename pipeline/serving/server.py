"""One serving worker's engine, its driving thread, its adapter cache and the resolution of ``model`` strings.

``model`` chooses the adapter: ``user:{user_id}`` (the user's production revision), ``user:{user_id}@{revision}``
(a named revision of that user) or the base model's id (`pipeline.domain.revisions.parse_model_name`). A key serves
the base and the users of its own application only: a user of another application, an unknown user, and a revision
that does not exist or is not that user's all answer the same 404 (`ModelNotFound`, one message built from the
``model`` string alone), so a key learns nothing about what it may not use. One thread drives the engine (it is not
thread-safe); request handlers hand it requests and wait for their tokens. Adapter loads into device slots do not
take the engine's lock: the cache packs an adapter once when it enters host memory and a slot load is one copy,
which the engines allow beside a running step for a slot no request uses (`engine_slots`). The HTTP API over it is
`pipeline.serving.api`.

Forget, on the serving side: at start, a background thread deletes the disk copies whose sha256 no revision in the
registry has any more (one query, retried with backoff while PostgreSQL does not answer); until then, and always, a
disk copy is adopted only after the registry confirms its revision (`AdapterCache.registered`); and every request
resolves ``model`` against the registry, so a forgotten user is a 404 on the next request even on a worker that has
not heard the forget yet.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar

import torch
from prometheus_client import generate_latest

from pipeline.config import Settings
from pipeline.domain.apikeys import Principal
from pipeline.domain.backoff import Backoff
from pipeline.domain.errors import InvalidInput, NotFound, Unavailable
from pipeline.domain.revisions import InvalidModelName, parse_model_name
from pipeline.models.base import LoadedBase
from pipeline.observability import metrics as obs
from pipeline.serving.adapters import AdapterKey, AdapterLimits, EngineSlots, registry_check, registry_fetch
from pipeline.serving.admission import Admission
from pipeline.serving.auth import KeyCache
from pipeline.serving.bodies import (  # noqa: F401 (ChatMessage and ScoreBody: re-exported, the API's bodies)
    ChatBody,
    ChatMessage,
    CompletionBody,
    ScoreBody,
    check_score_length,
)
from pipeline.serving.cache import AdapterCache
from pipeline.serving.engine import Engine, Generation
from pipeline.serving.engine import Request as EngineRequest
from pipeline.serving.fast_engine import make_engine
from pipeline.serving.fill import FetchSpec, FillPool, RegistryFetchSpec
from pipeline.storage import apps, registry, tenancy
from pipeline.storage.stores import Stores

log = logging.getLogger(__name__)
T = TypeVar("T")


class ModelNotFound(NotFound):
    """``model`` names nothing this key may use: an unknown user, another application's user, a user without a
    served revision, or a revision that does not exist or is not that user's (one message for all of them)."""

    code = "model_not_found"


#: ``model`` is none of the accepted forms (400 invalid_model; the parsing is the domain's).
InvalidModel = InvalidModelName


def not_found(model: str) -> ModelNotFound:
    """The one answer for every ``model`` a key may not use or that does not exist: built from ``model`` alone."""
    shown = repr(model) if len(model) <= 200 else repr(model[:200]) + "..."
    return ModelNotFound(
        f"the model {shown} does not exist or this key may not use it (`GET /v1/models` lists what it may use)",
        param="model",
    )


@dataclass(frozen=True)
class Target:
    """What a ``model`` string resolved to: an adapter key (None for the base), the revision header, and the
    ``model`` string asked for."""

    key: AdapterKey | None
    revision: str
    model: str = ""


class Resolution:
    """Keys to principals, ``model`` strings to targets and the models list, from the registry: what the worker's
    HTTP side does for every request, in the serving process itself or in each of its HTTP processes
    (`pipeline.serving.frontends`). Needs ``stores``, ``base_id``, ``settings``, ``_models`` and ``_models_lock``."""

    stores: Stores
    base_id: str
    settings: Settings
    _models: dict[str, tuple[float, list[tuple[str, int]]]]
    _models_lock: threading.Lock

    def _authenticate(self, key: str) -> Principal | None:
        with self.stores.db.connection() as conn:
            return apps.authenticate(conn, key)

    def resolve(self, model: str, principal: Principal) -> Target:
        """``model`` to an adapter key, for ``principal``: InvalidModel for bad syntax; `not_found` for anything the
        key may not use or that does not exist (StorageError when PostgreSQL fails). The owner check and the alias
        lookup share one pooled connection."""
        name = parse_model_name(model, self.base_id)
        if name.user_id is None:
            return Target(None, "base", model)
        user = name.user_id
        with self.stores.db.connection() as conn:
            # Ownership first, for every form: a user of another application answers exactly like an unknown one.
            if not principal.may_act_for(tenancy.owner_of(conn, user)):
                raise not_found(model)
            if name.revision_id is not None:
                try:
                    rev = registry.get_revision(conn, name.revision_id)
                except NotFound as e:
                    raise not_found(model) from e
                if rev.user_id != user:
                    raise not_found(model)
                if rev.status == "rejected":  # the key's own user: saying why is no leak
                    raise ModelNotFound(
                        f"revision {rev.revision_id} of {user!r} was rejected by the gate and is not served",
                        param="model",
                    )
            else:
                serving = registry.production(conn, user)
                if serving is None:
                    raise not_found(model)
                rev = serving
        return Target(AdapterKey(user, rev.revision_id, rev.sha256), rev.revision_id, model)

    def models(self, principal: Principal) -> list[tuple[str, int]]:
        """(``user:{id}``, created) of the first `models_list_limit` users by id of the key's application with a
        production revision; remembered per application for `key_cache_ttl_s`."""
        cfg = self.settings.serving
        if principal.app_id is None or cfg.models_list_limit == 0:
            return []
        now = time.monotonic()
        with self._models_lock:
            hit = self._models.get(principal.app_id)
            if hit is not None and now - hit[0] < cfg.key_cache_ttl_s:
                return hit[1]
        with self.stores.db.connection() as conn:
            rows = tenancy.app_models(conn, principal.app_id, cfg.models_list_limit)
        listed = [(f"user:{u}", int(at.timestamp())) for u, at in rows]
        with self._models_lock:
            self._models[principal.app_id] = (now, listed)
            while len(self._models) > 1024:  # bounded: one entry per application seen recently
                self._models.pop(next(iter(self._models)))
        return listed


class HttpSide(Protocol):
    """What the HTTP API (`pipeline.serving.api.create_app`) uses: a `Server` in the serving process, a
    `pipeline.serving.frontends.Frontend` in each HTTP process."""

    name: str
    base_id: str
    tokenizer: Any
    settings: Settings
    keys: KeyCache
    context: int
    engine: Any  # decode_text(ids) -> str

    def offload(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]: ...
    def resolve(self, model: str, principal: Principal) -> Target: ...
    def models(self, principal: Principal) -> list[tuple[str, int]]: ...
    def generate_async(
        self,
        target: Target,
        prompt_ids: list[int],
        body: CompletionBody | ChatBody,
        max_tokens: int,
        loop: asyncio.AbstractEventLoop,
    ) -> AsyncTokenStream: ...
    def score(self, target: Target, prompt: str | None, text: str) -> dict[str, Any]: ...
    def resident(self) -> dict[str, int]: ...
    def metrics_text(self) -> bytes: ...
    def record_request(self, endpoint: str, status: int, seconds: float) -> None: ...
    def record_refusal(self, reason: str) -> None: ...


class Sampling(NamedTuple):
    """A generation's sampling parameters, as the engine takes them."""

    temperature: float
    top_p: float
    stops: tuple[str, ...]
    seed: int | None

    @classmethod
    def of(cls, body: CompletionBody | ChatBody) -> Sampling:
        return cls(body.temperature, body.top_p, tuple(body.stops()), body.seed)


class Server(Resolution):
    """The engine, its driving thread, the adapter cache and the model resolution of one serving worker."""

    def __init__(self, settings: Settings, base: LoadedBase, name: str | None = None) -> None:
        cfg = settings.serving
        self.settings = settings
        self.name = name or f"{socket.gethostname()}:{cfg.port}:{os.getpid()}"  # header x-persona-worker
        self.base_id = base.ref.model_id
        self.tokenizer = base.tokenizer
        # The fill processes start first: each boots a Python with the project imported (seconds) while the engine
        # is built and warmed up, and all answer before the cache exists, so no first request waits for one.
        fill = FillPool(self.fetch_spec(), cfg.fill_processes) if cfg.fill_processes else None
        try:
            self.engine = make_engine(base, cfg)
            warmup = getattr(self.engine, "warmup", None)
            if warmup is not None:
                warmup()  # every CUDA graph captured before the first request
            if fill is not None:
                fill.pids()
        except BaseException:
            if fill is not None:
                fill.close()
            raise
        self.lock = threading.Lock()  # the engine: steps, submits, scoring (not slot loads: `engine_slots`)
        self.wake = threading.Event()
        #: Where each running request's tokens go: the queue of its consumer's event loop (`generate_async`).
        self.streams: dict[int, _LoopSink] = {}
        #: What the engine thread holds back between a stream's deliveries (`ServingSettings.stream_interval_ms`).
        self._holding = _Holding(cfg.stream_interval_ms / 1e3)
        # Submitting does not take the engine lock (a step holds it for milliseconds and a waiting thread may lose
        # the race for it many steps in a row): the engine's queue takes appends from any thread, and this short
        # lock only makes "submit + register the stream" atomic against the engine thread's token delivery.
        self._streams_lock = threading.RLock()  # re-entrant: a stream dropped by the GC may close inside it
        #: Prompt + generated tokens of one request, at most (the base's max_position_embeddings, and the fast
        #: engine's max_seq).
        self.context: int = int(self.engine.max_positions)
        self.stores = Stores.open(settings.db, settings.s3, name="persona-serve", wait=False)
        self.cache = AdapterCache(
            registry_fetch(self.stores),
            disk_dir=cfg.cache_dir,
            disk_bytes=cfg.disk_cache_bytes,
            host_bytes=cfg.host_cache_bytes,
            slots=cfg.slots,
            limits=AdapterLimits(cfg.max_rank, frozenset(cfg.targets)),
            loader=engine_slots(self.engine, self.lock),
            registered=registry_check(self.stores),
            write_behind=True,
            fill=fill,
        )
        self.keys = KeyCache(self._authenticate, ttl_s=cfg.key_cache_ttl_s, max_entries=cfg.key_cache_size)
        self._models: dict[str, tuple[float, list[tuple[str, int]]]] = {}  # app -> (when, its listed models)
        self._models_lock = threading.Lock()
        #: The request handlers' blocking work (resolution, tokenizing, acquisition, scoring): `offload`.
        self.pool = ThreadPoolExecutor(max_workers=cfg.api_threads, thread_name_prefix="persona-api")
        #: The HTTP processes' other calls (scoring, /metrics, /healthz): not queued behind generations that wait
        #: their turn in ``pool`` (`admission`).
        self.calls = ThreadPoolExecutor(max_workers=4, thread_name_prefix="persona-api-calls")
        #: At most max_batch + max_queued generations started (each pins its adapter's slot); the rest wait their turn.
        self.admission = Admission(cfg.max_batch + (cfg.max_queued or cfg.max_batch), cfg.queue_timeout_s)
        self._stop = threading.Event()
        #: Set once the disk copies of revisions the registry no longer has were deleted (at start).
        self.pruned = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="persona-engine", daemon=True)
        self._thread.start()
        self._pruner = threading.Thread(target=self._prune_disk, name="persona-disk-prune", daemon=True)
        self._pruner.start()

    # --- the engine thread ---
    def _loop(self) -> None:
        clock = time.perf_counter
        times = _EngineTimes(getattr(self.engine, "counters", None))
        while not self._stop.is_set():
            t0 = clock()
            if not self.engine.has_work():
                self.wake.wait(0.05)
                self.wake.clear()
                times.add(idle=clock() - t0)
                continue
            try:
                with self.lock:
                    outputs = self.engine.step()
            except Exception:
                # A failed step must not stop the worker: its requests end with finish_reason "error".
                log.exception("engine step failed; aborting the requests in flight")
                with self.lock:
                    aborted = self.engine.abort_all()
                self._deliver([(gen.id, None, True) for gen in aborted])
                continue
            t1 = clock()
            self._deliver([(out.generation.id, out.token_id, out.finished) for out in outputs])
            times.add(step=t1 - t0, deliver=clock() - t1, steps=1)

    def _deliver(self, items: list[tuple[int, int | None, bool]]) -> None:
        """Hand a step's tokens to their requests: one call per event loop (one wake-up of the loop per step,
        whatever the number of its streams). With a stream interval, a stream's tokens are held until its interval
        has passed since its last delivery (its first token and its end go at once), and then go together: one
        event for several tokens instead of one each."""
        with self._streams_lock:
            sinks = [self.streams.get(gen_id) for gen_id, _, _ in items]
        by_loop = self._holding.route(items, sinks, self._alive)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that loop is closed: its streams are gone
                log.debug("an event loop closed with streams open; %d tokens dropped", len(batch))

    def _alive(self, held: dict[int, _LoopSink]) -> dict[int, bool]:
        """Which of ``held``'s streams still have their request (the others ended: their tokens have no reader)."""
        with self._streams_lock:
            return {gen_id: self.streams.get(gen_id) is sink for gen_id, sink in held.items()}

    def _prune_disk(self) -> None:
        """Delete the disk copies whose sha256 no revision has any more (forgotten while this worker was down)."""
        backoff = Backoff(initial_s=0.5, cap_s=30.0)
        while not self._stop.is_set():
            among = self.cache.disk_entries()
            if not among:
                break
            try:
                with self.stores.db.connection() as conn:
                    known = registry.known_sha256s(conn, among)
            except Unavailable as e:
                wait = backoff.next()
                log.warning("cannot check the disk cache against the registry (%s); retrying in %.1f s", e, wait)
                self._stop.wait(wait)
                continue
            gone = self.cache.prune_disk(known, among)
            log.info("disk cache: %d cop%s kept, %d deleted (no revision has them any more)",
                     len(among) - len(gone), "y" if len(among) - len(gone) == 1 else "ies", len(gone))  # fmt: skip
            break
        self.pruned.set()

    def fetch_spec(self) -> FetchSpec:
        """What the adapter cache's fill processes fetch adapters with: the registry and the object store."""
        return RegistryFetchSpec(self.settings.db, self.settings.s3)

    def offload(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """``fn(*args)`` in the request handlers' thread pool, awaited on the running event loop (one hand-over each
        way: lighter than anyio's ``to_thread``, which the event loop, shared by every stream, paid per request)."""
        return asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    def close(self) -> None:
        self._stop.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.calls.shutdown(wait=False, cancel_futures=True)
        self._thread.join(timeout=10)
        self._pruner.join(timeout=10)
        self.cache.close()
        self.engine.close()
        self.stores.close()

    def _acquire(self, target: Target) -> int:
        """The device slot of the target's adapter (-1: the base); a revision forgotten since `resolve` is a 404."""
        if target.key is None:
            return -1
        try:
            return self.cache.acquire(target.key)
        except NotFound as e:
            raise not_found(target.model) from e

    # --- generation ---
    def _start(
        self,
        target: Target,
        prompt_ids: list[int],
        sampling: Sampling,
        max_tokens: int,
        sink: _LoopSink,
    ) -> Generation:
        """Wait for a turn (`Admission`), pin the adapter in a slot and queue the request for the engine thread (its
        tokens go to ``sink``)."""
        self.admission.enter()
        try:
            slot = self._acquire(target)
        except BaseException:
            self.admission.leave()
            raise
        try:
            req = EngineRequest(
                prompt_ids, slot, max_tokens, sampling.temperature, sampling.top_p, (), sampling.stops, sampling.seed
            )
            with self._streams_lock:
                gen = self.engine.submit(req)
                sink.generation = gen
                self.streams[gen.id] = sink
        except BaseException:
            if target.key is not None:
                self.cache.release(target.key)
            self.admission.leave()
            raise
        self.wake.set()
        return gen

    def _end(self, target: Target, gen: Generation) -> None:
        if not gen.done:  # the client went away first: stop generating for nobody (a flag: no lock needed)
            self.engine.cancel(gen)
        obs.SERVING_TOKENS.labels("prompt").inc(len(gen.request.prompt_ids))
        obs.SERVING_TOKENS.labels("completion").inc(len(gen.output_ids))
        with self._streams_lock:
            self.streams.pop(gen.id, None)
        try:
            if target.key is not None:
                self.cache.release(target.key)
        finally:
            self.admission.leave()

    def generate_async(
        self,
        target: Target,
        prompt_ids: list[int],
        body: CompletionBody | ChatBody,
        max_tokens: int,
        loop: asyncio.AbstractEventLoop,
    ) -> AsyncTokenStream:
        """The generation's token ids, for a consumer on ``loop``: they arrive on that loop (one hand-over per
        engine step), so a waiting request holds no thread. The adapter is acquired now (its errors raise here,
        before a response starts) and stays pinned in its slot until the stream ends or is closed. Call from any
        thread (acquiring may read disk)."""
        sink = _LoopSink(loop, _Tokens(loop))
        gen = self._start(target, prompt_ids, Sampling.of(body), max_tokens, sink)
        return AsyncTokenStream(lambda: self._end(target, gen), sink.tokens, gen)

    def score(self, target: Target, prompt: str | None, text: str) -> dict[str, Any]:
        """Per-token log-likelihood of ``text`` (after ``prompt``, if given) under the target."""
        prompt_ids, text_ids = score_ids(self.tokenizer, prompt, text, self.context)
        return self.score_ids(target, prompt_ids, text_ids)

    def score_ids(self, target: Target, prompt_ids: list[int], text_ids: list[int]) -> dict[str, Any]:
        """`score` of token ids checked by `score_ids` (the module function)."""
        ids = prompt_ids + text_ids
        slot = self._acquire(target)
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

    # --- what the HTTP side reports (an HTTP process asks the serving process: `pipeline.serving.frontends`) ---
    def resident(self) -> dict[str, int]:
        """Adapters resident per cache tier (``/healthz``)."""
        return self.cache.stats().resident

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of this process (``/metrics``)."""
        return bytes(generate_latest())

    def record_request(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered HTTP request, in the request metrics."""
        obs.SERVING_REQUESTS.labels(endpoint, str(status)).inc()
        obs.SERVING_REQUEST_SECONDS.labels(endpoint).observe(seconds)

    def record_refusal(self, reason: str) -> None:
        """One refused key, in the refusal metrics."""
        obs.SERVING_AUTH_REFUSALS.labels(reason).inc()

    def record_lookup(self, source: str) -> None:
        """One key lookup of an HTTP process's key cache ("cache" or "database"), in the lookup metrics."""
        obs.SERVING_KEY_LOOKUPS.labels(source).inc()


def score_ids(tokenizer: Any, prompt: str | None, text: str, context: int) -> tuple[list[int], list[int]]:
    """The token ids of a score request's ``prompt`` and ``text``, checked: at least one token to score, and within
    the context (InvalidInput)."""
    prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else []
    text_ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(prompt_ids) + len(text_ids) < 2 or not text_ids:
        raise InvalidInput("text must have at least one token after the first token of the input", param="text")
    check_score_length(len(prompt_ids), len(text_ids), context)
    return prompt_ids, text_ids


class _EngineTimes:
    """The engine thread's time by phase (`obs.SERVING_ENGINE_SECONDS`), summed in plain floats and added to the
    counters at most twice a second (a labelled counter's increment takes a lock: not once per step). The fast
    engine's own ``counters`` (plan_s, wait_s, finish_s, kept by its step) give the step's split."""

    _ENGINE_PHASES = (("plan_s", "plan"), ("wait_s", "wait"), ("finish_s", "finish"))

    def __init__(self, engine_counters: dict[str, float] | None) -> None:
        self.engine = engine_counters
        self.sums = {"step": 0.0, "deliver": 0.0, "idle": 0.0, "steps": 0.0}
        self.seen = {key: (engine_counters or {}).get(key, 0.0) for key, _ in self._ENGINE_PHASES}
        self.due = time.monotonic() + 0.5

    def add(self, **seconds: float) -> None:
        sums = self.sums
        for phase, dt in seconds.items():
            sums[phase] += dt
        now = time.monotonic()
        if now >= self.due:
            self.due = now + 0.5
            self.flush()

    def flush(self) -> None:
        for phase, total in self.sums.items():
            if total:
                if phase == "steps":
                    obs.SERVING_ENGINE_STEPS.inc(total)
                else:
                    obs.SERVING_ENGINE_SECONDS.labels(phase).inc(total)
                self.sums[phase] = 0.0
        if self.engine is not None:
            for key, phase in self._ENGINE_PHASES:
                now = self.engine.get(key, 0.0)
                if now > self.seen[key]:
                    obs.SERVING_ENGINE_SECONDS.labels(phase).inc(now - self.seen[key])
                self.seen[key] = now


class _Tokens:
    """One generation's tokens on its consumer's event loop: put there by `_put_all` (one call per engine step for
    all of that loop's streams), taken in runs by the one consumer. Lighter than an `asyncio.Queue` (no task
    accounting, one waiter): the event loop does this for every token of every stream. ``None`` ends the tokens; an
    exception is raised to the consumer."""

    __slots__ = ("items", "loop", "received", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: collections.deque[int | BaseException | None] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.received = 0

    def put(self, item: int | BaseException | None) -> None:
        self.items.append(item)
        self.received += 1
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def put_run(self, run: list[int], finished: bool) -> None:
        """Tokens that arrive together (and the end, when ``finished``): one wake-up of the consumer."""
        items = self.items
        items.extend(run)
        if finished:
            items.append(None)
        self.received += len(run) + finished
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[int | BaseException | None]:
        """What arrived (waiting for at least one item)."""
        while not self.items:
            self.waiter = self.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        taken = list(self.items)
        self.items.clear()
        return taken


class _LoopSink:
    """Where one generation's tokens go (its consumer's loop and `_Tokens`), and what the engine thread holds back
    for it (`Server._deliver`): tokens not delivered yet, and when the next delivery may go."""

    __slots__ = ("due", "generation", "loop", "pending", "tokens")

    def __init__(self, loop: Any, tokens: Any) -> None:
        self.loop = loop  # an event loop, or anything with its call_soon_threadsafe (an HTTP process's link)
        self.tokens = tokens
        self.generation: Generation | None = None  # set when submitted, before its first token
        self.pending: list[int] = []
        self.due = 0.0  # the first token goes at once


Batches = dict[Any, list[tuple[Any, list[int], bool]]]


class _Holding:
    """The stream interval (`ServingSettings.stream_interval_ms`), kept by the engine thread alone: which streams
    hold tokens back, and when to look at those that got none this step."""

    def __init__(self, interval_s: float) -> None:
        self.interval = interval_s
        self.held: dict[int, _LoopSink] = {}
        self.next_check = 0.0

    def route(
        self,
        items: list[tuple[int, int | None, bool]],
        sinks: list[_LoopSink | None],
        alive: Callable[[dict[int, _LoopSink]], dict[int, bool]],
        now: float | None = None,
    ) -> Batches:
        """A step's (generation id, token or None, finished) items, with each one's sink (None: gone), to what goes
        to each event loop now: (tokens, run, finished) per stream. A stream's tokens wait until ``interval`` has
        passed since its last delivery; its first token and its end go at once. A held stream that gets no token
        (preempted, say) goes once its time is up, checked at most once an interval (``alive`` says which held
        streams still have a reader)."""
        by_loop: Batches = {}
        interval = self.interval
        if interval and now is None:
            now = time.monotonic()
        held = self.held
        for (gen_id, token, finished), sink in zip(items, sinks, strict=True):
            if sink is None:
                continue
            if token is not None:
                sink.pending.append(token)
            if interval:
                assert now is not None
                if not finished and now < sink.due:
                    held[gen_id] = sink
                    continue
                sink.due = now + interval
                if held:
                    held.pop(gen_id, None)
            by_loop.setdefault(sink.loop, []).append((sink.tokens, sink.pending, finished))
            sink.pending = []
        if held and now is not None and now >= self.next_check:
            self.next_check = now + interval
            for gen_id, live in alive(held).items():
                sink = held[gen_id]
                if not live:
                    del held[gen_id]
                elif now >= sink.due and sink.pending:
                    del held[gen_id]
                    sink.due = now + interval
                    by_loop.setdefault(sink.loop, []).append((sink.tokens, sink.pending, False))
                    sink.pending = []
        return by_loop


def _put_all(batch: list[tuple[_Tokens, list[int], bool]]) -> None:
    for tokens, run, finished in batch:
        tokens.put_run(run, finished)


class AsyncTokenStream:
    """The tokens of one generation on an event loop, in runs (what arrived together); closing it (or its
    consumer going away) releases the adapter and cancels the generation if it is still running."""

    def __init__(self, release: Callable[[], None], tokens: _Tokens, generation: Generation) -> None:
        self._release: Callable[[], None] | None = release
        self._tokens = tokens
        #: The generation's live state: ``finish_reason`` says how it ended once the iteration is over.
        self.generation = generation

    async def runs(self, timeout_s: float = 300.0) -> AsyncIterator[list[int]]:
        """Lists of token ids, each what had arrived when the consumer got to it (one or more tokens). TimeoutError
        when no token came for ``timeout_s`` (checked by a timer every ``timeout_s``: between one and two periods;
        a timeout context per wait cost the event loop ~5% of its time)."""
        tokens = self._tokens
        seen = -1
        timer: asyncio.TimerHandle | None = None

        def watch() -> None:
            nonlocal seen, timer
            if tokens.received == seen:
                tokens.put(TimeoutError(f"no token for {timeout_s:.0f} s"))
                return
            seen = tokens.received
            timer = tokens.loop.call_later(timeout_s, watch)

        watch()
        try:
            while True:
                items = await tokens.take()
                run: list[int] = []
                for item in items:
                    if item is None:
                        if run:
                            yield run
                        return
                    if isinstance(item, BaseException):
                        raise item
                    run.append(item)
                yield run
        finally:
            if timer is not None:
                timer.cancel()
            self.close()

    def disconnect(self) -> None:
        """The consumer went away: the tokens end now (`runs` returns; closing then cancels the generation)."""
        self._tokens.put(None)

    def close(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __del__(self) -> None:  # a response that never started iterating still gives its slot back
        self.close()


def engine_slots(engine: Any, lock: threading.Lock) -> EngineSlots:
    """The cache's SlotLoader over ``engine``, whose steps run under ``lock``.

    Packing never takes ``lock`` and neither do slot loads: both engines' ``load_packed`` may run beside a step for a
    slot that no queued or running request uses, which the cache guarantees (a loading slot is reserved for its
    adapter). Clears do too on the fast engine; the reference `Engine`'s ``clear_adapter`` scans its request queues
    without guarding against a concurrent step, so there clears alone take ``lock`` (they are rare: an invalidated
    or forgotten adapter, a failed load; an eviction does not clear, the next load replaces the slot's contents).
    """
    return EngineSlots(engine, clear_lock=lock if isinstance(engine, Engine) else None)
