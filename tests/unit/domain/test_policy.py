"""The retrain policy: due by count or age, never in cooldown, never twice at once, oldest first, bounded."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pipeline.domain.policy import DueState, Policy, busy, due_reason, pick

NOW = datetime(2026, 6, 1, 12, tzinfo=UTC)
P = Policy(min_new_events=10, max_age_s=3600, cooldown_s=60, max_in_flight=3, queue_timeout_s=900)


def st(uid, pending=0, age=None, trained=None, queued=None, lease=None):
    def ago(s):
        return None if s is None else NOW - timedelta(seconds=s)

    return DueState(uid, pending, ago(age), ago(trained), ago(queued), ago(-lease) if lease is not None else None)


def test_due_by_count_or_age():
    assert due_reason(st("a", 10, 5), P, NOW) == "count"
    assert due_reason(st("a", 2, 3601), P, NOW) == "age"
    assert due_reason(st("a", 9, 5), P, NOW) is None
    assert due_reason(st("a", 0, None), P, NOW) is None


def test_cooldown_queue_and_lease_keep_a_user_out():
    assert due_reason(st("a", 50, 5, trained=30), P, NOW) is None
    assert due_reason(st("a", 50, 5, trained=61), P, NOW) == "count"
    assert due_reason(st("a", 50, 5, queued=10), P, NOW) is None
    assert due_reason(st("a", 50, 5, queued=901), P, NOW) == "count"  # a lost task's mark goes stale
    assert due_reason(st("a", 50, 5, lease=20), P, NOW) is None
    assert due_reason(st("a", 50, 5, lease=-1), P, NOW) == "count"  # a dead worker's lease expired
    assert busy(st("a", lease=5), P, NOW) and not busy(st("a", lease=-5), P, NOW)


def test_pick_oldest_first_within_the_budget():
    states = [
        st("young", 20, 10),
        st("old", 20, 500),
        st("older", 20, 900),
        st("oldest", 2, 4000),
        st("running", 20, 9999, lease=30),
    ]
    assert pick(states, P, NOW) == ["oldest", "older"]  # 3 in flight at most, one is running
    assert pick(states, Policy(max_in_flight=1), NOW) == []
