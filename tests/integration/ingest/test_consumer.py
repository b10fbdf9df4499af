"""The buffer consumer against real Kafka (tansu) and PostgreSQL: DLQ reasons, idempotency, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import orjson
import psycopg
import pytest
from kafka import KafkaProducer
from prometheus_client import REGISTRY

from pipeline.config import ROOT
from pipeline.demo import sim
from pipeline.ingest.codec import DLQ_CODE, DLQ_SOURCE, reasons_from_headers
from tests.integration.helpers import drain, fresh_topics, read_topic, rows_and_pending
from tests.unit.domain.test_events import INVALID

pytestmark = pytest.mark.integration


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _producer(kafka):
    return KafkaProducer(bootstrap_servers=kafka.servers, acks="all")


def _valid(prefix: str, users: int = 2, per_user: int = 10, seed: int = 7):
    return [e for u in sim.users(users, prefix=prefix) for e in sim.events_for(u, per_user, app="direct", seed=seed)]


def test_invalid_records_go_to_the_dlq_with_their_reason(services):
    kafka = fresh_topics(services.kafka)
    prefix = f"dlq-{uuid.uuid4().hex[:6]}"
    valid = _valid(prefix)
    user = f"{prefix}-bad"
    # (key, value bytes, expected code)
    bad: list[tuple[bytes | None, bytes | None, str]] = [
        (user.encode(), b"{not json", "invalid_json"),
        (user.encode(), b"\xff\xfe\x00", "invalid_json"),
        (user.encode(), b'"a string"', "not_object"),
        (user.encode(), b"[1, 2]", "not_object"),
        (user.encode(), None, "invalid_json"),  # tombstone
    ]
    for ev, _field, code in INVALID:
        ev = dict(ev)
        key = (ev.get("user_id") if isinstance(ev.get("user_id"), str) else user).encode()
        bad.append((key, orjson.dumps(ev), code))
    ok = dict(valid[0], event_id=str(uuid.uuid4()), user_id=user)
    bad.append((None, orjson.dumps(ok), "missing_key"))
    bad.append((b"someone-else", orjson.dumps(ok), "key_mismatch"))

    producer = _producer(kafka)
    for i, ev in enumerate(valid):
        producer.send(kafka.topic_events, key=ev["user_id"].encode(), value=orjson.dumps(ev))
        if i < len(bad):
            key, value, _ = bad[i]
            producer.send(kafka.topic_events, key=key, value=value)
    for key, value, _ in bad[len(valid) :]:
        producer.send(kafka.topic_events, key=key, value=value)
    producer.flush()
    producer.close()

    before = {c: _sample("persona_buffer_rejected_total", reason=c) for c in ("invalid_json", "key_mismatch")}
    batches_before = _sample("persona_buffer_batch_seconds_count")
    bc = drain(services, kafka, expect=len(valid) + len(bad))
    assert bc.totals.dead_lettered == len(bad) and bc.totals.inserted == len(valid)
    # The consumer's metrics count what it did.
    assert _sample("persona_buffer_rejected_total", reason="invalid_json") - before["invalid_json"] == 3
    assert _sample("persona_buffer_rejected_total", reason="key_mismatch") - before["key_mismatch"] == 1
    assert _sample("persona_buffer_batch_seconds_count") > batches_before

    dlq = read_topic(kafka, kafka.topic_dlq, expect=len(bad))
    assert len(dlq) == len(bad)
    by_value = {}
    for rec in dlq:
        headers = dict(rec.headers)
        reasons = reasons_from_headers(rec.headers)
        assert reasons and all(set(r) == {"field", "code", "message"} for r in reasons)
        assert headers[DLQ_CODE].decode() == reasons[0]["code"]
        assert headers[DLQ_SOURCE].decode().startswith(kafka.topic_events + "/")
        by_value.setdefault((rec.key, rec.value), []).append([r["code"] for r in reasons])
    for key, value, code in bad:
        # The DLQ keeps the original bytes and key untouched, with the specific reason.
        matches = by_value.get((key, value))
        assert matches, f"no DLQ record for {value!r}"
        assert any(code in codes for codes in matches), (value, matches)

    rows, pending = rows_and_pending(services.db, prefix)
    assert sum(rows.values()) == len(valid) and pending == rows
    assert f"{prefix}-bad" not in rows


def test_duplicates_straight_to_kafka_give_one_row(services):
    kafka = fresh_topics(services.kafka)
    prefix = f"dup-{uuid.uuid4().hex[:6]}"
    valid = _valid(prefix, users=3, per_user=10)
    producer = _producer(kafka)
    for _ in range(3):
        for ev in valid:
            producer.send(kafka.topic_events, key=ev["user_id"].encode(), value=orjson.dumps(ev))
    # Same ids in another letter case are the same events.
    for ev in valid[:5]:
        producer.send(
            kafka.topic_events,
            key=ev["user_id"].encode(),
            value=orjson.dumps(dict(ev, event_id=ev["event_id"].upper())),
        )
    producer.flush()
    producer.close()
    bc = drain(services, kafka, expect=3 * len(valid) + 5)
    assert bc.totals.inserted == len(valid) and bc.totals.duplicates == 2 * len(valid) + 5
    rows, pending = rows_and_pending(services.db, prefix)
    assert rows == {u.user_id: 10 for u in sim.users(3, prefix=prefix)} and pending == rows


def _consumer_env(services, kafka, group: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERSONA_")}
    env.update(
        {
            "PERSONA_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "PERSONA_KAFKA_TOPIC_EVENTS": kafka.topic_events,
            "PERSONA_KAFKA_TOPIC_DLQ": kafka.topic_dlq,
            "PERSONA_DB_URL": services.db.url,
            "PERSONA_CONSUMER_GROUP_ID": group,
            "PERSONA_CONSUMER_METRICS_PORT": "0",
            **extra,
        }
    )
    return env


def test_sigkill_between_db_commit_and_offset_commit_keeps_one_row(services):
    kafka = fresh_topics(services.kafka)
    prefix = f"kill-{uuid.uuid4().hex[:6]}"
    valid = _valid(prefix, users=4, per_user=25)
    producer = _producer(kafka)
    for ev in valid:
        producer.send(kafka.topic_events, key=ev["user_id"].encode(), value=orjson.dumps(ev))
    producer.flush()
    producer.close()
    group = f"kill-{uuid.uuid4().hex[:6]}"

    env = _consumer_env(services, kafka, group, PERSONA_CONSUMER_FAILPOINT="after_db_commit")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "consume"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert "failpoint after_db_commit" in proc.stderr
    rows_after_crash, _ = rows_and_pending(services.db, prefix)
    assert sum(rows_after_crash.values()) > 0  # the DB transaction had committed

    # A new member of the same group gets the uncommitted records again; the DB skips them.
    bc = drain(services, kafka, group=group, expect=len(valid))
    assert bc.totals.duplicates == sum(rows_after_crash.values())
    rows, pending = rows_and_pending(services.db, prefix)
    assert sum(rows.values()) == len(valid) and pending == rows


def test_sigterm_finishes_the_batch_and_exits_cleanly(services):
    kafka = fresh_topics(services.kafka)
    prefix = f"term-{uuid.uuid4().hex[:6]}"
    valid = _valid(prefix, users=2, per_user=10)
    producer = _producer(kafka)
    for ev in valid:
        producer.send(kafka.topic_events, key=ev["user_id"].encode(), value=orjson.dumps(ev))
    producer.flush()
    producer.close()
    env = _consumer_env(services, kafka, f"term-{uuid.uuid4().hex[:6]}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "consume"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        rows, _ = rows_and_pending(services.db, prefix)
        if sum(rows.values()) == len(valid):
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out[-2000:]
    assert "stopped: 20 records, 20 inserted" in out
    rows, pending = rows_and_pending(services.db, prefix)
    assert sum(rows.values()) == len(valid) and pending == rows


def test_pending_counters_equal_rows_for_every_user(services):
    """Across everything the tests wrote: user_state.pending_count is exactly the number of event rows no training
    has consumed yet (all of a user's rows until a retrain reads them; the session's database is shared with the
    training and gate tests, which run first)."""
    with psycopg.connect(services.db.url) as conn:
        bad = conn.execute(
            "SELECT s.user_id, s.pending_count, count(e.event_id) FILTER (WHERE e.consumed_by IS NULL)"
            " FROM user_state s LEFT JOIN events e USING (user_id) GROUP BY 1, 2"
            " HAVING s.pending_count <> count(e.event_id) FILTER (WHERE e.consumed_by IS NULL)"
        ).fetchall()
        users = conn.execute("SELECT count(*) FROM user_state").fetchone()[0]
    assert bad == [] and users > 0


def test_rows_the_database_refuses_go_to_the_dlq_and_the_rest_land(own_services):
    """A valid-looking event that the database refuses (here: a constraint added for the test) is dead-lettered
    with reason db_rejected; the other events of its batch are still written, once."""
    services = own_services
    with psycopg.connect(services.db.url, autocommit=True) as conn:
        conn.execute("ALTER TABLE events ADD CONSTRAINT test_no_poison CHECK (payload->>'text' <> 'poison')")
    kafka = fresh_topics(services.kafka)
    prefix = f"poison-{uuid.uuid4().hex[:6]}"
    valid = _valid(prefix, users=2, per_user=10)
    poison = dict(valid[0], event_id=str(uuid.uuid4()), kind="message", text="poison")
    poison.pop("prompt", None)
    for k in ("original", "edited", "chosen", "rejected", "completion", "rating"):
        poison.pop(k, None)
    producer = _producer(kafka)
    for ev in [*valid[:5], poison, *valid[5:]]:
        producer.send(kafka.topic_events, key=ev["user_id"].encode(), value=orjson.dumps(ev))
    producer.flush()
    producer.close()
    bc = drain(services, kafka, expect=len(valid) + 1)
    assert bc.totals.inserted == len(valid) and bc.totals.dead_lettered == 1
    dlq = read_topic(kafka, kafka.topic_dlq, expect=1)
    assert [reasons_from_headers(r.headers)[0]["code"] for r in dlq] == ["db_rejected"]
    rows, pending = rows_and_pending(services.db, prefix)
    assert sum(rows.values()) == len(valid) and pending == rows
