"""Benchmark: one serving worker under open-loop load through its HTTP API (streamed completions), many users.

What it does. A serving worker is started as a separate process with cold adapter tiers (a fresh disk cache
directory, a fresh process: nothing on disk, in host memory or in device slots). A single asyncio client process
sends ``POST /v1/completions`` (or ``/v1/chat/completions``) with ``stream: true`` at Poisson arrival times
(open loop: the next request is sent at its time whether or not the earlier ones finished), for several offered
rates. Each request names a user drawn from Zipf(1.0) over N users, each with their own random LoRA adapter, so
adapters are fetched on demand through store -> disk -> host -> slot. Prompt and output lengths are drawn
log-uniformly. Per rate it measures achieved request rate, output tokens/s, TTFT, inter-chunk latency and
end-to-end latency (p50/p99), errors by status, and the adapter-cache traffic (from the worker's /metrics).
Series: ``zipf`` (N adapters), ``resident`` (min(N, slots) adapters loaded into device slots before measuring)
and ``base`` (model = the base id), so that "Zipf over N as % of all-resident" and "% of base-only" can be read.

Two ways to stand the worker up:

- ``--stack real``: the registry (PostgreSQL) and object store (S3) of the configured stack (`persona stack up`;
  the stack's URLs are read as `persona` reads them). A fresh database ``persona_bench_load`` is created, N users of
  the application ``bench-load`` get one revision each (a random LoRA uploaded through
  `pipeline.storage.registry.Registry.write_revision`) promoted to production (`pipeline.flows.promotion.promote`),
  an API key with the ``serve`` scope is issued (`pipeline.storage.apps.create_key`), and ``persona serve`` runs as
  a subprocess (promotions listener included). Objects and the database are removed at the end unless ``--keep``.
- ``--stack inmemory`` (the GPU device machine: no PostgreSQL, S3 or Kafka there): the same HTTP app
  (`pipeline.serving.api.create_app` through `uvicorn_servers`, as `persona serve` builds it) over a subclass of
  `pipeline.serving.server.Server` with the same engine and the same `AdapterCache` (disk dir + host + slots). What
  is replaced is listed in REPLACED_INMEMORY and printed with the results.

Base models: ``--base tiny-random`` (CPU smoke), ``smollm2-135m`` or a local model directory (the project's model
refs, `pipeline.models.base`), or ``random:smollm2-135m`` / ``random:llama-1b`` (random weights of those shapes, as
bench/serving_gpu.py builds them; ``--stack inmemory`` only) with a real tokenizer from ``--tokenizer DIR`` (default:
the prepared SmolLM2 directory, `persona model prepare`).

    # CPU smoke (tiny model, in-memory registry)
    .venv/bin/python bench/serving_load.py --stack inmemory --base tiny-random --adapters 50 --rates 1,2 \\
        --duration 10 --prompt-tokens 16:200 --output-tokens 8:64 --out /tmp/load
    # GPU (device machine, through bench/serving_device.sh): each series' saturation, then points around it
    # (the measured runs of bench/results/serving_load.md, 2026-12-01)
    bash bench/serving_device.sh $OUT load --slots 4096 --max-batch 256 --adapters 10000 --kinds zipf,resident \\
        --start-rate 128 --duration 8 --probe-duration 4 --warmup 3 --fractions 0.8,1.0 --climb 2 --refine 3 \\
        --host-cache-bytes 17179869184 --budget-s 545 --threads 14 --stream-interval-ms 10 --http-processes 4 \\
        --cap 4096 --client-processes 2
    # the plot and the table (needs matplotlib); in serving_load.md only between its load-table marks
    .venv/bin/python bench/serving_load.py --plot /tmp/load/serving_load.json bench/results

Worker settings travel as PERSONA_SERVE_* variables (the engine: PERSONA_SERVE_ENGINE or ``--engine``).

The device machine has torch, transformers, httpx, aiohttp, psutil and prometheus-client, but not the serving app's
own packages, nor SmolLM2's tokenizer. Once, here (``build/`` is git-ignored; after `persona model prepare`)::

    mkdir -p build/load-bench/tokenizer
    cp ~/.cache/persona/models/smollm2-135m/{tokenizer*,chat_template.jinja} build/load-bench/tokenizer/
    P="annotated-types argon2-cffi argon2-cffi-bindings cffi pycparser fastapi opentelemetry-api jsonschema
       jsonschema-specifications referencing rpds-py rfc3339-validator minio orjson psycopg psycopg-binary psycopg-pool
       pycryptodome pydantic pydantic-core pydantic-settings python-dotenv python-ulid starlette typing-inspection
       uvicorn typing-extensions anyio sniffio"
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d build/load-bench/whl $(for d in $P; do .venv/bin/pip show $d | sed -n "s/^Version: /$d==/p"; done)

then each device call carries ``build/load-bench`` and starts with ``python3 -m pip install -q --no-index --no-deps
--target /tmp/site build/load-bench/whl/*.whl && export PYTHONPATH=/tmp/site;`` before ``python3 bench/serving_load.py
... --tokenizer build/load-bench/tokenizer``. A call may run 10 minutes: split the series over calls (``--kinds``,
``--adapters``, ``--budget-s 540``) and merge them with ``--plot a.json,b.json OUTDIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import functools
import gc
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = Path(__file__).parent / "results"
APP = "bench-load"
DB_NAME = "persona_bench_load"
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: What ``--stack inmemory`` replaces; everything else is the code `persona serve` runs.
REPLACED_INMEMORY = [
    "API key check (Server._authenticate): one key of the application 'bench-load' held in memory, instead of the "
    "api_keys table (the KeyCache in front of it is the real one)",
    "model resolution (Server.resolve): user:ID -> (revision, sha256) from an in-memory dict, instead of the tenancy "
    "owner check and the production alias lookup in PostgreSQL",
    "GET /v1/models (Server.models): the first users of that dict",
    "object store fetch (AdapterCache.fetch, and the fill processes' `Server.fetch_spec`): the PEFT files read from "
    "a local directory in the bucket layout (users/ID/revisions/REV/), sha256-checked as usual; no network time "
    "(see --store-latency-ms)",
    "registry check before adopting a disk copy (AdapterCache.registered): membership in that dict",
    "not started: the promotions listener (Kafka) and the PostgreSQL pool (opened by Server.__init__, closed at once)",
]
REPLACED_REAL = [
    "nothing in the worker: `persona serve` on the configured stack (PostgreSQL, S3, Kafka); its promotions "
    "listener listens on a private, empty topic (PERSONA_KAFKA_TOPIC_PROMOTIONS) and the seeding announced on "
    "another, so no replayed promotion prefetches adapters before the run"
]
UNREACHABLE_DB = "postgresql://bench@127.0.0.1:1/unused"

log = logging.getLogger("serving_load")


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- bases and tokenizers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseSpec:
    """A ``--base`` value: the id the API serves the base under, and where its config and tokenizer come from."""

    spec: str
    model_id: str
    shape: str | None = None  # random:SHAPE
    tokenizer: str | None = None  # random bases: a tokenizer directory (or a project ref)


def resolve_base(spec: str, tokenizer: str | None) -> BaseSpec:
    if spec.startswith("random:"):
        shape = spec.split(":", 1)[1]
        shapes = gpu_shapes()
        if shape not in shapes:
            raise SystemExit(f"--base {spec}: unknown shape {shape!r}; known: {', '.join(sorted(shapes))}")
        return BaseSpec(spec, f"random-{shape}", shape, tokenizer or default_tokenizer())
    if spec in ("tiny-random", "smollm2-135m"):
        return BaseSpec(spec, spec)
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise SystemExit(f"--base {spec}: not tiny-random, smollm2-135m, random:SHAPE or a model directory")
    return BaseSpec(str(path.resolve()), path.resolve().name)


def gpu_shapes() -> dict[str, dict]:
    from serving_gpu import SHAPES  # bench/ is on sys.path when this script runs

    return SHAPES


def default_tokenizer() -> str:
    from pipeline.config import ModelSettings
    from pipeline.models.prepare import prepared_dir

    return str(prepared_dir(ModelSettings().cache_dir, "smollm2-135m"))


def load_tokenizer(base: BaseSpec) -> Any:
    """The tokenizer the worker uses (the client builds prompts of exact lengths with it)."""
    ref = base.tokenizer if base.shape else base.spec
    assert ref is not None
    if ref == "tiny-random":
        from pipeline.models.base import tiny_tokenizer

        return tiny_tokenizer()
    if ref == "smollm2-135m":
        from pipeline.config import ModelSettings
        from pipeline.models.prepare import prepare

        ref = str(prepare(ModelSettings(base="smollm2-135m")).path)
    path = Path(ref)
    if not (path / "tokenizer_config.json").is_file():
        raise SystemExit(
            f"no tokenizer in {path}: pass --tokenizer DIR (a directory with tokenizer.json and "
            "tokenizer_config.json, e.g. the prepared SmolLM2 directory from `persona model prepare`)"
        )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def model_config(base: BaseSpec) -> Any:
    """The transformers config of the base (layer shapes for the adapters, the context length)."""
    if base.shape:
        from transformers import LlamaConfig

        return LlamaConfig(**gpu_shapes()[base.shape], bos_token_id=None, eos_token_id=2, pad_token_id=0)
    if base.spec == "tiny-random":
        from pipeline.models.base import tiny_random

        return tiny_random().config
    from transformers import AutoConfig

    if base.spec == "smollm2-135m":
        from pipeline.config import ModelSettings
        from pipeline.models.prepare import prepare

        return AutoConfig.from_pretrained(prepare(ModelSettings(base="smollm2-135m")).path, local_files_only=True)
    return AutoConfig.from_pretrained(base.spec, local_files_only=True)


def build_worker_base(base: BaseSpec, device: str) -> Any:
    """The LoadedBase of the in-memory worker: a project ref through `load_base`, or random weights of a shape."""
    import torch

    from pipeline.domain.revisions import BaseModelRef
    from pipeline.models.base import LoadedBase, load_base

    if not base.shape:
        return load_base(base.spec)
    from serving_gpu import make_model

    cuda = torch.device(device).type == "cuda"
    model = make_model(base.shape, device if cuda else "cpu", torch.bfloat16 if cuda else torch.float32)
    return LoadedBase(model, load_tokenizer(base), BaseModelRef(base.model_id, "0" * 64))


# -- adapters ------------------------------------------------------------------------------------------------------


def lora_shapes(config: Any, targets: list[str]) -> list[tuple[str, int, int]]:
    """(module path, in, out) of every Linear named in ``targets`` (a model built on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            out.append((name, mod.in_features, mod.out_features))
    return out


def adapter_files(shapes: list[tuple[str, int, int]], rank: int, targets: list[str], seed: int) -> dict[str, bytes]:
    """A random PEFT LoRA (bf16, as training saves it): adapter_config.json + adapter_model.safetensors.

    Built with numpy straight into the safetensors format (header + raw bfloat16 bits, rounded to nearest even as
    torch rounds): 10,000 adapters are made at the start of a run, and one torch call per tensor made that take
    minutes. The header and the per-value scales depend on the layout only and are made once (`_layout`)."""
    import numpy as np

    head, scales, config = _layout(tuple(shapes), rank, tuple(sorted(targets)))
    values = np.random.default_rng(seed).standard_normal(scales.shape[0], dtype=np.float32)
    values *= scales
    bits = values.view(np.uint32)
    bf16 = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype("<u2")
    return {"adapter_config.json": config, "adapter_model.safetensors": head + bf16.tobytes()}


@functools.lru_cache(maxsize=8)
def _layout(shapes: tuple[tuple[str, int, int], ...], rank: int, targets: tuple[str, ...]) -> tuple[bytes, Any, bytes]:
    """(length + header bytes, scale of each value, adapter_config.json bytes) of `adapter_files`' adapters."""
    import numpy as np

    header: dict[str, Any] = {}
    scales = []
    at = 0
    for name, k, n in shapes:
        for part, shape, scale in (("A", [rank, k], 1 / k**0.5), ("B", [n, rank], 0.02)):
            size = shape[0] * shape[1]
            header[f"base_model.model.{name}.lora_{part}.weight"] = {
                "dtype": "BF16", "shape": shape, "data_offsets": [2 * at, 2 * (at + size)],
            }  # fmt: skip
            scales.append(np.full(size, scale, dtype=np.float32))
            at += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
        "persona_dtype": "bfloat16",
    }
    return len(head).to_bytes(8, "little") + head, np.concatenate(scales), json.dumps(config).encode()


