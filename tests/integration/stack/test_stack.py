"""The embedded local stack: up, reuse, restart of a dead service, down; embedded PostgreSQL and Redis.

Each test runs its own stack in a temp data_dir on free ports, so it neither needs nor disturbs a stack that is
already running on the default ports.
"""

from __future__ import annotations

import io
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from minio import Minio
from psycopg import sql

from pipeline.config import (
    DatabaseSettings,
    KafkaSettings,
    RedisSettings,
    S3Settings,
    Settings,
    StackSettings,
)
from pipeline.stack import ServiceStatus, StackError, down, effective_urls, status, up
from tests.integration.helpers import free_port_block

pytestmark = pytest.mark.integration

#: weed mini takes a block of 10 ports from the S3 port.
WEED_PORTS = 10


def _by_name(statuses: list[ServiceStatus]) -> dict[str, ServiceStatus]:
    return {s.name: s for s in statuses}


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Settings]]:
    """Builds settings for a stack in tmp_path on free ports; stops whatever the test started."""
    made: list[Settings] = []

    def make(name: str = "stack", *, db_url: str | None = None, **stack: object) -> Settings:
        # One block: weed's ports, then Kafka, embedded PostgreSQL, embedded Redis.
        base = free_port_block(WEED_PORTS + 3)
        settings = Settings(
            StackSettings(
                data_dir=tmp_path / name,
                embedded_postgres_port=base + WEED_PORTS + 1,
                embedded_redis_port=base + WEED_PORTS + 2,
                start_timeout_s=30,
                **stack,
            ),
            KafkaSettings(bootstrap_servers=f"127.0.0.1:{base + WEED_PORTS}", partitions=2),
            S3Settings(endpoint=f"127.0.0.1:{base}", bucket="adapters-test"),
            DatabaseSettings(
                url=db_url or f"postgresql://postgres@127.0.0.1:5432/persona_stack_{uuid.uuid4().hex[:8]}"
            ),
            RedisSettings(url="redis://127.0.0.1:6379/0"),
        )
        made.append(settings)
        return settings

    yield make
    for settings in made:
        down(settings)


def _drop_database(url: str) -> None:
    dbname = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    with psycopg.connect(psycopg.conninfo.make_conninfo(url, dbname="postgres"), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(dbname)))


def _roundtrip_kafka(settings: Settings) -> None:
    servers = effective_urls(settings)["kafka_bootstrap_servers"]
    topic = settings.kafka.topic_events
    producer = KafkaProducer(bootstrap_servers=servers, acks="all")
    try:
        sent = producer.send(topic, key=b"user-1", value=b"hello").get(timeout=10)
    finally:
        producer.close()
    consumer = KafkaConsumer(bootstrap_servers=servers, auto_offset_reset="earliest", consumer_timeout_ms=10000)
    try:
        assert consumer.partitions_for_topic(topic) == set(range(settings.kafka.partitions))
        # A manual assignment: no group join, so no rebalance wait.
        consumer.assign([TopicPartition(topic, sent.partition)])
        got = next(iter(consumer))
    finally:
        consumer.close()
    assert (got.key, got.value) == (b"user-1", b"hello")


def _roundtrip_s3(settings: Settings) -> None:
    s3 = settings.s3
    client = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key.get_secret_value(), secure=False)
    client.put_object(s3.bucket, "probe/one.txt", io.BytesIO(b"payload"), length=7)
    response = client.get_object(s3.bucket, "probe/one.txt")
    try:
        assert response.read() == b"payload"
    finally:
        response.close()
        response.release_conn()


