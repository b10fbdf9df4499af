"""Benchmark: sustained rate from Kafka into the PostgreSQL buffers, next to the raw kafka-python consume rate.

Both consumers read the same pre-filled topic with the same fetch settings, in separate consumer groups:

- raw: kafka-python ``poll`` only (records counted, nothing decoded);
- buffer: the real BufferConsumer: decode + validate + split + one DB transaction per poll batch + offset commit.

Rates are counted from the first record received to the last one handled, so the group join is not in them
(it is printed separately). Needs a running stack (`persona stack up`); uses a fresh database ``persona_bench``.

    .venv/bin/python bench/ingest.py --events 250000
"""

from __future__ import annotations

import sys

if "--pure-python-crc" in sys.argv:
    # Before kafka is imported: without the optional C crc32c module kafka-python checks CRCs in pure Python.
    sys.modules["crc32c"] = None  # type: ignore[assignment]

import argparse
import json
import os
import platform
import subprocess
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import orjson
import psycopg
from kafka import KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from pipeline.config import ConsumerSettings, DatabaseSettings, EventSettings, KafkaSettings
from pipeline.demo import sim
from pipeline.ingest.consumer import BufferConsumer
from pipeline.storage import db

RESULTS = Path(__file__).parent / "results"


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


def prefill(kafka: KafkaSettings, n: int, users: int) -> float:
    producer = KafkaProducer(
        bootstrap_servers=kafka.servers,
        acks="all",
        linger_ms=20,
        batch_size=256 * 1024,
        max_request_size=8 * 1024 * 1024,
    )
    per_user = -(-n // users)
    sent = 0
    t0 = time.perf_counter()
    for u in sim.users(users, prefix="bench"):
        for ev in sim.events_for(u, per_user, app="bench", seed=1):
            if sent == n:
                break
            producer.send(kafka.topic_events, key=ev["user_id"].encode(), value=orjson.dumps(ev))
            sent += 1
    producer.flush()
    producer.close()
    return time.perf_counter() - t0


def raw_rate(kafka: KafkaSettings, cfg: ConsumerSettings, n: int) -> dict:
    consumer = KafkaConsumer(
        kafka.topic_events,
        bootstrap_servers=kafka.servers,
        group_id=f"raw-{uuid.uuid4().hex}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_records=cfg.max_poll_records,
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=cfg.session_timeout_ms // 3,
    )
    t0 = time.perf_counter()
    first = None
    seen = 0
    while seen < n:
        for recs in consumer.poll(timeout_ms=cfg.poll_timeout_ms).values():
            if first is None:
                first = time.perf_counter()
            seen += len(recs)
    end = time.perf_counter()
    consumer.close()
    return {"events": seen, "join_s": first - t0, "seconds": end - first, "rate": seen / (end - first)}


def buffer_rate(kafka: KafkaSettings, cfg: ConsumerSettings, database: DatabaseSettings, n: int) -> dict:
    bc = BufferConsumer(kafka, cfg, database, EventSettings())
    batches = 0

    def on_batch(_stats) -> None:
        nonlocal batches
        batches += 1
        if batches % 20 == 0:
            print(f"  buffer: {bc.totals.records:>8} / {n} records", file=sys.stderr)
        if bc.totals.records >= n:
            bc.stop()

    t0 = time.perf_counter()
    m0 = time.monotonic()
    bc.run(on_batch=on_batch)  # the real, pipelined loop of `persona consume`
    end = time.perf_counter()
    first = t0 + (bc.first_record_at - m0)
    return {
        "events": bc.totals.records,
        "inserted": bc.totals.inserted,
        "batches": batches,
        "join_s": first - t0,
        "seconds": end - first,
        "rate": bc.totals.records / (end - first),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=250_000)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--pure-python-crc", action="store_true", help="(internal) raw consume without the C crc32c")
    ap.add_argument("--raw-topic", help="(internal) only measure the raw consume of this topic, print JSON")
    args = ap.parse_args()
    if args.raw_topic:
        kafka = KafkaSettings().model_copy(update={"topic_events": args.raw_topic})
        print(json.dumps(raw_rate(kafka, ConsumerSettings(metrics_port=0), args.events)))
        return

    base_kafka = KafkaSettings()
    tag = uuid.uuid4().hex[:8]
    kafka = base_kafka.model_copy(
        update={"topic_events": f"bench.{tag}.interactions", "topic_dlq": f"bench.{tag}.dlq"}
    )
    admin = KafkaAdminClient(bootstrap_servers=kafka.servers)
    admin.create_topics([NewTopic(kafka.topic_events, args.partitions, 1), NewTopic(kafka.topic_dlq, 1, 1)])
    admin.close()

    server = DatabaseSettings()
    name = "persona_bench"
    with psycopg.connect(_with_database(server.url, "postgres"), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        conn.execute(f"CREATE DATABASE {name}")
    database = DatabaseSettings(url=_with_database(server.url, name))
    db.migrate(database)
    with psycopg.connect(database.url, autocommit=True) as conn:  # the consumer dead-letters unregistered apps
        conn.execute("INSERT INTO apps (app_id, description) VALUES ('bench', 'ingest benchmark')")

    cfg = ConsumerSettings(group_id=f"bench-{tag}", metrics_port=0)
    print(
        f"prefilling {args.events} events for {args.users} users into {args.partitions} partitions...", file=sys.stderr
    )
    produce_s = prefill(kafka, args.events, args.users)
    print("raw kafka-python consume...", file=sys.stderr)
    raw = raw_rate(kafka, cfg, args.events)
    print("raw kafka-python consume, pure-Python CRC (a process without the crc32c module)...", file=sys.stderr)
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--raw-topic",
            kafka.topic_events,
            "--events",
            str(args.events),
            "--pure-python-crc",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    raw_py = json.loads(out.strip().splitlines()[-1])
    print("buffer consumer (validate + DB transaction + offset commit)...", file=sys.stderr)
    buf = buffer_rate(kafka, cfg, database, args.events)

    with psycopg.connect(database.url) as conn:
        rows = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        pending = conn.execute("SELECT sum(pending_count) FROM user_state").fetchone()[0]
    ratio = buf["rate"] / raw["rate"]
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "events": args.events,
        "users": args.users,
        "partitions": args.partitions,
        "max_poll_records": cfg.max_poll_records,
        "produce_rate": args.events / produce_s,
        "raw": raw,
        "raw_pure_python_crc": raw_py,
        "buffer": buf,
        "ratio": ratio,
        "ratio_vs_pure_python_crc": buf["rate"] / raw_py["rate"],
        "rows": rows,
        "pending_sum": int(pending or 0),
    }
    table = "\n".join(
        [
            f"ingest benchmark: {args.events} events, {args.users} users, {args.partitions} partitions, "
            f"max_poll_records={cfg.max_poll_records} ({result['machine']})",
            "",
            "| path | events | seconds | events/s | group join s |",
            "| --- | ---: | ---: | ---: | ---: |",
            f"| produce (kafka-python, acks=all) | {args.events} | {produce_s:.1f} | "
            f"{result['produce_rate']:,.0f} | - |",
            f"| raw kafka-python consume | {raw['events']} | {raw['seconds']:.1f} | {raw['rate']:,.0f} | "
            f"{raw['join_s']:.1f} |",
            f"| raw kafka-python consume, pure-Python CRC | {raw_py['events']} | {raw_py['seconds']:.1f} | "
            f"{raw_py['rate']:,.0f} | {raw_py['join_s']:.1f} |",
            f"| buffer consumer -> PostgreSQL | {buf['events']} | {buf['seconds']:.1f} | {buf['rate']:,.0f} | "
            f"{buf['join_s']:.1f} |",
            "",
            f"buffer / raw = {ratio:.0%} (goal >= 50%); buffer / raw with pure-Python CRC = "
            f"{result['ratio_vs_pure_python_crc']:.0%}",
            f"rows in events = {rows}, sum of pending counters = {result['pending_sum']} (must both be {args.events})",
        ]
    )
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "ingest.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
