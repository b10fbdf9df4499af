"""What validate() accepts, PostgreSQL stores and gives back unchanged (issue 14): property tests on the real database.

Events come from the published schema (schemas/events/interaction.v1.json, see helpers.schema_events) and from
mutations of valid events (odd text, odd meta, any timestamp, fields of any JSON type). Every one validate() accepts
is written with the production path (buffers.write_events: COPY into a staging table, jsonb via orjson, timestamptz
via psycopg) in a transaction that is rolled back, and read back: the same instant, the same payload and meta.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from pipeline.config import SCHEMAS_DIR
from pipeline.domain.events import Event, Rejected, validate
from pipeline.storage.buffers import BufferedEvent, write_events
from tests.integration.helpers import schema_events
from tests.unit.domain.test_events import JSON_VALUES, SERVICE_ONLY_CODES, mutated_events, timestamps

pytestmark = pytest.mark.integration

SCHEMA = json.loads((SCHEMAS_DIR / "events" / "interaction.v1.json").read_text())
SCHEMA_VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)

# Meta as clients send it: JSON objects of any content, strings with any character (NUL and lone surrogates
# included, which validate must refuse), numbers of any size (beyond 64 bits: refused), NaN and infinities (refused).
METAS = st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4) | st.dictionaries(
    st.text(max_size=8), st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(), max_size=6
)

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def conn(services):
    with psycopg.connect(services.db.url, autocommit=True) as c:
        yield c


def _numbers_exact(value: Any) -> Any:
    """``value`` with every number as its exact Decimal: jsonb stores numbers as numeric, so 1e16 comes back as the
    integer 10000000000000000 and 1.5e300 as a 301-digit integer: the same JSON number, another Python type."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return Decimal(value)
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, dict):
        return {k: _numbers_exact(v) for k, v in value.items()}
    return [_numbers_exact(v) for v in value]


def _stored_as_given(conn: psycopg.Connection, ev: Event) -> None:
    """Write ``ev`` as the buffer consumer does, read it back, roll back."""
    with conn.transaction(force_rollback=True):
        result = write_events(conn, [BufferedEvent(ev, "train", partition=0, offset=1)])
        assert result.inserted == 1, result
        row = conn.execute(
            "SELECT user_id, app, kind, occurred_at, payload, meta::text FROM events WHERE event_id = %s",
            (ev.event_id,),
        ).fetchone()
    assert row is not None
    user_id, app, kind, occurred_at, payload, meta_text = row
    assert (user_id, app, kind) == (ev.user_id, ev.app, ev.kind)
    assert occurred_at == ev.occurred_at  # the same instant (aware datetimes compare as instants)
    assert payload == ev.payload
    if ev.meta is None:
        assert meta_text is None
    else:
        stored = json.loads(meta_text, parse_float=Decimal, parse_int=Decimal)
        assert stored == _numbers_exact(ev.meta)


@PROPERTY
@given(schema_events(timestamps=timestamps(separators="Tt"), meta=METAS))
def test_schema_valid_events_are_accepted_and_stored_unchanged(conn, obj):
    assert SCHEMA_VALIDATOR.is_valid(obj), next(iter(SCHEMA_VALIDATOR.iter_errors(obj)))
    result = validate(obj)
    if isinstance(result, Rejected):
        # Only the service's rules beyond the schema (documented in it) refuse a schema-valid event.
        assert set(result.codes) <= {*SERVICE_ONLY_CODES, "too_long", "too_large", "invalid_value"}, result
        event(f"rejected {sorted(set(result.codes))}")
        return
    _stored_as_given(conn, result)
    offset = result.occurred_at.utcoffset()
    event(
        "stored, |offset| > 15:59" if offset is not None and abs(offset.total_seconds()) > 16 * 3600 - 60 else "stored"
    )


@PROPERTY
@given(mutated_events())
def test_mutated_events_are_refused_or_stored_unchanged(conn, obj):
    result = validate(obj)
    if isinstance(result, Event):
        _stored_as_given(conn, result)
        event("stored")
    else:
        event("rejected")


@pytest.mark.parametrize(
    "ts",
    [
        "1900-01-01T00:00:00Z",
        "1900-01-01T23:59:00+23:59",
        "9998-12-31T23:59:59.999999Z",
        "9998-12-31T00:00:01-23:59",
        "2026-03-01T12:00:00+15:59",
        "2026-03-01T12:00:00-15:59",
        "2026-03-01T12:00:00+16:00",
        "2026-03-01T12:00:00+23:59",
        "2026-03-01T12:00:00-23:59",
        "2026-03-01T12:00:00.123456789+05:30",
    ],
)
def test_occurred_at_edges_are_stored_as_the_same_instant(conn, ts):
    ev = validate(
        {
            "event_id": "0b8e8a2e-5a55-4f0e-9d43-1f9a1b8f5a11",
            "user_id": "edge-user",
            "occurred_at": ts,
            "kind": "message",
            "app": "mail",
            "text": "hi",
            "meta": {"big": 2**64 - 1, "small": -(2**63), "f": 1.5e300, "tiny": 5e-324, "s": "é😀\\u0000"},
        }
    )
    assert isinstance(ev, Event), ev
    _stored_as_given(conn, ev)
