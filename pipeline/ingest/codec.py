"""Bytes <-> events on the Kafka topic, and the dead-letter record format.

A record on persona.interactions.v1 is the event's JSON object (UTF-8), key = user_id. A dead-letter record on
persona.interactions.dlq.v1 keeps the original key and value bytes untouched and carries the reason in headers:
``persona.dlq.reasons`` (JSON list of {field, code, message}), ``persona.dlq.code`` (the first code),
``persona.dlq.source`` (``topic/partition/offset``) and ``persona.dlq.at`` (RFC 3339). Reason-specific headers:
``persona.dlq.user_id`` and ``persona.dlq.stored_user_id`` (``id_conflict``: the record's user and the user the
event_id is stored for) and, for a record too large for the dead-letter topic, whose value is then truncated:
``persona.dlq.truncated`` (``true``), ``persona.dlq.original_bytes`` and ``persona.dlq.original_sha256`` (of the
original value).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import orjson

from pipeline.domain.events import Event, EventLimits, Reason, Rejected, check_key, validate

DLQ_REASONS = "persona.dlq.reasons"
DLQ_CODE = "persona.dlq.code"
DLQ_SOURCE = "persona.dlq.source"
DLQ_AT = "persona.dlq.at"
DLQ_USER = "persona.dlq.user_id"
DLQ_STORED_USER = "persona.dlq.stored_user_id"
DLQ_OWNER = "persona.dlq.owner_app"  # foreign_user: the application that owns the user
DLQ_TRUNCATED = "persona.dlq.truncated"
DLQ_ORIGINAL_BYTES = "persona.dlq.original_bytes"
DLQ_ORIGINAL_SHA256 = "persona.dlq.original_sha256"
#: Bytes a record takes beyond its key, value and header bytes (record batch framing, varints), rounded up.
_RECORD_OVERHEAD = 512
#: Longest key kept in a dead-letter record (a key is a user id: 128 bytes when valid).
MAX_DLQ_KEY_BYTES = 1024


def encode_event(event: Event) -> bytes:
    """The canonical wire form of a valid event."""
    return orjson.dumps(event.as_dict())


def decode_record(value: bytes | None, key: bytes | None, limits: EventLimits) -> Event | Rejected:
    """Decode and validate one Kafka record (value and key)."""
    if value is None:
        return Rejected((Reason("", "invalid_json", "the record has no value (a tombstone)"),))
    try:
        obj = orjson.loads(value)
    except orjson.JSONDecodeError as e:
        return Rejected((Reason("", "invalid_json", f"the record value is not valid JSON: {e}"),))
    result = validate(obj, limits, raw=value)
    if isinstance(result, Rejected):
        return result
    bad_key = check_key(result, key)
    if bad_key is not None:
        return Rejected((bad_key,), event_id=result.event_id, user_id=result.user_id)
    return result


def dlq_headers(
    reasons: tuple[Reason, ...], source: str, extra: dict[str, str] | None = None
) -> list[tuple[str, bytes]]:
    """Kafka headers of a dead-letter record (``extra``: reason-specific headers, e.g. the users of a conflict)."""
    headers = [
        (DLQ_REASONS, orjson.dumps([r.as_dict() for r in reasons])),
        (DLQ_CODE, reasons[0].code.encode() if reasons else b"unknown"),
        (DLQ_SOURCE, source.encode()),
        (DLQ_AT, datetime.now(UTC).isoformat().encode()),
    ]
    headers.extend((name, value.encode()) for name, value in (extra or {}).items())
    return headers


def fit_dead_letter(
    key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]], max_bytes: int
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes]], bool]:
    """The record as it can go to the dead-letter topic: unchanged when it fits in ``max_bytes``, else with its
    key cut to MAX_DLQ_KEY_BYTES and its value truncated to fit, the original size and sha256 in headers.

    Returns (key, value, headers, truncated). The reasons in the headers are kept whole (they are short)."""
    size = len(key or b"") + len(value or b"") + sum(len(n) + len(v) for n, v in headers) + _RECORD_OVERHEAD
    if size <= max_bytes:
        return key, value, headers, False
    original = value or b""
    headers = [
        *headers,
        (DLQ_TRUNCATED, b"true"),
        (DLQ_ORIGINAL_BYTES, str(len(original)).encode()),
        (DLQ_ORIGINAL_SHA256, hashlib.sha256(original).hexdigest().encode()),
    ]
    if key is not None and len(key) > MAX_DLQ_KEY_BYTES:
        headers.append(("persona.dlq.original_key_bytes", str(len(key)).encode()))
        key = key[:MAX_DLQ_KEY_BYTES]
    room = max_bytes - len(key or b"") - sum(len(n) + len(v) for n, v in headers) - _RECORD_OVERHEAD
    return key, original[: max(0, room)], headers, True


def reasons_from_headers(headers: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    """The reasons of a dead-letter record, read back from its headers."""
    for name, value in headers:
        if name == DLQ_REASONS:
            return list(orjson.loads(value))
    return []
