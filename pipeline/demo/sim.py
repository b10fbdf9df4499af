"""Synthetic users for the demo and benchmarks: each writes in a distinct, consistent way.

A user has topics, a greeting, a sign-off, favourite phrases and a register (formal, casual, terse, ...). Events
are drawn from that style with a seeded RNG, so the same (seed, user index) always gives the same events.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

_STYLES: list[dict[str, Any]] = [
    {
        "register": "formal",
        "greeting": "Good morning,",
        "signoff": "Kind regards, Eleanor",
        "topics": ["quarterly budget", "board meeting", "compliance review", "vendor contract"],
        "phrases": ["I would be grateful if", "please find attached", "at your earliest convenience"],
    },
    {
        "register": "casual",
        "greeting": "hey!!",
        "signoff": "cheers, sam :)",
        "topics": ["surf trip", "pizza night", "new skateboard", "beach playlist"],
        "phrases": ["no worries", "sounds rad", "lol that's wild"],
    },
    {
        "register": "terse",
        "greeting": "Status:",
        "signoff": "-- K.",
        "topics": ["deploy", "latency regression", "on-call handover", "db failover"],
        "phrases": ["ack.", "fixed in prod.", "rollback done."],
    },
    {
        "register": "poetic",
        "greeting": "Dearest friend,",
        "signoff": "Yours under the autumn moon, Rowan",
        "topics": ["falling leaves", "the quiet garden", "rain on the window", "old letters"],
        "phrases": ["as the light fades", "softly, like a whisper", "the heart remembers"],
    },
    {
        "register": "enthusiastic",
        "greeting": "Hi team!!!",
        "signoff": "Let's crush it! -- Priya",
        "topics": ["product launch", "growth metrics", "customer demo", "sprint goals"],
        "phrases": ["super excited", "huge win", "let's go"],
    },
    {
        "register": "academic",
        "greeting": "Dear colleagues,",
        "signoff": "Best, Dr. Okafor",
        "topics": ["protein folding", "the lab meeting", "grant proposal", "peer review"],
        "phrases": ["our results suggest", "in line with prior work", "further analysis is needed"],
    },
]

_PROMPTS = [
    "Write a short note about {topic}.",
    "Reply to a friend asking about {topic}.",
    "Send a quick update on {topic}.",
    "Draft a message about {topic}.",
]


@dataclass(frozen=True)
class SimUser:
    """One synthetic user and the style they write in."""

    user_id: str
    style: dict[str, Any]

    def message(self, rng: random.Random) -> tuple[str, str]:
        topic = rng.choice(self.style["topics"])
        phrase = rng.choice(self.style["phrases"])
        prompt = rng.choice(_PROMPTS).format(topic=topic)
        text = f"{self.style['greeting']} {phrase} about the {topic}. {self.style['signoff']}"
        return prompt, text

    def off_style(self, rng: random.Random) -> str:
        """A reply in a neutral voice: what a base model might say, which this user would rewrite or reject."""
        return f"Here is a message about the {rng.choice(self.style['topics'])}."


def users(k: int, *, prefix: str = "user") -> list[SimUser]:
    """``k`` users with ids ``{prefix}-000``..., styles assigned round-robin."""
    return [SimUser(f"{prefix}-{i:03d}", _STYLES[i % len(_STYLES)]) for i in range(k)]


def events_for(
    user: SimUser, n: int, *, app: str, seed: int = 0, start: datetime | None = None
) -> Iterator[dict[str, Any]]:
    """``n`` interaction.v1 events of ``user``: mostly messages, some edits, preferences and feedback."""
    rng = random.Random(f"{seed}:{user.user_id}")
    t = start or datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(n):
        t += timedelta(seconds=rng.randint(5, 600))
        base = {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "user_id": user.user_id,
            "occurred_at": t.isoformat(),
            "app": app,
            "meta": {"sim": True, "i": i},
        }
        prompt, text = user.message(rng)
        roll = rng.random()
        if roll < 0.7:
            yield {**base, "kind": "message", "prompt": prompt, "text": text}
        elif roll < 0.8:
            yield {**base, "kind": "edit", "prompt": prompt, "original": user.off_style(rng), "edited": text}
        elif roll < 0.9:
            yield {**base, "kind": "preference", "prompt": prompt, "chosen": text, "rejected": user.off_style(rng)}
        else:
            yield {**base, "kind": "feedback", "prompt": prompt, "completion": text, "rating": 1}


def invalid_events(app: str, seed: int = 0) -> list[dict[str, Any]]:
    """A few events that break the contract in different ways (the demo shows their rejection reasons)."""
    rng = random.Random(seed)
    now = datetime(2026, 1, 1, tzinfo=UTC).isoformat()

    def eid() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    return [
        {
            "event_id": "not-an-id",
            "user_id": "user-000",
            "occurred_at": now,
            "kind": "message",
            "app": app,
            "text": "hi",
        },
        {"event_id": eid(), "user_id": "user 000", "occurred_at": now, "kind": "message", "app": app, "text": "hi"},
        {
            "event_id": eid(),
            "user_id": "user-000",
            "occurred_at": "yesterday",
            "kind": "message",
            "app": app,
            "text": "hi",
        },
        {"event_id": eid(), "user_id": "user-000", "occurred_at": now, "kind": "shout", "app": app, "text": "hi"},
        {
            "event_id": eid(),
            "user_id": "user-000",
            "occurred_at": now,
            "kind": "feedback",
            "app": app,
            "prompt": "p",
            "completion": "c",
            "rating": 5,
        },
    ]
