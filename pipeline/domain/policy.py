"""When a user is due for a retrain. Pure: the scheduler's SQL (storage/training.py) implements the same rule,
and tests/unit/domain/test_policy.py checks both against the same cases."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Policy:
    """Due = enough new events (or the oldest waited long enough), not in cooldown, not already queued/training."""

    min_new_events: int = 20
    max_age_s: float = 3600.0
    cooldown_s: float = 60.0
    max_in_flight: int = 4
    #: A queue mark older than this is stale (its task was lost): the user may be queued again.
    queue_timeout_s: float = 900.0


@dataclass(frozen=True)
class DueState:
    """What the policy looks at for one user."""

    user_id: str
    pending_count: int
    oldest_pending_at: datetime | None
    last_trained_at: datetime | None
    queued_at: datetime | None
    lease_expires_at: datetime | None


def busy(s: DueState, policy: Policy, now: datetime) -> bool:
    """Queued (and not stale) or held by a live training lease."""
    queued = s.queued_at is not None and s.queued_at > now - timedelta(seconds=policy.queue_timeout_s)
    leased = s.lease_expires_at is not None and s.lease_expires_at > now
    return queued or leased


def due_reason(s: DueState, policy: Policy, now: datetime) -> str | None:
    """Why the user is due (``"count"`` or ``"age"``), or None when they are left alone."""
    if s.pending_count <= 0 or s.oldest_pending_at is None or busy(s, policy, now):
        return None
    if s.last_trained_at is not None and s.last_trained_at > now - timedelta(seconds=policy.cooldown_s):
        return None
    if s.pending_count >= policy.min_new_events:
        return "count"
    if s.oldest_pending_at <= now - timedelta(seconds=policy.max_age_s):
        return "age"
    return None


def pick(states: list[DueState], policy: Policy, now: datetime) -> list[str]:
    """The users to enqueue now: due ones, oldest pending event first, within the in-flight budget."""
    in_flight = sum(1 for s in states if busy(s, policy, now))
    room = max(0, policy.max_in_flight - in_flight)
    due = [s for s in states if due_reason(s, policy, now) is not None]
    due.sort(key=lambda s: (s.oldest_pending_at, s.user_id))
    return [s.user_id for s in due[:room]]
