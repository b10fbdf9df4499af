"""interaction.v1 validation: one specific reason per mistake, and agreement with the published JSON Schema.

Plus what storage needs beyond the schema (PostgreSQL text/jsonb/timestamptz through psycopg, orjson for jsonb):
validate never raises and never accepts what storage would refuse or change."""

from __future__ import annotations

import collections
import datetime as dt
import enum
import json
import math
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from pipeline.config import SCHEMAS_DIR
from pipeline.domain import events as events_module
from pipeline.domain.events import (
    MAX_META_DEPTH,
    OCCURRED_AT_MAX,
    OCCURRED_AT_MIN,
    Event,
    EventLimits,
    Rejected,
    check_key,
    normalize_event_id,
    parse_timestamp,
    split_of,
    validate,
)

SCHEMA = json.loads((SCHEMAS_DIR / "events" / "interaction.v1.json").read_text())
SCHEMA_VALIDATOR = Draft202012Validator(SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER)


def base(kind: str = "message", **kw):
    ev = {
        "event_id": "0b8e8a2e-5a55-4f0e-9d43-1f9a1b8f5a11",
        "user_id": "alice@example.com",
        "occurred_at": "2026-03-01T12:00:00Z",
        "kind": kind,
        "app": "mail",
    }
    ev.update(
        {
            "message": {"text": "hello"},
            "feedback": {"prompt": "p", "completion": "c", "rating": 1},
            "preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
            "edit": {"prompt": "p", "original": "o", "edited": "e"},
        }.get(kind, {"text": "x"})
    )
    ev.update(kw)
    return ev


def without(ev, *names):
    return {k: v for k, v in ev.items() if k not in names}


def nested(levels: int, leaf: Any = 1, key: str | None = None) -> Any:
    """``levels`` nested arrays (or objects under ``key``) around ``leaf``: nested(2) == [[1]]."""
    value = leaf
    for _ in range(levels):
        value = [value] if key is None else {key: value}
    return value


def meta_of_depth(depth: int) -> dict:
    """A meta object ``depth`` levels deep (meta itself is level 1): meta_of_depth(2) == {"a": [1]}."""
    return {"a": nested(depth - 1)}


VALID = [
    base(),
    base(prompt="context it answered"),
    base("feedback"),
    base("feedback", rating=-1),
    base("feedback", rating=0),
    base("preference"),
    base("edit"),
    base(meta={"client": "ios", "n": 3}),
    base(event_id="01ARZ3NDEKTSV4RRFFQ69G5FAV"),
    base(event_id="01arz3ndektsv4rrffq69g5fav"),
    base(occurred_at="2026-03-01T12:00:00.123456789+05:30"),
    base(occurred_at="2026-03-01t12:00:00z"),
    base(user_id="a" * 128),
    base(user_id="A.b_c:d@e-f"),
    base(text="é" * 100),
    base(text="emoji 😀 and CJK 漢字"),
    base(occurred_at="2026-03-01T12:00:00+23:59"),  # PostgreSQL alone takes ±15:59; storage writes UTC
    base(occurred_at="2026-03-01T12:00:00-23:59"),
    base(occurred_at="2026-03-01T12:00:00+16:00"),
    base(occurred_at="1900-01-01T00:00:00Z"),  # the first instant allowed
    base(occurred_at="1899-12-31T23:59:59-00:01"),  # = 1900-01-01T00:00:59Z
    base(occurred_at="1900-01-01T23:59:00+23:59"),  # = 1900-01-01T00:00:00Z
    base(occurred_at="9998-12-31T23:59:59.999999999Z"),  # the last instant allowed (to the microsecond)
    base(occurred_at="9999-01-01T23:58:59+23:59"),  # = 9998-12-31T23:59:59Z
    base(meta=meta_of_depth(MAX_META_DEPTH)),
    base(meta={"deep": nested(MAX_META_DEPTH - 1, key="k")}),
    base(meta={"max": 2**64 - 1, "min": -(2**63), "f": 1.5e308, "tiny": 5e-324, "neg0": -0.0}),
    base(meta={"text": "\\u0000 is a backslash and u0000, not NUL", "nested": {"é 😀": [None, True, 1.0]}}),
    base(meta={}),
]

