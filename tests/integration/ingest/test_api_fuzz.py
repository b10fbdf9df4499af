"""POST /v1/events fuzzed on a real socket (issue 14): whatever the body, never a 5xx, always the documented shape,
and the connection stays usable.

Bodies: valid events from the published schema (for the test's application), events with fields of any JSON type,
deep nesting (inside meta, in a field, the body itself), any JSON value, bytes that are not JSON, huge numbers.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from typing import Any

import httpx
import orjson
import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from pipeline.domain.events import MAX_META_DEPTH
from pipeline.storage import apps
from tests.integration.helpers import api_server, fresh_topics, schema_events
from tests.unit.domain.test_events import base, timestamps

pytestmark = pytest.mark.integration

APP_ID = f"fuzz-{uuid.uuid4().hex[:8]}"
FIELDS = ["event_id", "user_id", "occurred_at", "kind", "app", "meta", "text", "prompt", "completion", "rating"]

# JSON values a client can send (orjson reads them all): any string, any number, any nesting up to a few levels.
CLEAN_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=15,
)
VALID_EVENTS = schema_events(
    timestamps=timestamps(separators="Tt"),
    meta=st.dictionaries(st.text(max_size=8), CLEAN_JSON, max_size=4),
    app=APP_ID,
    long_text=False,
)


def _encode(obj: Any) -> bytes:
    """JSON bytes of ``obj``; what orjson cannot write (lone surrogates, NaN, integers beyond 64 bits) is written as
    Python's json module does (escaped surrogates, ``NaN``, all digits), as any client might."""
    try:
        return orjson.dumps(obj)
    except (orjson.JSONEncodeError, TypeError):
        return json.dumps(obj, ensure_ascii=True, allow_nan=True).encode()


def _event_bytes(event_id: uuid.UUID | None = None) -> bytes:
    """A valid event as JSON without its closing brace, so a test can append ``,"field":value}``."""
    eid = event_id or uuid.uuid4()
    return orjson.dumps(base(app=APP_ID, user_id=f"fuzz-{eid.hex[:6]}", event_id=str(eid)))[:-1]


@st.composite
def typed_events(draw) -> bytes:
    """A valid event whose fields (1 to 3, or new ones) hold values of any JSON type."""
    ev = draw(VALID_EVENTS)
    for _ in range(draw(st.integers(1, 3))):
        ev[draw(st.sampled_from(FIELDS) | st.text(max_size=10))] = draw(CLEAN_JSON)
    return _encode([ev])


@st.composite
def deep_bodies(draw) -> bytes:
    """Nesting from 1 to past orjson's own limit (1024), in meta, in another field, or the body itself."""
    n = draw(st.integers(1, 40) | st.integers(MAX_META_DEPTH - 2, MAX_META_DEPTH + 2) | st.integers(200, 1100))
    opening, closing = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    inner = opening * n + draw(st.sampled_from([b"1", b'"x"', b"null", b"[]", b"{}"])) + closing * n
    where = draw(st.sampled_from(["meta", "kind", "text", "event_id", "rating", "unknown", "body", "item"]))
    ev = _event_bytes(draw(st.uuids()))
    if where == "body":
        return inner
    if where == "item":
        return b"[" + inner + b"]"
    if where == "meta":
        return b"[" + ev + b',"meta":{"a":' + inner + b"}}]"
    return b"[" + ev + b',"' + where.encode() + b'":' + inner + b"}]"


