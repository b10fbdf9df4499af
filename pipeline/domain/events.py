"""The ``interaction.v1`` event: validation with machine-readable reasons, and the fixed holdout split.

Pure logic: no I/O. The published contract is schemas/events/interaction.v1.json; this validator implements it
by hand because it is on the ingest hot path (a few microseconds an event, against ~100 for a generic JSON Schema
validator) and because it gives one specific reason per mistake. tests/unit/domain/test_events.py checks that both
agree on every case.

On top of the schema, the service refuses what storage could not keep as it is (PostgreSQL ``text``/``jsonb``/
``timestamptz`` columns written through psycopg, ``meta`` and the payload serialized with orjson): NUL characters
and lone surrogates (U+D800..U+DFFF) in any string or ``meta`` key, ``meta`` nested deeper than
``EventLimits.max_meta_depth``, ``meta`` integers outside 64 bits, non-finite numbers and non-JSON values in
``meta`` (from Python callers), and ``occurred_at`` outside [OCCURRED_AT_MIN, OCCURRED_AT_MAX). ``validate`` never
raises, whatever value it is given: every mistake is a Reason.
"""

from __future__ import annotations

import hashlib
import re
import reprlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import orjson

SCHEMA_VERSION: Final = "interaction.v1"
KINDS: Final = ("message", "feedback", "preference", "edit")
Kind = Literal["message", "feedback", "preference", "edit"]
Split = Literal["train", "holdout"]

COMMON_FIELDS: Final = ("event_id", "user_id", "occurred_at", "kind", "app", "meta")
#: Required and optional payload fields by kind (schemas/events/interaction.v1.json).
KIND_FIELDS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "message": (("text",), ("prompt",)),
    "feedback": (("prompt", "completion", "rating"), ()),
    "preference": (("prompt", "chosen", "rejected"), ()),
    "edit": (("prompt", "original", "edited"), ()),
}
TEXT_FIELDS: Final = frozenset({"text", "prompt", "completion", "chosen", "rejected", "original", "edited"})
ALL_FIELDS: Final = frozenset(COMMON_FIELDS) | TEXT_FIELDS | {"rating"}
_ALLOWED: Final = {k: frozenset(COMMON_FIELDS) | frozenset(r) | frozenset(o) for k, (r, o) in KIND_FIELDS.items()}
_PAYLOAD_FIELDS: Final = {k: (*r, *o) for k, (r, o) in KIND_FIELDS.items()}

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# A ULID is 26 Crockford base32 characters; the first is at most 7 so the value fits in 128 bits.
_ULID = re.compile(r"[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}")
_USER_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_DOTS = re.compile(r"\.+")
_APP = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# RFC 3339: the offset is hh:mm with hh 00..23 and mm 00..59 (Python alone would read "+00:99" as 1 h 39 min).
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])"
)

#: The deepest nesting of ``meta`` allowed by default: ``meta`` itself is level 1 and each object or array inside it
#: one level more, so ``{"a": {"b": [1]}}`` is 3 levels. Real metadata needs a handful; orjson, which writes meta
#: to PostgreSQL, stops at 255.
MAX_META_DEPTH: Final = 32
#: The most ``EventLimits.max_meta_depth`` may be: orjson encodes at most 254 levels, and the event object that holds
#: ``meta`` on the wire is one more.
_MAX_META_DEPTH_BOUND: Final = 200
#: ``occurred_at`` must lie in [OCCURRED_AT_MIN, OCCURRED_AT_MAX) as an instant, whatever its offset: PostgreSQL's
#: ``timestamptz``, psycopg and Python's ``datetime`` (``astimezone(UTC)`` included) handle every instant of it.
OCCURRED_AT_MIN: Final = datetime(1900, 1, 1, tzinfo=UTC)
OCCURRED_AT_MAX: Final = datetime(9999, 1, 1, tzinfo=UTC)
# Integers orjson encodes: signed or unsigned 64 bits.
_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1
_INF: Final = float("inf")
# A JSON \u0000 escape that is not itself an escaped backslash followed by "u0000".
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


@dataclass(frozen=True, slots=True)
class EventLimits:
    """Bounds applied to every event (configured by EventSettings; ``max_meta_depth`` is fixed by default)."""

    max_text_bytes: int = 16384
    max_meta_bytes: int = 4096
    #: The deepest nesting of ``meta`` (``meta`` itself is level 1), 1..200.
    max_meta_depth: int = MAX_META_DEPTH

    def __post_init__(self) -> None:
        if not 1 <= self.max_meta_depth <= _MAX_META_DEPTH_BOUND:
            raise ValueError(f"max_meta_depth must be in 1..{_MAX_META_DEPTH_BOUND}, got {self.max_meta_depth}")


