"""Kafka record codec and dead-letter headers."""

from __future__ import annotations

import json

from pipeline.domain.events import EventLimits, Reason, Rejected
from pipeline.ingest.codec import decode_record, dlq_headers, reasons_from_headers


def test_dlq_reason_header_is_machine_readable_json():
    from pipeline.ingest.codec import dlq_headers

    headers = dlq_headers((Reason("text", "too_long", "text is 20000 bytes"),), "t/0/5")
    assert json.loads(dict(headers)["persona.dlq.reasons"]) == [
        {"field": "text", "code": "too_long", "message": "text is 20000 bytes"}
    ]


def test_decode_record_reasons():
    limits = EventLimits()
    assert decode_record(None, b"u", limits).codes == ["invalid_json"]
    assert decode_record(b"{", b"u", limits).codes == ["invalid_json"]
    assert decode_record(b"[]", b"u", limits).codes == ["not_object"]
    ok = (
        b'{"event_id":"0b8e8a2e-5a55-4f0e-9d43-1f9a1b8f5a11","user_id":"u","occurred_at":"2026-01-01T00:00:00Z",'
        b'"kind":"message","app":"a","text":"hi"}'
    )
    assert not isinstance(decode_record(ok, b"u", limits), Rejected)
    assert decode_record(ok, b"v", limits).codes == ["key_mismatch"]
    assert decode_record(ok, None, limits).codes == ["missing_key"]
    rej = decode_record(ok, None, limits)
    assert reasons_from_headers(dlq_headers(rej.reasons, "t/1/2"))[0]["code"] == "missing_key"


def test_meta_bounds_hold_on_the_raw_fast_path():
    import orjson

    base = {
        "event_id": "0b8e8a2e-5a55-4f0e-9d43-1f9a1b8f5a11",
        "user_id": "u",
        "occurred_at": "2026-01-01T00:00:00Z",
        "kind": "message",
        "app": "a",
        "text": "hi",
    }
    limits = EventLimits(max_meta_bytes=200)
    small = orjson.dumps({**base, "meta": {"a": 1}})
    assert not isinstance(decode_record(small, b"u", limits), Rejected)
    big = orjson.dumps({**base, "meta": {"a": "x" * 300}})
    assert decode_record(big, b"u", limits).codes == ["too_large"]
    nul = orjson.dumps({**base, "meta": {"a": "x\x00"}})
    assert decode_record(nul, b"u", limits).codes == ["invalid_character"]


def test_a_dead_letter_record_that_fits_is_unchanged():
    from pipeline.ingest.codec import fit_dead_letter

    headers = dlq_headers((Reason("kind", "type", "kind must be a string"),), "t/0/1")
    key, value, out, truncated = fit_dead_letter(b"u1", b"x" * 1000, headers, 100_000)
    assert (key, value, out, truncated) == (b"u1", b"x" * 1000, headers, False)


def test_a_dead_letter_record_too_large_is_truncated_with_its_size_and_hash():
    import hashlib

    from pipeline.ingest.codec import (
        DLQ_ORIGINAL_BYTES,
        DLQ_ORIGINAL_SHA256,
        DLQ_TRUNCATED,
        MAX_DLQ_KEY_BYTES,
        fit_dead_letter,
    )

    value = bytes(range(256)) * 10_000
    headers = dlq_headers((Reason("text", "too_long", "text is too long"),), "t/0/1")
    key, cut, out, truncated = fit_dead_letter(b"k" * 5000, value, headers, 100_000)
    assert truncated and value.startswith(cut) and len(cut) > 90_000
    assert len(key or b"") == MAX_DLQ_KEY_BYTES
    size = len(key or b"") + len(cut or b"") + sum(len(n) + len(v) for n, v in out)
    assert size <= 100_000
    h = dict(out)
    assert h[DLQ_TRUNCATED] == b"true" and int(h[DLQ_ORIGINAL_BYTES]) == len(value)
    assert h[DLQ_ORIGINAL_SHA256].decode() == hashlib.sha256(value).hexdigest()
    assert h["persona.dlq.original_key_bytes"] == b"5000"