# (event, field, code): every schema violation gets its own reason.
INVALID = [
    (without(base(), "event_id"), "event_id", "missing"),
    (without(base(), "user_id"), "user_id", "missing"),
    (without(base(), "occurred_at"), "occurred_at", "missing"),
    (without(base(), "kind"), "kind", "missing"),
    (without(base(), "app"), "app", "missing"),
    (without(base(), "text"), "text", "missing"),
    (without(base("feedback"), "rating"), "rating", "missing"),
    (without(base("feedback"), "completion"), "completion", "missing"),
    (without(base("preference"), "chosen"), "chosen", "missing"),
    (without(base("preference"), "rejected"), "rejected", "missing"),
    (without(base("edit"), "edited"), "edited", "missing"),
    (without(base("edit"), "original"), "original", "missing"),
    (without(base("edit"), "prompt"), "prompt", "missing"),
    (base(event_id=12), "event_id", "type"),
    (base(event_id="not-a-uuid"), "event_id", "invalid_format"),
    (base(event_id="81ARZ3NDEKTSV4RRFFQ69G5FAV"), "event_id", "invalid_format"),  # ULID overflows 128 bits
    (base(event_id="01ARZ3NDEKTSV4RRFFQ69G5FAU"), "event_id", "invalid_format"),  # U is not Crockford base32
    (base(user_id=""), "user_id", "invalid_format"),
    (base(user_id="a" * 129), "user_id", "invalid_format"),
    (base(user_id="."), "user_id", "invalid_format"),  # a path segment: no object store key can hold it
    (base(user_id=".."), "user_id", "invalid_format"),
    (base(user_id="...."), "user_id", "invalid_format"),
    (base(user_id="bob smith"), "user_id", "invalid_format"),
    (base(user_id="bob/../x"), "user_id", "invalid_format"),
    (base(user_id=7), "user_id", "type"),
    (base(occurred_at="2026-03-01 noon"), "occurred_at", "invalid_format"),
    (base(occurred_at="2026-03-01T12:00:00"), "occurred_at", "invalid_format"),  # no offset
    (base(occurred_at="2026-13-01T12:00:00Z"), "occurred_at", "invalid_format"),  # month 13
    (base(occurred_at=1700000000), "occurred_at", "type"),
    (base(occurred_at="2026-03-01T12:00:00+00:60"), "occurred_at", "invalid_format"),  # minute 60
    (base(occurred_at="2026-03-01T12:00:00+00:99"), "occurred_at", "invalid_format"),  # Python reads it as 1h39
    (base(occurred_at="2026-03-01T12:00:00+24:00"), "occurred_at", "invalid_format"),
    (base(occurred_at="0000-01-01T00:00:00Z"), "occurred_at", "invalid_format"),  # no year 0
    (base(occurred_at="0001-01-01T00:00:00+05:00"), "occurred_at", "out_of_range"),  # year 0 in UTC
    (base(occurred_at="0001-01-01T00:00:00Z"), "occurred_at", "out_of_range"),
    (base(occurred_at="1899-12-31T23:59:59Z"), "occurred_at", "out_of_range"),
    (base(occurred_at="1900-01-01T05:29:59+05:30"), "occurred_at", "out_of_range"),  # = 1899-12-31T23:59:59Z
    (base(occurred_at="9999-01-01T00:00:00Z"), "occurred_at", "out_of_range"),
    (base(occurred_at="9998-12-31T23:00:00-01:00"), "occurred_at", "out_of_range"),  # = 9999-01-01T00:00:00Z
    (base(occurred_at="9999-12-31T23:59:59-23:59"), "occurred_at", "out_of_range"),  # beyond datetime.max in UTC
    (base(occurred_at=None), "occurred_at", "type"),
    (base(occurred_at=["2026-03-01T12:00:00Z"]), "occurred_at", "type"),
    (base(kind="shout"), "kind", "unknown_kind"),
    (base(kind="Message"), "kind", "unknown_kind"),
    (dict(base(), kind=None), "kind", "type"),
    (dict(base(), kind=["message"]), "kind", "type"),
    (dict(base(), kind={"message": 1}), "kind", "type"),
    (dict(base(), kind=1), "kind", "type"),
    (dict(base(), kind=True), "kind", "type"),
    (dict(base(), kind=nested(100)), "kind", "type"),
    (base(event_id=None), "event_id", "type"),
    (base(event_id={"id": 1}), "event_id", "type"),
    (base(user_id=["alice"]), "user_id", "type"),
    (base(user_id=None), "user_id", "type"),
    (base(app={"id": "mail"}), "app", "type"),
    (base(app=1.5), "app", "type"),
    (base(prompt=["context"]), "prompt", "type"),
    (base(text=None), "text", "type"),
    (base(text={"t": "x"}), "text", "type"),
    (base("feedback", prompt=7), "prompt", "type"),
    (base("feedback", completion=[]), "completion", "type"),
    (base("feedback", rating=[1]), "rating", "invalid_value"),
    (base("feedback", rating=None), "rating", "invalid_value"),
    (base("preference", chosen=None), "chosen", "type"),
    (base("preference", rejected=1.5), "rejected", "type"),
    (base("edit", original=True), "original", "type"),
    (base("edit", edited={"a": "b"}), "edited", "type"),
    (base(meta=[1]), "meta", "type"),
    (base(meta=None), "meta", "type"),
    (base(meta=meta_of_depth(MAX_META_DEPTH + 1)), "meta", "too_deep"),
    (base(meta={"deep": nested(MAX_META_DEPTH, key="k")}), "meta", "too_deep"),
    (base(meta=meta_of_depth(200)), "meta", "too_deep"),
    (base(meta={"k\x00": 1}), "meta", "invalid_character"),
    (base(meta={"a": ["x\x00"]}), "meta", "invalid_character"),
    (base(app=""), "app", "invalid_format"),
    (base(app="my app"), "app", "invalid_format"),
    (base(app=["mail"]), "app", "type"),
    (base(meta="x"), "meta", "type"),
    (base(surprise=1), "surprise", "unknown_field"),
    (base(rating=1), "rating", "unknown_field"),  # a field of another kind
    (base("feedback", text="t"), "text", "unknown_field"),
    (base("feedback", rating=2), "rating", "invalid_value"),
    (base("feedback", rating=True), "rating", "invalid_value"),
    (base("feedback", rating=1.5), "rating", "invalid_value"),
    (base("feedback", rating="1"), "rating", "invalid_value"),
    (base(text=""), "text", "empty"),
    (base(text=5), "text", "type"),
    (base(text="x" * 16385), "text", "too_long"),
    (base(text="hi\x00there"), "text", "invalid_character"),
]