@dataclass(frozen=True, slots=True)
class Reason:
    """Why an event was rejected: the offending ``field`` (dotted path, or ``""`` for the whole event), a stable
    machine-readable ``code`` and a human ``message`` naming the bad value and what is allowed."""

    field: str
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "code": self.code, "message": self.message}


@dataclass(frozen=True, slots=True)
class Event:
    """A valid interaction event. ``payload`` holds the kind-specific fields (text, prompt, rating, ...)."""

    event_id: str
    user_id: str
    occurred_at: datetime
    kind: str
    app: str
    payload: dict[str, Any]
    meta: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """The event as its JSON object (the canonical wire form)."""
        out: dict[str, Any] = {
            "event_id": self.event_id,
            "user_id": self.user_id,
            "occurred_at": self.occurred_at.isoformat(),
            "kind": self.kind,
            "app": self.app,
        }
        if self.meta is not None:
            out["meta"] = self.meta
        out.update(self.payload)
        return out


@dataclass(frozen=True, slots=True)
class Rejected:
    """An invalid event: the reasons, and whatever ids could be read (to report back to the sender)."""

    reasons: tuple[Reason, ...]
    event_id: str | None = None
    user_id: str | None = None

    @property
    def codes(self) -> list[str]:
        return [r.code for r in self.reasons]


@dataclass(slots=True)
class _Check:
    reasons: list[Reason] = field(default_factory=list)

    def add(self, field_: str, code: str, message: str) -> None:
        self.reasons.append(Reason(field_, code, message))


class _ShortRepr(reprlib.Repr):
    """repr() bounded in size and depth, that never raises (huge ints, deep or cyclic containers, broken __repr__)."""

    def repr_int(self, x: int, level: int) -> str:
        bits = x.bit_length()
        return repr(x) if bits <= 128 else f"<{'-' if x < 0 else ''}integer of {bits} bits>"


_REPR = _ShortRepr()
_REPR.maxlevel = 3
_REPR.maxstring = 64
_REPR.maxother = 64
_REPR.maxlong = 64


def _shorten(value: Any, n: int = 60) -> str:
    """A short, printable (non-ASCII escaped only where not printable) repr of any value, for messages."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a pathological object from a Python caller
        text = f"<{type(value).__name__}>"
    return text if len(text) <= n else text[: n - 3] + "..."


_JSON_TYPES: Final = {
    type(None): "null",
    bool: "boolean",
    int: "number",
    float: "number",
    str: "string",
    list: "array",
    tuple: "array",
    dict: "object",
}


def _json_type(value: Any) -> str:
    """The JSON type of ``value`` (``null``, ``boolean``, ``number``, ...), or its Python type name."""
    return _JSON_TYPES.get(type(value)) or type(value).__name__


def _field_name(name: Any) -> str:
    """``name`` as the ``field`` of a Reason: itself when it is a short printable string, else its short repr
    (so a reason can always be encoded as JSON, whatever key a client sent)."""
    if isinstance(name, str) and len(name) <= 64 and name.isprintable():
        return name
    return _shorten(name)


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode for UTF-8 (no lone surrogate); O(1) for ASCII strings."""
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _flat(meta: dict[Any, Any]) -> bool:
    """Whether no value of ``meta`` is an object or an array (so it is 1 level deep)."""
    for v in meta.values():
        if type(v) is dict or type(v) is list:
            return False
    return True


_PLAIN_SCALARS: Final = frozenset({str, bool, type(None)})


def _plain(value: Any, depth: int, max_depth: int) -> bool:
    """Whether ``value`` (a dict or list at nesting ``depth``) is plain JSON within bounds, judged by exact types:
    the quick yes of the common case. No says nothing yet: ``_meta_problem`` then finds the reason, or that there is
    none (a tuple, a subclass of str or dict, ...)."""
    if depth > max_depth:
        return False
    if type(value) is dict:
        for k in value:
            if type(k) is not str:
                return False
        value = value.values()
    for v in value:
        t = type(v)
        if t in _PLAIN_SCALARS:
            continue
        if t is int:
            if not _INT_MIN <= v <= _INT_MAX:
                return False
        elif t is float:
            if not -_INF < v < _INF:
                return False
        elif t is dict or t is list:
            if not _plain(v, depth + 1, max_depth):
                return False
        else:
            return False
    return True


