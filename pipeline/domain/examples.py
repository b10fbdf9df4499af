"""From a user's interaction events to what an adapter trains on. Pure logic: no torch, no I/O.

Rules (the kinds and fields are those of ``interaction.v1``, schemas/events/interaction.v1.json):

- Only ``train``-split events become training examples and training pairs; ``holdout`` events are the gate's
  evidence and are never trained on.
- ``message``: the user wrote ``text``; it is the target, with its optional ``prompt`` as context.
- ``edit``: the user rewrote a model output; ``edited`` is what they want, so it is the target, with its ``prompt``.
  The ``original`` is never a target: it is the rejected side of the edit's pair (below).
- ``feedback`` with ``rating`` 1: the user approved ``completion``; it is the target, with its ``prompt``.
  Ratings 0 and -1 give no target (a liked-by-nobody text must not be imitated).
- ``preference``: no target; it is a pair (``chosen`` over ``rejected``), like an ``edit`` (``edited`` over
  ``original``; an edit that changed nothing gives no pair). ``preference_pairs`` does not filter by split: the
  gate measures the ``holdout`` pairs, and ``training_pairs`` gives the ``train``-split ones, which the trainers
  learn from next to the examples (a preference loss, `pipeline.training.lora`). So an edit is trained on twice:
  its ``edited`` text as an example, and ``edited`` over ``original`` as a pair.

Which events a retrain sees: every new ``train`` event since the parent revision, plus a bounded, seeded sample of
older ones (replay), so an adapter keeps what it learnt without retraining on the whole history. Its examples and
its pairs both come from those events.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainingEvent:
    """One stored event as training sees it: ``seq`` is its ingestion position, ``payload`` its kind's fields."""

    event_id: str
    seq: int
    kind: str
    split: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Example:
    """A text the adapter should produce (``target``), after an optional ``prompt`` it answers."""

    prompt: str | None
    target: str
    event_id: str


@dataclass(frozen=True)
class PreferencePair:
    """The user preferred ``chosen`` over ``rejected`` as an answer to ``prompt``."""

    prompt: str
    chosen: str
    rejected: str
    event_id: str


def example_of(event: TrainingEvent) -> Example | None:
    """The training example an event gives, whatever its split, or None when its kind gives none (module rules)."""
    p = event.payload
    if event.kind == "message":
        return Example(p.get("prompt") or None, p["text"], event.event_id)
    if event.kind == "edit":
        return Example(p.get("prompt") or None, p["edited"], event.event_id)
    if event.kind == "feedback" and p.get("rating") == 1:
        return Example(p.get("prompt") or None, p["completion"], event.event_id)
    return None


def examples_from_events(events: Iterable[TrainingEvent]) -> list[Example]:
    """The training examples of the ``train``-split events, in the given order (module rules)."""
    out = []
    for event in events:
        if event.split != "train":
            continue
        example = example_of(event)
        if example is not None:
            out.append(example)
    return out


def preference_pairs(events: Iterable[TrainingEvent]) -> list[PreferencePair]:
    """Pairs from ``preference`` (chosen over rejected) and ``edit`` (edited over original) events, any split.

    An edit that changed nothing carries no preference and gives no pair.
    """
    out = []
    for event in events:
        p = event.payload
        if event.kind == "preference":
            out.append(PreferencePair(p["prompt"], p["chosen"], p["rejected"], event.event_id))
        elif event.kind == "edit" and p["edited"] != p["original"]:
            out.append(PreferencePair(p["prompt"], p["edited"], p["original"], event.event_id))
    return out


def training_pairs(events: Iterable[TrainingEvent]) -> list[PreferencePair]:
    """The pairs of the ``train``-split events (`preference_pairs` of those), in the given order (module rules)."""
    return preference_pairs(e for e in events if e.split == "train")


def replay_sample(older: Sequence[TrainingEvent], k: int, seed: str | int) -> list[TrainingEvent]:
    """At most ``k`` of ``older``, drawn with ``random.Random(seed)``, in ingestion order.

    The same events (in any order) and seed give the same sample in every process: the input is sorted first, and
    ``random.Random`` seeds from a str by its sha512, not by the salted ``hash()``.
    """
    if k <= 0 or not older:
        return []
    ordered = sorted(older, key=lambda e: (e.seq, e.event_id))
    if len(ordered) <= k:
        return ordered
    picked = random.Random(seed).sample(range(len(ordered)), k)
    return [ordered[i] for i in sorted(picked)]


def select_training_events(
    events: Iterable[TrainingEvent], *, parent_last_seq: int | None, replay_max: int, seed: str | int
) -> tuple[list[TrainingEvent], list[TrainingEvent]]:
    """Split a user's events into (new, replay), both ``train``-split only and in ingestion order.

    ``new``: events after the parent revision's last event (``seq > parent_last_seq``; all of them without a
    parent). ``replay``: a seeded sample of at most ``replay_max`` of the events the parent already saw.
    """
    train = sorted((e for e in events if e.split == "train"), key=lambda e: (e.seq, e.event_id))
    if parent_last_seq is None:
        return train, []
    new = [e for e in train if e.seq > parent_last_seq]
    older = [e for e in train if e.seq <= parent_last_seq]
    return new, replay_sample(older, replay_max, seed)


def general_mix(general: Sequence[Example], n_examples: int, share: float, seed: str | int) -> list[Example]:
    """General examples to add to a retrain's ``n_examples`` of the user, so that they make about ``share`` of all:
    ``round(n_examples * share / (1 - share))`` of ``general``, drawn with ``random.Random(seed)`` without
    replacement (and again from the start once all were drawn), in the order drawn. Empty when ``share`` is 0, or
    without general examples or user examples."""
    if not general or n_examples <= 0 or share <= 0:
        return []
    want = round(n_examples * share / (1 - share))
    rng = random.Random(seed)
    out: list[Example] = []
    while len(out) < want:
        order = list(range(len(general)))
        rng.shuffle(order)
        out.extend(general[i] for i in order[: want - len(out)])
    return out
