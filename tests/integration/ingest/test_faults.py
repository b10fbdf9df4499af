"""The buffer consumer and the ingest API under bad records and dependency faults, on the real services.

Each poison record class: the consumer keeps consuming past it, the DLQ has it with its reason, the events behind it
are buffered. Each fault (broker crash, PostgreSQL restart, rebalance mid-stream): the process stays up, retries,
and every event is buffered exactly once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
import uuid

import httpx
import orjson
import psycopg
import pytest
from kafka import KafkaProducer
from prometheus_client import REGISTRY

from pipeline.demo import sim
from pipeline.ingest.codec import (
    DLQ_CODE,
    DLQ_ORIGINAL_BYTES,
    DLQ_ORIGINAL_SHA256,
    DLQ_STORED_USER,
    DLQ_TRUNCATED,
    DLQ_USER,
    reasons_from_headers,
)
from pipeline.ingest.consumer import BufferConsumer
from pipeline.storage import apps
from tests.integration.faults import PrivateBroker, TcpProxy, proxied_url, wait_for
from tests.integration.helpers import (
    api_server,
    consumer_settings,
    drain,
    fresh_topics,
    read_topic,
    rows_and_pending,
)

pytestmark = pytest.mark.integration


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _events(prefix: str, users: int = 2, per_user: int = 10, seed: int = 3, app: str = "direct") -> list[dict]:
    return [e for u in sim.users(users, prefix=prefix) for e in sim.events_for(u, per_user, app=app, seed=seed)]


def _send(kafka, items: list[tuple[bytes | None, bytes | None]], **producer_kw) -> None:
    producer = KafkaProducer(bootstrap_servers=kafka.servers, acks="all", **producer_kw)
    try:
        for key, value in items:
            producer.send(kafka.topic_events, key=key, value=value)
        producer.flush(timeout=30)
    finally:
        producer.close()


def _records(events: list[dict]) -> list[tuple[bytes, bytes]]:
    return [(e["user_id"].encode(), orjson.dumps(e)) for e in events]


def _nested(depth: int) -> dict:
    meta: dict = {"leaf": 1}
    for _ in range(depth - 1):
        meta = {"a": meta}
    return meta


def test_poison_records_are_dead_lettered_and_the_events_behind_them_buffered(services):
    """Wrong JSON types, meta nested past the limit (and past orjson's own), a record over 1 MiB: each goes to the
    DLQ with a specific reason, and every valid event around them is buffered."""
    kafka = fresh_topics(services.kafka, partitions=1)  # one partition: the valid events are behind the poison
    prefix = f"poison-{uuid.uuid4().hex[:6]}"
    before = _events(prefix + "-a", users=1, per_user=5)
    after = _events(prefix + "-b", users=1, per_user=5)
    user = f"{prefix}-x"
    # A message event (the simulated events' kinds vary with the user): `text` is one of its fields.
    base = {
        "event_id": str(uuid.uuid4()),
        "user_id": user,
        "occurred_at": before[0]["occurred_at"],
        "kind": "message",
        "app": before[0]["app"],
        "text": "hello",
    }
    poison = [
        dict(base, event_id=str(uuid.uuid4()), kind=["message"]),
        dict(base, event_id=str(uuid.uuid4()), kind={"k": "message"}),
        dict(base, event_id=str(uuid.uuid4()), text=["not", "a", "string"]),
        dict(base, event_id=str(uuid.uuid4()), occurred_at=12345),
        dict(base, event_id=str(uuid.uuid4()), meta=_nested(300)),  # orjson.dumps refuses > 255 levels
        dict(base, event_id=str(uuid.uuid4()), meta=_nested(40)),
    ]
    # json, not orjson: orjson refuses to write more than 255 levels.
    poison_records = [(user.encode(), json.dumps(p).encode()) for p in poison]
    # Deeper than orjson will even parse (its limit is 1024): invalid JSON to the consumer.
    poison_records.append((user.encode(), b'{"meta":' + b'{"a":' * 1100 + b"1" + b"}" * 1101))
    big = dict(base, event_id=str(uuid.uuid4()), text="x" * (2 << 20))  # 2 MiB: over the text bound and the DLQ's
    big_value = orjson.dumps(big)
    poison_records.append((user.encode(), big_value))

    _send(kafka, _records(before) + poison_records + _records(after), max_request_size=8 << 20)
    total = len(before) + len(poison_records) + len(after)
    bc = drain(services, kafka, expect=total)
    assert bc.totals.dead_lettered == len(poison_records)
    assert bc.totals.inserted == len(before) + len(after)

    rows, pending = rows_and_pending(services.db, prefix)
    assert rows == {before[0]["user_id"]: 5, after[0]["user_id"]: 5} and pending == rows

    dlq = read_topic(kafka, kafka.topic_dlq, expect=len(poison_records))
    assert len(dlq) == len(poison_records)
    codes = [dict(r.headers)[DLQ_CODE].decode() for r in dlq]
    assert "internal_error" not in codes, [reasons_from_headers(r.headers) for r in dlq]
    by_value = {r.value: r for r in dlq}
    for (_, value), field in zip(poison_records[:4], ("kind", "kind", "text", "occurred_at"), strict=True):
        assert field in [x["field"] for x in reasons_from_headers(by_value[value].headers)]
    for p in poison[4:6]:
        assert "too_deep" in [x["code"] for x in reasons_from_headers(by_value[json.dumps(p).encode()].headers)]
    truncated = [r for r in dlq if dict(r.headers).get(DLQ_TRUNCATED) == b"true"]
    assert len(truncated) == 1
    headers = dict(truncated[0].headers)
    assert int(headers[DLQ_ORIGINAL_BYTES]) == len(big_value)
    assert headers[DLQ_ORIGINAL_SHA256].decode() == hashlib.sha256(big_value).hexdigest()
    assert big_value.startswith(truncated[0].value) and len(truncated[0].value) < 1_000_000
    assert "too_long" in [x["code"] for x in reasons_from_headers(truncated[0].headers)]


def test_a_reused_event_id_with_other_content_is_an_id_conflict(services):
    kafka = fresh_topics(services.kafka)
    prefix = f"conflict-{uuid.uuid4().hex[:6]}"
    a, b = (u.user_id for u in sim.users(2, prefix=prefix))
    first = _events(prefix, users=1, per_user=3)
    same = dict(first[0])  # the same event again: a quiet duplicate
    other_user = dict(first[1], user_id=b)  # the same id for another user
    other_text = dict(first[2], text=first[2].get("text", "x") + " (edited)") if "text" in first[2] else None
    batch = _records(first) + _records([same, other_user])
    if other_text is not None:
        batch += _records([other_text])
    conflicts_before = _sample("persona_buffer_id_conflicts_total")
    group = f"conflict-{uuid.uuid4().hex[:6]}"
    _send(kafka, batch[:3])
    drain(services, kafka, expect=3, group=group)
    _send(kafka, batch[3:])
    bc = drain(services, kafka, expect=len(batch) - 3, group=group)
    n_conflicts = 2 if other_text is not None else 1
    assert bc.totals.conflicts == n_conflicts and bc.totals.duplicates == 1
    assert _sample("persona_buffer_id_conflicts_total") - conflicts_before == n_conflicts

    rows, _ = rows_and_pending(services.db, prefix)
    assert rows == {a: 3}  # the first writer of each id wins; b has nothing
    dlq = read_topic(kafka, kafka.topic_dlq, expect=n_conflicts)
    assert len(dlq) == n_conflicts
    by_user = {dict(r.headers)[DLQ_USER].decode(): r for r in dlq}
    rec = by_user[b]
    assert dict(rec.headers)[DLQ_CODE] == b"id_conflict" and dict(rec.headers)[DLQ_STORED_USER].decode() == a
    assert rec.value == orjson.dumps(other_user)


def test_the_consumer_rides_out_a_broker_crash(services, tmp_path):
    broker = PrivateBroker(services, tmp_path / "broker")
    broker.start()
    try:
        kafka = fresh_topics(broker.kafka, partitions=2)
        prefix = f"bcrash-{uuid.uuid4().hex[:6]}"
        first, second = _events(prefix, users=2, per_user=10, seed=1), _events(prefix, users=2, per_user=10, seed=2)
    except BaseException:
        broker.stop()
        raise
    bc = BufferConsumer(kafka, consumer_settings(retry_initial_s=0.2, retry_max_s=2), services.db, services.events)
    thread = threading.Thread(target=bc.run, daemon=True)
    thread.start()
    try:
        _send(kafka, _records(first))
        wait_for(lambda: sum(rows_and_pending(services.db, prefix)[0].values()) == 20, 60, "first events buffered")

        broker.kill()
        time.sleep(3)  # the consumer polls and commits against a dead broker
        assert thread.is_alive()
        broker.start()
        kafka = fresh_topics_again(broker, kafka)
        _send(kafka, _records(second))
        took = wait_for(lambda: sum(rows_and_pending(services.db, prefix)[0].values()) == 40, 60, "events after")
        assert thread.is_alive()  # (kafka-python may ride out the outage itself: retries are not required)
        rows, pending = rows_and_pending(services.db, prefix)
        assert sum(rows.values()) == 40 and pending == rows
        assert took < 30
    finally:
        bc.stop()
        thread.join(timeout=30)
        broker.stop()
    assert not thread.is_alive()


def fresh_topics_again(broker: PrivateBroker, kafka):
    """The memory-storage broker came back empty: create the test's topics again (a durable one keeps them)."""
    from kafka.admin import KafkaAdminClient, NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(bootstrap_servers=kafka.servers)
    try:
        for t in (kafka.topic_events, kafka.topic_dlq, kafka.topic_promotions):
            try:
                admin.create_topics([NewTopic(t, kafka.partitions, 1)])
            except TopicAlreadyExistsError:
                pass
    finally:
        admin.close()
    return kafka


def test_the_consumer_rides_out_a_database_restart(services):
    kafka = fresh_topics(services.kafka)
    info = psycopg.conninfo.conninfo_to_dict(services.db.url)
    proxy = TcpProxy((str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)))
    database = services.db.model_copy(update={"url": proxied_url(services.db.url, proxy.port), "connect_timeout_s": 2})
    prefix = f"dbrestart-{uuid.uuid4().hex[:6]}"
    first, second = _events(prefix, users=2, per_user=10, seed=1), _events(prefix, users=2, per_user=10, seed=2)
    retries_before = _sample("persona_buffer_retries_total", dependency="database", operation="write")
    bc = BufferConsumer(kafka, consumer_settings(retry_initial_s=0.2, retry_max_s=2), database, services.events)
    thread = threading.Thread(target=bc.run, daemon=True)
    thread.start()
    try:
        _send(kafka, _records(first))
        wait_for(lambda: sum(rows_and_pending(services.db, prefix)[0].values()) == 20, 60, "first events buffered")
        down = threading.Thread(target=proxy.restart, args=(5.0,))
        down.start()
        time.sleep(0.5)
        _send(kafka, _records(second))  # arrives while PostgreSQL is "restarting"
        down.join()
        took = wait_for(lambda: sum(rows_and_pending(services.db, prefix)[0].values()) == 40, 60, "events after")
        assert thread.is_alive()
        assert took < 30
        assert _sample("persona_buffer_retries_total", dependency="database", operation="write") > retries_before
        rows, pending = rows_and_pending(services.db, prefix)
        assert sum(rows.values()) == 40 and pending == rows
    finally:
        bc.stop()
        thread.join(timeout=30)
        proxy.close()
    assert not thread.is_alive()


