"""Benchmark: what the embedded broker's durable `s3` storage costs next to its `memory` storage.

Starts one private embedded stack per storage engine (tansu and SeaweedFS on free ports, a temporary data
directory; PostgreSQL and Redis are the configured ones, or embedded servers on free ports) and measures, alternating
between the stacks, the median of ``--repeat`` runs of:

- produce, small batches: kafka-python KafkaProducer, acks=all, linger_ms=5, the default 16 KiB batches (the
  settings of pipeline/ingest/producer.py), ``--records`` records of 300 bytes keyed by 100 users;
- produce, large batches: the same with linger_ms=20 and 256 KiB batches (bench/ingest.py's prefill);
- EventProducer.send of 100 simulated events per call, one call at a time: what one ingest API request waits for;
- consume: a kafka-python consumer (manual assignment) reading the first produce run's records back;

then stops each stack (`down`), starts it again (`up`) and counts the records that are still there.

    .venv/bin/python bench/broker_storage.py --records 20000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from minio import Minio

from pipeline.config import KafkaSettings, S3Settings, Settings, StackSettings
from pipeline.demo import sim
from pipeline.ingest.producer import EventProducer
from pipeline.stack import down, effective_urls, up

RESULTS = Path(__file__).parent / "results"
STORAGES = ("memory", "s3")
#: weed mini takes 10 ports from the S3 port; then tansu, embedded PostgreSQL, embedded Redis.
BLOCK = 13
RECORD_BYTES = 300
CALL_EVENTS = 100


def _free_block(n: int) -> int:
    """The first of ``n`` consecutive free ports, below the kernel's ephemeral range (clients' local ports)."""

    def free(port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 32000 - n)
        if all(free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no block of {n} free ports")


def stack_settings(root: Path, storage: str, partitions: int) -> Settings:
    base = _free_block(BLOCK)
    return Settings(
        StackSettings(
            data_dir=root / storage,
            kafka_storage=storage,
            embedded_postgres_port=base + 11,
            embedded_redis_port=base + 12,
        ),
        KafkaSettings(bootstrap_servers=f"127.0.0.1:{base + 10}", partitions=partitions),
        S3Settings(endpoint=f"127.0.0.1:{base}"),
    )


def new_topic(servers: str, partitions: int) -> str:
    topic = f"bench.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=servers)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        admin.close()
    return topic


def produce(servers: str, topic: str, n: int, **producer: Any) -> float:
    """Events/s of ``n`` acks=all records, every one acknowledged (raises otherwise)."""
    client = KafkaProducer(bootstrap_servers=servers, acks="all", **producer)
    value = os.urandom(RECORD_BYTES // 2).hex().encode()
    t0 = time.perf_counter()
    futures = [client.send(topic, key=f"user-{i % 100:03d}".encode(), value=value) for i in range(n)]
    client.flush()
    for f in futures:
        f.get(timeout=60)
    took = time.perf_counter() - t0
    client.close()
    return n / took


def event_producer(settings: Settings, topic: str, n: int) -> dict[str, float]:
    """EventProducer.send of CALL_EVENTS simulated events per call: events/s and ms per call (p50, p99)."""
    kafka = settings.kafka.model_copy(update={"topic_events": topic})
    users = sim.users(max(1, n // 50), prefix="bench")
    events = [ev for u in users for ev in sim.events_for(u, 50, app="bench", seed=1)][:n]
    calls: list[float] = []
    with EventProducer(kafka) as producer:
        t0 = time.perf_counter()
        for i in range(0, len(events), CALL_EVENTS):
            c0 = time.perf_counter()
            producer.send(events[i : i + CALL_EVENTS]).raise_for_rejected()
            calls.append(time.perf_counter() - c0)
        took = time.perf_counter() - t0
    calls.sort()
    return {
        "rate": len(events) / took,
        "p50_ms": 1000 * calls[len(calls) // 2],
        "p99_ms": 1000 * calls[min(len(calls) - 1, int(len(calls) * 0.99))],
    }


def count(servers: str, topic: str, n: int | None = None, timeout_s: float = 5.0) -> tuple[int, float]:
    """(records of ``topic``, events/s reading them); stops at ``n`` records or after ``timeout_s`` of silence."""
    consumer = KafkaConsumer(bootstrap_servers=servers, enable_auto_commit=False, consumer_timeout_ms=timeout_s * 1000)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            return 0, 0.0
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        seen = 0
        t0 = time.perf_counter()
        for _ in consumer:
            seen += 1
            if seen == n:
                break
        took = time.perf_counter() - t0
    finally:
        consumer.close()
    return seen, seen / took if took else 0.0


def tansu_objects(settings: Settings) -> tuple[int, int]:
    """(objects, bytes) in the `tansu` bucket of the stack's S3 server."""
    s3 = settings.s3
    client = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key.get_secret_value(), secure=False)
    objects = list(client.list_objects("tansu", recursive=True))
    return len(objects), sum(o.size or 0 for o in objects)


