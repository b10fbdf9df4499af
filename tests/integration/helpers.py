"""Helpers shared by the integration tests: topics, an API server on a real socket, consumers, DLQ reads."""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psycopg
import uvicorn
from kafka import KafkaConsumer
from kafka.admin import KafkaAdminClient, NewTopic

from pipeline.config import (
    SCHEMAS_DIR,
    ConsumerSettings,
    DatabaseSettings,
    EventSettings,
    IngestSettings,
    KafkaSettings,
    S3Settings,
)
from pipeline.ingest.api import create_app
from pipeline.ingest.consumer import BufferConsumer

if TYPE_CHECKING:
    from hypothesis.strategies import SearchStrategy


@dataclass(frozen=True)
class Services:
    """Settings of the real services the integration tests talk to."""

    kafka: KafkaSettings
    db: DatabaseSettings
    events: EventSettings
    s3: S3Settings


def fresh_topics(kafka: KafkaSettings, partitions: int = 4) -> KafkaSettings:
    """Kafka settings with new, empty topics (so tests never see each other's records)."""
    tag = uuid.uuid4().hex[:10]
    k = kafka.model_copy(
        update={
            "topic_events": f"test.{tag}.interactions",
            "topic_dlq": f"test.{tag}.dlq",
            "topic_promotions": f"test.{tag}.promotions",
            "partitions": partitions,
        }
    )
    admin = KafkaAdminClient(bootstrap_servers=k.servers)
    try:
        admin.create_topics([NewTopic(t, partitions, 1) for t in (k.topic_events, k.topic_dlq, k.topic_promotions)])
    finally:
        admin.close()
    return k


def free_port_block(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports, below the kernel's ephemeral range (20000-32000), so
    that a client's outgoing port cannot take one of them between this check and the server's start."""

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def api_server(services: Services, kafka: KafkaSettings, **ingest_overrides) -> Iterator[str]:
    """The ingest API served by uvicorn on a real loopback socket; yields its base URL."""
    cfg = IngestSettings(host="127.0.0.1", port=free_port(), **ingest_overrides)
    app = create_app(cfg, kafka, services.db, services.events)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the ingest API did not start")
        time.sleep(0.05)
    try:
        yield f"http://{cfg.host}:{cfg.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def consumer_settings(group: str | None = None, **kw) -> ConsumerSettings:
    return ConsumerSettings(group_id=group or f"test-{uuid.uuid4().hex[:8]}", metrics_port=0, **kw)


def drain(
    services: Services, kafka: KafkaSettings, *, group: str | None = None, expect: int, timeout_s: float = 60.0
) -> BufferConsumer:
    """Run a buffer consumer (its real, pipelined loop) until it has seen ``expect`` records and then 1.5 s more
    (so that records beyond the expected count are seen too), in this process."""
    bc = BufferConsumer(kafka, consumer_settings(group), services.db, services.events)
    deadline = threading.Timer(timeout_s, bc.stop)
    deadline.start()
    extra: list[threading.Timer] = []

    def on_batch(_stats) -> None:
        if bc.totals.records >= expect and not extra:
            extra.append(threading.Timer(1.5, bc.stop))
            extra[0].start()

    try:
        bc.run(on_batch=on_batch)
    finally:
        deadline.cancel()
    if bc.totals.records < expect:
        raise AssertionError(f"consumer saw {bc.totals.records} of {expect} records in {timeout_s}s")
    return bc


def read_topic(kafka: KafkaSettings, topic: str, expect: int, timeout_s: float = 30.0) -> list:
    """Every record of ``topic`` (waits until ``expect`` arrived)."""
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka.servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=f"reader-{uuid.uuid4().hex[:8]}",
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
    )
    out: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < expect and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                out.extend(recs)
        # Catch anything beyond the expected count (a test must see extra records too).
        for recs in consumer.poll(timeout_ms=1000).values():
            out.extend(recs)
    finally:
        consumer.close()
    return out


def rows_and_pending(db: DatabaseSettings, user_prefix: str) -> tuple[dict[str, int], dict[str, int]]:
    """(event rows per user, pending_count per user) for users whose id starts with ``user_prefix``."""
    with psycopg.connect(db.url) as conn:
        rows = dict(
            conn.execute(
                "SELECT user_id, count(*) FROM events WHERE user_id LIKE %s GROUP BY 1", (user_prefix + "%",)
            ).fetchall()
        )
        pending = dict(
            conn.execute(
                "SELECT user_id, pending_count FROM user_state WHERE user_id LIKE %s", (user_prefix + "%",)
            ).fetchall()
        )
    return rows, pending


def schema_events(
    *,
    timestamps: SearchStrategy[str],
    meta: SearchStrategy[dict],
    app: str | None = None,
    long_text: bool = True,
) -> SearchStrategy[dict]:
    """interaction.v1 events generated from the published schema (schemas/events/interaction.v1.json): per kind, its
    required and allowed fields as the schema's ``allOf`` says, each field's value from ``hypothesis_jsonschema``'s
    ``from_schema`` of that property.

    The objects are put together here because hypothesis-jsonschema 0.23 cannot generate object schemas with this
    hypothesis release (``many.more`` is gone); ``occurred_at`` comes from ``timestamps`` (its format + pattern pair
    is slow to generate) and ``meta`` (any object) from ``meta``. ``app`` pins the application id; ``long_text``
    adds texts of up to the default bound in characters (multi-byte ones exceed it in bytes)."""
    from hypothesis import strategies as st
    from hypothesis_jsonschema import from_schema

    schema = json.loads((SCHEMAS_DIR / "events" / "interaction.v1.json").read_text())

    def resolve(sub: dict) -> dict:
        ref = sub.get("$ref")
        return schema["$defs"][ref.rsplit("/", 1)[1]] if ref else sub

    def field(name: str) -> SearchStrategy[Any]:
        if name == "occurred_at":
            return timestamps
        if name == "meta":
            return meta
        if name == "app" and app is not None:
            return st.just(app)
        sub = resolve(schema["properties"][name])
        strategy = from_schema(sub)
        if long_text and sub.get("type") == "string" and "maxLength" in sub and "pattern" not in sub:
            n = sub["maxLength"]  # 1, 2 and 4 UTF-8 bytes a character: at the byte bound, or beyond it
            long = st.builds(
                lambda c, k: c * k, st.sampled_from(["a", "é", "😀"]), st.sampled_from([n // 4, n // 2, n])
            )
            strategy = st.one_of(strategy, strategy, strategy, long)
        return strategy

    per_kind = []
    for branch in schema["allOf"]:
        kind = branch["if"]["properties"]["kind"]["const"]
        required = [*schema["required"], *branch["then"]["required"]]
        optional = [n for n in branch["then"]["propertyNames"]["enum"] if n not in required]
        per_kind.append(
            st.fixed_dictionaries(
                {n: st.just(kind) if n == "kind" else field(n) for n in dict.fromkeys(required)},
                optional={n: field(n) for n in optional},
            )
        )
    return st.one_of(per_kind)