def test_a_rebalance_mid_stream_keeps_every_event_once(services):
    """A second member joins while the first is consuming (its batches in flight are revoked and redelivered)."""
    kafka = fresh_topics(services.kafka, partitions=4)
    prefix = f"rebal-{uuid.uuid4().hex[:6]}"
    events = _events(prefix, users=8, per_user=100, seed=5)
    group = f"rebal-{uuid.uuid4().hex[:6]}"
    members = [
        BufferConsumer(kafka, consumer_settings(group, max_poll_records=50), services.db, services.events)
        for _ in range(2)
    ]
    threads = [threading.Thread(target=m.run, daemon=True) for m in members]
    threads[0].start()
    try:
        _send(kafka, _records(events[:400]))
        wait_for(lambda: members[0].totals.records > 0, 60, "the first member consumes")
        threads[1].start()  # joins mid-stream: a rebalance
        _send(kafka, _records(events[400:]))
        wait_for(lambda: sum(rows_and_pending(services.db, prefix)[0].values()) == len(events), 90, "all buffered")
        time.sleep(2)
        assert all(t.is_alive() for t in threads)
        rows, pending = rows_and_pending(services.db, prefix)
        assert sum(rows.values()) == len(events) and pending == rows
        with psycopg.connect(services.db.url) as conn:
            stored = {r[0] for r in conn.execute("SELECT event_id FROM events WHERE user_id LIKE %s", (prefix + "%",))}
        assert stored == {e["event_id"] for e in events}
    finally:
        for m in members:
            m.stop()
        for t in threads:
            t.join(timeout=30)