def test_up_reuse_restart_down(make_stack: Callable[..., Settings]) -> None:
    settings = make_stack()
    messages: list[str] = []
    t0 = time.monotonic()
    first = _by_name(up(settings, console_progress=messages.append))
    print(f"first up: {time.monotonic() - t0:.1f}s")
    try:
        assert all(s.healthy for s in first.values()), first
        assert first["kafka"].managed and first["s3"].managed
        assert any(m.startswith("kafka: starting tansu") for m in messages)
        assert any("healthy in" in m for m in messages)
        assert all(s.healthy for s in status(settings))
        _roundtrip_kafka(settings)
        _roundtrip_s3(settings)

        # A second `up` finds everything healthy and starts nothing.
        messages.clear()
        second = _by_name(up(settings, console_progress=messages.append))
        assert not [m for m in messages if "starting" in m], messages
        assert {n: s.pid for n, s in second.items()} == {n: s.pid for n, s in first.items()}

        # A recorded process that died is restarted, and only that one.
        os.kill(first["kafka"].pid, signal.SIGKILL)
        messages.clear()
        third = _by_name(up(settings, console_progress=messages.append))
        assert [m for m in messages if "starting" in m] == [m for m in messages if m.startswith("kafka: starting")]
        assert third["kafka"].healthy and third["kafka"].pid != first["kafka"].pid
        assert third["s3"].pid == first["s3"].pid

        # Another stack reuses this S3 as external, and refuses a Kafka address taken by something else (weed).
        s3_port = int(settings.s3.endpoint.rpartition(":")[2])
        other = Settings(
            StackSettings(data_dir=settings.stack.data_dir.parent / "other", start_timeout_s=5),
            settings.s3,
            KafkaSettings(bootstrap_servers=f"127.0.0.1:{s3_port + 2}"),
        )
        with pytest.raises(StackError, match="taken by something"):
            up(other)
        assert not (other.stack.data_dir / "stack.json").exists()

        # `down` stops only what `up` started.
        managed = {n for n, s in third.items() if s.managed}
        stopped = down(settings)
        assert set(stopped) == managed and {"kafka", "s3"} <= managed
        after = _by_name(status(settings))
        for name, s in after.items():
            assert not s.managed
            assert s.healthy == (name not in managed), s
        assert not (settings.stack.data_dir / "stack.json").exists()
        assert down(settings) == []
    finally:
        if not first["postgres"].managed:
            _drop_database(settings.db.url)


def test_embedded_postgres_and_redis(make_stack: Callable[..., Settings]) -> None:
    settings = make_stack(
        "embedded",
        db_url="postgresql://postgres@127.0.0.1:5432/persona_embedded",
        postgres="embedded",
        redis="embedded",
        kafka_storage="s3",
    )
    t0 = time.monotonic()
    statuses = _by_name(up(settings))
    print(f"embedded up: {time.monotonic() - t0:.1f}s")
    assert all(s.healthy and s.managed for s in statuses.values()), statuses

    urls = effective_urls(settings)
    assert urls["db_url"].endswith(f"127.0.0.1:{settings.stack.embedded_postgres_port}/persona_embedded")
    with psycopg.connect(urls["db_url"]) as conn:
        row = conn.execute("SELECT current_database(), current_setting('server_version_num')::int").fetchone()
    assert row is not None and row[0] == "persona_embedded" and row[1] >= 160000
    client = redis.Redis.from_url(urls["redis_url"])
    try:
        assert client.ping()
    finally:
        client.close()

    # tansu keeps its log in the `tansu` bucket of the stack's S3.
    s3 = settings.s3
    minio = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key.get_secret_value(), secure=False)
    assert any(o.object_name.startswith("clusters/") for o in minio.list_objects("tansu", recursive=True))
    _roundtrip_kafka(settings)

    t0 = time.monotonic()
    assert sorted(down(settings)) == ["kafka", "postgres", "redis", "s3"]
    print(f"embedded down: {time.monotonic() - t0:.1f}s")
    assert effective_urls(settings)["db_url"] == settings.db.url
    after = _by_name(status(settings))
    assert not any(s.healthy or s.managed for s in after.values()), after
    assert after["postgres"].address == f"127.0.0.1:{settings.stack.embedded_postgres_port}/persona_embedded"
