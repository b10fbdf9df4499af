"""Records of the adapter-lifecycle topic (persona.promotions.v1): promotion.v1 and forget.v1, checked by schema."""

from __future__ import annotations

import orjson
import pytest

from pipeline.domain.errors import InvalidInput
from pipeline.serving.promotions import parse_promotion

SHA = "ab" * 32
PROMOTION = {
    "schema": "promotion.v1",
    "user_id": "alice",
    "revision_id": "01M8HMVBB9Y9YH6MA1RJA15HRB",
    "parent_id": None,
    "sha256": SHA,
    "uri": "s3://adapters/users/alice/revisions/01M8HMVBB9Y9YH6MA1RJA15HRB/adapter_model.safetensors",
    "promoted_at": "2026-11-28T18:00:00+00:00",
    "reason": "gate",
}
FORGET = {"schema": "forget.v1", "user_id": "alice", "sha256s": [SHA], "forgotten_at": "2026-11-28T18:00:00+00:00"}


def test_both_kinds_of_record_parse():
    assert parse_promotion(orjson.dumps(PROMOTION)) == PROMOTION
    assert parse_promotion(orjson.dumps(FORGET)) == FORGET
    assert parse_promotion(orjson.dumps({**FORGET, "sha256s": []}))["sha256s"] == []


@pytest.mark.parametrize(
    ("record", "message"),
    [
        (b"{nope", "not JSON"),
        (orjson.dumps({**FORGET, "sha256s": ["xyz"]}), "not forget.v1: sha256s/0"),
        (orjson.dumps({**FORGET, "revision_id": PROMOTION["revision_id"]}), "not forget.v1"),
        (orjson.dumps({k: v for k, v in FORGET.items() if k != "user_id"}), "not forget.v1"),
        (orjson.dumps({**PROMOTION, "schema": "promotion.v2"}), "not promotion.v1: schema"),
        (orjson.dumps([1, 2]), "not promotion.v1"),
    ],
)
def test_bad_records_are_refused_with_the_reason(record, message):
    with pytest.raises(InvalidInput, match=message):
        parse_promotion(record)
