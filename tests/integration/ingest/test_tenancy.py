"""Tenancy at the door: keys with scopes and expiry, a user owned by one application, forgotten users' late events.

Real PostgreSQL, Kafka and the ingest API on a socket; the consumer runs its real loop."""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import psycopg
import pytest
from kafka import KafkaProducer
from prometheus_client import REGISTRY

from pipeline import stack
from pipeline.config import DatabaseSettings
from pipeline.domain.errors import InvalidInput, NotFound
from pipeline.domain.events import Event
from pipeline.ingest.codec import DLQ_OWNER, DLQ_USER, reasons_from_headers
from pipeline.storage import apps, buffers, db, tenancy
from pipeline.storage.buffers import BufferedEvent
from pipeline.storage.db import MIGRATIONS_DIR
from tests.integration.conftest import _with_database
from tests.integration.helpers import api_server, drain, fresh_topics, read_topic, rows_and_pending

pytestmark = pytest.mark.integration


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _new_app(services, *scopes: str) -> tuple[str, str]:
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(services.db.url) as conn:
        _, key = apps.create_key(conn, app_id, scopes=scopes or ("ingest", "serve"))
    return app_id, key


def _event(user: str, app: str, at: datetime | None = None, text: str = "hello") -> dict:
    at = at or datetime.now(UTC)
    return {
        "event_id": str(uuid.uuid4()),
        "user_id": user,
        "occurred_at": at.isoformat(),
        "kind": "message",
        "app": app,
        "text": text,
    }


def _post(url: str, key: str, events: list[dict]) -> httpx.Response:
    return httpx.post(f"{url}/v1/events", json=events, headers={"Authorization": f"Bearer {key}"}, timeout=30)


# --- keys ---------------------------------------------------------------------------------------------------------
def test_keys_have_scopes_expiry_and_operator_keys(services):
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(services.db.url, autocommit=True) as conn:
        kid, key = apps.create_key(conn, app_id, scopes=("serve",))
        p = apps.authenticate(conn, key)
        assert p is not None and p.app_id == app_id and p.scopes == {"serve"} and p.expires_at is None
        # A key is only ever stored hashed.
        stored = conn.execute("SELECT key_sha256 FROM api_keys WHERE key_id = %s", (kid,)).fetchone()[0]
        assert key.encode() not in bytes(stored) and len(bytes(stored)) == 32

        soon = datetime.now(UTC) + timedelta(hours=1)
        kid2, key2 = apps.create_key(conn, app_id, scopes=("ingest",), expires_at=soon)
        assert apps.authenticate(conn, key2).expires_at == soon
        conn.execute("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE key_id = %s", (kid2,))
        assert apps.authenticate(conn, key2) is None  # expired
        with pytest.raises(InvalidInput, match="in the past"):
            apps.create_key(conn, app_id, expires_at=datetime.now(UTC) - timedelta(seconds=5))

        op_id, op_key = apps.create_key(conn, None, scopes=("admin",))
        op = apps.authenticate(conn, op_key)
        assert op is not None and op.operator and op.scopes == {"admin"} and op.may_act_for(app_id)
        with pytest.raises(InvalidInput, match="operator key"):
            apps.create_key(conn, None, scopes=("serve",))
        with pytest.raises(InvalidInput, match="unknown scope"):
            apps.create_key(conn, app_id, scopes=("root",))

        assert [k.key_id for k in apps.list_keys(conn, operator=True)][-1] == op_id
        assert {k.key_id for k in apps.list_keys(conn, app_id)} == {kid, kid2}
        assert apps.revoke_key(conn, kid).revoked_at is not None
        assert apps.authenticate(conn, key) is None
        assert apps.revoke_key(conn, kid).revoked_at is not None  # again: no change, no error
        with pytest.raises(NotFound):
            apps.revoke_key(conn, "000000000000")
        assert apps.authenticate(conn, key[:-1] + ("A" if key[-1] != "A" else "B")) is None  # right id, wrong secret