def user_id(i: int) -> str:
    return f"load-{i:06d}"


def make_store(
    work: Path, base: BaseSpec, n: int, rank: int, targets: list[str], seed: int, threads: int
) -> tuple[Path, dict[str, tuple[str, str]]]:
    """N users' adapters in the bucket layout under a local directory (reused when it exists), and the index
    user -> (revision, sha256)."""
    from pipeline.domain.revisions import new_revision_id

    tag = hashlib.sha256(json.dumps([base.model_id, rank, sorted(targets), seed]).encode()).hexdigest()[:12]
    store = work / f"store-{tag}"
    index_file = store / "index.json"
    index: dict[str, tuple[str, str]] = {}
    if index_file.is_file():
        index = {u: tuple(v) for u, v in json.loads(index_file.read_text()).items()}
    missing = [i for i in range(n) if user_id(i) not in index]
    if missing:
        shapes = lora_shapes(model_config(base), targets)
        started = time.perf_counter()

        def one(i: int) -> tuple[str, str, str]:
            files = adapter_files(shapes, rank, targets, seed * 1_000_003 + i)
            rev = new_revision_id()
            folder = store / "users" / user_id(i) / "revisions" / rev
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (folder / name).write_bytes(data)
            return user_id(i), rev, hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()

        with ThreadPoolExecutor(max(1, threads)) as pool:
            for u, rev, sha in pool.map(one, missing):
                index[u] = (rev, sha)
        index_file.write_text(json.dumps(index))
        note(f"store: {len(missing)} adapters written to {store} in {time.perf_counter() - started:.1f}s")
        # Otherwise the kernel writes these GBs back to disk during the first measured points, beside the worker's
        # own disk-tier writes: written back now, before any worker starts. (Suspected, not verified, of a Zipf
        # series at fixed rates from 200 req/s running 62% of all-resident on a fresh device machine, against 78%
        # on one where the store existed already.)
        started = time.perf_counter()
        os.sync()
        note(f"store: flushed to disk in {time.perf_counter() - started:.1f}s")
    return store, {u: index[u] for u in (user_id(i) for i in range(n))}


# -- the in-memory worker (a subprocess: `serving_load.py --worker SPEC`) -----------------------------------------


def inmemory_server(settings: Any, base: Any, spec: dict) -> Any:
    """`Server` with the registry and object store replaced (REPLACED_INMEMORY, bench/serving_inmemory.py); engine,
    cache and API are real."""
    from serving_inmemory import InMemoryServer

    cls: Any = InMemoryServer
    if os.environ.get("LOAD_PHASES"):
        cls = _phased(cls)
    server = cls(settings, base, spec)
    if os.environ.get("LOAD_PHASES"):
        server.cache._host_get = _timed(server.cache._host_get, "acquire miss: host tier (disk/store, pack)")
        server.cache.loader.load = _timed(server.cache.loader.load, "acquire miss: slot load")
    return server


