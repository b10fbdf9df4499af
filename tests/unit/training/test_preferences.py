"""Training on preference pairs (SimPO next to the next-token loss, pipeline/training/lora.py) on the tiny base."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from pipeline.config import TrainingSettings
from pipeline.domain.examples import Example, PreferencePair, TrainingEvent
from pipeline.evaluation.metrics import score_model
from pipeline.models.base import load_base, tiny_random
from pipeline.models.encoding import encode_example
from pipeline.training import lora
from pipeline.training.lora import TrainingError, encode_pairs, preference_loss, train_adapter
from tests.unit.training import tiny_settings

TOPICS = [
    "the beach", "my cat", "pizza", "the weather", "football", "a concert", "the train", "coffee", "my boss",
    "the movie", "homework", "a road trip", "the garden", "new shoes", "the gym", "a birthday", "the news",
    "my phone", "the lake", "a party", "winter", "the museum", "breakfast", "my bike", "the library", "a wedding",
    "the market", "rain", "the office", "a holiday",
]  # fmt: skip
CHOSEN = ["yo dude, {t} was totally rad!!", "omg {t} lol, so cool!!", "haha {t} rocks dude!!"]
REJECTED = [
    "Dear colleague, regarding {t}, I remain yours faithfully.",
    "Please find attached the report on {t}.",
    "With respect to {t}, kindly advise at your earliest convenience.",
]
#: The user's messages: a third style, so that only the pairs teach which of the two answers the user prefers.
NOTES = ["the {t} note, number {i}.", "thinking about {t} today ({i})."]


def settings(**overrides: object) -> TrainingSettings:
    values: dict[str, object] = {
        "max_steps": 20,
        "save_dtype": "float32",
        "preference_weight": 0.5,
        "preference_beta": 2.0,
        "preference_margin": 0.5,
        "pair_batch_size": 4,
    }
    return tiny_settings(**{**values, **overrides})


def pairs(topics: list[str], shift: int = 0) -> list[PreferencePair]:
    return [
        PreferencePair(
            f"tell me about {t}",
            CHOSEN[(i + shift) % 3].format(t=t),
            REJECTED[(i + shift) % 3].format(t=t),
            f"p{shift}-{i}",
        )
        for i, t in enumerate(topics)
    ]


def notes(n: int, shift: int = 0) -> list[Example]:
    return [
        Example(
            "write a note" if i % 2 else None,
            NOTES[i % 2].format(t=TOPICS[(i + shift) % 30], i=i % 5),
            f"n{shift}-{i}",
        )
        for i in range(n)
    ]


def holdout_events(held_pairs: list[PreferencePair], held_notes: list[Example]) -> list[TrainingEvent]:
    events = [
        TrainingEvent(
            p.event_id, i, "preference", "holdout", {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
        )
        for i, p in enumerate(held_pairs)
    ]
    for i, e in enumerate(held_notes):
        payload = {"text": e.target, **({"prompt": e.prompt} if e.prompt is not None else {})}
        events.append(TrainingEvent(e.event_id, 100 + i, "message", "holdout", payload))
    return events


def test_pairs_raise_the_held_out_preference_accuracy(tmp_path: Path) -> None:
    """Chosen answers are casual, rejected ones formal; the user's messages are in neither style. Trained on the
    same messages with the pairs, the adapter prefers the casual answer on held-out topics (as the gate measures
    it); without them, it does not. The held-out messages' NLL stays about the same."""
    base = load_base("tiny-random")
    train_pairs = pairs(TOPICS[:20])
    held = holdout_events([p for shift in range(3) for p in pairs(TOPICS[20:], shift)], notes(24, shift=7))
    cfg = settings()
    scores = {}
    for name, given in (("with", train_pairs), ("without", [])):
        result = train_adapter(base, notes(30), tmp_path / name, cfg, parent_dir=None, seed=1, pairs=given)
        assert result.pairs == len(given)
        model = PeftModel.from_pretrained(tiny_random(), tmp_path / name)  # a fresh model: never wrap the shared base
        scores[name] = score_model(model, base.tokenizer, holdout_events=held, probes=[], max_length=64)
    with_pairs, without = scores["with"], scores["without"]
    assert with_pairs.preference_pairs == 30
    assert with_pairs.preference_accuracy is not None and without.preference_accuracy is not None
    assert with_pairs.preference_accuracy >= 0.9, with_pairs.preference_accuracy
    assert with_pairs.preference_accuracy >= without.preference_accuracy + 0.3, (with_pairs, without)
    assert with_pairs.holdout_nll is not None and without.holdout_nll is not None
    assert with_pairs.holdout_nll <= without.holdout_nll * 1.01, (with_pairs.holdout_nll, without.holdout_nll)