SERVICE_ONLY_CODES = ("invalid_character", "too_deep", "out_of_range")


class Color(enum.Enum):
    RED = "red"


_cycle: dict = {}
_cycle["self"] = _cycle

# What only a Python caller (the producer SDK) can send, or what JSON decoders other than orjson produce (json.loads
# reads lone surrogate escapes, NaN and integers of any size): validate must still answer with a reason.
INVALID_PYTHON_ONLY = [
    (base(text="lone \ud800 surrogate"), "text", "invalid_character"),
    (base(prompt="\udfff"), "prompt", "invalid_character"),
    (base("feedback", completion="a\ud83d"), "completion", "invalid_character"),  # half of a pair
    (base("edit", edited="\ud83d\ude00"), "edited", "invalid_character"),  # a pair as 2 code points
    (base(meta={"a": "\ud800"}), "meta", "invalid_character"),
    (base(meta={"\udc00": 1}), "meta", "invalid_character"),
    (base(meta={"a": [{"b": "x\ud800"}]}), "meta", "invalid_character"),
    (base(meta={"big": 2**64}), "meta", "out_of_range"),
    (base(meta={"a": [-(2**63) - 1]}), "meta", "out_of_range"),
    (base(meta={"huge": 10**5000}), "meta", "out_of_range"),  # beyond Python's int -> str limit, too
    (base(meta={"nan": math.nan}), "meta", "invalid_value"),
    (base(meta={"inf": [math.inf]}), "meta", "invalid_value"),
    (base(meta={"x": -math.inf}), "meta", "invalid_value"),
    (base(meta={1: "int key"}), "meta", "type"),
    (base(meta={"a": {(1, 2): "tuple key"}}), "meta", "type"),
    (base(meta={"s": {1, 2}}), "meta", "type"),
    (base(meta={"b": b"bytes"}), "meta", "type"),
    (base(meta={"d": dt.datetime(2026, 1, 1)}), "meta", "type"),
    (base(meta={"u": uuid.UUID(int=1)}), "meta", "type"),
    (base(meta={"e": Color.RED}), "meta", "type"),
    (base(meta={"o": object()}), "meta", "type"),
    (base(meta=_cycle), "meta", "too_deep"),
    (base(meta=meta_of_depth(2000)), "meta", "too_deep"),
    (dict(base(), kind=nested(5000)), "kind", "type"),  # repr() alone would raise RecursionError
    (base(event_id=nested(5000)), "event_id", "type"),
    (base(event_id=10**5000), "event_id", "type"),  # repr() alone would raise ValueError
    (base("feedback", rating=10**5000), "rating", "invalid_value"),
    (base("feedback", rating=math.nan), "rating", "invalid_value"),
    (base("feedback", rating=math.inf), "rating", "invalid_value"),
    (dict(base(), kind=frozenset({"message"})), "kind", "type"),
    (base(user_id=uuid.UUID(int=1)), "user_id", "type"),
]