def _timed(fn: Any, phase: str) -> Any:
    def timed(*args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            PHASES.add(phase, time.perf_counter() - t0)

    return timed


class PhaseTimes:
    """``LOAD_PHASES=1``: where a request's time to first token goes on the server: the model's resolution, the
    adapter's acquisition (through the tiers; tokenizing and queueing for the thread pool before it), and from the
    engine's queue to the first token delivered to the request's event loop. Written next to the worker's status
    file (``phases.txt``) when the worker stops."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        phases = ("resolve", "acquire hit", "acquire miss", "acquire miss: host tier (disk/store, pack)",
                  "acquire miss: slot load", "submit -> first token (adapter)",
                  "submit -> first token (base)", "first token handed over")  # fmt: skip
        self.samples: dict[str, list[float]] = {p: [] for p in phases}
        self.submitted: dict[int, tuple[float, str]] = {}

    def add(self, phase: str, seconds: float) -> None:
        with self.lock:
            self.samples[phase].append(seconds)

    def write(self, path: Path) -> None:
        lines = ["phase | n | p50 ms | p90 ms | p99 ms | max ms", "--- | ---: | ---: | ---: | ---: | ---:"]
        for phase, xs in self.samples.items():
            xs = sorted(xs)
            if xs:
                q = [1e3 * xs[min(len(xs) - 1, int(len(xs) * f))] for f in (0.5, 0.9, 0.99)]
                lines.append(f"{phase} | {len(xs)} | {q[0]:.2f} | {q[1]:.2f} | {q[2]:.2f} | {1e3 * xs[-1]:.2f}")
        path.write_text("\n".join(lines) + "\n")


PHASES = PhaseTimes()


def _phased(cls: Any) -> Any:
    """``cls`` with `PHASES` recorded around resolution, acquisition and the first token's delivery."""

    class Phased(cls):  # type: ignore[misc,valid-type]
        def resolve(self, model: str, principal: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return super().resolve(model, principal)
            finally:
                PHASES.add("resolve", time.perf_counter() - t0)

        def _acquire(self, target: Any) -> int:
            if target.key is None:
                return super()._acquire(target)
            hit = target.key in self.cache._slot_of
            t0 = time.perf_counter()
            try:
                return super()._acquire(target)
            finally:
                PHASES.add("acquire hit" if hit else "acquire miss", time.perf_counter() - t0)

        def _start(self, target: Any, *args: Any, **kwargs: Any) -> Any:
            gen = super()._start(target, *args, **kwargs)
            phase = "submit -> first token (base)" if target.key is None else "submit -> first token (adapter)"
            with PHASES.lock:
                PHASES.submitted.setdefault(gen.id, (time.perf_counter(), phase))
            return gen

        def _deliver(self, items: list[tuple[int, int | None, bool]]) -> None:
            now = time.perf_counter()
            with PHASES.lock:
                firsts = [PHASES.submitted.pop(gid) for gid, _, _ in items if gid in PHASES.submitted]
                for t, phase in firsts:
                    PHASES.samples[phase].append(now - t)
            super()._deliver(items)
            if firsts:
                PHASES.add("first token handed over", time.perf_counter() - now)

    return Phased


class StubEngine:
    """``--stub-engine-ms MS``: the serving engine's interface without a model, to measure what the worker costs
    around the engine (HTTP, streaming, the engine thread's hand-over). Each step sleeps MS (the GIL released, as a
    wait on the GPU) and gives every running request one token (prompts are not prefilled: the first token comes
    at the first step after admission); no EOS, so each request runs to its max_tokens. Base-only traffic."""

    def __init__(self, tokenizer: Any, slots: int, max_batch: int, step_ms: float, max_positions: int) -> None:
        from pipeline.serving.engine import GenerationLoop

        class Loop(GenerationLoop):
            pass

        self._loop = Loop()
        self._loop.tokenizer = tokenizer
        self._loop.slots = slots
        self._loop.max_positions = max_positions
        self._loop.eos_token_id = None
        self._loop._ids = itertools.count()
        from collections import deque

        self._loop._waiting = deque()
        self.max_positions = max_positions
        self.max_batch = max_batch
        self.step_s = step_ms / 1e3
        self._running: list[Any] = []
        # Word-like tokens, so the detokenizer does its usual work.
        self._tokens = [t for t in (tokenizer.convert_tokens_to_ids(w) for w in ("Ġthe", "Ġof", "Ġand", "Ġa")) if t]
        self._tokens = self._tokens or [100, 101, 102, 103]
        self.counters: dict[str, float] = {"steps": 0}

    def submit(self, request: Any) -> Any:
        if request.slot != -1:
            raise RuntimeError("the stub engine serves base-only traffic")
        return self._loop.submit(request)

    def cancel(self, gen: Any) -> None:
        gen.cancelled = True

    def decode_text(self, ids: list[int]) -> str:
        return self._loop.decode_text(ids)

    def has_work(self) -> bool:
        return bool(self._loop._waiting or self._running)

    def step(self) -> list[Any]:
        waiting = self._loop._waiting
        while waiting and len(self._running) < self.max_batch:
            self._running.append(waiting.popleft())
        time.sleep(self.step_s)
        outs = []
        for i, gen in enumerate(self._running):
            tok = self._tokens[(len(gen.output_ids) + i) % len(self._tokens)]
            outs.append(self._loop._emit(gen, tok, len(gen.request.prompt_ids) + len(gen.output_ids)))
        self._running = [g for g in self._running if not g.done]
        self.counters["steps"] += 1
        return outs

    def abort_all(self) -> list[Any]:
        gens = self._running + list(self._loop._waiting)
        self._running = []
        self._loop._waiting.clear()
        for g in gens:
            g.finish_reason = g.finish_reason or "error"
        return gens

    def close(self) -> None:
        self.abort_all()


def worker_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    from serving_inmemory import InMemoryFrontend

    from pipeline.config import DatabaseSettings, S3Settings, ServingSettings, Settings
    from pipeline.serving.api import run_http

    torch.set_grad_enabled(False)
    serving = ServingSettings()  # PERSONA_SERVE_* as the bench set them
    if serving.cache_dir.exists() and any(serving.cache_dir.iterdir()):
        raise SystemExit(f"the disk cache {serving.cache_dir} is not empty: the run must start cold")
    settings = Settings(
        DatabaseSettings(url=UNREACHABLE_DB, connect_timeout_s=1), S3Settings(endpoint="127.0.0.1:9"), serving
    )
    base = build_worker_base(BaseSpec(**spec["base"]), serving.device)
    if spec.get("stub_engine_ms"):
        import pipeline.serving.server as server_module

        def stub(base: Any, cfg: Any) -> StubEngine:
            return StubEngine(base.tokenizer, cfg.slots, cfg.max_batch, spec["stub_engine_ms"], cfg.max_seq)

        server_module.make_engine = stub  # type: ignore[assignment]
    server = inmemory_server(settings, base, spec)
    Path(spec["status_file"]).write_text(
        json.dumps({"engine": type(server.engine).__name__, "base": server.base_id, "pid": os.getpid()})
    )
    sampler = None
    if os.environ.get("LOAD_SAMPLE"):
        sampler = StackSampler(Path(spec["status_file"]).with_name("stacks.txt"))
    try:
        with contextlib.suppress(KeyboardInterrupt):  # the bench stops it with SIGINT, as one stops `persona serve`
            # admin_port 0: /metrics on the API port; with --http-processes, the API in processes of its own
            run_http(server, frontend=InMemoryFrontend, extra=spec)
    finally:
        if sampler is not None:
            sampler.stop(server)
        if os.environ.get("LOAD_PHASES"):
            PHASES.write(Path(spec["status_file"]).with_name("phases.txt"))
        server.close()


class StackSampler:
    """``LOAD_SAMPLE=1``: where the worker's threads spend their time. A thread samples every thread's Python stack
    every 2 ms (``sys._current_frames``) and counts the innermost frames per thread; its own lateness shows how long
    it waited for the GIL. Written to ``stacks.txt`` next to the worker's status file when the worker stops."""

    def __init__(self, path: Path, every_s: float = 0.002) -> None:
        import collections

        self.path, self.every_s = path, every_s
        self.counts: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.late: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import sys
        import traceback

        names = {}
        me = threading.get_ident()
        while not self._stop.is_set():
            t0 = time.perf_counter()
            time.sleep(self.every_s)
            self.late.append(time.perf_counter() - t0 - self.every_s)
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                if ident not in names:
                    names = {t.ident: t.name for t in threading.enumerate()}
                stack = traceback.extract_stack(frame, limit=None)[-5:]
                key = " <- ".join(f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in reversed(stack))
                self.counts[names.get(ident, str(ident))][key] += 1

    def stop(self, server: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        late = sorted(self.late) or [0.0]
        lines = [f"samples {len(self.late)}; sampler lateness (GIL wait) p50 {1e3 * late[len(late) // 2]:.2f} ms, "
                 f"p99 {1e3 * late[int(len(late) * 0.99)]:.2f} ms, mean {1e3 * sum(late) / len(late):.2f} ms",
                 f"engine counters: {dict(getattr(server.engine, 'counters', {}))}"]  # fmt: skip
        for name, c in sorted(self.counts.items(), key=lambda kv: -sum(kv[1].values())):
            total = sum(c.values())
            lines.append(f"\n== thread {name}: {total} samples")
            for key, n in c.most_common(25):
                lines.append(f"{100 * n / total:5.1f}%  {key}")
        self.path.write_text("\n".join(lines) + "\n")


# -- the real stack: seeding the registry -------------------------------------------------------------------------


@dataclass
class RealStack:
    """What `seed_real` made: the database, the users and the key, and the env of `persona serve`."""

    env: dict[str, str]
    key: str
    users: list[str]
    db_url: str
    admin_url: str
    s3: Any
    kafka: Any
    topics: list[str]
    seconds: float


def _with_database(url: str, name: str) -> str:
    return f"{url.rpartition('/')[0]}/{name}"


def seed_real(base: BaseSpec, store: Path, index: dict[str, tuple[str, str]], threads: int) -> RealStack:
    import psycopg

    from pipeline import stack
    from pipeline.config import DatabaseSettings, Settings
    from pipeline.domain.revisions import EventsUsed
    from pipeline.flows import promotion
    from pipeline.models.base import load_base
    from pipeline.serving.promotions import Announcer
    from pipeline.storage import apps, db
    from pipeline.storage.stores import Stores

    started = time.perf_counter()
    settings = Settings()
    urls = stack.effective_urls(settings)
    admin_url = _with_database(urls["db_url"], "postgres")
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {DB_NAME}")
    except psycopg.OperationalError as e:
        raise SystemExit(
            f"--stack real: PostgreSQL at {urls['db_url']} does not answer ({e}); `persona stack up`"
        ) from e
    database = DatabaseSettings(url=_with_database(urls["db_url"], DB_NAME))
    db.migrate(database)
    s3 = settings.s3.model_copy(update={"endpoint": urls["s3_endpoint"]})
    kafka = settings.kafka.model_copy(update={"bootstrap_servers": urls["kafka_bootstrap_servers"]})
    ref = load_base(base.spec).ref
    # Private topics: the seeding announces its promotions on one; the workers listen on another, empty one. On the
    # embedded broker (tansu) a new consumer group's "latest" is not the end of the topic, so a worker listening
    # where the seeding announced replays those promotions and prefetches the adapters: the tiers would start warm.
    run = uuid.uuid4().hex[:8]
    topics = [f"persona.bench-load.{run}.seed", f"persona.bench-load.{run}.listen"]
    _create_topics(kafka, topics)
    stores = Stores.open(database, s3, name="persona-bench-load")
    announcer = Announcer(kafka.model_copy(update={"topic_promotions": topics[0]}))
    try:
        with stores.db.connection() as conn:
            _, key = apps.create_key(conn, APP, "bench/serving_load.py", scopes=("serve",))

        def one(user: str) -> None:
            rev, _ = index[user]
            folder = store / "users" / user / "revisions" / rev
            written = stores.registry.write_revision(
                user,
                folder,
                parent_id=None,
                base=ref,
                training={"seed": 0, "dtype": "bfloat16", "source": "bench"},
                events=EventsUsed.of([]),
                revision_id=rev,
                app=APP,
            )
            done = promotion.promote(stores, announcer, user, written.revision_id, actor="bench")
            if not done.announced:
                raise RuntimeError(f"promotion of {user} not announced: {done.warning}")

        with ThreadPoolExecutor(max(1, threads)) as pool:
            list(pool.map(one, list(index)))
    finally:
        announcer.close()
        stores.close()
    env = {
        "PERSONA_DB_URL": database.url,
        "PERSONA_S3_ENDPOINT": s3.endpoint,
        "PERSONA_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "PERSONA_KAFKA_TOPIC_PROMOTIONS": topics[1],
        "PERSONA_MODEL_BASE": base.spec,
    }
    note(
        f"real stack: {len(index)} users seeded in {DB_NAME} and S3 {s3.endpoint} "
        f"({time.perf_counter() - started:.1f}s)"
    )
    return RealStack(env, key, list(index), database.url, admin_url, s3, kafka, topics, time.perf_counter() - started)


def _create_topics(kafka: Any, names: list[str]) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=kafka.servers, client_id="persona-bench-load")
    try:
        admin.create_topics([NewTopic(n, kafka.partitions, 1) for n in names])
    finally:
        admin.close()


def clean_real(real: RealStack, threads: int) -> None:
    import psycopg

    from pipeline.storage.objects import ObjectStore

    objects = ObjectStore(real.s3)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(objects.delete_user, real.users))
    with psycopg.connect(real.admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {DB_NAME} WITH (FORCE)")
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=real.kafka.servers, client_id="persona-bench-load")
        try:
            admin.delete_topics(real.topics)
        finally:
            admin.close()
        gone = f" and the topics {', '.join(real.topics)}"
    except KafkaError as e:
        gone = f" (the topics {', '.join(real.topics)} stay: {e!r})"
    note(f"real stack: removed the objects of {len(real.users)} users, the database {DB_NAME}{gone}")


# -- the worker process -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Worker:
    proc: subprocess.Popen
    url: str
    log: Path
    engine: str
    started_s: float

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: its HTTP and fill processes too
                self.proc.wait(10)


def _interval_text(c: dict) -> str:
    """The worker's stream interval as the results state it (runs before the flag existed had none: 0)."""
    ms = c.get("stream_interval_ms") or 0
    return f"{ms:g} ms (one event a token)" if not ms else f"{ms:g} ms (a stream's tokens go at most this often)"


def _fill_text(c: dict) -> str:
    n = c.get("fill_processes")
    if n is None:
        return "adapter file work on the request threads (before fill processes existed)"
    return (
        f"at most {n} fill processes (the adapter cache's file work)"
        if n
        else "adapter file work on the request threads"
    )


def _http_text(c: dict) -> str:
    n = c.get("http_processes") or 0
    return f"the HTTP API in {n} processes of its own" if n else "the HTTP API in the worker's process"


def worker_env(args: argparse.Namespace, port: int, cache_dir: Path) -> dict[str, str]:
    env = {
        "PERSONA_SERVE_HOST": "127.0.0.1",
        "PERSONA_SERVE_PORT": str(port),
        "PERSONA_SERVE_ADMIN_PORT": "0",
        "PERSONA_SERVE_DEVICE": args.device,
        "PERSONA_SERVE_SLOTS": str(args.slots),
        "PERSONA_SERVE_MAX_BATCH": str(args.max_batch),
        "PERSONA_SERVE_MAX_QUEUED": str(args.max_queued),
        "PERSONA_SERVE_MAX_SEQ": str(args.max_seq),
        "PERSONA_SERVE_MAX_RANK": str(max(args.rank, 1)),
        "PERSONA_SERVE_MAX_TOKENS": str(args.output_tokens[1]),
        "PERSONA_SERVE_CACHE_DIR": str(cache_dir),
        "PERSONA_SERVE_HOST_CACHE_BYTES": str(args.host_cache_bytes),
        "PERSONA_SERVE_DISK_CACHE_BYTES": str(args.disk_cache_bytes),
        "PERSONA_SERVE_WORKER_ID": f"bench-load-{uuid.uuid4().hex[:8]}",
        "PYTHONUNBUFFERED": "1",
    }
    if args.engine:
        env["PERSONA_SERVE_ENGINE"] = args.engine
    if args.stream_interval_ms is not None:
        env["PERSONA_SERVE_STREAM_INTERVAL_MS"] = str(args.stream_interval_ms)
    env["PERSONA_SERVE_FILL_PROCESSES"] = str(args.fill_processes)
    env["PERSONA_SERVE_HTTP_PROCESSES"] = str(args.http_processes)
    return env


def start_worker(
    args: argparse.Namespace,
    run_dir: Path,
    base: BaseSpec,
    index: dict,
    store: Path,
    key: tuple[str, str],
    real: RealStack | None,
    cores: set[int] | None,
) -> Worker:
    """A fresh worker process with a fresh (empty) disk cache directory; waits until /healthz answers."""
    from pipeline.config import child_env

    run_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = run_dir / "adapter-cache"
    shutil.rmtree(cache_dir, ignore_errors=True)
    port = free_port()
    env = worker_env(args, port, cache_dir)
    status = run_dir / "worker.json"
    status.unlink(missing_ok=True)
    if real is not None:
        env.update(real.env)
        cmd = [sys.executable, "-m", "pipeline.cli", "serve"]
    else:
        spec = {
            "base": asdict(base),
            "index": index,
            "store": str(store),
            "key_id": key[0],
            "key": key[1],
            "store_latency_ms": args.store_latency_ms,
            "stub_engine_ms": args.stub_engine_ms,
            "status_file": str(status),
        }
        spec_file = run_dir / "worker-spec.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_file)]
    log_file = run_dir / "worker.log"
    t0 = time.perf_counter()
    with log_file.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            env=child_env(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    import httpx

    while True:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-4000:]
            raise SystemExit(f"the worker exited with {proc.returncode} before answering; its log ends:\n{tail}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the worker did not answer /healthz within {args.start_timeout}s; see {log_file}")
        time.sleep(0.5)
    if status.is_file():
        name = json.loads(status.read_text())["engine"]
        engine = ENGINE_NAMES.get(name, name)
    else:
        engine = _engine_from_log(log_file)
    return Worker(proc, url, log_file, engine, time.perf_counter() - t0)


ENGINE_NAMES = {"FastEngine": "fast", "Engine": "reference", "StubEngine": "stub (no model)"}


def _engine_from_log(log_file: Path) -> str:
    text = log_file.read_text(errors="replace")
    return "fast" if "fast engine:" in text else "reference" if "multi-LoRA:" in text else "?"


# -- traffic --------------------------------------------------------------------------------------------------------


class PromptMaker:
    """Prompts of an exact token count: words that are one token each and stay one token when concatenated."""

    def __init__(self, tok: Any) -> None:
        self.tok = tok
        words = []
        for i in range(min(len(tok), 30000)):
            s = tok.decode([i])
            if re.fullmatch(r" [a-z]{3,9}", s) and tok(s, add_special_tokens=False)["input_ids"] == [i]:
                words.append(s)
        if len(words) < 100:  # byte-level tokenizers: one character, one token
            words = [
                c for c in "abcdefghijklmnopqrstuvwxyz" if len(tok(c, add_special_tokens=False)["input_ids"]) == 1
            ]
        self.words = words
        rng = random.Random(0)
        for n in (1, 7, 100, 333):  # the claim checked on a few prompts
            got = self.count(self.make(rng, n))
            if got != n:
                raise SystemExit(f"prompt builder: {n} words gave {got} tokens with this tokenizer")

    def make(self, rng: random.Random, n: int) -> str:
        return "".join(rng.choices(self.words, k=n))

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])