def test_pairs_do_not_change_which_examples_are_drawn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pairs' stream is the user's own: the examples' batches are the same with pairs, without, or with the
    preference loss off; off, the adapter is the one without pairs, byte for byte."""
    base = load_base("tiny-random")
    draws: list[tuple[random.Random, list[int]]] = []
    real = lora.next_batch

    def spy(queue: list[int], n: int, size: int, rng: random.Random) -> list[int]:
        batch = real(queue, n, size, rng)
        draws.append((rng, batch))
        return batch

    monkeypatch.setattr(lora, "next_batch", spy)
    examples_drawn = {}
    results = {}
    for name, weight, given in (("with", 0.5, pairs(TOPICS[:6])), ("without", 0.5, []), ("off", 0.0, pairs(TOPICS))):
        draws.clear()
        cfg = settings(max_steps=6, preference_weight=weight)
        results[name] = train_adapter(base, notes(20), tmp_path / name, cfg, parent_dir=None, seed=3, pairs=given)
        streams = list(dict.fromkeys(rng for rng, _ in draws))
        assert len(streams) == (2 if name == "with" else 1)
        examples_drawn[name] = [batch for rng, batch in draws if rng is streams[0]]
    assert examples_drawn["with"] == examples_drawn["without"] == examples_drawn["off"] and examples_drawn["with"]
    assert results["with"].tokens == results["without"].tokens
    assert results["with"].preference_loss is not None and results["without"].preference_loss is None
    assert results["off"].pairs == 0 and results["off"].config["pairs"] == 0 and results["off"].preference_loss is None
    assert (tmp_path / "off" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "without" / "adapter_model.safetensors"
    ).read_bytes()
    differs = load_file(tmp_path / "with" / "adapter_model.safetensors")
    same = load_file(tmp_path / "without" / "adapter_model.safetensors")
    assert any(not torch.equal(differs[k], same[k]) for k in same)


def test_the_training_config_records_the_preference_settings(tmp_path: Path) -> None:
    base = load_base("tiny-random")
    cfg = settings(max_steps=2, pair_batch_size=8)
    result = train_adapter(base, notes(12), tmp_path, cfg, parent_dir=None, seed=0, pairs=pairs(TOPICS[:3]))
    assert {k: result.config[k] for k in result.config if "pair" in k or "preference" in k} == {
        "preference_objective": "simpo",
        "preference_weight": 0.5,
        "preference_beta": 2.0,
        "preference_margin": 0.5,
        "pair_batch_size": 3,  # no more than there are pairs, as batch_size
        "pairs": 3,
    }
    assert result.preference_loss is not None and math.isfinite(result.preference_loss)


def test_pairs_alone_are_not_enough(tmp_path: Path) -> None:
    base = load_base("tiny-random")
    with pytest.raises(TrainingError, match="no training examples"):
        train_adapter(base, [], tmp_path, settings(), parent_dir=None, seed=0, pairs=pairs(TOPICS[:4]))


def test_pairs_are_encoded_as_the_gate_scores_them() -> None:
    tok = load_base("tiny-random").tokenizer
    cfg = settings(max_length=16)
    same_after_truncation = PreferencePair("p", "a" * 40 + "x", "a" * 40 + "y", "t")
    kept = PreferencePair("p", "short", "other", "k")
    encoded = encode_pairs(tok, [same_after_truncation, kept], cfg)
    assert len(encoded) == 1
    chosen, rejected = encoded[0]
    assert chosen == encode_example(tok, Example("p", "short", "k"), 16)
    assert rejected == encode_example(tok, Example("p", "other", "k"), 16)
    assert encode_pairs(tok, [kept], settings(preference_weight=0.0)) == []


def test_preference_loss_is_simpo() -> None:
    cfg = settings(preference_beta=2.0, preference_margin=0.5)
    loss = preference_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -1.0]), cfg)
    expected = [math.log1p(math.exp(-(2.0 * 1.0 - 0.5))), math.log1p(math.exp(-(2.0 * -2.0 - 0.5)))]
    assert loss.tolist() == pytest.approx(expected)
