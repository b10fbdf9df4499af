"""Benchmark: the PostgreSQL and S3 share of a training wave in the worker's flow, by `RetrainConfig.io_threads`.

`pipeline.flows.retrain.retrain_batch` for K users of 100 simulated events each, on the configured stack (`persona
stack up`; a fresh database ``persona_bench_io``), with the tiny model and 2 training steps, so that what is left
around the training is the flow's own work: leases, event reads, parent downloads (sha256 verified), candidate
writes (objects put and read back, then the row); then the gate of the wave's candidates (`judge_many`: reads,
candidate and serving adapters downloaded, decisions written and promotions announced around one measuring pass).
Round ``first`` trains from scratch; 100 more events arrive, and round ``continual`` trains from what the gate
promoted (downloads included).

The object store can be put behind a TCP proxy that delays what the client sends by ``--s3-latency-ms`` (one way,
each chunk; replies are not delayed), a stand-in for an object store across a network: on one machine PostgreSQL,
the S3 server and this process share the cores, and round trips cost microseconds.

    .venv/bin/python bench/retrain_io.py --users 64 --io-threads 1,8 --s3-latency-ms 0,10

Prints a table; ``--out DIR`` writes retrain_io.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import stack  # noqa: E402
from pipeline.config import ModelSettings, Settings, TrainingSettings  # noqa: E402
from pipeline.demo import sim  # noqa: E402
from pipeline.evaluation.rules import load_rules  # noqa: E402
from pipeline.flows import gate  # noqa: E402
from pipeline.flows import retrain as flow  # noqa: E402
from pipeline.serving.promotions import Announcer  # noqa: E402
from pipeline.storage import db  # noqa: E402
from pipeline.storage.stores import Stores  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from train_cpu import _with_database, add_events  # noqa: E402

DB_NAME = "persona_bench_io"


class DelayProxy:
    """A TCP proxy on 127.0.0.1 that forwards what clients send ``delay_s`` late (each chunk at its arrival time plus
    the delay, in order) and what the server answers at once."""

    def __init__(self, target: tuple[str, int], delay_s: float) -> None:
        self.target, self.delay_s = target, delay_s
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.port = 0

        async def start() -> None:
            server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            ready.set()

        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="delay-proxy")
        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop)
        ready.wait(10)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:  # `close`: the connection ends with the proxy
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def receive() -> None:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + self.delay_s, data))
            queue.put_nowait((time.monotonic() + self.delay_s, b""))

        async def forward() -> None:
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    up_writer.close()
                    return
                up_writer.write(data)
                await up_writer.drain()

        async def answer() -> None:
            while data := await up_reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(receive(), forward(), answer(), return_exceptions=True)

    def close(self) -> None:
        async def cancel() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(cancel(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Timed:
    """``module.name`` replaced by a wrapper that adds its seconds to ``seconds`` (restored by ``restore``)."""

    def __init__(self, module: Any, name: str) -> None:
        self.module, self.name, self.real = module, name, getattr(module, name)
        self.seconds = 0.0

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return self.real(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        setattr(module, name, timed)

    def restore(self) -> None:
        setattr(self.module, self.name, self.real)


def run(settings: Settings, users: int, io_threads: int, steps: int, tag: str) -> list[dict[str, Any]]:
    """Two rounds (first, continual) of one wave of ``users``: its retrain, then the gate of its candidates; per
    step its wall time and compute time (training, or the gate's measuring)."""
    cfg = flow.RetrainConfig(
        ModelSettings(base="tiny-random"),
        TrainingSettings(max_steps=steps, eval_every=steps, threads=1),
        600,
        io_threads=io_threads,
    )
    gate_cfg = gate.GateConfig(
        model=ModelSettings(base="tiny-random"),
        probes=settings.gate.probes,
        min_preference_pairs=settings.gate.min_preference_pairs,
        max_length=cfg.training.max_length,
        io_threads=io_threads,
    )
    people = [sim.SimUser(f"io-{tag}-{i}", sim.users(6)[i % 6].style) for i in range(users)]
    rows = []
    training = Timed(flow, "train_adapters")
    measuring = Timed(gate, "evaluate_many")
    announcer = Announcer(settings.kafka)

    def row(round_name: str, step: str, wall: float, compute: float) -> None:
        rows.append(
            {"round": round_name, "step": step, "users": users, "io_threads": io_threads, "wall_s": wall,
             "compute_s": compute, "rest_s": wall - compute}
        )  # fmt: skip
        print(
            f"  {round_name:9s} {step:7s} io_threads {io_threads}: {wall:.2f} s, compute {compute:.2f} s, "
            f"the rest {wall - compute:.2f} s",
            flush=True,
        )

    try:
        with Stores.open(settings.db, settings.s3, name=f"persona-bench-io-{tag}") as stores:
            for round_name, seed in (("first", 1), ("continual", 2)):
                for person in people:
                    add_events(settings.db, person, 100, seed)
                training.seconds = measuring.seconds = 0.0
                t0 = time.perf_counter()
                out = flow.retrain_batch([p.user_id for p in people], stores=stores, config=cfg, owner="bench-io")
                row(round_name, "retrain", time.perf_counter() - t0, training.seconds)
                failed = [o for o in out if isinstance(o, BaseException)]
                if failed:
                    raise RuntimeError(f"{len(failed)} of {users} users failed, e.g. {failed[0]!r}")
                made = [o for o in out if isinstance(o, flow.Outcome) and o.revision_id]
                t0 = time.perf_counter()
                judged = gate.judge_many(
                    [o.revision_id or "" for o in made],
                    stores=stores,
                    announcer=announcer,
                    config=gate_cfg,
                    rules=load_rules(settings.gate.rules),
                    rules_source=str(settings.gate.rules),
                )
                row(round_name, "gate", time.perf_counter() - t0, measuring.seconds)
                bad = [j for j in judged if not isinstance(j, gate.GateResult)]
                if bad:
                    raise RuntimeError(f"{len(bad)} of {len(made)} candidates were not judged, e.g. {bad[0]!r}")
                outcomes = Counter(j.outcome for j in judged if isinstance(j, gate.GateResult))
                rows[-1]["outcomes"] = dict(outcomes)
                print(f"  gate outcomes: {dict(outcomes)}", flush=True)  # the promoted are the next round's parents
    finally:
        training.restore()
        measuring.restore()
        announcer.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--io-threads", default="1,8", help="comma-separated RetrainConfig.io_threads values")
    ap.add_argument("--s3-latency-ms", default="0,10", help="comma-separated one-way delays before the S3 server")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    base = Settings()
    stack.up(base)
    server_url = stack.effective_urls(base)["db_url"]
    database = base.db.model_copy(update={"url": _with_database(server_url, DB_NAME)})
    with psycopg.connect(_with_database(server_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    db.migrate(database)
    with psycopg.connect(database.url, autocommit=True) as conn:
        conn.execute("INSERT INTO apps (app_id, description) VALUES ('bench', 'bench') ON CONFLICT DO NOTHING")
    rows = []
    try:
        for latency in [float(x) for x in args.s3_latency_ms.split(",")]:
            proxy = None
            s3 = base.s3
            if latency > 0:
                host, _, port = s3.endpoint.rpartition(":")
                proxy = DelayProxy((host, int(port)), latency / 1e3)
                s3 = s3.model_copy(update={"endpoint": f"127.0.0.1:{proxy.port}"})
            try:
                for threads in [int(x) for x in args.io_threads.split(",")]:
                    print(f"S3 latency {latency:g} ms, io_threads {threads}", flush=True)
                    tag = uuid.uuid4().hex[:6]
                    for row in run(base.replace(database, s3), args.users, threads, args.steps, tag):
                        rows.append({**row, "s3_latency_ms": latency})
            finally:
                if proxy is not None:
                    proxy.close()
    finally:
        with psycopg.connect(_with_database(server_url, "postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    lines = [
        f"retrain I/O ({platform.machine()}, {len(os.sched_getaffinity(0))} cores; "
        f"{datetime.now(UTC).isoformat(timespec='seconds')}): tiny model, {args.steps} steps, 100 events a user",
        "",
        "| S3 latency ms (one way) | io_threads | round | step | users | wall s | compute s | the rest s "
        "| the rest ms/user |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['s3_latency_ms']:g} | {r['io_threads']} | {r['round']} | {r['step']} | {r['users']} | "
            f"{r['wall_s']:.2f} | {r['compute_s']:.2f} | {r['rest_s']:.2f} | {1e3 * r['rest_s'] / r['users']:.1f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "retrain_io.json").write_text(json.dumps({"rows": rows, "args": vars(args)}, default=str))
        (args.out / "retrain_io.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