@pytest.mark.parametrize("ev", VALID)
def test_valid_events_pass(ev):
    result = validate(ev)
    assert isinstance(result, Event), result
    assert SCHEMA_VALIDATOR.is_valid(ev), list(SCHEMA_VALIDATOR.iter_errors(ev))


@pytest.mark.parametrize(("ev", "field", "code"), INVALID)
def test_invalid_events_get_their_specific_reason(ev, field, code):
    result = validate(ev)
    assert isinstance(result, Rejected)
    assert (field, code) in [(r.field, r.code) for r in result.reasons], result.reasons
    assert all(r.message for r in result.reasons)


@pytest.mark.parametrize(("ev", "field", "code"), INVALID)
def test_json_schema_agrees_on_invalid(ev, field, code):
    # NUL characters, meta depth and the occurred_at range are service rules on top of the schema (documented in the
    # schema's descriptions).
    if code in SERVICE_ONLY_CODES:
        pytest.skip("service-only rule")
    assert not SCHEMA_VALIDATOR.is_valid(ev)


def test_integral_float_rating_is_the_integer():
    ev = validate(base("feedback", rating=-1.0))
    assert isinstance(ev, Event) and ev.payload["rating"] == -1 and type(ev.payload["rating"]) is int


def test_byte_bound_counts_utf8_bytes_and_is_configurable():
    limits = EventLimits(max_text_bytes=10)
    assert isinstance(validate(base(text="é" * 5), limits), Event)  # 10 bytes
    rejected = validate(base(text="é" * 6), limits)  # 12 bytes, 6 characters
    assert isinstance(rejected, Rejected)
    assert rejected.reasons[0].code == "too_long" and "12 bytes" in rejected.reasons[0].message


def test_meta_bound():
    rejected = validate(base(meta={"blob": "x" * 5000}))
    assert isinstance(rejected, Rejected) and rejected.codes == ["too_large"]
    assert isinstance(validate(base(meta={"blob": "x" * 5000}), EventLimits(max_meta_bytes=10000)), Event)


def test_every_reason_is_reported_not_just_the_first():
    rejected = validate({"kind": "feedback", "text": "x", "rating": 9})
    assert isinstance(rejected, Rejected)
    got = {(r.field, r.code) for r in rejected.reasons}
    assert {
        ("event_id", "missing"),
        ("user_id", "missing"),
        ("text", "unknown_field"),
        ("rating", "invalid_value"),
        ("prompt", "missing"),
    } <= got


@pytest.mark.parametrize("obj", [[], "x", 3, None])
def test_non_objects(obj):
    result = validate(obj)
    assert isinstance(result, Rejected) and result.codes == ["not_object"]


def test_event_ids_are_canonical():
    u = uuid.uuid4()
    assert normalize_event_id(str(u).upper()) == str(u)
    assert normalize_event_id("01arz3ndektsv4rrffq69g5fav") == "01ARZ3NDEKTSV4RRFFQ69G5FAV"
    ev = validate(base(event_id=str(u).upper()))
    assert isinstance(ev, Event) and ev.event_id == str(u)