@st.composite
def huge_numbers(draw) -> bytes:
    """Numbers JSON allows but no machine type holds, in every field (rating, meta, kind, ...)."""
    digits = draw(st.integers(19, 5000))
    number = draw(
        st.sampled_from(
            [
                b"1" + b"0" * digits,
                b"-" + b"9" * digits,
                b"1e" + str(digits).encode(),
                b"1e-" + str(digits).encode(),
                b"0." + b"0" * digits + b"1",
                b"18446744073709551616",
                b"18446744073709551615",
                b"-9223372036854775809",
                b"1.0",
                b"-0",
                b"1E0",
            ]
        )
    )
    field = draw(st.sampled_from(["rating", "meta", "kind", "text", "occurred_at", "x"]))
    eid = draw(st.uuids())
    ev = _event_bytes(eid)
    if field == "meta":
        return b"[" + ev + b',"meta":{"n":' + number + b',"l":[' + number + b"]}}]"
    if field == "rating":
        fb = orjson.dumps(base("feedback", app=APP_ID, user_id="fuzz-r", event_id=str(eid)))[:-1]
        return b"[" + fb.replace(b'"rating":1', b'"rating":' + number) + b"}]"
    return b"[" + ev + b',"' + field.encode() + b'":' + number + b"}]"


@st.composite
def broken_bytes(draw) -> bytes:
    """Bytes that are not JSON: random, a valid body cut or with a byte changed, invalid UTF-8, NUL bytes, BOMs,
    lone surrogate escapes, NaN."""
    kind = draw(st.sampled_from(["random", "cut", "flip", "special"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    ev = _event_bytes(draw(st.uuids()))
    valid = b"[" + ev + b"}]"
    if kind == "cut":
        return valid[: draw(st.integers(0, len(valid) - 1))]
    if kind == "flip":
        i = draw(st.integers(0, len(valid) - 1))
        return valid[:i] + bytes([draw(st.integers(0, 255))]) + valid[i + 1 :]
    return draw(
        st.sampled_from(
            [
                b"",
                b"\xef\xbb\xbf[]",
                b"[" + ev + b',"meta":{"a":"\\ud800"}}]',
                b"[" + ev + b',"\\udc00":1}]',
                b"[" + ev + b',"meta":{"a":NaN}}]',
                b"[" + ev + b',"meta":{"a":"\xff"}}]',
                b"[" + ev + b',"meta":{"a":"x\x00y"}}]',
                b"[" + ev + b',"meta":{"a\\u0000":1}}]',
                b"[1e400]",
                b"[" + b"{}," * 999 + b"{}]",
                b"[" + b"{}," * 1000 + b"{}]",
            ]
        )
    )


# Each class of body, its own share of the examples (one_of would leave the rarer classes to chance).
BODIES = {
    "valid": (st.lists(VALID_EVENTS, min_size=1, max_size=3).map(_encode), 60),
    "typed": (typed_events(), 60),
    "deep": (deep_bodies(), 60),
    "huge-numbers": (huge_numbers(), 40),
    "not-json": (broken_bytes(), 40),
    "any-json": (CLEAN_JSON.map(_encode) | st.lists(CLEAN_JSON, min_size=1, max_size=3).map(_encode), 40),
}


def _note(label: str) -> None:
    """Counted in hypothesis' statistics (pytest --hypothesis-show-statistics); nothing outside a hypothesis test."""
    with contextlib.suppress(InvalidArgument):
        event(label)


@pytest.fixture(scope="module")
def client(services):
    with psycopg.connect(services.db.url) as conn:
        _, key = apps.create_key(conn, APP_ID)
    kafka = fresh_topics(services.kafka)
    with (
        api_server(services, kafka) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c,
    ):
        yield c


def _check_answer(body: bytes, r: httpx.Response) -> None:
    """No 5xx, and the documented shape: 202 with a result per event, or the error object."""
    assert r.status_code < 500, (r.status_code, r.text[:2000], body[:300])
    answer = r.json()
    if r.status_code != 202:
        assert r.status_code in (400, 413), (r.status_code, r.text[:500])
        assert set(answer) == {"error"}
        error = answer["error"]
        assert {"type", "code", "message"} <= set(error) <= {"type", "code", "message", "param"}
        assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"]
        _note(f"{r.status_code} {error['code']}")
        return
    items = orjson.loads(body)  # the server read it, so can we
    assert set(answer) == {"accepted", "rejected", "dropped", "results"}
    assert answer["accepted"] + answer["rejected"] + answer["dropped"] == len(items) == len(answer["results"])
    assert answer["dropped"] == 0  # nobody was forgotten here
    for i, result in enumerate(answer["results"]):
        assert result["index"] == i
        assert result["event_id"] is None or isinstance(result["event_id"], str)
        if result["status"] == "accepted":
            assert set(result) == {"index", "event_id", "status"} and result["event_id"]
            _note("202 accepted")
            continue
        assert result["status"] == "rejected" and set(result) == {"index", "event_id", "status", "reasons"}
        assert result["reasons"]
        for reason in result["reasons"]:
            assert set(reason) == {"field", "code", "message"}
            assert all(isinstance(v, str) for v in reason.values()) and reason["code"] and reason["message"]
            assert reason["code"] != "internal_error", reason  # validate raised: a bug
            _note(f"202 rejected {reason['code']}")


def _valid_request_still_works(client: httpx.Client) -> None:
    ev = base(app=APP_ID, user_id=f"fuzz-{uuid.uuid4().hex[:6]}", event_id=str(uuid.uuid4()))
    r = client.post("/v1/events", content=orjson.dumps([ev]), headers={"Content-Type": "application/json"})
    assert r.status_code == 202 and r.json()["accepted"] == 1, r.text


def _fuzz(name: str):
    """The test for one class of body: any body of it gets a documented answer, never a 5xx."""
    strategy, examples = BODIES[name]

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(body=strategy)
    def test(client, body):
        r = client.post("/v1/events", content=body, headers={"Content-Type": "application/json"})
        _check_answer(body, r)

    test.__name__ = test.__qualname__ = f"test_{name.replace('-', '_')}_bodies_get_a_documented_answer_never_a_5xx"
    return test


test_valid_bodies_get_a_documented_answer_never_a_5xx = _fuzz("valid")
test_typed_bodies_get_a_documented_answer_never_a_5xx = _fuzz("typed")
test_deep_bodies_get_a_documented_answer_never_a_5xx = _fuzz("deep")
test_huge_numbers_bodies_get_a_documented_answer_never_a_5xx = _fuzz("huge-numbers")
test_not_json_bodies_get_a_documented_answer_never_a_5xx = _fuzz("not-json")
test_any_json_bodies_get_a_documented_answer_never_a_5xx = _fuzz("any-json")


def test_the_connection_stays_usable_after_bad_bodies(client):
    bad = [
        b"[" + _event_bytes() + b',"meta":' + b"[" * 1000 + b"]" * 1000 + b"}]",
        b"[" + _event_bytes() + b',"kind":' + b"[" * 1000 + b"]" * 1000 + b"}]",
        b"[" * 2000 + b"]" * 2000,
        b"[" + _event_bytes() + b',"meta":{"n":1' + b"0" * 5000 + b"}}]",
        b"\xff\xfe\x00garbage",
        b"",
        _encode([dict(base(app=APP_ID), kind=["message"], text={"a": [1]})]),
    ]
    for body in bad:
        r = client.post("/v1/events", content=body, headers={"Content-Type": "application/json"})
        _check_answer(body, r)
        assert r.headers.get("connection", "").lower() != "close", r.headers  # the server keeps the connection
        _valid_request_still_works(client)  # on the same client, right after


def test_schema_valid_events_of_the_app_are_accepted(client):
    """The valid part of the fuzzing really reaches acceptance (a fuzz test that only sees 400s proves little)."""
    evs = [
        base(app=APP_ID, user_id="fuzz-ok", event_id=str(uuid.uuid4()), occurred_at=ts)
        for ts in ("2026-03-01T12:00:00+23:59", "1900-01-01T00:00:00Z", "9998-12-31T23:59:59.999999999-00:00")
    ]
    evs.append(base(app=APP_ID, user_id="fuzz-ok", event_id=str(uuid.uuid4()), meta={"a": [[[1]]], "n": 2**64 - 1}))
    r = client.post("/v1/events", content=orjson.dumps(evs), headers={"Content-Type": "application/json"})
    assert r.status_code == 202 and r.json()["accepted"] == len(evs), r.text
