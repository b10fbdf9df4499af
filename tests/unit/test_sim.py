"""The simulated users: the demo's styles stay as they were, the benchmark's users are distinct, valid and seeded."""

from __future__ import annotations

from collections import Counter

import pytest

from pipeline.demo import sim
from pipeline.domain.events import Event, validate


def test_the_demo_users_are_unchanged():
    users = sim.users(8)
    assert [u.user_id for u in users[:2]] == ["user-000", "user-001"]
    assert [u.style["register"] for u in users] == [
        *("formal", "casual", "terse", "poetic", "enthusiastic", "academic"),
        *("formal", "casual"),
    ]
    assert all(type(u) is sim.SimUser for u in users)
    first = next(sim.events_for(users[0], 1, app="demo", seed=0))
    assert first["text"].startswith("Good morning,") and first["text"].endswith("Kind regards, Eleanor")


def test_bench_users_have_distinct_styles():
    styles = sim.bench_styles()
    assert len(styles) >= 8
    assert len({s["register"] for s in styles}) == len(styles)
    users = sim.bench_users(len(styles), seed=3)
    assert len({u.style["register"] for u in users}) == len(users)
    assert len({u.user_id for u in users}) == len(users)
    assert [u.style for u in sim.bench_users(4, seed=0)] == [u.style for u in sim.bench_users(4, seed=1)]
    with pytest.raises(ValueError):
        sim.bench_users(len(styles) + 1)


@pytest.mark.parametrize("style", sim.bench_styles(), ids=lambda s: s["register"])
def test_bench_events_are_valid_mixed_and_vary_with_the_seed(style):
    user = sim.bench_user(style, f"t-{style['register']}")
    events = list(sim.events_for(user, 200, app="test", seed=1))
    assert all(isinstance(validate(e), Event) for e in events)
    kinds = Counter(e["kind"] for e in events)
    assert kinds["message"] > 100 and kinds["edit"] and kinds["preference"] and kinds["feedback"]
    texts = [e["text"] for e in events if e["kind"] == "message"]
    assert texts == [e["text"] for e in sim.events_for(user, 200, app="test", seed=1) if e["kind"] == "message"]
    other = [e["text"] for e in sim.events_for(user, 200, app="test", seed=2) if e["kind"] == "message"]
    assert texts != other
    for e in events:  # a preference or an edit always prefers the user's own text over the neutral one
        if e["kind"] in ("preference", "edit"):
            assert (e.get("chosen") or e["edited"]) != (e.get("rejected") or e["original"])


def test_hard_styles_vary_their_content_and_keep_a_marker():
    markers = {
        "content-signoff": lambda t: t.endswith("~ Marguerite (sent from the allotment)"),
        "content-lowercase": lambda t: t == t.lower(),
        "content-tic": lambda t: t.startswith("Right, so ") and "you know?" in t,
        "content-bullets": lambda t: t.startswith("My notes:\n- "),
        "french-casual": lambda t: t.startswith("Coucou les amis !") and t.endswith("Bisous, Léa"),
    }
    for style in sim.bench_styles():
        if "marker" not in style:
            continue
        user = sim.bench_user(style, "t")
        texts = [e["text"] for e in sim.events_for(user, 100, app="test", seed=0) if e["kind"] == "message"]
        if style["register"] in markers:  # the emoji habit is most messages, not all (below)
            assert all(markers[style["register"]](t) for t in texts), style["register"]
        assert len(set(texts)) == len(texts), f"{style['register']}: repeated texts"
    emoji = sim.bench_user(next(s for s in sim.bench_styles() if s.get("marker") == "emoji"), "t")
    texts = [e["text"] for e in sim.events_for(emoji, 100, app="test", seed=0) if e["kind"] == "message"]
    assert sum(any(c in t for c in "🌿✨🐝") for t in texts) > len(texts) / 2


def test_poison_generators():
    user, source = sim.bench_users(2, seed=0)
    foreign = sim.foreign_events(user, source, 30, app="test", seed=0)
    own_source = list(sim.events_for(source, 30, app="test", seed=0))
    assert [e["user_id"] for e in foreign] == [user.user_id] * 30
    assert [e.get("text") for e in foreign] == [e.get("text") for e in own_source]
    assert not {e["event_id"] for e in foreign} & {e["event_id"] for e in own_source}

    salad = sim.word_salad_events(user, 30, app="test", seed=0)
    assert len({e["text"] for e in salad}) == 30 and all(e["kind"] == "message" for e in salad)
    assert salad != sim.word_salad_events(user, 30, app="test", seed=1)

    repeated = sim.repeated_events(user, 50, app="test", seed=0)
    assert len(repeated) == 50 and len({e["event_id"] for e in repeated}) == 50
    assert len({(e["prompt"], e["text"]) for e in repeated}) == 1

    for e in foreign + salad + repeated:
        assert isinstance(validate(e), Event), e