def test_keys_issued_before_scopes_keep_ingest_only(test_stack, tmp_path):
    # Migration 0006 gives the keys that existed before it exactly what they could do then: post events.
    server_url = stack.effective_urls(test_stack)["db_url"]
    name = f"persona_mig_{uuid.uuid4().hex[:8]}"
    admin_url = _with_database(server_url, "postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database = DatabaseSettings(url=_with_database(server_url, name))
    try:
        for path in MIGRATIONS_DIR.glob("000[1-5]_*.sql"):
            shutil.copy(path, tmp_path / path.name)
        db.migrate(database, tmp_path)
        with psycopg.connect(database.url) as conn:
            conn.execute("INSERT INTO apps (app_id) VALUES ('old')")
            conn.execute("INSERT INTO api_keys (key_id, app_id, key_sha256) VALUES ('0123456789ab', 'old', '\\x00')")
        assert 6 in [m.version for m in db.migrate(database)]
        with psycopg.connect(database.url) as conn:
            row = conn.execute("SELECT scopes, expires_at FROM api_keys WHERE key_id = '0123456789ab'").fetchone()
            assert row == (["ingest"], None)
            with pytest.raises(psycopg.errors.NotNullViolation):  # no default left: a new key names its scopes
                conn.execute("INSERT INTO api_keys (key_id, app_id, key_sha256) VALUES ('ba9876543210', 'old', '')")
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- the ingest API -----------------------------------------------------------------------------------------------
def test_api_key_scopes_and_ownership(services):
    kafka = fresh_topics(services.kafka)
    app_a, key_a = _new_app(services, "ingest", "serve")
    app_b, key_b = _new_app(services, "ingest")
    _, serve_only = _new_app(services, "serve")
    user_b = f"b-{uuid.uuid4().hex[:6]}"
    with api_server(services, kafka) as url:
        r = _post(url, serve_only, [_event("x", "whatever")])
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", r.text
        r = _post(url, "pk_000000000000_" + "A" * 43, [_event("x", app_a)])
        assert r.status_code == 401, r.text

        r = _post(url, key_b, [_event(user_b, app_b)])
        assert r.status_code == 202 and r.json()["accepted"] == 1
        drain(services, kafka, expect=1)  # app B owns user_b now

        # App A, with its own valid key and its own app name, cannot write into B's user.
        r = _post(url, key_a, [_event(user_b, app_a), _event(f"a-{uuid.uuid4().hex[:6]}", app_a)])
        assert r.status_code == 202, r.text
        body = r.json()
        assert (body["accepted"], body["rejected"], body["dropped"]) == (1, 1, 0)
        reason = body["results"][0]["reasons"][0]
        assert body["results"][0]["status"] == "rejected"
        assert (reason["field"], reason["code"]) == ("user_id", "foreign_user"), reason
        assert app_b not in reason["message"]  # the owner is not named to another application
        # Nor by naming B as the app.
        r = _post(url, key_a, [_event(user_b, app_b)])
        assert r.json()["results"][0]["reasons"][0]["code"] == "app_mismatch"
    drain(services, kafka, expect=1)
    rows, _ = rows_and_pending(services.db, user_b)
    assert rows == {user_b: 1}
    with psycopg.connect(services.db.url) as conn:
        apps_of_user = conn.execute("SELECT DISTINCT app FROM events WHERE user_id = %s", (user_b,)).fetchall()
    assert apps_of_user == [(app_b,)]


def test_api_drops_events_of_a_forgotten_user_that_occurred_before_the_forget(services):
    kafka = fresh_topics(services.kafka)
    app_id, key = _new_app(services, "ingest")
    user = f"gone-{uuid.uuid4().hex[:6]}"
    with psycopg.connect(services.db.url) as conn:
        forgotten_at = tenancy.add_tombstone(conn, user, app_id, "test")
    before = _sample("persona_forgotten_events_dropped_total", path="api")
    with api_server(services, kafka) as url:
        late = _event(user, app_id, at=forgotten_at - timedelta(minutes=5))
        fresh = _event(user, app_id, at=forgotten_at + timedelta(seconds=1))
        r = _post(url, key, [late, fresh])
    body = r.json()
    assert r.status_code == 202 and (body["accepted"], body["rejected"], body["dropped"]) == (1, 0, 1), body
    assert body["results"][0]["status"] == "dropped"
    assert body["results"][0]["reasons"][0]["code"] == "forgotten"
    assert _sample("persona_forgotten_events_dropped_total", path="api") - before == 1
    drain(services, kafka, expect=1)
    # The event after the forget starts a new life of the id; the late one never reached Kafka or the buffers.
    with psycopg.connect(services.db.url) as conn:
        stored = [r[0] for r in conn.execute("SELECT event_id FROM events WHERE user_id = %s", (user,))]
    assert stored == [fresh["event_id"]]


# --- the consumer (records written straight to Kafka) -------------------------------------------------------------
def test_consumer_dead_letters_unknown_apps_and_foreign_users_and_drops_forgotten_users(services):
    kafka = fresh_topics(services.kafka)
    app_a, _ = _new_app(services)
    app_b, _ = _new_app(services)
    owned_by_b = f"ob-{uuid.uuid4().hex[:6]}"
    forgotten = f"fg-{uuid.uuid4().hex[:6]}"
    with psycopg.connect(services.db.url) as conn:
        buffers.write_events(conn, [_buffered(owned_by_b, app_b)])
        gone_at = tenancy.add_tombstone(conn, forgotten, app_a, "test")

    records = [
        _event(owned_by_b, "not-registered"),  # unknown_app
        _event(owned_by_b, app_a),  # foreign_user
        _event(owned_by_b, app_b),  # fine
        _event(forgotten, app_a, at=gone_at - timedelta(days=1)),  # dropped, not dead-lettered
        _event(forgotten, app_a, at=gone_at - timedelta(microseconds=1)),  # dropped
        _event(forgotten, app_a, at=gone_at + timedelta(seconds=1)),  # the id's new life
    ]
    producer = KafkaProducer(bootstrap_servers=kafka.servers, acks="all")
    for ev in records:
        producer.send(kafka.topic_events, key=ev["user_id"].encode(), value=orjson.dumps(ev))
    producer.flush()
    producer.close()
    dropped = _sample("persona_forgotten_events_dropped_total", path="consumer")
    bc = drain(services, kafka, expect=len(records))
    assert (bc.totals.inserted, bc.totals.dead_lettered, bc.totals.forgotten) == (2, 2, 2)
    assert _sample("persona_forgotten_events_dropped_total", path="consumer") - dropped == 2

    dlq = read_topic(kafka, kafka.topic_dlq, expect=2)
    by_code = {reasons_from_headers(r.headers)[0]["code"]: r for r in dlq}
    assert set(by_code) == {"unknown_app", "foreign_user"} and len(dlq) == 2
    foreign = dict(by_code["foreign_user"].headers)
    assert foreign[DLQ_USER].decode() == owned_by_b and foreign[DLQ_OWNER].decode() == app_b
    assert orjson.loads(by_code["foreign_user"].value)["event_id"] == records[1]["event_id"]
    with psycopg.connect(services.db.url) as conn:
        rows = conn.execute(
            "SELECT user_id, app, count(*) FROM events WHERE user_id = ANY(%s) GROUP BY 1, 2 ORDER BY 1",
            ([owned_by_b, forgotten],),
        ).fetchall()
        owner = tenancy.owner_of(conn, forgotten)
    assert rows == [(forgotten, app_a, 1), (owned_by_b, app_b, 2)]
    assert owner == app_a


def _buffered(user: str, app: str, at: datetime | None = None) -> BufferedEvent:
    ev = Event(str(uuid.uuid4()), user, at or datetime.now(UTC), "message", app, {"text": "hi"}, None)
    return BufferedEvent(ev, "train")


# --- storage: the races -------------------------------------------------------------------------------------------
def test_two_applications_racing_for_a_new_user_id_one_wins(services):
    user = f"race-{uuid.uuid4().hex[:6]}"
    app_a, _ = _new_app(services)
    app_b, _ = _new_app(services)
    with psycopg.connect(services.db.url) as first, psycopg.connect(services.db.url) as second:
        first_result = buffers.write_events(first, [_buffered(user, app_a)])  # uncommitted: B's claim must wait
        out: dict[str, buffers.WriteResult] = {}
        t = threading.Thread(target=lambda: out.setdefault("b", _write_commit(second, _buffered(user, app_b))))
        t.start()
        time.sleep(0.5)
        assert t.is_alive()  # waiting for A's transaction
        first.commit()
        t.join(timeout=10)
    assert first_result.inserted == 1
    assert out["b"].inserted == 0 and [f.owner for f in out["b"].foreign] == [app_a]


def _write_commit(conn: psycopg.Connection, b: BufferedEvent) -> buffers.WriteResult:
    with conn.transaction():
        return buffers.write_events(conn, [b])


def test_a_forget_waits_for_a_batch_of_its_user_and_then_sees_it(services):
    user = f"lock-{uuid.uuid4().hex[:6]}"
    app_id, _ = _new_app(services)
    with psycopg.connect(services.db.url) as writer, psycopg.connect(services.db.url) as forgetter:
        buffers.write_events(writer, [_buffered(user, app_id)])  # the batch's transaction is open
        forgetter.execute("SET lock_timeout = '300ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            tenancy.lock_for_forget(forgetter, user)
        forgetter.rollback()
        writer.commit()
        tenancy.lock_for_forget(forgetter, user)  # free now; and a new batch of the user waits for the forget
        writer.execute("SET lock_timeout = '300ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            buffers.write_events(writer, [_buffered(user, app_id)])
        writer.rollback()
        tenancy.add_tombstone(forgetter, user, app_id, "test")
        forgetter.execute("DELETE FROM events WHERE user_id = %s", (user,))
        forgetter.commit()
        # The batch, retried after the forget, drops the event: it occurred before the forget.
        result = _write_commit(writer, _buffered(user, app_id, at=datetime.now(UTC) - timedelta(seconds=5)))
    assert (result.inserted, result.forgotten) == (0, 1)