@pytest.fixture
def app_key(services):
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(services.db.url) as conn:
        _, key = apps.create_key(conn, app_id)
    return app_id, key


def test_the_ingest_api_heals_after_a_broker_crash(services, app_key, tmp_path):
    app_id, key = app_key
    broker = PrivateBroker(services, tmp_path / "broker")
    broker.start()
    auth = {"Authorization": f"Bearer {key}"}
    prefix = f"heal-{uuid.uuid4().hex[:6]}"
    events = _events(prefix, users=1, per_user=30, app=app_id)
    try:
        kafka = fresh_topics(broker.kafka)
        with api_server(services, kafka, produce_timeout_s=2.0, producer_rebuild_interval_s=1.0) as url:
            with httpx.Client(base_url=url, headers=auth, timeout=30) as client:
                assert client.post("/v1/events", json=events[:10]).status_code == 202
                assert client.get("/healthz").json()["broker"] == "ok"

                broker.kill()
                r = client.post("/v1/events", json=events[10:20])
                assert r.status_code == 503 and r.json()["error"]["code"] == "broker_unavailable"
                assert int(r.headers["Retry-After"]) >= 1
                health = client.get("/healthz")
                assert health.status_code == 503 and health.json()["broker"] != "ok"
                assert health.json()["database"] == "ok"

                broker.start()
                fresh_topics_again(broker, kafka)
                back = time.monotonic()
                wait_for(lambda: client.post("/v1/events", json=events[10:20]).status_code == 202, 30, "202 again")
                healed = time.monotonic() - back
                assert client.post("/v1/events", json=events[20:]).status_code == 202
                assert client.get("/healthz").json() == {"status": "ok", "database": "ok", "broker": "ok"}
        assert healed < 10, healed
        bc = drain(services, kafka, expect=20)
        assert bc.totals.inserted + bc.totals.duplicates >= 20
        with psycopg.connect(services.db.url) as conn:
            stored = {r[0] for r in conn.execute("SELECT event_id FROM events WHERE user_id LIKE %s", (prefix + "%",))}
        # The first 10 went with the crashed broker's memory storage; the 20 acknowledged after it are all buffered.
        assert stored == {e["event_id"] for e in events[10:]}
    finally:
        broker.stop()