def test_round_trip_through_wire_form():
    ev = validate(base("preference", meta={"a": 1}))
    assert isinstance(ev, Event)
    again = validate(json.loads(json.dumps(ev.as_dict())))
    assert again == ev


def test_timestamps():
    t = parse_timestamp("2026-03-01T12:00:00.1234567+02:00")
    assert t is not None and t.microsecond == 123456 and t.utcoffset().total_seconds() == 7200
    assert parse_timestamp("2026-02-30T00:00:00Z") is None


def test_key_must_be_user_id():
    ev = validate(base())
    assert isinstance(ev, Event)
    assert check_key(ev, b"alice@example.com") is None
    assert check_key(ev, None).code == "missing_key"
    assert check_key(ev, b"bob").code == "key_mismatch"
    assert check_key(ev, b"\xff").code == "key_mismatch"


def test_split_is_fixed_and_near_the_fraction():
    ids = [str(uuid.UUID(int=i)) for i in range(20000)]
    splits = [split_of("u1", i, 0.2) for i in ids]
    assert splits == [split_of("u1", i, 0.2) for i in ids]  # deterministic
    share = splits.count("holdout") / len(splits)
    assert 0.18 < share < 0.22
    assert all(split_of("u1", i, 0.0) == "train" for i in ids[:100])
    # A pinned value: the split must never change between releases.
    assert split_of("alice", "0b8e8a2e-5a55-4f0e-9d43-1f9a1b8f5a11", 0.2) == split_of(
        "alice", "0b8e8a2e-5a55-4f0e-9d43-1f9a1b8f5a11", 0.2
    )


# --- what storage needs beyond the schema ------------------------------------------------------------------------


def assert_storable(ev: Event, limits: EventLimits = EventLimits()) -> None:
    """What storage does with an accepted event cannot fail: orjson for payload and meta (jsonb), UTF-8 without NUL
    for text columns, occurred_at in UTC within PostgreSQL's and Python's range, and the wire form round-trips."""
    for value in (ev.event_id, ev.user_id, ev.app, ev.kind):
        assert isinstance(value, str) and "\x00" not in value
        value.encode()
    payload = orjson.dumps(ev.payload)
    assert b"\\u0000" not in payload
    if ev.meta is not None:
        meta = orjson.dumps(ev.meta)
        assert len(meta) <= limits.max_meta_bytes
        assert orjson.loads(meta) == ev.meta  # nothing changed on the way (no NaN -> null, no tuple)
        assert depth_of(ev.meta) <= limits.max_meta_depth
    utc = ev.occurred_at.astimezone(dt.UTC)
    assert OCCURRED_AT_MIN <= utc < OCCURRED_AT_MAX
    wire = orjson.dumps(ev.as_dict())
    again = validate(orjson.loads(wire), limits, raw=wire)
    assert again == ev, again