def _meta_problem(value: Any, depth: int, max_depth: int) -> tuple[str, str, list[Any]] | None:
    """The first thing in ``value`` (a dict, list or tuple at nesting ``depth``) that keeps ``meta`` from being
    plain JSON that storage keeps as it is: (code, what is wrong, path to it reversed), or None.

    Strings are not looked at (orjson refuses lone surrogates and the NUL scan looks at the encoded form).
    Recursion is bounded by ``max_depth``, so a cyclic value is merely too deep."""
    if depth > max_depth:
        return ("too_deep", f"is nested more than {max_depth} levels deep", [])
    is_dict = isinstance(value, dict)
    for k, v in value.items() if is_dict else enumerate(value):
        if is_dict and type(k) is not str:  # orjson writes no other key, not even a subclass of str
            return ("type", f"has a key that is not a plain string: {_shorten(k)} (a Python {type(k).__name__})", [])
        t = type(v)
        if t is str or t is bool or v is None:
            continue
        if t is int or (isinstance(v, int) and not isinstance(v, bool)):
            if not _INT_MIN <= v <= _INT_MAX:
                return ("out_of_range", f"holds an integer beyond 64 bits ({_shorten(v)})", [k])
        elif t is float or isinstance(v, float):
            if not -_INF < v < _INF:
                return ("invalid_value", f"holds {v!r}, which is not a JSON number", [k])
        elif isinstance(v, (dict, list, tuple)):
            found = _meta_problem(v, depth + 1, max_depth)
            if found is not None:
                found[2].append(k)
                return found
        elif not isinstance(v, (str, bool)):
            return ("type", f"holds {_shorten(v)} (a Python {t.__name__}), which is not a JSON value", [k])
    return None


def _surrogate_in(value: Any, depth: int = 0) -> list[Any] | None:
    """The path (reversed) to a string or key of ``value`` holding a lone surrogate, or None."""
    if isinstance(value, str):
        return None if _encodable(value) else []
    if depth > _MAX_META_DEPTH_BOUND or not isinstance(value, (dict, list, tuple)):
        return None
    for k, v in value.items() if isinstance(value, dict) else enumerate(value):
        if isinstance(k, str) and not _encodable(k):
            return [k]
        found = _surrogate_in(v, depth + 1)
        if found is not None:
            found.append(k)
            return found
    return None


def _path(reversed_parts: list[Any]) -> str:
    """``meta.a[0]['b c']`` from the reversed path ``["b c", 0, "a"]`` (its end elided beyond 100 characters)."""
    out = "meta"
    for part in reversed(reversed_parts):
        if isinstance(part, str) and part.isidentifier() and part.isascii():
            out += "." + part
        else:
            out += f"[{_shorten(part, 40)}]"
        if len(out) > 100:
            return out[:97] + "..."
    return out


def _check_meta(chk: _Check, meta: dict[Any, Any], limits: EventLimits) -> None:
    """Everything ``meta`` must be beyond a JSON object (the slow path: ``meta`` encoded again)."""
    found = None if _plain(meta, 1, limits.max_meta_depth) else _meta_problem(meta, 1, limits.max_meta_depth)
    if found is not None:
        code, what, where = found
        chk.add("meta", code, f"{_path(where)} {what}" if where else f"meta {what}")
        return
    try:
        encoded = orjson.dumps(meta)
    except orjson.JSONEncodeError as e:  # after _meta_problem, a lone surrogate is all that orjson refuses
        spot = _surrogate_in(meta)
        if spot is None:  # not expected; still a reason, never an exception
            chk.add("meta", "type", f"meta cannot be encoded as JSON: {e}")
        else:
            chk.add(
                "meta",
                "invalid_character",
                f"{_path(spot)} contains a lone surrogate (U+D800..U+DFFF), which is not valid Unicode text",
            )
        return
    if b"\\u0000" in encoded and _NUL_ESCAPE.search(encoded):
        chk.add("meta", "invalid_character", "meta contains a NUL character (U+0000), which is not allowed")
    elif len(encoded) > limits.max_meta_bytes:
        chk.add("meta", "too_large", f"meta is {len(encoded)} bytes as JSON, at most {limits.max_meta_bytes} allowed")


def normalize_event_id(value: str) -> str | None:
    """The canonical form of an event id (UUID lower-case, ULID upper-case), or None if it is neither.

    Canonical forms make the idempotency key insensitive to the case a client happened to use.
    """
    if len(value) == 36 and _UUID.fullmatch(value):
        return value.lower()
    if len(value) == 26 and _ULID.fullmatch(value):
        return value.upper()
    return None