def measure(settings: Settings, n: int, api_events: int, partitions: int) -> dict[str, Any]:
    servers = effective_urls(settings)["kafka_bootstrap_servers"]
    small = new_topic(servers, partitions)
    result: dict[str, Any] = {"topic": small}
    result["produce_small"] = produce(servers, small, n, linger_ms=5)
    large = new_topic(servers, partitions)
    result["produce_large"] = produce(servers, large, n, linger_ms=20, batch_size=256 * 1024)
    result["event_producer"] = event_producer(settings, new_topic(servers, partitions), api_events)
    seen, result["consume"] = count(servers, small, n)
    if seen != n:
        raise AssertionError(f"read {seen} of the {n} records just produced to {small}")
    return result


def _median(runs: list[dict[str, Any]], *path: str) -> float:
    values = []
    for run in runs:
        v: Any = run
        for key in path:
            v = v[key]
        values.append(float(v))
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=20_000)
    ap.add_argument("--api-events", type=int, default=5_000, help="events sent through EventProducer per run")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="leave the stacks' data directories behind")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="persona-bench-broker-"))
    stacks = {s: stack_settings(root, s, args.partitions) for s in STORAGES}
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in STORAGES}
    kept: dict[str, int] = {}
    objects: dict[str, tuple[int, int]] = {}
    try:
        for storage, settings in stacks.items():
            t0 = time.perf_counter()
            up(settings)
            print(f"{storage}: stack up in {time.perf_counter() - t0:.1f}s ({settings.stack.data_dir})")
        for i in range(args.repeat):
            for storage, settings in stacks.items():
                run = measure(settings, args.records, args.api_events, args.partitions)
                runs[storage].append(run)
                print(
                    f"{storage} run {i + 1}: produce {run['produce_small']:,.0f} / {run['produce_large']:,.0f} "
                    f"events/s, EventProducer {run['event_producer']['rate']:,.0f} events/s "
                    f"(p50 {run['event_producer']['p50_ms']:.0f} ms), consume {run['consume']:,.0f} events/s"
                )
        for storage, settings in stacks.items():
            objects[storage] = tansu_objects(settings) if storage == "s3" else (0, 0)
            down(settings)
            up(settings)
            servers = effective_urls(settings)["kafka_bootstrap_servers"]
            kept[storage] = count(servers, runs[storage][0]["topic"], args.records)[0]
    finally:
        for settings in stacks.values():
            down(settings)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    rows = [
        ("produce, linger 5 ms, 16 KiB batches (events/s)", ("produce_small",), "{:,.0f}"),
        ("produce, linger 20 ms, 256 KiB batches (events/s)", ("produce_large",), "{:,.0f}"),
        (f"EventProducer.send, {CALL_EVENTS} events a call (events/s)", ("event_producer", "rate"), "{:,.0f}"),
        (f"EventProducer.send, {CALL_EVENTS} events a call, p50 ms", ("event_producer", "p50_ms"), "{:.0f}"),
        (f"EventProducer.send, {CALL_EVENTS} events a call, p99 ms", ("event_producer", "p99_ms"), "{:.0f}"),
        ("consume, manual assignment (events/s)", ("consume",), "{:,.0f}"),
    ]
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    lines = [
        f"broker storage benchmark: tansu memory vs s3 (SeaweedFS), {args.records} records of {RECORD_BYTES} bytes, "
        f"{args.partitions} partitions, acks=all, median of {args.repeat} runs ({machine})",
        "",
        "| measurement | memory | s3 | s3 / memory |",
        "| --- | ---: | ---: | ---: |",
    ]
    table: dict[str, dict[str, float]] = {}
    for label, path, fmt in rows:
        m, s = (_median(runs[st], *path) for st in STORAGES)
        table[label] = {"memory": m, "s3": s}
        lines.append(f"| {label} | {fmt.format(m)} | {fmt.format(s)} | {s / m:.0%} |")
    lines.append(
        f"| records kept after `down` + `up` | {kept['memory']:,} of {args.records:,} | "
        f"{kept['s3']:,} of {args.records:,} | |"
    )
    n_obj, n_bytes = objects["s3"]
    produced = args.repeat * (2 * args.records + args.api_events)
    lines += [
        "",
        f"s3 storage: {n_obj:,} objects, {n_bytes / 2**20:.1f} MiB in bucket `tansu` for {produced:,} records "
        "(one object per produced batch and partition, plus offsets and watermarks)",
    ]
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(exist_ok=True)
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "args": vars(args),
        "median": table,
        "kept_after_restart": kept,
        "tansu_bucket": {"objects": n_obj, "bytes": n_bytes},
        "runs": runs,
    }
    (RESULTS / "broker_storage.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "broker_storage.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
