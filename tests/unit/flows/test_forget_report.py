"""What a forget reports it could not remove, and the failpoint registry (pure logic, no services)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from pipeline.config import KafkaSettings
from pipeline.flows import failpoints
from pipeline.flows.promotion import ForgetReport, Remainder, remainders, retention_text


def test_retention_in_words():
    assert retention_text(604_800_000) == "7 days after each record was written (retention.ms=604800000)"
    assert retention_text(3_600_000) == "1 hour after each record was written (retention.ms=3600000)"
    assert retention_text(90_000) == "90 seconds after each record was written (retention.ms=90000)"
    assert retention_text(1234) == "1234 ms after each record was written (retention.ms=1234)"
    assert "no time limit" in retention_text(-1)


def test_remainders_name_every_topic_and_the_retention_in_force():
    kafka = KafkaSettings(topic_events="ev", topic_dlq="dlq", topic_promotions="pro", retention_ms=86_400_000)
    out = remainders(kafka, versioning="Off", objects_deleted=3, announced=True, sha256s=["a" * 64])
    assert [r.where for r in out] == ["kafka topic ev", "kafka topic dlq", "kafka topic pro"]
    assert all("1 day after each record" in r.until for r in out)


def test_remainders_add_versions_and_untold_caches():
    kafka = KafkaSettings()
    out = remainders(kafka, versioning="Enabled", objects_deleted=7, announced=False, sha256s=["ab" * 32])
    where = [r.where for r in out]
    assert "object store bucket (versioning Enabled)" in where
    caches = next(r for r in out if r.where.startswith("serving workers"))
    assert "abababababab" in caches.what and "not announced" in caches.what
    # nothing deleted from the bucket: no version remainder; nothing cached: no cache remainder
    quiet = remainders(kafka, versioning="Enabled", objects_deleted=0, announced=False, sha256s=[])
    assert [r.where for r in quiet] == [r.where for r in out[:3]]
    off = remainders(kafka, versioning="Off", objects_deleted=7, announced=True, sha256s=["ab" * 32])
    assert len(off) == 3
    unknown = remainders(kafka, versioning=None, objects_deleted=7, announced=True, sha256s=["ab" * 32])
    assert unknown[3].where == "object store bucket (versioning unknown: it could not be read)"


def test_report_as_json_values():
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    report = ForgetReport(
        "u1", {"users": 0}, [], forgotten_at=at, actor="dpo", remaining=[Remainder("kafka topic t", "events", "7 d")]
    )
    d = report.to_dict()
    assert d["nothing"] is True and d["forgotten_at"] == at.isoformat() and d["actor"] == "dpo"
    assert d["remaining"] == [{"where": "kafka topic t", "what": "events", "until": "7 d"}]
    assert d["owner"] is None and d["announced"] is False


def test_failpoints_fire_only_while_armed():
    seen: list[dict] = []
    failpoints.fire(failpoints.BEFORE_DECISION, user_id="u")  # nothing armed: nothing happens
    with failpoints.armed(failpoints.BEFORE_DECISION, lambda **ctx: seen.append(ctx)):
        failpoints.fire(failpoints.BEFORE_DECISION, user_id="u", revision_id="r")
        failpoints.fire(failpoints.BEFORE_CANDIDATE_COMMIT, user_id="other")  # another point: not armed
    failpoints.fire(failpoints.BEFORE_DECISION, user_id="u")
    assert seen == [{"user_id": "u", "revision_id": "r"}]


def test_failpoints_nest_and_reject_unknown_names():
    calls: list[str] = []
    with failpoints.armed(failpoints.BEFORE_CANDIDATE_COMMIT, lambda **_: calls.append("outer")):
        with failpoints.armed(failpoints.BEFORE_CANDIDATE_COMMIT, lambda **_: calls.append("inner")):
            failpoints.fire(failpoints.BEFORE_CANDIDATE_COMMIT)
        failpoints.fire(failpoints.BEFORE_CANDIDATE_COMMIT)
    failpoints.fire(failpoints.BEFORE_CANDIDATE_COMMIT)
    assert calls == ["inner", "outer"]
    with pytest.raises(ValueError, match="unknown failpoint"):
        with failpoints.armed("retrain.typo", lambda **_: None):
            pass


def test_a_failpoint_callback_error_propagates():
    def boom(**_: object) -> None:
        raise RuntimeError("crash here")

    with failpoints.armed(failpoints.BEFORE_DECISION, boom), pytest.raises(RuntimeError, match="crash here"):
        failpoints.fire(failpoints.BEFORE_DECISION)