def _check_string(chk: _Check, obj: dict[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if not isinstance(value, str):
        chk.add(name, "type", f"{name} must be a string, got {_json_type(value)} {_shorten(value)}")
        return None
    return value


def parse_timestamp(value: str) -> datetime | None:
    """An RFC 3339 timestamp with an offset as an aware datetime, or None if it is not one."""
    m = _RFC3339.fullmatch(value)
    if m is None:
        return None
    if m.group(1) is None or len(m.group(1)) <= 7:  # no fraction, or at most 6 digits: the common case
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            pass
    text = value.replace("t", "T").replace(" ", "T").replace("z", "+00:00").replace("Z", "+00:00")
    main, _, rest = text.partition(".")
    if rest:  # Python parses at most 6 fractional digits; RFC 3339 allows more.
        digits = re.match(r"[0-9]+", rest)
        frac = digits.group(0) if digits else ""
        text = f"{main}.{frac[:6].ljust(6, '0')}{rest[len(frac) :]}"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def validate(obj: Any, limits: EventLimits = EventLimits(), raw: bytes | None = None) -> Event | Rejected:
    """Validate one decoded event object against interaction.v1 and the configured ``limits``.

    ``raw`` is the JSON that ``orjson.loads`` decoded the object from, if known: when the whole event is within the
    meta bound, holds no NUL escape and fewer brackets than ``meta`` may nest levels, ``meta`` is known to pass
    without being looked at again (the buffer consumer's hot path). That relies on what orjson.loads never yields
    (lone surrogates, non-finite numbers, integers beyond 64 bits: it reads those as floats), so ``raw`` must not come
    from another JSON decoder.

    Never raises, whatever ``obj`` is. Returns the Event, or Rejected with every reason found (not just the first).
    """
    if not isinstance(obj, dict):
        return Rejected((Reason("", "not_object", f"an event must be a JSON object, got {_json_type(obj)}"),))
    chk = _Check()

    raw_id = obj.get("event_id")
    event_id: str | None = None
    if "event_id" not in obj:
        chk.add("event_id", "missing", "event_id is required")
    elif (eid := _check_string(chk, obj, "event_id")) is not None:
        event_id = normalize_event_id(eid)
        if event_id is None:
            chk.add("event_id", "invalid_format", f"event_id must be a UUID or a ULID, got {_shorten(raw_id)}")

    user_id: str | None = None
    if "user_id" not in obj:
        chk.add("user_id", "missing", "user_id is required")
    elif (uid := _check_string(chk, obj, "user_id")) is not None:
        if not _USER_ID.fullmatch(uid):
            chk.add(
                "user_id", "invalid_format", f"user_id must be 1..128 chars of [A-Za-z0-9._:@-], got {_shorten(uid)}"
            )
        elif _DOTS.fullmatch(uid):
            chk.add("user_id", "invalid_format", f"user_id must not be only dots (a path segment), got {uid!r}")
        else:
            user_id = uid

    occurred_at: datetime | None = None
    if "occurred_at" not in obj:
        chk.add("occurred_at", "missing", "occurred_at is required")
    elif (ts := _check_string(chk, obj, "occurred_at")) is not None:
        occurred_at = parse_timestamp(ts)
        if occurred_at is None:
            chk.add(
                "occurred_at", "invalid_format", f"occurred_at must be RFC 3339 with an offset, got {_shorten(ts)}"
            )
        elif not 1900 < occurred_at.year < 9998 and not OCCURRED_AT_MIN <= occurred_at < OCCURRED_AT_MAX:
            # (an offset moves the instant by less than a day, so only the edge years need the exact comparison)
            chk.add(
                "occurred_at",
                "out_of_range",
                f"occurred_at must lie in [{OCCURRED_AT_MIN:%Y-%m-%dT%H:%M:%SZ}, {OCCURRED_AT_MAX:%Y-%m-%dT%H:%M:%SZ})"
                f" as an instant, got {_shorten(ts)}",
            )
            occurred_at = None

    app: str | None = None
    if "app" not in obj:
        chk.add("app", "missing", "app is required")
    elif (a := _check_string(chk, obj, "app")) is not None:
        if not _APP.fullmatch(a):
            chk.add("app", "invalid_format", f"app must be 1..64 chars of [A-Za-z0-9._:-], got {_shorten(a)}")
        else:
            app = a

    meta = obj.get("meta")
    if "meta" in obj:
        if not isinstance(meta, dict):
            chk.add("meta", "type", f"meta must be an object, got {_json_type(meta)} {_shorten(meta)}")
        elif (
            raw is not None
            and len(raw) <= limits.max_meta_bytes
            and b"\\u0000" not in raw
            # depth: flat (the common case), or fewer brackets in all of raw than levels allowed (+1: the event's)
            and (_flat(meta) or raw.count(b"{") + raw.count(b"[") <= limits.max_meta_depth + 1)
        ):
            pass
        else:
            _check_meta(chk, meta, limits)

    kind = obj.get("kind")
    payload: dict[str, Any] = {}
    known_kind = isinstance(kind, str) and kind in KIND_FIELDS
    if "kind" not in obj:
        chk.add("kind", "missing", "kind is required")
    elif not isinstance(kind, str):
        chk.add(
            "kind",
            "type",
            f"kind must be a string, one of {', '.join(KINDS)}; got {_json_type(kind)} {_shorten(kind)}",
        )
    elif not known_kind:
        chk.add("kind", "unknown_kind", f"kind must be one of {', '.join(KINDS)}, got {_shorten(kind)}")
    else:
        required = KIND_FIELDS[kind][0]
        allowed = _ALLOWED[kind]
        for name in obj:
            if name not in allowed:
                where = "for kind " + kind if name in ALL_FIELDS else "in interaction.v1"
                chk.add(_field_name(name), "unknown_field", f"field {_shorten(name)} is not allowed {where}")
        for name in required:
            if name not in obj:
                chk.add(name, "missing", f"{name} is required for kind {kind}")
        for name in _PAYLOAD_FIELDS[kind]:
            if name not in obj:
                continue
            value = obj[name]
            if name == "rating":
                if type(value) is float and value in (-1.0, 0.0, 1.0):  # JSON Schema: 1.0 is the integer 1
                    value = int(value)
                if type(value) is not int or value not in (-1, 0, 1):
                    chk.add("rating", "invalid_value", f"rating must be -1, 0 or 1, got {_shorten(value)}")
                    continue
            elif not isinstance(value, str):
                chk.add(name, "type", f"{name} must be a string, got {_json_type(value)} {_shorten(value)}")
                continue
            elif not value:
                chk.add(name, "empty", f"{name} must not be empty")
                continue
            elif "\x00" in value:
                chk.add(name, "invalid_character", f"{name} contains a NUL character (U+0000), which is not allowed")
                continue
            else:
                if value.isascii():  # O(1) in CPython
                    n = len(value)
                else:
                    try:
                        n = len(value.encode())
                    except UnicodeEncodeError as e:
                        chk.add(
                            name,
                            "invalid_character",
                            f"{name} contains a lone surrogate (U+{ord(value[e.start]):04X} at character {e.start}),"
                            " which is not valid Unicode text",
                        )
                        continue
                if n > limits.max_text_bytes:
                    chk.add(name, "too_long", f"{name} is {n} bytes, at most {limits.max_text_bytes} allowed")
                    continue
            payload[name] = value
    if not known_kind:
        for name in obj:
            if name not in ALL_FIELDS:
                chk.add(_field_name(name), "unknown_field", f"field {_shorten(name)} is not allowed in interaction.v1")

    if chk.reasons or event_id is None or user_id is None or occurred_at is None or app is None:
        return Rejected(tuple(chk.reasons), event_id=event_id, user_id=user_id)
    return Event(event_id, user_id, occurred_at, str(kind), app, payload, meta)


def valid_app_id(value: str) -> bool:
    """Whether ``value`` is a well-formed application id (1..64 chars of [A-Za-z0-9._:-])."""
    return bool(_APP.fullmatch(value))


def valid_user_id(value: str) -> bool:
    """Whether ``value`` is a well-formed user id: 1..128 chars of [A-Za-z0-9._:@-], not only dots (``.`` and
    ``..`` are path segments: no object store key can hold them)."""
    return bool(_USER_ID.fullmatch(value)) and not _DOTS.fullmatch(value)


def check_key(event: Event, key: bytes | None) -> Reason | None:
    """The Kafka record key must be the event's user_id (so one user's events stay on one partition, in order)."""
    if key is None:
        return Reason("key", "missing_key", "the Kafka record key must be the event's user_id, got no key")
    try:
        text = key.decode()
    except UnicodeDecodeError:
        return Reason("key", "key_mismatch", f"the Kafka record key is not UTF-8: {_shorten(key)}")
    if text != event.user_id:
        return Reason("key", "key_mismatch", f"the Kafka record key {_shorten(text)} is not user_id {event.user_id!r}")
    return None


def split_of(user_id: str, event_id: str, holdout_fraction: float) -> Split:
    """The event's fixed split: holdout when hash(user_id, event_id) falls under ``holdout_fraction``.

    sha256 rather than Python's hash() so the split is the same in every process and every release.
    """
    digest = hashlib.sha256(f"{user_id}\x00{event_id}".encode()).digest()
    return "holdout" if int.from_bytes(digest[:8], "big") < holdout_fraction * 2**64 else "train"