class Zipf:
    """Ranks 0..n-1 with P(k) proportional to 1/(k+1)^s (rank k = user k)."""

    def __init__(self, n: int, s: float = 1.0) -> None:
        self.cum = list(itertools.accumulate(1.0 / (k + 1) ** s for k in range(n)))

    def draw(self, rng: random.Random) -> int:
        return min(bisect.bisect_left(self.cum, rng.random() * self.cum[-1]), len(self.cum) - 1)


def draw_length(rng: random.Random, lo: int, hi: int, dist: str) -> int:
    if lo >= hi:
        return lo
    if dist == "uniform":
        return rng.randint(lo, hi)
    return min(hi, max(lo, int(math.exp(rng.uniform(math.log(lo), math.log(hi + 1))))))


@dataclass
class Req:
    """One planned request and what happened to it (times are perf_counter seconds)."""

    at: float  # scheduled arrival, seconds after the point's start
    user: int  # -1: the base
    prompt_tokens: int
    max_tokens: int
    body: bytes
    sent: float = 0.0
    capped: bool = False
    status: int = 0
    error: str | None = None
    times: list[float] = field(default_factory=list)  # arrival of each content chunk
    end: float = 0.0
    done: bool = False


@dataclass
class Traffic:
    kind: str  # zipf | resident | base
    adapters: int  # users drawn from (0 for base)


def plan_requests(
    args: argparse.Namespace,
    traffic: Traffic,
    rate: float,
    seconds: float,
    prompts: PromptMaker,
    model_id: str,
    context: int,
    chat_overhead: int,
) -> tuple[list[Req], int]:
    """Poisson arrivals at ``rate`` for ``seconds``; arrival gaps, lengths, users and prompt words each from a
    generator of their own seeded by (seed, rate): every series sees the same arrivals and lengths at a rate (common
    random numbers), whatever it draws users from."""
    arrivals, lengths, users, words = (random.Random(f"{args.seed}:{rate:.6f}:{what}") for what in "aluw")
    zipf = Zipf(traffic.adapters) if traffic.adapters else None
    reqs, t, clamped = [], 0.0, 0
    while True:
        t += arrivals.expovariate(rate)
        if t >= seconds:
            break
        p = draw_length(lengths, *args.prompt_tokens, args.length_dist)
        m = draw_length(lengths, *args.output_tokens, args.length_dist)
        u = zipf.draw(users) if zipf else -1
        if p + chat_overhead + m > context:
            p = max(1, context - m - chat_overhead)
            clamped += 1
        text = prompts.make(words, p)
        model = f"user:{user_id(u)}" if u >= 0 else model_id
        payload: dict[str, Any] = {"model": model, "max_tokens": m, "stream": True, "temperature": args.temperature}
        if args.endpoint == "chat":
            payload["messages"] = [{"role": "user", "content": text}]
        else:
            payload["prompt"] = text
        reqs.append(Req(t, u, p + chat_overhead, m, json.dumps(payload).encode()))
    return reqs, clamped


# -- the client -----------------------------------------------------------------------------------------------------


def _line(line: str, rec: Req, now: Callable[[], float]) -> bool:
    """One SSE line of a stream; True at ``data: [DONE]``."""
    if not line.startswith("data: "):
        return False
    if line.startswith("data: [DONE]"):
        rec.done = True
        return True
    if line.startswith('data: {"error"'):
        rec.error = "stream_error"
        return False
    rec.times.append(now())
    return False


def _error_code(status: int, body: bytes) -> str:
    try:
        return f"{status} {json.loads(body)['error']['code']}"
    except (ValueError, KeyError, TypeError):
        return str(status)


class Client:
    """One HTTP client for all requests of a run: aiohttp when installed, else httpx (both asyncio)."""

    def __init__(self, kind: str, url: str, key: str, cap: int, timeout: float) -> None:
        self.url, self.cap, self.timeout, self.key = url, cap, timeout, key
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        if kind == "auto":
            try:
                import aiohttp  # noqa: F401

                kind = "aiohttp"
            except ImportError:
                kind = "httpx"
        self.kind = kind
        self.session: Any = None

    async def __aenter__(self) -> Client:
        if self.kind == "aiohttp":
            import aiohttp

            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.cap, limit_per_host=self.cap, force_close=False),
                timeout=aiohttp.ClientTimeout(total=self.timeout, sock_connect=30),
            )
        else:
            import httpx

            self.session = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=self.cap, max_keepalive_connections=self.cap),
                timeout=httpx.Timeout(self.timeout, connect=30),
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.kind == "aiohttp":
            await self.session.close()
        else:
            await self.session.aclose()

    async def stream(self, path: str, rec: Req) -> None:
        now = time.perf_counter
        if self.kind == "aiohttp":
            async with self.session.post(self.url + path, data=rec.body, headers=self.headers) as r:
                rec.status = r.status
                if r.status != 200:
                    rec.error = _error_code(r.status, await r.read())
                    return
                async for raw in r.content:
                    if _line(raw.decode(), rec, now):
                        break
        else:
            async with self.session.stream("POST", self.url + path, content=rec.body, headers=self.headers) as r:
                rec.status = r.status_code
                if r.status_code != 200:
                    rec.error = _error_code(r.status_code, await r.aread())
                    return
                async for line in r.aiter_lines():
                    if _line(line, rec, now):
                        break

    async def get(self, path: str) -> tuple[int, bytes]:
        if self.kind == "aiohttp":
            async with self.session.get(self.url + path) as r:
                return r.status, await r.read()
        r = await self.session.get(self.url + path)
        return r.status_code, r.content


async def drive(client: Client, path: str, reqs: list[Req], drain_s: float, t0: float | None = None) -> dict[str, Any]:
    """Send every request at its time (open loop); at most ``client.cap`` in flight (later ones wait, and their
    latencies still count from their scheduled time). Returns the run's timing facts."""
    sem = asyncio.Semaphore(client.cap)
    t0 = time.perf_counter() + 0.1 if t0 is None else t0  # (given: client processes share one start)
    lags: list[float] = []
    stalls: list[float] = []
    running = True

    async def watch() -> None:
        """The client's own event-loop stalls (a 1 ms sleep that wakes late): they would count as server latency."""
        while running:
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            stalls.append(time.perf_counter() - t - 0.001)

    watcher = asyncio.create_task(watch())

    async def one(rec: Req) -> None:
        if sem.locked():
            rec.capped = True
        try:
            async with sem:
                rec.sent = time.perf_counter()
                try:
                    await client.stream(path, rec)
                except Exception as e:  # a connection error, a timeout: counted by its class
                    rec.error = f"exception {type(e).__name__}"
        except asyncio.CancelledError:
            sent = "unfinished (client drain timeout)" if rec.sent else "never sent (client cap, drain timeout)"
            rec.error = rec.error or sent
            raise
        finally:
            rec.end = time.perf_counter()
            if rec.error is None and not rec.done:
                rec.error = "stream ended without [DONE]"

    tasks = []
    for rec in reqs:
        wait = t0 + rec.at - time.perf_counter()
        if wait > 0:
            await asyncio.sleep(wait)
        lags.append(time.perf_counter() - (t0 + rec.at))
        tasks.append(asyncio.create_task(one(rec)))
    last = time.perf_counter()
    unfinished = 0
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=drain_s)
        unfinished = len(pending)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=10)
    running = False
    await watcher
    return {
        "t0": t0,
        "arrivals_end": last,
        "drained_s": time.perf_counter() - last,
        "unfinished": unfinished,
        "dispatch_lag_p99_ms": 1e3 * pct(lags, 0.99) if lags else 0.0,
        "client_stall_p99_ms": 1e3 * pct(stalls, 0.99) if stalls else 0.0,
        "client_stall_max_ms": 1e3 * max(stalls, default=0.0),
    }


# -- server metrics -------------------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "persona_serving_tokens_total": "kind",
        "persona_adapter_cache_hits_total": "tier",
        "persona_adapter_cache_misses_total": "tier",
        "persona_adapter_cache_evictions_total": "tier",
        "persona_adapter_cache_resident": "tier",
        "persona_adapter_load_seconds_sum": "tier",
        "persona_adapter_load_seconds_count": "tier",
        "persona_serving_engine_seconds_total": "phase",
        "persona_serving_engine_steps_total": "",
    }
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            label = wanted.get(s.name)
            if label is not None:
                out[f"{s.name}:{s.labels.get(label, '')}"] = s.value
    return out


def metric_delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


