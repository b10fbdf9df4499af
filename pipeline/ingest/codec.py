"""Bytes <-> events on the Kafka topic, and the dead-letter record format.

A record on persona.interactions.v1 is the event's JSON object (UTF-8), key = user_id. A dead-letter record on
persona.interactions.dlq.v1 keeps the original key and value bytes untouched and carries the reason in headers:
``persona.dlq.reasons`` (JSON list of {field, code, message}), ``persona.dlq.code`` (the first code),
``persona.dlq.source`` (``topic/partition/offset``) and ``persona.dlq.at`` (RFC 3339).
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from pipeline.domain.events import Event, EventLimits, Reason, Rejected, check_key, validate

DLQ_REASONS = "persona.dlq.reasons"
DLQ_CODE = "persona.dlq.code"
DLQ_SOURCE = "persona.dlq.source"
DLQ_AT = "persona.dlq.at"


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


def dlq_headers(reasons: tuple[Reason, ...], source: str) -> list[tuple[str, bytes]]:
    """Kafka headers of a dead-letter record."""
    return [
        (DLQ_REASONS, orjson.dumps([r.as_dict() for r in reasons])),
        (DLQ_CODE, reasons[0].code.encode() if reasons else b"unknown"),
        (DLQ_SOURCE, source.encode()),
        (DLQ_AT, datetime.now(UTC).isoformat().encode()),
    ]


def reasons_from_headers(headers: list[tuple[str, bytes]]) -> list[dict[str, str]]:
    """The reasons of a dead-letter record, read back from its headers."""
    for name, value in headers:
        if name == DLQ_REASONS:
            return list(orjson.loads(value))
    return []