def test_a_member_without_partitions_asks_for_a_new_assignment_and_nothing_is_lost(services):
    """One partition, two members: the spare one rejoins every ``idle_rejoin_s`` (the guard against an assignment
    made without the topic's metadata); the rebalances it causes lose and duplicate nothing."""
    kafka = fresh_topics(services.kafka, partitions=1)
    prefix = f"idle-{uuid.uuid4().hex[:6]}"
    events = _events(prefix, users=4, per_user=50, seed=9)
    group = f"idle-{uuid.uuid4().hex[:6]}"
    rejoins_before = _sample("persona_buffer_retries_total", dependency="kafka", operation="rejoin")
    members = [
        BufferConsumer(
            kafka, consumer_settings(group, idle_rejoin_s=3, max_poll_records=20), services.db, services.events
        )
        for _ in range(2)
    ]
    threads = [threading.Thread(target=m.run, daemon=True) for m in members]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: any(m._consumer.assignment() for m in members), 60, "one member gets the partition")
        for i in range(0, len(events), 50):
            _send(kafka, _records(events[i : i + 50]))
            time.sleep(1)
        wait_for(lambda: sum(rows_and_pending(services.db, prefix)[0].values()) == len(events), 90, "all buffered")
        wait_for(
            lambda: _sample("persona_buffer_retries_total", dependency="kafka", operation="rejoin") > rejoins_before,
            30,
            "the spare member rejoins",
        )
        assert all(t.is_alive() for t in threads)
        rows, pending = rows_and_pending(services.db, prefix)
        assert sum(rows.values()) == len(events) and pending == rows
    finally:
        for m in members:
            m.stop()
        for t in threads:
            t.join(timeout=30)