# -- statistics -----------------------------------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def summarize(
    reqs: list[Req], timing: dict, warmup: float, duration: float, before: dict, after: dict, cpu: dict
) -> dict[str, Any]:
    """The point's numbers over the requests that arrived in the measurement window [warmup, warmup+duration)."""
    t0 = timing["t0"]
    w0, w1 = t0 + warmup, t0 + warmup + duration
    measured = [r for r in reqs if warmup <= r.at < warmup + duration]
    ok = [r for r in measured if r.status == 200 and r.error is None]
    ttft = [r.times[0] - (t0 + r.at) for r in ok if r.times]
    itl = [b - a for r in ok for a, b in itertools.pairwise(r.times)]
    e2e = [r.end - (t0 + r.at) for r in ok]
    errors = Counter(r.error or str(r.status) for r in measured if r not in ok)
    chunks_all = sum(len(r.times) for r in reqs)
    chunks_window = sum(1 for r in reqs for t in r.times if w0 <= t < w1)
    done_window = sum(1 for r in reqs if r.status == 200 and r.error is None and w0 <= r.end < w1)
    server_tokens = metric_delta(after, before, "persona_serving_tokens_total:completion")
    per_chunk = server_tokens / chunks_all if chunks_all and server_tokens else None
    tier = {
        t: {
            "hits": metric_delta(after, before, f"persona_adapter_cache_hits_total:{t}"),
            "misses": metric_delta(after, before, f"persona_adapter_cache_misses_total:{t}"),
            "evictions": metric_delta(after, before, f"persona_adapter_cache_evictions_total:{t}"),
            "load_s": metric_delta(after, before, f"persona_adapter_load_seconds_sum:{t}"),
            "loads": metric_delta(after, before, f"persona_adapter_load_seconds_count:{t}"),
            "resident_after": after.get(f"persona_adapter_cache_resident:{t}"),
        }
        for t in ("slot", "host", "disk", "store")
    }
    finished = [r for r in reqs if r.status == 200 and r.error is None]

    def ms(xs: list[float], q: float) -> float:
        return 1e3 * pct(xs, q)

    return {
        "requests_planned": len(reqs),
        "requests_measured": len(measured),
        "ok": len(ok),
        "errors": dict(errors),
        "error_fraction": (len(measured) - len(ok)) / len(measured) if measured else 0.0,
        "achieved_rps": done_window / duration,
        "offered_rps_actual": len(measured) / duration,
        "chunks_per_s": chunks_window / duration,
        "tokens_per_chunk": per_chunk,
        "out_tokens_per_s": chunks_window * (per_chunk or 1.0) / duration,
        "out_tokens_counted_by": "server counter x client chunks" if per_chunk else "client chunks only",
        "server_completion_tokens": server_tokens,
        "mean_max_tokens": statistics.fmean(r.max_tokens for r in reqs) if reqs else 0.0,
        "mean_out_tokens": server_tokens / len(finished) if finished and server_tokens else None,
        "mean_prompt_tokens": statistics.fmean(r.prompt_tokens for r in reqs) if reqs else 0.0,
        "ttft_p50_ms": ms(ttft, 0.5),
        "ttft_p99_ms": ms(ttft, 0.99),
        "ttft_max_ms": ms(ttft, 1.0),
        "itl_p50_ms": ms(itl, 0.5),
        "itl_p99_ms": ms(itl, 0.99),
        "e2e_p50_s": pct(e2e, 0.5),
        "e2e_p99_s": pct(e2e, 0.99),
        "no_text_ok": sum(1 for r in ok if not r.times),
        "distinct_adapters": len({r.user for r in measured if r.user >= 0}),
        "cap_waits": sum(1 for r in reqs if r.capped),
        "cap_wait_p99_ms": ms([r.sent - (t0 + r.at) for r in reqs if r.capped], 0.99)
        if any(r.capped for r in reqs)
        else 0.0,
        "cache": tier,
        **timing,
        **cpu,
    }


# -- one point, one series ------------------------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    base: BaseSpec
    prompts: PromptMaker
    context: int
    chat_overhead: int
    deadline: float  # time.monotonic()
    idle_latency_s: float | None = None  # a 1-token request on the idle worker (set per series)
    clients: Any = None  # the client processes (`--client-processes` > 1), started at the first point


def run_point(
    ctx: Context, client: Client, worker: Worker, traffic: Traffic, rate: float, duration: float, role: str
) -> dict[str, Any]:
    args = ctx.args
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    reqs, clamped = plan_requests(
        args, traffic, rate, args.warmup + duration, ctx.prompts, ctx.base.model_id, ctx.context, ctx.chat_overhead
    )
    import psutil

    server_proc = psutil.Process(worker.proc.pid)
    spy = None
    if os.environ.get("LOAD_PYSPY") and args.out and role != "probe":
        # LOAD_PYSPY=1: py-spy samples the worker's threads that hold the GIL over the point (warm-up and window).
        exe = shutil.which("py-spy") or str(Path(sys.prefix) / "bin" / "py-spy")
        name = f"pyspy-{traffic.kind}-{traffic.adapters}-{rate:.0f}.txt"
        spy = subprocess.Popen(
            [exe, "record", "--pid", str(worker.proc.pid), "--gil", "--rate", "250", "--format", "raw",
             "--duration", str(int(args.warmup + duration)), "--nonblocking", "-o", str(args.out / name)],
            stdout=subprocess.DEVNULL, stderr=open(args.out / f"{name}.err", "w"),
        )  # fmt: skip

    async def go() -> tuple[dict, dict, dict, dict]:
        # The client's garbage: what lives now (tokenizer, torch, earlier points) is frozen out of the collector's
        # passes, and no pass runs during the point (a full one over torch's objects stalled this client's loop by
        # 100-300 ms, counted as TTFT of the requests due meanwhile); one collection after it.
        gc.collect()
        gc.freeze()
        gc.disable()
        before = parse_metrics((await client.get("/metrics"))[1].decode())
        cpu0 = _tree_cpu(server_proc)
        c0, w0 = time.process_time(), time.perf_counter()
        drain_s = max(args.drain_s, 2 * duration)
        children_cpu = 0.0
        if args.client_processes > 1:
            timing, children_cpu = await asyncio.get_running_loop().run_in_executor(
                None, drive_in_processes, ctx, client, path, reqs, drain_s
            )
        else:
            timing = await drive(client, path, reqs, drain_s)
        wall = time.perf_counter() - w0
        cpu1 = _tree_cpu(server_proc)
        cpu = {
            "client_cpu_cores": (time.process_time() - c0 + children_cpu) / wall,
            # the worker's process, and its HTTP and fill processes (by pid: one restarted meanwhile is not counted)
            "server_cpu_cores": sum(cpu1[pid] - cpu0[pid] for pid in cpu1 if pid in cpu0) / wall,
            "server_main_cpu_cores": (cpu1[server_proc.pid] - cpu0[server_proc.pid]) / wall,
        }
        after = parse_metrics((await client.get("/metrics"))[1].decode())
        # The engine thread's time by phase, as a share of the point's wall time (the worker adds to these counters
        # at most twice a second: the edges of a point blur by up to 0.5 s).
        cpu["engine_share"] = {
            phase: metric_delta(after, before, f"persona_serving_engine_seconds_total:{phase}") / wall
            for phase in ("step", "plan", "wait", "finish", "deliver", "idle")
        }
        cpu["engine_steps_per_s"] = metric_delta(after, before, "persona_serving_engine_steps_total:") / wall
        return timing, before, after, cpu

    try:
        timing, before, after, cpu = asyncio.run(_with_client(client, go))
    finally:
        gc.enable()
        gc.unfreeze()
        if spy is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(timeout=30)
    point = summarize(reqs, timing, args.warmup, duration, before, after, cpu)
    point.update(
        {
            "offered_rps": rate,
            "duration_s": duration,
            "warmup_s": args.warmup,
            "role": role,
            "clamped_to_context": clamped,
        }
    )
    if point["unfinished"]:
        # Abandoned streams keep generating on the worker (nothing aborts them): wait until it is idle again.
        point["settle_s"] = settle(ctx, client)
    note(f"    {role} {rate:8.2f} req/s: " + short(point))
    return point


def _tree_cpu(proc: Any) -> dict[int, float]:
    """CPU seconds (user + system) of ``proc`` and each of its descendants, by pid."""
    import psutil

    out = {}
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
    return out


