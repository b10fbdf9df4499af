"""Training pairs from events (pipeline/domain/examples.py): the train split's preferences and edits."""

from __future__ import annotations

from pipeline.domain.examples import PreferencePair, TrainingEvent, preference_pairs, training_pairs


def ev(seq: int, kind: str, split: str = "train", **payload: object) -> TrainingEvent:
    return TrainingEvent(f"e{seq}", seq, kind, split, dict(payload))


def test_training_pairs_are_the_train_splits_preferences_and_changed_edits_in_order() -> None:
    events = [
        ev(1, "edit", prompt="q", original="Dear Sir", edited="hey"),
        ev(2, "preference", prompt="p", chosen="a", rejected="b"),
        ev(3, "preference", "holdout", prompt="p", chosen="c", rejected="d"),
        ev(4, "edit", "holdout", prompt="q", original="long", edited="short"),
        ev(5, "edit", prompt="q", original="same", edited="same"),
        ev(6, "message", text="t"),
        ev(7, "feedback", prompt="p", completion="c", rating=1),
        ev(8, "feedback", prompt="p", completion="c", rating=-1),
    ]
    assert training_pairs(events) == [
        PreferencePair("q", "hey", "Dear Sir", "e1"),
        PreferencePair("p", "a", "b", "e2"),
    ]
    # The gate's pairs are the others: no event is both trained on and judged on.
    holdout = [e for e in events if e.split == "holdout"]
    assert preference_pairs(holdout) == [
        PreferencePair("p", "c", "d", "e3"),
        PreferencePair("q", "short", "long", "e4"),
    ]
    assert not {p.event_id for p in training_pairs(events)} & {p.event_id for p in preference_pairs(holdout)}


def test_training_pairs_of_nothing_to_prefer() -> None:
    assert training_pairs([]) == []
    assert (
        training_pairs(iter([ev(1, "message", text="t"), ev(2, "edit", prompt="q", original="x", edited="x")])) == []
    )
    assert training_pairs(iter([ev(1, "preference", prompt="p", chosen="a", rejected="b")])) == [
        PreferencePair("p", "a", "b", "e1")
    ]