@contextlib.contextmanager
def _member_with_half_buffered(services, name: str, seed: int, **settings):
    """One member (its real loop, in a thread) of a fresh group on a fresh 2-partition topic that has buffered the
    first half of 160 events; yields (member, send the rest). On leaving: every event buffered exactly once, the
    loop alive, a new Kafka client counted (``operation="reconnect"``)."""
    kafka = fresh_topics(services.kafka, partitions=2)
    prefix = f"{name}-{uuid.uuid4().hex[:6]}"
    events = _events(prefix, users=4, per_user=40, seed=seed)
    half = len(events) // 2
    reconnects_before = _sample("persona_buffer_retries_total", dependency="kafka", operation="reconnect")
    member = BufferConsumer(
        kafka, consumer_settings(f"{name}-{uuid.uuid4().hex[:6]}", max_poll_records=20, **settings), services.db,
        services.events,
    )  # fmt: skip
    thread = threading.Thread(target=member.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: bool(member._consumer.assignment()), 60, "the member gets its partitions")
        _send(kafka, _records(events[:half]))
        wait_for(lambda: sum(rows_and_pending(services.db, prefix)[0].values()) == half, 60, "the first half")
        yield member, lambda: _send(kafka, _records(events[half:]))
        assert _sample("persona_buffer_retries_total", dependency="kafka", operation="reconnect") > reconnects_before
        wait_for(lambda: sum(rows_and_pending(services.db, prefix)[0].values()) == len(events), 90, "all buffered")
        assert thread.is_alive()
        rows, pending = rows_and_pending(services.db, prefix)
        assert sum(rows.values()) == len(events) and pending == rows
    finally:
        member.stop()
        thread.join(timeout=30)


def test_a_member_whose_coordinator_stays_unknown_builds_a_new_client_and_nothing_is_lost(services):
    """The client is made to report its group coordinator unknown (as kafka-python 3.0 did for minutes after an outage
    of tansu's S3 storage): after ``coordinator_lost_s`` the member closes it and builds a new one, which joins the
    group and consumes on; every event is buffered exactly once, before and after."""
    with _member_with_half_buffered(services, "lost", 11, coordinator_lost_s=2) as (member, send_rest):
        stuck = member._consumer
        stuck._coordinator.coordinator_unknown = lambda: True  # the old client never finds its coordinator again
        wait_for(lambda: member._consumer is not stuck, 30, "a new client")
        send_rest()


def test_a_member_whose_fetches_never_come_back_builds_a_new_client_and_nothing_is_lost(services):
    """The client is made to send no fetch any more (as kafka-python 3.0 kept one in flight that never completed,
    after an outage of tansu's S3 storage: coordinator known, nothing received, nothing logged): after
    ``fetch_stuck_s`` without a record, a fresh client fetches records past the member's positions, and the member
    builds a new client that consumes on; every event is buffered exactly once. An idle member (nothing waiting)
    keeps its client."""
    with _member_with_half_buffered(services, "fetch", 13, fetch_stuck_s=2) as (member, send_rest):
        idle = member._consumer
        reconnects = _sample("persona_buffer_retries_total", dependency="kafka", operation="reconnect")
        time.sleep(5)  # more than fetch_stuck_s with nothing waiting: looked at, not rebuilt
        assert member._consumer is idle
        assert _sample("persona_buffer_retries_total", dependency="kafka", operation="reconnect") == reconnects
        # The old client never fetches again, nor hands out what a fetch in flight may still bring.
        idle._fetcher.send_fetches = lambda: []
        idle._fetcher.fetched_records = lambda *args, **kwargs: ({}, False)
        send_rest()
        wait_for(lambda: member._consumer is not idle, 30, "a new client")
