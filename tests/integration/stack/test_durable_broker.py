"""The embedded broker keeps every acknowledged event: tansu's default `s3` storage (bucket `tansu` of the stack's
SeaweedFS) survives `down` + `up`, and a SIGKILL of the broker (or of the S3 server) followed by `up`.

Each test runs a stack of its own in a temp data_dir, on free ports below the kernel's ephemeral range (so that no
client connection can hold one of them); PostgreSQL and Redis are the configured servers (database `postgres`, so
nothing is created there) or embedded ones on ports of the same block.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from psycopg.conninfo import make_conninfo

from pipeline.config import DatabaseSettings, KafkaSettings, S3Settings, Settings, StackSettings
from pipeline.demo import sim
from pipeline.ingest.producer import EventProducer
from pipeline.stack import ServiceStatus, down, effective_urls, status, up
from pipeline.stack.state import load_state
from tests.integration.helpers import free_port_block

pytestmark = pytest.mark.integration

#: weed mini's 10 ports, then tansu, embedded PostgreSQL, embedded Redis.
BLOCK = 13
PARTITIONS = 4


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Settings]]:
    """Settings of a private stack (kafka_storage left at its default unless given); stopped at the end."""
    made: list[Settings] = []

    def make(**stack: object) -> Settings:
        base = free_port_block(BLOCK)
        settings = Settings(
            StackSettings(
                data_dir=tmp_path / "stack",
                embedded_postgres_port=base + 11,
                embedded_redis_port=base + 12,
                start_timeout_s=30,
                **stack,
            ),
            KafkaSettings(bootstrap_servers=f"127.0.0.1:{base + 10}", partitions=PARTITIONS),
            S3Settings(endpoint=f"127.0.0.1:{base}", bucket="adapters-test"),
            DatabaseSettings(url=make_conninfo(DatabaseSettings().url, dbname="postgres")),
        )
        made.append(settings)
        return settings

    yield make
    for settings in made:
        down(settings)


def _by_name(statuses: list[ServiceStatus]) -> dict[str, ServiceStatus]:
    return {s.name: s for s in statuses}


def _servers(settings: Settings) -> str:
    return effective_urls(settings)["kafka_bootstrap_servers"]


def _new_topic(settings: Settings) -> str:
    topic = f"durable.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=_servers(settings))
    try:
        admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        admin.close()
    return topic


def _read_all(settings: Settings, topic: str, timeout_s: float = 5.0) -> list[bytes]:
    """Every record value of ``topic`` (manual assignment from the beginning; no group)."""
    consumer = KafkaConsumer(
        bootstrap_servers=_servers(settings), enable_auto_commit=False, consumer_timeout_ms=int(timeout_s * 1000)
    )
    try:
        partitions = consumer.partitions_for_topic(topic)
        assert partitions == set(range(PARTITIONS)), f"topic {topic} has partitions {partitions} after the restart"
        tps = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        return [m.value for m in consumer]
    finally:
        consumer.close()


def _group_consumer(settings: Settings, topic: str, group: str) -> KafkaConsumer:
    return KafkaConsumer(
        topic,
        bootstrap_servers=_servers(settings),
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=2000,
        max_poll_records=200,
    )


def _committed(settings: Settings, topic: str, group: str) -> dict[int, int | None]:
    consumer = KafkaConsumer(bootstrap_servers=_servers(settings), group_id=group, enable_auto_commit=False)
    try:
        return {p: consumer.committed(TopicPartition(topic, p)) for p in range(PARTITIONS)}
    finally:
        consumer.close()


def test_down_up_keeps_every_event_and_the_group_offsets(make_stack: Callable[..., Settings]) -> None:
    settings = make_stack()
    assert settings.stack.kafka_storage == "s3"  # the default
    first = _by_name(up(settings))
    assert first["kafka"].managed and first["s3"].managed
    assert first["kafka"].detail.startswith("tansu (s3 storage)"), first["kafka"]

    # The project's producer (acks=all): send returns once the broker acknowledged every event.
    topic = _new_topic(settings)
    kafka = settings.kafka.model_copy(update={"topic_events": topic})
    events = [e for u in sim.users(20, prefix="durable") for e in sim.events_for(u, 100, app="durable", seed=3)]
    with EventProducer(kafka) as producer:
        for i in range(0, len(events), 250):
            result = producer.send(events[i : i + 250])
            result.raise_for_rejected()
    sent = {e["event_id"] for e in events}
    assert len(sent) == 2000

    # A consumer group reads about half and commits.
    group = f"durable-{uuid.uuid4().hex[:8]}"
    consumer = _group_consumer(settings, topic, group)
    read = 0
    deadline = time.monotonic() + 30
    try:
        while read < len(sent) // 2 and time.monotonic() < deadline:
            read += sum(len(recs) for recs in consumer.poll(timeout_ms=500).values())
        consumer.commit()
    finally:
        consumer.close()
    committed = _committed(settings, topic, group)
    assert read >= len(sent) // 2 and sum(o or 0 for o in committed.values()) == read, (read, committed)

    t0 = time.monotonic()
    assert set(down(settings)) >= {"kafka", "s3"}
    assert not any(s.healthy for s in status(settings) if s.name in ("kafka", "s3"))
    second = _by_name(up(settings))
    print(f"down + up: {time.monotonic() - t0:.1f}s")
    assert second["kafka"].managed and second["kafka"].pid != first["kafka"].pid
    assert second["s3"].pid != first["s3"].pid

    stored = [orjson.loads(v)["event_id"] for v in _read_all(settings, topic)]
    assert set(stored) == sent and len(stored) == len(sent)

    # The group's offsets are kept too: a restarted consumer goes on where the group left off.
    assert _committed(settings, topic, group) == committed
    consumer = _group_consumer(settings, topic, group)
    rest = 0
    deadline = time.monotonic() + 30
    try:
        while rest < len(sent) - read and time.monotonic() < deadline:
            rest += sum(len(recs) for recs in consumer.poll(timeout_ms=500).values())
        rest += sum(len(recs) for recs in consumer.poll(timeout_ms=1000).values())  # nothing beyond the end
    finally:
        consumer.close()
    assert rest == len(sent) - read


@pytest.mark.parametrize("victim", ["kafka", "s3"])
def test_sigkill_keeps_every_acknowledged_event(make_stack: Callable[..., Settings], victim: str) -> None:
    settings = make_stack()
    up(settings)
    topic = _new_topic(settings)
    producer = KafkaProducer(
        bootstrap_servers=_servers(settings),
        acks="all",
        linger_ms=5,
        retries=0,  # a record is either acknowledged or failed: nothing is resent after the kill
        request_timeout_ms=3000,
        # Records still queued when the broker died fail within this, so that flush and close finish before `up`
        # (a close that times out leaves kafka-python's sender running, and it would send them after the restart).
        delivery_timeout_ms=5000,
        max_block_ms=2000,
    )
    acked: set[int] = set()
    failed: list[Exception] = []
    lock = threading.Lock()
    stop = threading.Event()
    sent = 0

    def on_ack(i: int) -> Callable[[object], None]:
        def record(_metadata: object) -> None:
            with lock:
                acked.add(i)

        return record

    def send_until_stopped() -> None:
        nonlocal sent
        while not stop.is_set():
            try:
                producer.send(topic, key=f"user-{sent % 50}".encode(), value=b"%08d" % sent + b"x" * 292).add_callback(
                    on_ack(sent)
                ).add_errback(failed.append)
            except Exception as e:  # the broker is gone: send may block and time out
                failed.append(e)
            sent += 1
            if sent % 200 == 0:
                time.sleep(0.01)

    thread = threading.Thread(target=send_until_stopped, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(acked) < 2000 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(acked) >= 2000, f"only {len(acked)} records acknowledged in 30s"
    pids = {name: rec.pid for name, rec in load_state(settings.stack.data_dir).services.items()}
    os.kill(pids[victim], signal.SIGKILL)
    time.sleep(1.5)  # sends go on failing against the dead service
    stop.set()
    thread.join(timeout=10)
    with contextlib.suppress(Exception):
        producer.flush(timeout=15)
    producer.close(timeout=5)
    with lock:
        acknowledged = set(acked)

    messages: list[str] = []
    after = _by_name(up(settings, console_progress=messages.append))
    started = [m for m in messages if ": starting " in m]
    assert started and all(m.startswith(f"{victim}: starting") for m in started), messages
    assert after[victim].pid != pids[victim]
    other = "s3" if victim == "kafka" else "kafka"
    assert after[other].pid == pids[other]

    stored = {int(v[:8]) for v in _read_all(settings, topic)}
    missing = acknowledged - stored
    print(f"{victim} killed: sent {sent}, acked {len(acknowledged)}, stored {len(stored)}, failed {len(failed)}")
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged records lost, e.g. {sorted(missing)[:5]}"
    # Records can be stored without an acknowledgement (the broker died before answering), never made up.
    assert stored <= set(range(sent)) and len(acknowledged) + len(failed) >= sent


def test_a_storage_change_restarts_the_broker_and_memory_loses_records(make_stack: Callable[..., Settings]) -> None:
    settings = make_stack(kafka_storage="memory")
    messages: list[str] = []
    first = _by_name(up(settings, console_progress=messages.append))
    assert first["kafka"].detail.startswith("tansu (memory storage)")
    assert any("memory storage: every acknowledged record" in m for m in messages), messages
    topic = _new_topic(settings)
    producer = KafkaProducer(bootstrap_servers=_servers(settings), acks="all")
    try:
        producer.send(topic, key=b"u", value=b"kept?").get(timeout=10)
    finally:
        producer.close()

    # The same stack with the default storage: `up` replaces the memory broker, and its records are gone.
    durable = settings.replace(settings.stack.model_copy(update={"kafka_storage": "s3"}))
    messages.clear()
    second = _by_name(up(durable, console_progress=messages.append))
    assert any("does not fit the settings (it runs with memory storage" in m for m in messages), messages
    assert second["kafka"].detail.startswith("tansu (s3 storage)") and second["kafka"].pid != first["kafka"].pid
    assert second["s3"].pid == first["s3"].pid
    admin = KafkaAdminClient(bootstrap_servers=_servers(durable))
    try:
        assert topic not in admin.list_topics()
    finally:
        admin.close()