def depth_of(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((depth_of(v) for v in value.values()), default=0)
    if isinstance(value, (list, tuple)):
        return 1 + max((depth_of(v) for v in value), default=0)
    return 0


def assert_reasons_encodable(result: Rejected) -> None:
    """Reasons go back to clients as JSON (ingest API) and into Kafka headers (DLQ): orjson must encode them."""
    assert result.reasons
    encoded = orjson.dumps([r.as_dict() for r in result.reasons])
    for r in orjson.loads(encoded):
        assert set(r) == {"field", "code", "message"} and all(isinstance(v, str) for v in r.values())
        assert r["code"] and r["message"] and len(r["message"]) < 1000 and len(r["field"]) <= 64


@pytest.mark.parametrize("ev", VALID)
def test_valid_events_are_storable(ev):
    result = validate(ev)
    assert isinstance(result, Event)
    assert_storable(result)


@pytest.mark.parametrize(
    ("ev", "field", "code"),
    INVALID + INVALID_PYTHON_ONLY,
    ids=[f"{f}-{c}" for _, f, c in INVALID + INVALID_PYTHON_ONLY],
)
def test_any_value_gets_a_reason_never_an_exception(ev, field, code):
    result = validate(ev)
    assert isinstance(result, Rejected)
    assert (field, code) in [(r.field, r.code) for r in result.reasons], result.reasons
    assert_reasons_encodable(result)


@pytest.mark.parametrize(("ev", "field", "code"), INVALID)
def test_the_consumer_path_gives_the_same_reasons(ev, field, code):
    """With ``raw`` (the buffer consumer), the same answer as without: the fast path for meta skips nothing."""
    raw = orjson.dumps(ev)
    with_raw = validate(orjson.loads(raw), raw=raw)
    assert isinstance(with_raw, Rejected)
    assert with_raw.reasons == validate(orjson.loads(raw)).reasons


def test_kind_of_a_wrong_json_type_says_so():
    for kind, name in ((["message"], "array"), ({"k": 1}, "object"), (3, "number"), (None, "null"), (True, "boolean")):
        result = validate(dict(base(), kind=kind))
        assert isinstance(result, Rejected) and result.codes == ["type"], result
        assert f"got {name}" in result.reasons[0].message


def test_meta_depth_limit():
    limit = EventLimits().max_meta_depth
    assert limit == MAX_META_DEPTH == 32
    assert isinstance(validate(base(meta=meta_of_depth(limit))), Event)
    rejected = validate(base(meta=meta_of_depth(limit + 1)))
    assert isinstance(rejected, Rejected) and rejected.codes == ["too_deep"]
    assert "32 levels" in rejected.reasons[0].message and rejected.reasons[0].message.startswith("meta.a[0]")
    # configurable (within what orjson can encode inside an event)
    assert isinstance(validate(base(meta={"a": {"b": 1}}), EventLimits(max_meta_depth=2)), Event)
    assert validate(base(meta={"a": {"b": []}}), EventLimits(max_meta_depth=2)).codes == ["too_deep"]
    for bad in (0, 201):
        with pytest.raises(ValueError, match="max_meta_depth"):
            EventLimits(max_meta_depth=bad)


@pytest.mark.parametrize("depth", [1, 2, MAX_META_DEPTH - 1, MAX_META_DEPTH])
def test_meta_fast_path_is_taken_up_to_the_limit(depth, monkeypatch):
    """The consumer's fast path (``raw`` small, few brackets) skips re-encoding meta, up to the depth limit."""
    ev = base(meta=meta_of_depth(depth))
    raw = orjson.dumps(ev)

    def fail(*_a):
        raise AssertionError("the slow path was taken")

    monkeypatch.setattr(events_module, "_check_meta", fail)
    assert isinstance(validate(orjson.loads(raw), raw=raw), Event)


@pytest.mark.parametrize("levels", [MAX_META_DEPTH + 1, 100, 1000])
def test_meta_fast_path_still_enforces_the_depth(levels):
    # 1000 levels: within orjson.loads' own limit (1024) and the default meta bound (4 KiB)
    raw = b'{"event_id":"0b8e8a2e-5a55-4f0e-9d43-1f9a1b8f5a11","user_id":"u","occurred_at":"2026-03-01T12:00:00Z",'
    raw += b'"kind":"message","app":"mail","text":"x","meta":{"a":' + b"[" * (levels - 1) + b"]" * (levels - 1) + b"}}"
    assert len(raw) <= 4096
    result = validate(orjson.loads(raw), raw=raw)
    assert isinstance(result, Rejected) and result.codes == ["too_deep"]


def test_meta_fast_path_with_brackets_in_strings_falls_back_to_the_exact_check():
    ev = base(meta={"s": "[[[[{{{{" * 10})
    raw = orjson.dumps(ev)
    assert isinstance(validate(orjson.loads(raw), raw=raw), Event)


def test_meta_integers_within_64_bits_pass_beyond_do_not():
    assert isinstance(validate(base(meta={"a": 2**64 - 1, "b": -(2**63)})), Event)
    for big in (2**64, -(2**63) - 1, 10**30):
        result = validate(base(meta={"a": [big]}))
        assert isinstance(result, Rejected) and result.codes == ["out_of_range"]
        assert "meta.a[0]" in result.reasons[0].message
    # orjson.loads (the API and the consumer) reads integers beyond 64 bits as floats: accepted, stored as numbers
    obj = orjson.loads(b'{"a": 123456789012345678901234567890}')
    assert isinstance(validate(base(meta=obj)), Event)


def test_python_callers_may_use_what_is_written_as_plain_json():
    """Tuples, subclasses of dict, str and int (IntEnum, StrEnum) in meta are accepted: orjson writes them as the
    JSON they stand for. Keys must be plain strings (orjson writes no other)."""

    class Level(enum.IntEnum):
        HIGH = 2

    class Tag(enum.StrEnum):
        A = "a"

    meta = {"t": (1, 2), "o": collections.OrderedDict(x=1), "i": Level.HIGH, "s": Tag.A, "d": {"k": [Tag.A]}}
    ev = validate(base(meta=meta))
    assert isinstance(ev, Event), ev
    assert orjson.loads(orjson.dumps(ev.meta)) == {"t": [1, 2], "o": {"x": 1}, "i": 2, "s": "a", "d": {"k": ["a"]}}
    result = validate(base(meta={Tag.A: 1}))
    assert isinstance(result, Rejected) and result.codes == ["type"] and "plain string" in result.reasons[0].message


def test_surrogates_are_refused_with_where_they_are():
    result = validate(base(text="ab\ud800c"))
    assert isinstance(result, Rejected) and result.codes == ["invalid_character"]
    assert "U+D800" in result.reasons[0].message and "character 2" in result.reasons[0].message
    result = validate(base(meta={"x": [1, {"y\udc00": 2}]}))
    assert isinstance(result, Rejected) and result.codes == ["invalid_character"]
    assert result.reasons[0].message.startswith("meta.x[1]")
    # a well-formed pair (one code point) is fine
    assert isinstance(validate(base(text=json.loads('"\\ud83d\\ude00"'), meta={"e": "😀"})), Event)


def test_nul_escape_check_in_meta_is_exact():
    assert isinstance(validate(base(meta={"path": "C:\\u0000"})), Event)  # backslash, then "u0000"
    assert isinstance(validate(base(meta={"path": "C:\\\\u0000"})), Event)
    assert validate(base(meta={"a": "\\\x00"})).codes == ["invalid_character"]  # backslash, then NUL
    raw = orjson.dumps(base(meta={"path": "C:\\u0000"}))
    assert isinstance(validate(orjson.loads(raw), raw=raw), Event)


def test_occurred_at_range_edges_and_astimezone_never_raises():
    for ts in (
        "0001-01-01T00:00:00+23:59",
        "0001-01-01T00:00:00-23:59",
        "9999-12-31T23:59:59.999999+23:59",
        "9999-12-31T23:59:59.999999-23:59",
        "1899-12-31T23:59:59.999999Z",
        "9999-01-01T00:00:00.000001+00:00",
    ):
        result = validate(base(occurred_at=ts))
        assert isinstance(result, Rejected) and result.codes == ["out_of_range"], (ts, result)
        assert "1900-01-01T00:00:00Z" in result.reasons[0].message
    for ts in (
        "1900-01-01T00:00:00Z",
        "1900-01-01T23:59:00+23:59",
        "9998-12-31T23:59:59.999999Z",
        "9998-12-31T00:00:01-23:59",
    ):
        ev = validate(base(occurred_at=ts))
        assert isinstance(ev, Event), (ts, ev)
        assert OCCURRED_AT_MIN <= ev.occurred_at.astimezone(dt.UTC) < OCCURRED_AT_MAX


def test_odd_field_names_are_reported_as_encodable_fields():
    result = validate(base(**{"\ud800": 1, "x" * 1000: 2, "a\nb": 3, "ok_name": 4}))
    assert isinstance(result, Rejected)
    assert_reasons_encodable(result)
    fields = [r.field for r in result.reasons]
    assert "ok_name" in fields and "'a\\nb'" in fields
    assert all(len(f) <= 64 for f in fields)


# --- property: any JSON value, any mutation of an event ------------------------------------------------------------

# Strings with what storage refuses: NUL, lone surrogates (hypothesis leaves out category Cs by default).
_chars = st.characters(exclude_categories=()) | st.sampled_from(["\x00", "\ud800", "\udfff", "é", "😀", "\\", '"'])
_text = st.text(_chars, max_size=12)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**64 + 2)
    | st.integers(min_value=-(2**63) - 2, max_value=-(2**63) + 2)
    | st.floats()
    | _text
)
JSON_VALUES = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4), max_leaves=20
)


