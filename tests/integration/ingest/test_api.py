"""POST /v1/events on a real socket, through real Kafka into real PostgreSQL."""

from __future__ import annotations

import uuid

import httpx
import psycopg
import pytest

from pipeline.demo import sim
from pipeline.storage import apps
from tests.integration.helpers import api_server, drain, fresh_topics, rows_and_pending
from tests.unit.domain.test_events import INVALID

pytestmark = pytest.mark.integration


@pytest.fixture
def app_key(services):
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(services.db.url) as conn:
        _, key = apps.create_key(conn, app_id)
    return app_id, key


def _events(prefix: str, app_id: str, users: int = 3, per_user: int = 20, seed: int = 1):
    return [e for u in sim.users(users, prefix=prefix) for e in sim.events_for(u, per_user, app=app_id, seed=seed)]


def test_posted_events_land_exactly_once(services, app_key):
    app_id, key = app_key
    kafka = fresh_topics(services.kafka)
    prefix = f"api-{uuid.uuid4().hex[:6]}"
    events = _events(prefix, app_id)
    auth = {"Authorization": f"Bearer {key}"}
    with api_server(services, kafka) as url:
        r1 = httpx.post(f"{url}/v1/events", json=events, headers=auth)
        r2 = httpx.post(f"{url}/v1/events", json=events[:25], headers={"X-API-Key": key})  # a retry, in part
    assert r1.status_code == 202 and r2.status_code == 202, (r1.text, r2.text)
    assert r1.json()["accepted"] == len(events) and r1.json()["rejected"] == 0
    assert [x["index"] for x in r1.json()["results"]] == list(range(len(events)))

    bc = drain(services, kafka, expect=len(events) + 25)
    assert bc.totals.inserted == len(events) and bc.totals.duplicates == 25

    rows, pending = rows_and_pending(services.db, prefix)
    expected: dict[str, int] = {}
    for e in events:
        expected[e["user_id"]] = expected.get(e["user_id"], 0) + 1
    assert rows == expected
    assert pending == rows
    with psycopg.connect(services.db.url) as conn:
        stored = {r[0] for r in conn.execute("SELECT event_id FROM events WHERE user_id LIKE %s", (prefix + "%",))}
    assert stored == {e["event_id"] for e in events}


@pytest.mark.parametrize(("bad", "field", "code"), INVALID, ids=[f"{f}-{c}" for _, f, c in INVALID])
def test_each_invalid_event_gets_its_reason_and_never_reaches_the_buffers(services, app_key, api, bad, field, code):
    app_id, key = app_key
    url, _ = api
    user = f"inv-{uuid.uuid4().hex[:6]}"
    good = {**_events(user, app_id, users=1, per_user=1)[0]}
    bad = {**bad, "app": app_id} if bad.get("app") == "mail" else dict(bad)
    if bad.get("user_id") == "alice@example.com":
        bad["user_id"] = user + "-0"
    r = httpx.post(f"{url}/v1/events", json=[good, bad], headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["accepted"] == 1 and body["rejected"] == 1
    result = body["results"][1]
    assert result["status"] == "rejected"
    assert {"field": field, "code": code} in [{"field": x["field"], "code": x["code"]} for x in result["reasons"]]


@pytest.fixture(scope="module")
def api(services):
    kafka = fresh_topics(services.kafka)
    with api_server(services, kafka) as url:
        yield url, kafka


def test_invalid_events_never_reach_the_buffers(services, app_key):
    """Everything the API rejects stays out of Kafka: the topic only ever holds accepted events."""
    app_id, key = app_key
    kafka = fresh_topics(services.kafka)
    prefix = f"mix-{uuid.uuid4().hex[:6]}"
    good = _events(prefix, app_id, users=1, per_user=5)
    bad = [dict(b, user_id=f"{prefix}-0", app=app_id) for b, f, _ in INVALID if f not in ("user_id", "app")]
    with api_server(services, kafka) as url2:
        r = httpx.post(f"{url2}/v1/events", json=good + bad, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 202
    assert r.json()["accepted"] == len(good) and r.json()["rejected"] == len(bad)
    bc = drain(services, kafka, expect=len(good))
    assert bc.totals.records == len(good) and bc.totals.dead_lettered == 0
    rows, pending = rows_and_pending(services.db, prefix)
    assert rows == {f"{prefix}-000": len(good)} and pending == rows


def test_app_must_be_the_authenticated_application(services, app_key, api):
    _, key = app_key
    url, _ = api
    ev = _events(f"own-{uuid.uuid4().hex[:6]}", "someone-else", users=1, per_user=1)[0]
    r = httpx.post(f"{url}/v1/events", json=[ev], headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 202
    assert r.json()["results"][0]["reasons"][0]["code"] == "app_mismatch"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"[{", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
        (b'{"event_id": "x"}', 400, "not_an_array"),
        (b"[]", 400, "empty_batch"),
        (b"[" + b",".join([b"{}"] * 1001) + b"]", 413, "too_many_events"),
        (b"[" + b" " * (4 * 1024 * 1024) + b"]", 413, "body_too_large"),
    ],
    ids=["bad-json", "not-utf8", "not-array", "empty", "too-many", "too-big"],
)
def test_bad_requests(services, app_key, api, body, status, code):
    _, key = app_key
    url, _ = api
    r = httpx.post(
        f"{url}/v1/events",
        content=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_body_bound_holds_without_content_length(services, app_key, api):
    _, key = app_key
    url, _ = api

    def chunks():
        yield b"["
        for _ in range(5000):
            yield b" " * 1024
        yield b"]"

    r = httpx.post(f"{url}/v1/events", content=chunks(), headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_authentication(services, app_key, api):
    app_id, key = app_key
    url, _ = api
    ev = _events(f"auth-{uuid.uuid4().hex[:6]}", app_id, users=1, per_user=1)
    assert httpx.post(f"{url}/v1/events", json=ev).json()["error"]["code"] == "missing_api_key"
    for bad in ("nonsense", key[:-1] + ("A" if key[-1] != "A" else "B"), "pk_000000000000_" + "x" * 43):
        r = httpx.post(f"{url}/v1/events", json=ev, headers={"Authorization": f"Bearer {bad}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(f"{url}/v1/events", json=ev, headers={"Authorization": f"Bearer {key}"}).status_code == 202
    with psycopg.connect(services.db.url) as conn:
        assert len(apps.revoke(conn, app_id)) == 1
    r = httpx.post(f"{url}/v1/events", json=ev, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401


def test_health_and_metrics(services, api):
    url, _ = api
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok", "database": "ok", "broker": "ok"}
    text = httpx.get(f"{url}/metrics").text
    assert "persona_ingest_events_total" in text


def test_unknown_paths_and_methods_answer_in_the_error_shape(api):
    url, _ = api
    r = httpx.get(f"{url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{url}/v1/events")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