def drive_in_processes(
    ctx: Context, client: Client, path: str, reqs: list[Req], drain_s: float
) -> tuple[dict[str, Any], float]:
    """`drive` split over ``--client-processes`` processes (request i to process i mod n), all from one start time
    (perf_counter is the system's monotonic clock: the same in every process); returns the merged timing facts and
    the CPU seconds the client processes used. The requests come back filled in."""
    import concurrent.futures as cf
    import multiprocessing as mp

    n = ctx.args.client_processes
    if ctx.clients is None:
        ctx.clients = cf.ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"))
        list(ctx.clients.map(time.sleep, [0.0] * n))  # started (and their imports done) before the first point
    t0 = time.perf_counter() + 0.3
    parts = [reqs[i::n] for i in range(n)]
    cap = max(1, client.cap // n)
    futures = [
        ctx.clients.submit(
            _drive_part, client.kind, client.url, client.key, cap, client.timeout, path, part, t0, drain_s
        )
        for part in parts
    ]
    timings, cpu = [], 0.0
    for part, future in zip(parts, futures, strict=True):
        done, timing, used = future.result()
        for mine, theirs in zip(part, done, strict=True):
            mine.__dict__.update(theirs.__dict__)
        timings.append(timing)
        cpu += used
    merged = {
        "t0": t0,
        "arrivals_end": max(t["arrivals_end"] for t in timings),
        "drained_s": max(t["drained_s"] for t in timings),
        "unfinished": sum(t["unfinished"] for t in timings),
        "client_processes": n,
    }
    for key in ("dispatch_lag_p99_ms", "client_stall_p99_ms", "client_stall_max_ms"):
        merged[key] = max(t[key] for t in timings)  # the worst process's
    return merged, cpu


def _drive_part(
    kind: str, url: str, key: str, cap: int, timeout: float, path: str, reqs: list[Req], t0: float, drain_s: float
) -> tuple[list[Req], dict[str, Any], float]:
    gc.collect()
    gc.freeze()
    gc.disable()
    c0 = time.process_time()
    client = Client(kind, url, key, cap, timeout)
    try:
        timing = asyncio.run(_with_client(client, lambda: drive(client, path, reqs, drain_s, t0=t0)))
    finally:
        gc.enable()
        gc.unfreeze()
    return reqs, timing, time.process_time() - c0


async def _with_client(client: Client, fn: Callable[[], Any]) -> Any:
    async with client:
        return await fn()


def probe_latency(ctx: Context, client: Client) -> float:
    """Seconds of one 1-token base request (it queues behind whatever the worker still runs)."""
    body = {
        "model": ctx.base.model_id,
        "prompt": ctx.prompts.make(random.Random(3), 8),
        "max_tokens": 1,
        "stream": True,
    }
    rec = Req(0.0, -1, 8, 1, json.dumps(body).encode())

    async def go() -> None:
        await drive(client, "/v1/completions", [rec], 300)

    asyncio.run(_with_client(client, go))
    return rec.end - rec.sent


def settle(ctx: Context, client: Client, limit_s: float = 180.0) -> float:
    """Wait until a 1-token request is about as fast as on the idle worker (at most ``limit_s``)."""
    started = time.perf_counter()
    idle = ctx.idle_latency_s or 0.05
    while time.perf_counter() - started < limit_s and probe_latency(ctx, client) > max(3 * idle, idle + 0.05):
        time.sleep(1.0)
    return time.perf_counter() - started


def short(p: dict) -> str:
    return (
        f"achieved {p['achieved_rps']:.2f} req/s, {p['out_tokens_per_s']:,.0f} tok/s, TTFT p50/p99 "
        f"{p['ttft_p50_ms']:.0f}/{p['ttft_p99_ms']:.0f} ms, ITL p50/p99 {p['itl_p50_ms']:.1f}/{p['itl_p99_ms']:.1f} "
        "ms, "
        f"ok {p['ok']}/{p['requests_measured']}, errors {p['errors'] or '-'}, client CPU {p['client_cpu_cores']:.2f}"
        f", server CPU {p['server_cpu_cores']:.2f}, client stall max {p.get('client_stall_max_ms', 0):.0f} ms"
        + _engine_text(p)
    )


def _engine_text(p: dict) -> str:
    """The engine thread's time split, as shares of the point's wall time (fast engine: plan / wait / finish)."""
    e = p.get("engine_share")
    if not e or not e.get("step"):
        return ""
    return (
        f", engine thread: step {e['step']:.0%} (plan {e['plan']:.0%}, GPU wait {e['wait']:.0%}, finish "
        f"{e['finish']:.0%}), deliver {e['deliver']:.0%}, idle {e['idle']:.0%}, {p['engine_steps_per_s']:.0f} steps/s"
    )


def time_left(ctx: Context) -> float:
    return ctx.deadline - time.monotonic()


def point_cost(ctx: Context, duration: float) -> float:
    return ctx.args.warmup + duration + 5


def saturation(ctx: Context, run: Callable[[float, float, str], dict]) -> tuple[dict, list[dict]]:
    """Double the offered rate until the worker stops keeping up; capacity = the best achieved request rate."""
    args = ctx.args
    probes: list[dict] = []
    rate = args.start_rate
    reason = "--max-rate reached"
    first_ttft = None
    while time_left(ctx) > point_cost(ctx, args.probe_duration):
        p = run(rate, args.probe_duration, "probe")
        probes.append(p)
        # The bar is 10x the quietest probe's TTFT p99 so far (a hiccup in the first probe, e.g. a cold worker's first
        # misses, must not raise it: with 10x a first probe's 956 ms, a point at 3.5 s counted as keeping up).
        first_ttft = min(first_ttft or p["ttft_p99_ms"], p["ttft_p99_ms"])
        why = saturated(p, first_ttft)
        if len(probes) >= 2 and p["out_tokens_per_s"] < 1.1 * probes[-2]["out_tokens_per_s"]:
            why.append("output tokens/s grew < 10% on doubling the rate")
        if why:
            reason = "; ".join(why)
            break
        if rate * 2 > args.max_rate:
            break
        rate *= 2
    else:
        reason = "time budget"
    best = max(probes, key=lambda p: p["achieved_rps"], default=None)
    sat = {
        "capacity_rps": best["achieved_rps"] if best else None,
        "at_offered_rps": best["offered_rps"] if best else None,
        "stopped_because": reason,
        "first_ttft_p99_ms": first_ttft,
    }
    return sat, probes


def saturated(p: dict, first_ttft_ms: float) -> list[str]:
    """Why point ``p`` shows a worker that no longer keeps up (empty: it kept up)."""
    why = []
    arrived = p["offered_rps_actual"]  # the window's own arrivals: Poisson noise is not saturation
    if p["achieved_rps"] < 0.85 * arrived:
        why.append(f"completed {p['achieved_rps']:.2f} < 85% of the {arrived:.2f} req/s that arrived")
    if p["ttft_p99_ms"] > max(1000.0, 10 * first_ttft_ms):
        why.append(f"TTFT p99 {p['ttft_p99_ms']:.0f} ms > max(1 s, 10x the quietest probe's)")
    if p["error_fraction"] > 0.05:
        why.append(f"{p['error_fraction']:.0%} errors")
    return why


def run_series(ctx: Context, traffic: Traffic, name: str, start: Callable[[Path], Worker], key: str) -> dict:
    args = ctx.args
    note(f"== {name}")
    run_dir = Path(args.work_dir) / f"run-{re.sub(r'[^A-Za-z0-9.-]+', '-', name)}"
    worker = start(run_dir)
    note(f"   worker up in {worker.started_s:.1f}s ({worker.engine}); log {worker.log}")
    series: dict[str, Any] = {
        "name": name,
        "kind": traffic.kind,
        "adapters": traffic.adapters,
        "engine": worker.engine,
        "worker_start_s": worker.started_s,
        "worker_log": str(worker.log),
        "points": [],
    }
    client = Client(args.client, worker.url, key, args.cap, args.request_timeout)
    series["client"] = client.kind
    try:
        if args.server_warmup:
            series["server_warmup_s"] = warm_server(ctx, client)
        ctx.idle_latency_s = statistics.median(probe_latency(ctx, client) for _ in range(3))
        series["idle_1_token_s"] = ctx.idle_latency_s
        if traffic.kind == "resident":
            series["prewarm"] = prewarm(ctx, client, traffic.adapters)

        def run(rate: float, duration: float, role: str) -> dict:
            p = run_point(ctx, client, worker, traffic, rate, duration, role)
            series["points"].append(p)
            return p

        if args.rates:
            rates = sorted(args.rates)
        else:
            sat, _ = saturation(ctx, run)
            series["saturation"] = sat
            note(f"   saturation: {sat}")
            rates = [f * sat["capacity_rps"] for f in args.fractions] if sat["capacity_rps"] else []
        last = None
        for rate in rates:
            if time_left(ctx) < point_cost(ctx, args.duration):
                series.setdefault("skipped_rates", []).append(rate)
                continue
            last = run(rate, args.duration, "measure")
        # The probes run first, on the coldest tiers, and double the rate: the capacity they find can lie well under
        # what the warm worker sustains (its 1.0 point then keeps up easily). Climb until a point shows saturation.
        climbed = 0
        while (
            not args.rates and last is not None and climbed < args.climb
            and time_left(ctx) > point_cost(ctx, args.duration)
        ):  # fmt: skip
            why = saturated(last, series["saturation"]["first_ttft_p99_ms"])
            if why:
                series["climb_stopped_because"] = "; ".join(why)
                break
            prev = last
            last = run(last["offered_rps"] * args.climb_step, args.duration, "climb")
            climbed += 1
            if last["out_tokens_per_s"] < 1.03 * prev["out_tokens_per_s"]:
                series["climb_stopped_because"] = f"output tokens/s grew < 3% on {args.climb_step}x the rate"
                break
        if not args.rates:
            refine(ctx, series, run)
    finally:
        worker.stop()
    pts = series["points"]
    if pts:
        best = max(pts, key=lambda p: p["out_tokens_per_s"])
        series["peak"] = {
            "out_tokens_per_s": best["out_tokens_per_s"],
            "achieved_rps": best["achieved_rps"],
            "offered_rps": best["offered_rps"],
        }
    if series.get("saturation"):
        series["sustained"] = sustained(series)
    return series


def _bracket(series: dict) -> tuple[dict | None, dict | None]:
    """(the kept-up point of highest offered rate below the lowest rate that did not keep up, that lowest point),
    over the measured points (the probes ran shorter, on colder tiers). Either may be None."""
    first = series["saturation"]["first_ttft_p99_ms"]
    pts = [p for p in series["points"] if p["role"] != "probe"]
    tipped = [p for p in pts if saturated(p, first)]
    low = min(tipped, key=lambda p: p["offered_rps"], default=None)
    kept = [p for p in pts if not saturated(p, first) and (low is None or p["offered_rps"] < low["offered_rps"])]
    return max(kept, key=lambda p: p["offered_rps"], default=None), low


def refine(ctx: Context, series: dict, run: Callable[[float, float, str], dict]) -> None:
    """Bisect (geometrically) between the highest rate that kept up and the lowest that did not, ``--refine``
    points at most, until they are within ``--refine-within``: the measured rates are ~25% apart, so without this
    the capacity a series shows depends on where its grid happened to fall (the same worker's Zipf / all-resident
    ratio read 73-113% that way)."""
    args = ctx.args
    for _ in range(args.refine):
        high, low = _bracket(series)
        if high is None or low is None or low["offered_rps"] <= high["offered_rps"] * (1 + args.refine_within):
            return
        if time_left(ctx) < point_cost(ctx, args.duration):
            series["refine_skipped"] = "time budget"
            return
        run(math.sqrt(high["offered_rps"] * low["offered_rps"]), args.duration, "refine")


def sustained(series: dict) -> dict | None:
    """The best measured point that kept up (completions >= 85% of arrivals, TTFT p99 within bounds, <= 5% errors)
    at a rate below the lowest that did not: what the worker sustains, where the peak may be a point already falling
    behind (its backlog keeps the batch full for the length of the window)."""
    first = series["saturation"]["first_ttft_p99_ms"]
    high, low = _bracket(series)
    limit = low["offered_rps"] if low is not None else math.inf
    kept = [
        p for p in series["points"] if p["role"] != "probe" and not saturated(p, first) and p["offered_rps"] < limit
    ]
    if not kept:
        return None
    best = max(kept, key=lambda p: p["out_tokens_per_s"])
    return {
        "out_tokens_per_s": best["out_tokens_per_s"],
        "achieved_rps": best["achieved_rps"],
        "offered_rps": best["offered_rps"],
        "ttft_p99_ms": best["ttft_p99_ms"],
        "bracket_rps": [high["offered_rps"] if high else None, low["offered_rps"] if low else None],
    }


def warm_server(ctx: Context, client: Client) -> float:
    """Base-only bursts at growing concurrency (engine warm-up: kernels, CUDA graphs of the base path); touches no
    adapter tier."""
    args = ctx.args
    started = time.perf_counter()
    rng = random.Random(1)
    levels = sorted({c for c in (1, 4, 16, 64, 256, args.max_batch) if c <= args.max_batch})
    reqs = []
    t = 0.0
    for c in levels:
        for _ in range(c):
            body = {"model": ctx.base.model_id, "prompt": ctx.prompts.make(rng, 64), "max_tokens": 8, "stream": True}
            reqs.append(Req(t, -1, 64, 8, json.dumps(body).encode()))
        t += 1.0

    async def go() -> None:
        await drive(client, "/v1/completions", reqs, 120)

    asyncio.run(_with_client(client, go))
    bad = Counter(r.error for r in reqs if r.error)
    if bad:
        note(f"   server warm-up errors: {dict(bad)}")
    return time.perf_counter() - started


def prewarm(ctx: Context, client: Client, k: int) -> dict:
    """Bring users 0..k-1 into device slots (one short request each, 8 at a time); checked on /metrics."""
    started = time.perf_counter()
    rng = random.Random(2)
    reqs = []
    for i in range(k):
        body = {"model": f"user:{user_id(i)}", "prompt": ctx.prompts.make(rng, 8), "max_tokens": 1, "stream": True}
        reqs.append(Req(i / 1000, i, 8, 1, json.dumps(body).encode()))
    cap = client.cap
    client.cap = min(cap, 8)

    async def go() -> dict:
        await drive(client, "/v1/completions", reqs, 600)
        return parse_metrics((await client.get("/metrics"))[1].decode())

    try:
        after = asyncio.run(_with_client(client, go))
    finally:
        client.cap = cap
    resident = after.get("persona_adapter_cache_resident:slot")
    out = {
        "adapters": k,
        "seconds": time.perf_counter() - started,
        "slot_resident": resident,
        "errors": dict(Counter(r.error for r in reqs if r.error)),
    }
    note(f"   pre-warmed {k} adapters into slots in {out['seconds']:.1f}s (slot tier holds {resident})")
    return out


# -- output ---------------------------------------------------------------------------------------------------------


def fmt_ms(x: float) -> str:
    return "-" if x != x else f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def table(res: dict) -> str:
    lines = [
        "| series | role | offered req/s | achieved req/s | out tok/s | TTFT p50 / p99 ms | "
        "ITL p50 / p99 ms (per chunk) | E2E p50 / p99 s | ok / measured | errors | cap waits | store fetches | "
        "slot loads |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for s in res["series"]:
        for p in s["points"]:
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(p["errors"].items())) or "-"
            lines.append(
                f"| {s['name']} | {p['role']} | {p['offered_rps']:.2f} | {p['achieved_rps']:.2f} | "
                f"{p['out_tokens_per_s']:,.0f} | {fmt_ms(p['ttft_p50_ms'])} / {fmt_ms(p['ttft_p99_ms'])} | "
                f"{fmt_ms(p['itl_p50_ms'])} / {fmt_ms(p['itl_p99_ms'])} | "
                f"{p['e2e_p50_s']:.2f} / {p['e2e_p99_s']:.2f} | "
                f"{p['ok']} / {p['requests_measured']} | {errors} | {p['cap_waits']} | "
                f"{p['cache']['store']['hits']:.0f} | {p['cache']['slot']['misses']:.0f} |"
            )
    return "\n".join(lines)


def summary_lines(res: dict) -> list[str]:
    out = []
    by_kind: dict[str, dict] = {}
    sustained_of: dict[str, dict] = {}
    for s in res["series"]:
        sat = s.get("saturation")
        peak = s.get("peak")
        if sat:
            out.append(
                f"- {s['name']}: saturation at {sat['capacity_rps'] or 0:.2f} req/s achieved (offered "
                f"{sat['at_offered_rps'] or 0:.2f}); stopped because {sat['stopped_because']}"
                + (f"; peak {peak['out_tokens_per_s']:,.0f} out tok/s" if peak else "")
                + (
                    f" at {peak['achieved_rps']:.2f} req/s; climbing above the capacity stopped because "
                    f"{s['climb_stopped_because']}"
                    if peak and s.get("climb_stopped_because")
                    else ""
                )
            )
        elif peak:
            out.append(
                f"- {s['name']}: peak {peak['out_tokens_per_s']:,.0f} out tok/s at {peak['offered_rps']:.2f} "
                "req/s offered (fixed rates: no saturation search)"
            )
        if peak:
            by_kind.setdefault(s["kind"], {})[s["adapters"]] = peak["out_tokens_per_s"]
        held = s.get("sustained")
        if held:
            lo, hi = held["bracket_rps"]
            out.append(
                f"- {s['name']}: sustained {held['out_tokens_per_s']:,.0f} out tok/s at {held['achieved_rps']:.2f} "
                f"req/s (the best measured point that kept up, TTFT p99 {held['ttft_p99_ms']:,.0f} ms"
                + (f"; the capacity lies between {lo:.1f} and {hi:.1f} req/s offered" if lo and hi else "")
                + ")"
            )
            sustained_of.setdefault(s["kind"], {})[s["adapters"]] = held["out_tokens_per_s"]
    slots = res["config"]["slots"]
    residents = by_kind.get("resident", {})
    base = max(by_kind.get("base", {}).values(), default=None)
    searched = all(s.get("saturation") for s in res["series"] if s.get("points"))
    caveat = "" if searched else " (fixed rates, no saturation search: a ratio of offered load unless all saturated)"
    for n, tok in sorted(by_kind.get("zipf", {}).items()):
        parts = []
        resident = residents.get(min(n, slots))
        if resident:
            parts.append(f"{tok / resident:.0%} of all-resident (k={min(n, slots)})")
        if base:
            parts.append(f"{tok / base:.0%} of base-only")
        if parts:
            out.append(f"- Zipf over {n:,} adapters: peak output tokens/s = {', '.join(parts)}{caveat}")
        held, held_resident = sustained_of.get("zipf", {}).get(n), sustained_of.get("resident", {}).get(min(n, slots))
        if held and held_resident:
            out.append(
                f"- Zipf over {n:,} adapters: sustained output tokens/s = {held / held_resident:.0%} of all-resident "
                f"(k={min(n, slots)})"
            )
    for k, tok in sorted(residents.items()):
        if base:
            out.append(f"- all-resident k={k}: peak output tokens/s = {tok / base:.0%} of base-only{caveat}")
    capped = [f"{s['name']} @ {p['offered_rps']:.2f}" for s in res["series"] for p in s["points"] if p["cap_waits"]]
    if capped:
        out.append(
            f"- the client cap of {res['config']['cap']} requests in flight was reached (later ones waited; their "
            f"latencies count the wait): {', '.join(capped)}"
        )
    procs = res["config"].get("client_processes") or 1  # the cores of all client processes: 80% of a core each
    client_bound = [
        f"{s['name']} @ {p['offered_rps']:.2f}"
        for s in res["series"]
        for p in s["points"]
        if p["client_cpu_cores"] > 0.8 * procs
    ]
    if client_bound:
        who = "the client process" if procs == 1 else f"the {procs} client processes"
        out.append(f"- {who} used > 80% of a core each (it may bound these points): {', '.join(client_bound)}")
    stalled = [
        f"{s['name']} @ {p['offered_rps']:.2f} ({p['client_stall_max_ms']:.0f} ms)"
        for s in res["series"]
        for p in s["points"]
        if p.get("client_stall_max_ms", 0) > 20
    ]
    if stalled:
        out.append(f"- the client's event loop stalled > 20 ms (counted as latency): {', '.join(stalled)}")
    return out


def method_text(res: dict) -> str:
    c = res["config"]
    replaced = res["replaced"]
    lo_p, hi_p = c["prompt_tokens"]
    lo_o, hi_o = c["output_tokens"]
    rates = (
        f"fixed offered rates {c['rates']}"
        if c["rates"]
        else f"saturation search (start {c['start_rate']} req/s, doubling, {c['probe_duration']} s probes; stop when "
        "completions < 85% of the window's arrivals, TTFT p99 > max(1 s, 10x the quietest probe's), > 5% errors, or "
        f"output tokens/s grew < 10% on doubling; capacity = best achieved req/s), then {c['duration']} s at "
        f"{c['fractions']} of capacity"
        + (
            f", then (`climb`) {c['climb_step']}x the last rate while the last point kept up (completions >= 85% of "
            f"arrivals, TTFT p99 <= max(1 s, 10x the quietest probe's), <= 5% errors), at most {c['climb']} points, "
            "stopping also when output tokens/s grew < 3%: the probes run on the coldest tiers, so the capacity they "
            "find can lie under what the warm worker sustains"
            if c.get("climb")
            else ""
        )
        + (
            f", then (`refine`) at most {c['refine']} points bisecting (geometric mean) between the highest measured "
            "rate that kept up and the lowest that did not, until they are within "
            f"{c.get('refine_within', 0.06):.0%}; sustained = the best measured point that kept up below the lowest "
            "that did not"
            if c.get("refine")
            else ""
        )
    )
    return "\n".join(
        [
            f"- Worker: {res['stack_text']}; base `{c['base']}` on `{c['device']}`, engine "
            f"{', '.join(sorted({s['engine'] for s in res['series']}))} "
            f"(PERSONA_SERVE_ENGINE={c['engine'] or 'from the environment'}), "
            f"slots {c['slots']}, max batch {c['max_batch']}, at most "
            f"{c['max_batch'] + (c.get('max_queued') or c['max_batch'])} requests started (the rest wait their turn "
            f"holding no slot), max_seq {c['max_seq']}, host cache "
            f"{c['host_cache_bytes'] / 2**30:.1f} GiB, disk cache {c['disk_cache_bytes'] / 2**30:.1f} GiB, stream "
            f"interval {_interval_text(c)}, {_fill_text(c)}, {_http_text(c)}. A fresh "
            "worker process with an empty disk cache directory per series: store -> disk -> host -> slot tiers all "
            "cold at its start (the resident series then loads its adapters before measuring); rates of one series "
            "run in increasing order on that worker, so later rates find the tiers as the earlier ones left them.",
            f"- Replaced: {'; '.join(replaced)}.",
            f"- Adapters: random LoRA r={c['rank']} on {', '.join(c['targets'])} (bf16, as training saves them), one "
            "per user, each different (content-addressed copies are not shared).",
            f"- Arrivals: open-loop Poisson (exponential gaps, seeded per rate: every series sees the same arrival "
            f"times, users ranks and lengths at a given rate); {rates}. Each point: {c['warmup']} s warm-up (arrivals "
            "not counted), then the measured window; latencies are over requests that arrived in the window, counted "
            "from their scheduled arrival (client queueing included); throughput counts what was received inside the "
            "window.",
            "- Users: Zipf(1.0) over N users (rank k drawn with probability proportional to 1/(k+1)); `resident`: "
            "Zipf over min(N, slots) users pre-loaded into device slots; `base`: model = the base id.",
            f"- Lengths: prompt {lo_p}..{hi_p} tokens and max_tokens {lo_o}..{hi_o}, {c['length_dist']}, clamped to "
            "the context; prompts are random words that are one token each, so a prompt has exactly its drawn length "
            f"(endpoint `{c['endpoint']}`, temperature {c['temperature']}). The API has no `ignore_eos`: a generation "
            "may stop early at EOS (mean output vs mean max_tokens in the JSON).",
            "- Tokens: the stream sends one SSE chunk per token that adds text (a token without text of its own is "
            "sent with the next one"
            + (
                "; with a stream interval, the tokens of the steps within an interval go as one chunk, the first "
                "token at once"
                if c.get("stream_interval_ms")
                else ""
            )
            + "), so TTFT is the first chunk and inter-token latency is measured per chunk; "
            "output tokens/s = chunks received in the window x (completion tokens counted by the worker's "
            "`persona_serving_tokens_total` / chunks received, over the point).",
            f"- Client: {_clients_text(c)} ({', '.join(sorted({s.get('client', '?') for s in res['series']}))}), at "
            f"most {c['cap']} requests in flight (a request over the cap waits; counted as cap waits); client and "
            f"server CPU per point in the JSON. Pinning: {res['pinning']}.",
        ]
    )


def _clients_text(c: dict) -> str:
    n = c.get("client_processes") or 1
    if n == 1:
        return "one asyncio process"
    return f"{n} asyncio processes (request i of a point sent by process i mod {n}, all from one start time)"


def header(res: dict) -> str:
    e = res["env"]
    return (
        f"serving load benchmark ({e['machine']}, {e['cores']} cores, torch {e['torch']}, device {e['device_name']}; "
        f"{res['started_at']}; {res['wall_s']:.0f} s)"
    )


#: Where `write_md` puts a run's table in a Markdown file that holds more than it (bench/results/serving_load.md: the
#: sessions' write-ups around the latest table): between these lines, the rest of the file kept.
MD_START, MD_END = "<!-- load-table:start -->", "<!-- load-table:end -->"


def write_md(res: dict, path: Path, png: str | None) -> None:
    """The run's header, table, summary, method and plot link into ``path``: the whole file, or only what lies
    between `MD_START` and `MD_END` where the file already has both."""
    text = [
        header(res),
        "",
        table(res),
        "",
        *summary_lines(res),
        "",
        "Method:",
        "",
        method_text(res),
    ]
    if png:
        text += ["", f"![throughput and latency vs offered rate]({png})"]
    body = "\n".join(text) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    head, start, rest = old.partition(MD_START + "\n")
    _, end, tail = rest.partition(MD_END)
    if start and end:
        body = head + start + "\n" + body + "\n" + end + tail
    path.write_text(body)


def plot(json_paths: str, out_dir: Path, md: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib ({e})") from e
    runs = [json.loads(Path(j).read_text()) for j in json_paths.split(",") if j]
    res = runs[0]  # several runs (e.g. one device call per series): their series together, the first one's config
    res["series"] = [s for r in runs for s in r["series"]]
    res["wall_s"] = sum(r["wall_s"] for r in runs)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for s in res["series"]:
        pts = sorted(s["points"], key=lambda p: p["offered_rps"])
        if not pts:
            continue
        x = [p["offered_rps"] for p in pts]
        axes[0].plot(x, [p["out_tokens_per_s"] for p in pts], marker="o", label=s["name"])
        axes[1].plot(x, [p["ttft_p99_ms"] for p in pts], marker="o", label=s["name"])
        axes[2].plot(x, [p["itl_p99_ms"] for p in pts], marker="o", label=s["name"])
    for ax, title, unit in zip(
        axes,
        ("output tokens/s (achieved)", "TTFT p99", "inter-token latency p99 (per chunk)"),
        ("tokens/s", "ms", "ms"),
        strict=True,
    ):
        ax.set_title(title)
        ax.set_xlabel("offered requests/s")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(header(res), fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / "serving_load.png"
    fig.savefig(png, dpi=110)
    write_md(res, md, os.path.relpath(png.resolve(), md.parent.resolve()))
    print(f"wrote {png} and {md}")


# -- main -----------------------------------------------------------------------------------------------------------


def span(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(":")
    return int(lo), int(hi or lo)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--plot",
        nargs=2,
        metavar=("JSON", "OUTDIR"),
        help="render serving_load.png + the .md from JSON (a,b,...: runs merged) and exit",
    )
    ap.add_argument("--md", type=Path, default=RESULTS / "serving_load.md", help="--plot: the Markdown it writes")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run the in-memory worker of this spec file
    ap.add_argument("--stack", choices=["inmemory", "real"], default="inmemory")
    ap.add_argument("--base", default="tiny-random", help="tiny-random | smollm2-135m | DIR | random:SHAPE")
    ap.add_argument("--tokenizer", help="tokenizer directory of a random:SHAPE base (default: prepared SmolLM2)")
    ap.add_argument("--adapters", type=ints, default=[1000, 10000], help="N users/adapters, comma-separated")
    ap.add_argument("--kinds", default="zipf,resident,base", help="series: zipf, resident, base (comma-separated)")
    ap.add_argument("--base-only", action="store_true", help="only the base-only series (= --kinds base)")
    ap.add_argument("--rates", type=floats, help="offered req/s (comma-separated); default: saturation search")
    ap.add_argument("--fractions", type=floats, default=[0.3, 0.5, 0.7, 0.9, 1.0], help="of the saturation rate")
    ap.add_argument(
        "--climb", type=int, default=4, help="measured points above the capacity found (--climb-step x each) while "
        "the last one kept up; 0: none",
    )  # fmt: skip
    ap.add_argument("--climb-step", type=float, default=1.25)
    ap.add_argument(
        "--refine",
        type=int,
        default=3,
        help="measured points at most bisecting between the highest rate that kept up and the lowest that did not",
    )
    ap.add_argument("--refine-within", type=float, default=0.06, help="stop refining when they are this close")
    ap.add_argument("--start-rate", type=float, default=1.0, help="first rate of the saturation search")
    ap.add_argument("--max-rate", type=float, default=4096.0)
    ap.add_argument("--duration", type=float, default=20.0, help="measured seconds per rate")
    ap.add_argument("--probe-duration", type=float, help="measured seconds per saturation probe (default duration/2)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds of arrivals before each window (not counted)")
    ap.add_argument("--drain-s", type=float, default=120.0, help="longest wait for the last requests of a point")
    ap.add_argument("--budget-s", type=float, default=1500.0, help="global time budget; later points are skipped")
    ap.add_argument("--prompt-tokens", type=span, default=(32, 512), help="LO:HI")
    ap.add_argument("--output-tokens", type=span, default=(16, 256), help="LO:HI (max_tokens)")
    ap.add_argument("--length-dist", choices=["loguniform", "uniform"], default="loguniform")
    ap.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--targets", default=",".join(ALL_TARGETS))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engine", choices=["auto", "fast", "reference"], help="default: PERSONA_SERVE_ENGINE or auto")
    ap.add_argument(
        "--stub-engine-ms", type=float, default=0.0, help="inmemory, base only: a stub engine whose steps sleep MS "
        "(no model): what the worker costs around the engine",
    )  # fmt: skip
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument(
        "--max-queued",
        type=int,
        default=0,
        help="PERSONA_SERVE_MAX_QUEUED: started requests beyond the batch (0: max batch)",
    )
    ap.add_argument("--max-seq", type=int, default=2048)
    ap.add_argument("--host-cache-bytes", type=int, default=2 << 30)
    ap.add_argument(
        "--stream-interval-ms",
        type=float,
        default=None,
        help="the worker's PERSONA_SERVE_STREAM_INTERVAL_MS (default: from the environment, else 0: every token)",
    )
    ap.add_argument(
        "--fill-processes",
        type=int,
        default=None,
        help="the worker's PERSONA_SERVE_FILL_PROCESSES (default: from the environment, else 8, the worker's default; "
        "0: the cache's file work on the request threads)",
    )
    ap.add_argument(
        "--http-processes",
        type=int,
        default=None,
        help="the worker's PERSONA_SERVE_HTTP_PROCESSES (default: from the environment, else 0: the API in the "
        "worker's process)",
    )
    ap.add_argument("--disk-cache-bytes", type=int, default=10 << 30)
    ap.add_argument("--store-latency-ms", type=float, default=0.0, help="inmemory: sleep per object-store fetch")
    ap.add_argument("--cap", type=int, default=1024, help="client: requests in flight at most")
    ap.add_argument("--client", choices=["auto", "aiohttp", "httpx"], default="auto")
    ap.add_argument(
        "--client-processes",
        type=int,
        default=1,
        help="client processes that share each point's requests (one asyncio client each; near 1,000 req/s one "
        "process uses most of a core)",
    )
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--no-server-warmup", dest="server_warmup", action="store_false")
    ap.add_argument(
        "--pin", choices=["auto", "on", "off"], default="auto", help="client on the last core (>= 4 cores)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=8, help="threads that write adapters and seed the registry")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "persona-serving-load"))
    ap.add_argument(
        "--store-dir",
        default=None,
        help="where the bucket-layout store of the adapters is written (default: --work-dir); e.g. a tmpfs, where "
        "writing 10,000 adapters does not wait for a slow disk",
    )
    ap.add_argument("--keep", action="store_true", help="--stack real: keep the database and the objects")
    ap.add_argument("--out", type=Path, help="write serving_load.json (and .md) here")
    args = ap.parse_args(argv)
    args.probe_duration = args.probe_duration or args.duration / 2
    if args.stream_interval_ms is None:  # what the worker will read (recorded with the results)
        args.stream_interval_ms = float(os.environ.get("PERSONA_SERVE_STREAM_INTERVAL_MS") or 0)
    if args.fill_processes is None:
        args.fill_processes = int(os.environ.get("PERSONA_SERVE_FILL_PROCESSES") or 8)
    if args.http_processes is None:
        args.http_processes = int(os.environ.get("PERSONA_SERVE_HTTP_PROCESSES") or 0)
    if args.base_only:
        args.kinds = "base"
    return args


def raise_nofile(cap: int) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, cap + 256))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return {"nofile_soft": want, "nofile_hard": hard}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    if args.plot:
        plot(args.plot[0], Path(args.plot[1]), args.md)
        return
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # minio's one-connection pool, used from seeding threads
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    t_start = time.monotonic()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    base = resolve_base(args.base, args.tokenizer)
    if args.stack == "real" and base.shape:
        raise SystemExit("--stack real runs `persona serve`, which loads project refs only: use --stack inmemory")
    limits = raise_nofile(args.cap)
    if args.cap + 64 > limits["nofile_soft"]:
        args.cap = max(16, limits["nofile_soft"] - 64)
        note(f"client cap lowered to {args.cap} (open-file limit {limits['nofile_soft']})")
    cores = sorted(os.sched_getaffinity(0))
    nc = args.client_processes
    pin = args.pin == "on" or (args.pin == "auto" and len(cores) >= 3 + nc)
    worker_cores = set(cores[:-nc]) if pin else None
    if pin:
        os.sched_setaffinity(0, set(cores[-nc:]))  # the client processes inherit it
    where = f"core {cores[-1]}" if nc == 1 else f"cores {cores[-nc]}-{cores[-1]}"
    pinning = f"client on {where}, worker on cores {cores[0]}-{cores[-nc - 1]}" if pin else "none"

    tok = load_tokenizer(base)
    prompts = PromptMaker(tok)
    config = model_config(base)
    context = min(int(getattr(config, "max_position_embeddings", args.max_seq)), args.max_seq)
    chat_overhead = 0
    if args.endpoint == "chat":
        msg = [{"role": "user", "content": prompts.make(random.Random(0), 10)}]
        rendered = tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False)
        chat_overhead = prompts.count(rendered) - 10
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    n_max = max(args.adapters) if any(k in kinds for k in ("zipf", "resident")) else 0
    store_dir = Path(args.store_dir) if args.store_dir else work
    store, index = make_store(store_dir, base, n_max, args.rank, targets, args.seed, args.threads)

    real = None
    if args.stack == "real":
        real = seed_real(base, store, index, args.threads)
        key = ("", real.key)
        stack_text = "`persona serve` (subprocess) on the configured stack: PostgreSQL registry, S3 store, Kafka"
    else:
        from pipeline.domain.apikeys import new_key

        key = new_key()
        stack_text = "the serving app and Server subclass of bench/serving_load.py in a subprocess (--stack inmemory)"

    ctx = Context(args, base, prompts, context, chat_overhead, t_start + args.budget_s)
    plan: list[tuple[Traffic, str]] = []
    for kind in kinds:
        if kind == "base":
            plan.append((Traffic("base", 0), "base only"))
        elif kind == "resident":
            for k in sorted({min(n, args.slots) for n in args.adapters}):
                plan.append((Traffic("resident", k), f"all resident k={k}"))
        elif kind == "zipf":
            for n in args.adapters:
                plan.append((Traffic("zipf", n), f"zipf N={n}"))
        else:
            raise SystemExit(f"--kinds: unknown series {kind!r} (zipf, resident, base)")

    import torch

    res: dict[str, Any] = {
        "started_at": started_at,
        "config": {k: v for k, v in vars(args).items() if k not in ("plot", "worker")} | {"targets": targets},
        "env": {
            "machine": platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            **limits,
        },
        "stack": args.stack,
        "stack_text": stack_text,
        "replaced": REPLACED_REAL if real else REPLACED_INMEMORY,
        "pinning": pinning,
        "context_tokens": context,
        "store": str(store),
        "series": [],
    }
    if real:
        res["seed_s"] = real.seconds

    def starter(run_dir: Path) -> Worker:
        return start_worker(args, run_dir, base, index, store, key, real, worker_cores)

    try:
        for traffic, name in plan:
            if time_left(ctx) < point_cost(ctx, args.probe_duration) + 30:
                note(f"== {name}: skipped (time budget)")
                res["series"].append(
                    {
                        "name": name,
                        "kind": traffic.kind,
                        "adapters": traffic.adapters,
                        "engine": "-",
                        "points": [],
                        "skipped": "time budget",
                    }
                )
                continue
            res["series"].append(run_series(ctx, traffic, name, starter, key[1]))
    finally:
        if ctx.clients is not None:
            ctx.clients.shutdown(wait=False, cancel_futures=True)
        if real and not args.keep:
            clean_real(real, args.threads)
    res["wall_s"] = time.monotonic() - t_start
    text = "\n".join([header(res), "", table(res), "", *summary_lines(res), "", "Method:", "", method_text(res)])
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serving_load.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
        write_md(res, args.out / "serving_load.md", None)
        note(f"wrote {args.out / 'serving_load.json'} and serving_load.md")


if __name__ == "__main__":
    main()