def _deep(depth: int, leaf: Any) -> Any:
    return nested(depth, leaf)


@st.composite
def timestamps(draw, offsets: st.SearchStrategy[int] | None = None, separators: str = "Tt ") -> str:
    """RFC 3339 timestamps over the whole of years 1..9999 (the edges often), any fraction and offset; ``offsets``
    (minutes east of UTC) defaults to -23:59..+23:59. The JSON Schema's date-time format refuses the " " separator
    that its pattern (and the service) allow: pass ``separators="Tt"`` for schema-valid ones."""
    edge = st.sampled_from([1, 2, 1899, 1900, 1901, 9997, 9998, 9999])
    when = draw(
        st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31, 23, 59, 59, 999999))
        | st.builds(lambda d, y: d.replace(year=y), st.datetimes().filter(lambda d: (d.month, d.day) != (2, 29)), edge)
        | st.sampled_from([dt.datetime(1900, 1, 1), dt.datetime(9998, 12, 31, 23, 59, 59, 999999)])
    )
    digits = draw(st.integers(0, 9))
    frac = "" if digits == 0 else "." + f"{when.microsecond:06d}{draw(st.integers(0, 999)):03d}"[:digits]
    any_offset = st.integers(-(24 * 60 - 1), 24 * 60 - 1)
    edges = st.sampled_from([0, 330, -480, 15 * 60 + 59, -(15 * 60 + 59), 16 * 60, -16 * 60, 1439, -1439])
    minutes = draw(
        offsets if offsets is not None else any_offset | edges | st.integers(16 * 60, 1439).map(lambda m: -m)
    )
    if minutes == 0 and draw(st.booleans()):
        zone = draw(st.sampled_from(["Z", "z"]))
    else:
        zone = f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    sep = draw(st.sampled_from(["T", *separators]))
    return (
        f"{when.year:04d}-{when.month:02d}-{when.day:02d}{sep}{when.hour:02d}:{when.minute:02d}:{when.second:02d}"
        f"{frac}{zone}"
    )


