"""Revision identity, manifest, lineage and rollback target (pure domain logic)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pipeline.domain.errors import InvalidInput
from pipeline.domain.revisions import (
    AliasMove,
    BaseModelRef,
    EventsUsed,
    Revision,
    build_manifest,
    check_revision_id,
    lineage,
    new_revision_id,
    rollback_target,
)
from pipeline.storage.manifest import validate_manifest

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def rev(rid: str, parent: str | None, minutes: int, status="retired") -> Revision:
    return Revision(rid, "u", parent, status, "s3://b/k", "0" * 64, 10, {}, T0 + timedelta(minutes=minutes), T0)


def test_revision_ids_sort_by_time_and_are_checked():
    a, b = new_revision_id(T0), new_revision_id(T0 + timedelta(seconds=1))
    assert a < b and len(a) == 26
    assert check_revision_id(a.lower()) == a
    for bad in ("", "x" * 26, "01ARZ3NDEKTSV4RRFFQ69G5FA", "01ARZ3NDEKTSV4RRFFQ69G5FAU"):
        with pytest.raises(InvalidInput):
            check_revision_id(bad)


def test_events_used_digest_is_order_independent():
    a = EventsUsed.of([("x", 5), ("y", 2)])
    b = EventsUsed.of([("y", 2), ("x", 5)])
    assert a == b and (a.count, a.first_seq, a.last_seq) == (2, 2, 5)
    assert EventsUsed.of([]).count == 0 and EventsUsed.of([]).first_seq is None


def test_manifest_matches_its_schema():
    rid = new_revision_id()
    m = build_manifest(
        user_id="u1",
        revision_id=rid,
        parent_id=None,
        base=BaseModelRef("tiny-random", "a" * 64),
        adapter_config={"r": 8, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"], "peft_type": "LORA"},
        training={"seed": 3},
        events=EventsUsed.of([("e", 1)]),
        metrics={},
        artifact_sha256="b" * 64,
        artifact_size=100,
        code_version="0.1.0",
    )
    m["files"] = {"adapter_config.json": "c" * 64, "adapter_model.safetensors": "b" * 64}
    validate_manifest(m)
    assert m["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    m["training"] = {}
    with pytest.raises(InvalidInput, match="training: 'seed' is a required property"):
        validate_manifest(m)


def test_lineage_tree_marks_the_serving_revision():
    revs = [rev("A", None, 0), rev("B", "A", 1), rev("C", "A", 2), rev("D", "B", 3, "promoted"), rev("E", None, 4)]
    roots = lineage(revs, "D")
    assert [r.revision.revision_id for r in roots] == ["A", "E"]
    a = roots[0]
    assert [c.revision.revision_id for c in a.children] == ["B", "C"]
    assert a.children[0].children[0].serving and not a.serving


def test_rollback_target_is_what_served_before():
    h = [
        AliasMove("u", "production", None, "A", "promote", "gate", T0),
        AliasMove("u", "production", "A", "B", "promote", "gate", T0),
        AliasMove("u", "production", "B", "C", "promote", "gate", T0),
    ]
    assert rollback_target(h, "C") == "B"
    assert rollback_target(h, "A") is None
    h.append(AliasMove("u", "production", "C", "B", "rollback", "op", T0))
    assert rollback_target(h, "B") == "C"  # the latest move onto B came from C