@st.composite
def mutated_events(draw) -> Any:
    """Events that are mostly right: kind-specific fields with odd text (NUL, surrogates), odd meta, any timestamp,
    and then a few fields set to any JSON value (deep ones too) or added."""
    kind = draw(st.sampled_from(["message", "feedback", "preference", "edit"]))
    ev = base(kind)
    if draw(st.booleans()):
        ev["meta"] = draw(st.dictionaries(_text, JSON_VALUES, max_size=3))
    if draw(st.booleans()):
        ev["occurred_at"] = draw(timestamps())
    for name in ("text", "prompt", "completion", "chosen", "rejected", "original", "edited"):
        if name in ev and draw(st.integers(0, 3)) == 0:
            ev[name] = draw(_text)
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from([*ev.keys(), "meta", "rating", "prompt", "text"]) | _text)
        ev[name] = draw(
            JSON_VALUES
            | st.builds(_deep, st.integers(1, 300), JSON_VALUES)
            | st.builds(lambda d, v: {"a": _deep(d, v)}, st.integers(MAX_META_DEPTH - 2, MAX_META_DEPTH + 2), _scalars)
            | st.sampled_from(["message", "feedback", "2026-03-01T12:00:00+23:59", "0001-01-01T00:00:00+01:00"])
        )
    return ev


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_events(), JSON_VALUES))
def test_validate_never_raises_and_accepts_only_storable_events(obj):
    result = validate(obj)
    if isinstance(result, Event):
        assert_storable(result)
    else:
        assert_reasons_encodable(result)
    # The consumer's path (raw bytes from orjson.loads) gives the same answer.
    try:
        raw = orjson.dumps(obj)
        decoded = orjson.loads(raw)
    except (orjson.JSONEncodeError, orjson.JSONDecodeError):
        return  # not JSON (surrogates, NaN, too deep for orjson, big ints): cannot reach the consumer
    with_raw = validate(decoded, raw=raw)
    without_raw = validate(decoded)
    assert with_raw == without_raw
