"""Evaluation metrics and adapter attachment on the tiny random base (CPU, seconds)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from pipeline.config import TrainingSettings
from pipeline.demo import sim
from pipeline.domain.errors import PersonaError
from pipeline.domain.examples import TrainingEvent, example_of, examples_from_events, preference_pairs
from pipeline.evaluation.metrics import (
    METRIC_KEYS,
    PAIRED,
    MetricsError,
    evaluate,
    load_general,
    load_probes,
    paired_gain,
    probe_logits,
    score_model,
    shift_examples,
)
from pipeline.models.attach import AttachError, attached, borrowed
from pipeline.models.base import LoadedBase, load_base, weights_sha256
from pipeline.training.lora import mean_nll, train_adapter

# interaction.v1 fields that are not the kind's payload.
ENVELOPE = {"event_id", "user_id", "occurred_at", "app", "meta", "kind"}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny tensors: thread hand-offs cost more than they save, and a busy CI machine makes them much worse.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def user_events(user: sim.SimUser, n: int = 40) -> list[TrainingEvent]:
    """A simulated user's events, every fifth one in the holdout split."""
    return [
        TrainingEvent(
            d["event_id"],
            i,
            d["kind"],
            "holdout" if i % 5 == 4 else "train",
            {k: v for k, v in d.items() if k not in ENVELOPE},
        )
        for i, d in enumerate(sim.events_for(user, n, app="test", seed=0))
    ]


def holdout(events: list[TrainingEvent]) -> list[TrainingEvent]:
    return [e for e in events if e.split == "holdout"]


def structure(model: torch.nn.Module) -> list[tuple[str, type, int, bool, int, int, tuple[str, ...]]]:
    return [
        (n, type(m), id(m), m.training, len(m._forward_hooks), len(m._forward_pre_hooks), tuple(sorted(vars(m))))
        for n, m in model.named_modules()
    ]


def fingerprint(base: LoadedBase) -> tuple[Any, ...]:
    model = base.model
    return (
        weights_sha256(model),
        structure(model),
        hasattr(model, "peft_config"),
        [p.requires_grad for p in model.parameters()],
        model.config.to_dict(),
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Two users of different styles (formal A, casual B), each with an adapter trained on their train split."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    base = load_base("tiny-random")
    user_a, user_b = sim.users(2)
    events_a, events_b = user_events(user_a), user_events(user_b)
    # A high learning rate and no validation slice: the tiny model learns a style in a second.
    settings = TrainingSettings(
        rank=4,
        alpha=8.0,
        target_modules="q_proj,v_proj",
        learning_rate=0.1,
        batch_size=8,
        max_length=128,
        max_steps=30,
        val_fraction=0.0,
        threads=1,
    )
    root = tmp_path_factory.mktemp("adapters")
    for name, events in (("a", events_a), ("b", events_b)):
        train_adapter(base, examples_from_events(events), root / name, settings, parent_dir=None, seed=1)
    torch.set_num_threads(before)
    return SimpleNamespace(base=base, events_a=events_a, dir_a=root / "a", dir_b=root / "b", probes=load_probes())


def run_evaluate(world: SimpleNamespace, candidate: Path, current: Path | None, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "candidate_dir": candidate,
        "current_dir": current,
        "holdout_events": holdout(world.events_a),
        "train_events_count": 32,
        "new_events_count": 32,
        "probes": world.probes,
    }
    kwargs.update(overrides)
    return evaluate(world.base, **kwargs)


# ---- evaluate: the gate's input ----------------------------------------------------------------------------------


def test_own_adapter_beats_the_base_and_another_users_adapter(world: SimpleNamespace) -> None:
    m = run_evaluate(world, world.dir_a, world.dir_b)
    cand, cur, base = m["candidate"], m["current"], m["base"]
    assert cand["holdout_nll"] < base["holdout_nll"] - 0.2, m
    assert cand["holdout_nll"] < cur["holdout_nll"] - 0.05, m  # B's adapter on A's holdout
    assert base["drift_kl"] == 0.0 and cand["drift_kl"] > 0 and cur["drift_kl"] > 0
    holdout_a = holdout(world.events_a)
    assert m["evidence"] == {
        "holdout_events": len(holdout_a),
        "holdout_events_prior": 0,
        "holdout_events_new": sum(example_of(e) is not None for e in holdout_a),
        "holdout_tokens": m["evidence"]["holdout_tokens"],
        "preference_pairs": sum(e.kind in ("preference", "edit") for e in holdout_a),
        "train_events": 32,
        "new_events": 32,
    }
    assert m["evidence"]["holdout_tokens"] > 100 and m["evidence"]["preference_pairs"] > 0


def test_result_shape_is_plain_json_and_deterministic(world: SimpleNamespace) -> None:
    first = run_evaluate(world, world.dir_a, None)
    assert set(first) == {"candidate", "current", "base", "paired", "evidence"} and first["current"] is None
    assert first["paired"]["current"] is None and set(first["paired"]["base"]) == set(PAIRED)
    assert tuple(first["base"]) == METRIC_KEYS
    assert tuple(first["candidate"]) == (*METRIC_KEYS, "new_shift", "new_repeat_share")
    for who in ("candidate", "base"):
        assert all(v is None or type(v) is float for v in first[who].values()), first[who]
    assert all(type(v) is int for v in first["evidence"].values())
    again = run_evaluate(world, world.dir_a, None)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)
    json.loads(json.dumps(first, allow_nan=False))


def test_base_is_unchanged_after_evaluate_and_after_a_bad_adapter(world: SimpleNamespace, tmp_path: Path) -> None:
    before = fingerprint(world.base)
    run_evaluate(world, world.dir_a, world.dir_b)
    assert fingerprint(world.base) == before
    broken = tmp_path / "broken"
    shutil.copytree(world.dir_a, broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AttachError, match="broken"):
        run_evaluate(world, broken, None)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AttachError) as err:
        run_evaluate(world, tmp_path, None)
    assert isinstance(err.value, PersonaError)
    with pytest.raises(AttachError):
        run_evaluate(world, tmp_path / "missing", None)
    assert fingerprint(world.base) == before


def test_no_holdout_target_and_no_pairs_give_none(world: SimpleNamespace) -> None:
    prefs = [e for e in holdout(world.events_a) if e.kind == "preference"]
    messages = [e for e in holdout(world.events_a) if e.kind == "message"]
    assert prefs and messages
    m = run_evaluate(world, world.dir_a, None, holdout_events=prefs)
    assert m["candidate"]["holdout_nll"] is None and m["base"]["holdout_nll"] is None
    assert m["evidence"]["holdout_tokens"] == 0 and m["candidate"]["preference_accuracy"] is not None
    m = run_evaluate(world, world.dir_a, None, holdout_events=messages)
    assert m["candidate"]["preference_accuracy"] is None and m["evidence"]["preference_pairs"] == 0
    m = run_evaluate(world, world.dir_a, None, holdout_events=[], probes=[])
    m = run_evaluate(world, world.dir_a, None, holdout_events=[], probes=[], general=[])
    assert set(m["candidate"].values()) == {None}
    assert m["base"] == {**dict.fromkeys(METRIC_KEYS), "drift_kl": 0.0}
    assert m["paired"]["base"] == dict.fromkeys(PAIRED)


def test_prior_and_new_holdout_paired_gains_and_the_rounds_new_events(world: SimpleNamespace) -> None:
    """The holdout splits at the parent's last event; the paired gains compare event by event; new_shift is ~0 for
    more of the same user and large for another writer; a repeated text raises new_repeat_share."""
    events = world.events_a
    cut = events[len(events) // 2].seq
    m = run_evaluate(world, world.dir_a, world.dir_a, parent_last_seq=cut, new_events=[])
    prior = [e for e in holdout(events) if e.seq <= cut and example_of(e) is not None]
    assert m["evidence"]["holdout_events_prior"] == len(prior) > 0 and m["evidence"]["holdout_events_new"] > 0
    for side in ("candidate", "base"):
        lo, hi = sorted((m[side]["holdout_nll_prior"], m[side]["holdout_nll_new"]))
        assert lo <= m[side]["holdout_nll"] <= hi
    # The same adapter as candidate and current: no gain, an interval of zero width.
    assert m["paired"]["current"]["holdout_nll"] == {"gain": 0.0, "low": 0.0, "high": 0.0, "events": 7}
    vs_base = m["paired"]["base"]["holdout_nll"]
    assert 0 < vs_base["low"] <= vs_base["gain"] <= vs_base["high"], vs_base  # A's adapter on A's text
    assert m["candidate"]["new_shift"] is None  # no new events given

    # The prior holdout texts sent again as new training events: exactly as likely as the prior holdout.
    again = [
        TrainingEvent(f"x{e.event_id}", e.seq, e.kind, "train", e.payload) for e in holdout(events) if e.seq <= cut
    ]
    rng = random.Random(0)
    noise = [
        TrainingEvent(
            f"n{i}", 1000 + i, "message", "train", {"text": "".join(chr(rng.randrange(33, 127)) for _ in range(60))}
        )
        for i in range(10)
    ]
    repeated = [TrainingEvent(f"r{i}", 100 + i, "message", "train", {"text": "the same words"}) for i in range(10)]
    shift_same = run_evaluate(world, world.dir_a, world.dir_a, parent_last_seq=cut, new_events=again)["candidate"]
    shift_noise = run_evaluate(world, world.dir_a, world.dir_a, parent_last_seq=cut, new_events=noise)["candidate"]
    assert abs(shift_same["new_shift"]) < 1e-9 and shift_same["new_repeat_share"] == 1 / len(again)
    assert shift_noise["new_shift"] > 0.05, shift_noise
    assert run_evaluate(world, world.dir_a, None, new_events=again)["candidate"]["new_shift"] is None  # no current
    assert run_evaluate(world, world.dir_a, None, new_events=repeated)["candidate"]["new_repeat_share"] == 1.0


def test_paired_gain_interval() -> None:
    ref = [(-10.0, 5)] * 30
    better = [(-9.0, 5)] * 30
    assert paired_gain(better, ref) == {"gain": 0.1, "low": 0.1, "high": 0.1, "events": 30}
    mixed = [(-9.0, 5) if i % 2 else (-11.0, 5) for i in range(30)]  # the same mean NLL, half better, half worse
    stats = paired_gain(mixed, ref)
    assert stats is not None and abs(stats["gain"]) < 1e-9 and stats["low"] < 0 < stats["high"]
    assert paired_gain(mixed, ref) == stats  # seeded
    assert paired_gain([], []) is None
    with pytest.raises(MetricsError, match="different lengths"):
        paired_gain(better, ref[:3])


def test_general_answers_load_and_score(world: SimpleNamespace, tmp_path: Path) -> None:
    general = load_general()
    assert len(general) >= 20 and all(g.prompt and g.target for g in general)
    m = run_evaluate(world, world.dir_a, None)
    assert m["base"]["general_nll"] > 0 and m["candidate"]["general_nll"] > 0
    bad = tmp_path / "p.yaml"
    bad.write_text("probes: [a]\ngeneral: [{prompt: p}]\n")
    with pytest.raises(MetricsError, match="general"):
        load_general(bad)
    bad.write_text("probes: [a]\n")
    assert load_general(bad) == []


def test_evaluate_refuses_training_events(world: SimpleNamespace) -> None:
    with pytest.raises(MetricsError, match="holdout-split events only"):
        run_evaluate(world, world.dir_a, None, holdout_events=world.events_a)


# ---- score_model --------------------------------------------------------------------------------------------------


def test_base_has_zero_drift_and_nll_matches_training(world: SimpleNamespace) -> None:
    base = world.base
    ref = probe_logits(base.model, base.tokenizer, world.probes)
    events = holdout(world.events_a)
    scores = score_model(base.model, base.tokenizer, holdout_events=events, probes=world.probes, base_logits=ref)
    assert scores.drift_kl == 0.0 and scores.probe_tokens == sum(t.shape[0] for t in ref)
    examples = [x for x in map(example_of, events) if x is not None]
    expected = mean_nll(base.model, base.tokenizer, examples, max_length=128)
    assert scores.holdout_nll == pytest.approx(expected, rel=1e-5)
    assert scores.holdout_examples == len(examples)
    no_ref = score_model(base.model, base.tokenizer, holdout_events=events, probes=world.probes)
    assert no_ref.drift_kl is None


class FondOfA(torch.nn.Module):
    """A fake causal LM that always predicts the byte ``a`` (probability ~0.9) and spreads the rest evenly."""

    def __init__(self, a_id: int, vocab: int = 384) -> None:
        super().__init__()
        self.a_id, self.vocab = a_id, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # only so that the scorer finds a device

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool) -> SimpleNamespace:
        logits = torch.zeros((*input_ids.shape, self.vocab))
        logits[..., self.a_id] = math.log(0.9 * (self.vocab - 1) / 0.1)
        return SimpleNamespace(logits=logits + self.anchor)


def pref(i: int, chosen: str, rejected: str, kind: str = "preference") -> TrainingEvent:
    if kind == "edit":
        return TrainingEvent(f"p{i}", i, "edit", "holdout", {"prompt": "q", "original": rejected, "edited": chosen})
    return TrainingEvent(f"p{i}", i, "preference", "holdout", {"prompt": "q", "chosen": chosen, "rejected": rejected})


def test_preference_accuracy_on_crafted_pairs() -> None:
    tok = load_base("tiny-random").tokenizer
    model = FondOfA(tok.convert_tokens_to_ids("a"))
    events = [
        pref(1, "aaaa", "zzzz"),
        pref(2, "aaaa", "abcd", kind="edit"),
        # Per-token normalisation: the longer answer wins on its mean, though its summed log-prob is lower.
        pref(3, "a" * 16, "a"),
        pref(4, "zzzz", "aaaa"),  # the model disagrees with the user here
        pref(5, "same", "same", kind="edit"),  # an edit that changed nothing is no pair
    ]
    scores = score_model(model, tok, holdout_events=events, probes=[])
    assert scores.preference_pairs == 4 and scores.preference_accuracy == 0.75
    assert scores.holdout_nll is not None and scores.holdout_examples == 2  # the edits' edited texts are targets
    assert scores.drift_kl is None
    only_messages = [TrainingEvent("m", 1, "message", "holdout", {"text": "aaaa"})]
    scores = score_model(model, tok, holdout_events=only_messages, probes=[])
    assert scores.preference_accuracy is None and scores.preference_pairs == 0
    # A message without a prompt is an answer to an empty user turn: "aaaa" at p=0.9, then the template's
    # newline and EOS at 0.1/383 each.
    assert scores.holdout_tokens == 6
    assert scores.holdout_nll == pytest.approx((-4 * math.log(0.9) - 2 * math.log(0.1 / 383)) / 6, rel=1e-5)


def test_score_model_restores_modes_and_uses_no_gradients(world: SimpleNamespace) -> None:
    base = world.base
    with attached(base, world.dir_a, trainable=True) as model:
        model.train()
        scores = score_model(model, base.tokenizer, holdout_events=holdout(world.events_a), probes=[])
        assert model.training and all(m.training for m in model.modules())
        assert scores.holdout_nll is not None
        assert all(p.grad is None for p in model.parameters())


# ---- attached ------------------------------------------------------------------------------------------------------


def test_attached_is_stock_peft_on_the_shared_base_and_restores_it(world: SimpleNamespace) -> None:
    base = world.base
    before = fingerprint(base)
    rng = torch.random.get_rng_state()
    with attached(base, world.dir_a) as model:
        assert type(model).__name__ == "PeftModelForCausalLM" and hasattr(base.model, "peft_config")
        assert model.get_base_model() is base.model and not model.training
        assert not any(p.requires_grad for p in model.parameters())
        with pytest.raises(AttachError, match="already borrowed"):
            with attached(base, world.dir_b):
                pass
    assert torch.equal(torch.random.get_rng_state(), rng)  # loading drew nothing from the caller's RNG
    assert fingerprint(base) == before
    with attached(base, world.dir_a, trainable=True) as model:
        assert any(p.requires_grad for p in model.parameters())
    with attached(base, None) as model:
        assert model is base.model
    assert fingerprint(base) == before


def test_other_threads_wait_for_the_base(world: SimpleNamespace) -> None:
    base = world.base
    entered = threading.Event()

    def other() -> None:
        with attached(base, world.dir_b):
            entered.set()

    with attached(base, world.dir_a):
        thread = threading.Thread(target=other)
        thread.start()
        assert not entered.wait(0.3)  # blocked while this thread holds the base
    thread.join(10)
    assert entered.is_set() and not thread.is_alive()


def test_borrowed_restores_after_an_exception_inside() -> None:
    base = load_base("tiny-random")
    before = fingerprint(base)
    with pytest.raises(RuntimeError, match="boom"):
        with borrowed(base.model) as model:
            model.train()
            model.model.layers[0].self_attn.q_proj = torch.nn.Identity()
            model.register_forward_hook(lambda *_: None)
            model.peft_config = {}
            next(model.parameters()).requires_grad_(True)
            raise RuntimeError("boom")
    assert fingerprint(base) == before


# ---- probes --------------------------------------------------------------------------------------------------------


def test_probe_file_loads_and_bad_files_are_refused(tmp_path: Path) -> None:
    probes = load_probes()
    assert 10 <= len(probes) <= 32 and len(set(probes)) == len(probes)
    for text in ("probes: []\n", "- a list\n", "probes: [1, 2]\n", "probes: ['', 'x']\n", "probes: [unclosed\n"):
        (tmp_path / "p.yaml").write_text(text)
        with pytest.raises(MetricsError, match=r"p\.yaml"):
            load_probes(tmp_path / "p.yaml")
    with pytest.raises(MetricsError, match=r"missing\.yaml"):
        load_probes(tmp_path / "missing.yaml")
    (tmp_path / "p.yaml").write_text("probes:\n  - one\n  - two\n")
    assert load_probes(tmp_path / "p.yaml") == ["one", "two"]


# ---- evaluate_many: the batched gate ---------------------------------------------------------------------------


@pytest.mark.parametrize("packed_rows", [False, True], ids=["padded", "packed"])
def test_evaluate_many_equals_evaluate_per_request(
    world: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, packed_rows: bool
) -> None:
    """Several candidates (with and without a serving revision, with prior/new holdout splits and new events) in
    one stacked pass give each request the result `evaluate` gives it alone: every metric, paired interval and
    evidence count, within float rounding (rtol 1e-5: rows run in other batches and through the per-row LoRA
    layer); a bad request fails alone, and one of another rank is evaluated on its own. The stacked forwards run
    the rows' common first tokens (the chat template's head) once per adapter (`shared_prefix`): counted. Labelled
    rows padded, or packed as one sequence per forward (`metrics.PACKED_ROWS`, `pipeline.models.packed`)."""
    from pipeline.evaluation import metrics
    from pipeline.evaluation.metrics import EvalRequest, evaluate_many
    from pipeline.models import packed, shared_prefix

    prefixes: list[int] = []
    real = shared_prefix.decoder_states
    real_rows = packed.rows_of

    def counted(decoder: Any, ids: Any, prefix: Any, set_rows: Any, row_slots: Any) -> Any:
        prefixes.append(prefix.length if prefix is not None else 0)
        return real(decoder, ids, prefix, set_rows, row_slots)

    def counted_rows(ids: Any, slots: Any, shared: int = 0) -> Any:
        prefixes.append(shared)
        return real_rows(ids, slots, shared)

    monkeypatch.setattr(shared_prefix, "decoder_states", counted)
    monkeypatch.setattr(packed, "rows_of", counted_rows)
    monkeypatch.setattr(metrics, "SHARED_PREFIX", {"cpu": True})
    monkeypatch.setattr(metrics, "PACKED_ROWS", {"cpu": packed_rows})

    events = world.events_a
    cut = events[len(events) // 2].seq
    again = [TrainingEvent(f"x{e.event_id}", e.seq, e.kind, "train", e.payload) for e in holdout(events)[:5]]
    other_rank = tmp_path / "r2"
    settings = TrainingSettings(rank=2, alpha=4.0, target_modules="q_proj,v_proj", max_steps=2, val_fraction=0.0)
    train_adapter(world.base, examples_from_events(events), other_rank, settings, parent_dir=None, seed=2)
    requests = [
        EvalRequest(world.dir_a, None, holdout(events), 32, 32),
        EvalRequest(world.dir_a, world.dir_b, holdout(events), 30, 12, parent_last_seq=cut, new_events=again),
        EvalRequest(world.dir_b, world.dir_a, holdout(events), 30, 12, parent_last_seq=cut),
        EvalRequest(world.dir_b, None, events, 1, 1),  # training events: refused, alone
        EvalRequest(other_rank, world.dir_a, holdout(events), 30, 12, parent_last_seq=cut),  # another rank
    ]
    before = fingerprint(world.base)
    got = evaluate_many(world.base, requests, probes=world.probes, batch_size=5)
    assert fingerprint(world.base) == before  # the shared base comes back exactly as it was
    assert isinstance(got[3], MetricsError)
    for req, result in zip(requests, got, strict=True):
        if req.holdout_events is events:
            continue
        want = evaluate(
            world.base,
            candidate_dir=req.candidate_dir,
            current_dir=req.current_dir,
            holdout_events=req.holdout_events,
            train_events_count=req.train_events_count,
            new_events_count=req.new_events_count,
            probes=world.probes,
            parent_last_seq=req.parent_last_seq,
            new_events=req.new_events,
        )
        assert isinstance(result, dict), result
        scores = result.pop("scores", None)  # the stacked path's rows for later gates (checked below)
        assert scores is None or (scores["reused"] == 0 and scores["candidate"])
        _assert_close_tree(result, want)
    assert got[1]["candidate"]["new_shift"] is not None and got[1]["current"] is not None
    assert any(n >= shared_prefix.MIN_PREFIX for n in prefixes), prefixes


def test_new_shift_scores_a_fixed_sample_of_a_large_round(world: SimpleNamespace) -> None:
    """Past ``shift_events`` new events, new_shift is taken over a sample: the same events whatever their order or
    path (`evaluate`, `evaluate_many`), in event order; 0 takes all. new_repeat_share still sees every event."""
    from pipeline.evaluation.metrics import EvalRequest, evaluate_many

    events = world.events_a
    cut = events[len(events) // 2].seq
    rng = random.Random(1)
    again = [
        TrainingEvent(f"x{e.event_id}", e.seq, e.kind, "train", e.payload) for e in holdout(events) if e.seq <= cut
    ]
    noise = [
        TrainingEvent(
            f"n{i}", 1000 + i, "message", "train", {"text": "".join(chr(rng.randrange(33, 127)) for _ in range(60))}
        )
        for i in range(len(again))
    ]
    mixed = sorted(again + noise, key=lambda e: e.seq)
    assert len(mixed) > 4
    picked = shift_examples(mixed, 4)
    shuffled = list(mixed)
    rng.shuffle(shuffled)
    assert len(picked) == 4 and {x.target for x in shift_examples(shuffled, 4)} == {x.target for x in picked}
    targets = [example_of(e).target for e in mixed]  # type: ignore[union-attr]
    assert [targets.index(x.target) for x in picked] == sorted(targets.index(x.target) for x in picked)
    assert len(shift_examples(mixed, 0)) == len(mixed) == len(shift_examples(mixed, len(mixed)))

    every = run_evaluate(world, world.dir_a, world.dir_b, parent_last_seq=cut, new_events=mixed, shift_events=0)
    some = run_evaluate(world, world.dir_a, world.dir_b, parent_last_seq=cut, new_events=mixed, shift_events=4)
    assert some["candidate"]["new_shift"] != every["candidate"]["new_shift"]
    assert some["candidate"]["new_repeat_share"] == every["candidate"]["new_repeat_share"]
    request = EvalRequest(world.dir_a, world.dir_b, holdout(events), 32, 32, parent_last_seq=cut, new_events=mixed)
    other = EvalRequest(world.dir_b, world.dir_a, holdout(events), 32, 32, parent_last_seq=cut)
    stacked = evaluate_many(world.base, [request, other], probes=world.probes, shift_events=4)[0]
    assert isinstance(stacked, dict), stacked
    assert math.isclose(stacked["candidate"]["new_shift"], some["candidate"]["new_shift"], rel_tol=1e-3, abs_tol=1e-4)


def _assert_close_tree(a: Any, b: Any, path: str = "") -> None:
    if isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys(), path
        for k in b:
            _assert_close_tree(a[k], b[k], f"{path}.{k}")
    elif isinstance(b, list) and isinstance(a, list) and len(a) == len(b):
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close_tree(x, y, f"{path}[{k}]")
    elif isinstance(b, float) and isinstance(a, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_evaluate_many_head_on_labelled_positions_equals_the_full_logits(
    world: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stacked gate applies the LM head to the labelled positions only (`_split_head`: the tiny Llama qualifies)
    and scores probe rows in batches of one probe: the same results as the full-logits path within float rounding,
    whatever the batching (3 rows: probe batches of 3 and of 1 row, labelled batches of rows of different lengths)."""
    from pipeline.evaluation import metrics
    from pipeline.evaluation.metrics import EvalRequest, evaluate_many

    assert metrics._split_head(world.base.model) is not None
    events = world.events_a
    cut = events[len(events) // 2].seq
    again = [TrainingEvent(f"x{e.event_id}", e.seq, e.kind, "train", e.payload) for e in holdout(events)[:3]]
    requests = [
        EvalRequest(world.dir_a, world.dir_b, holdout(events), 30, 12, parent_last_seq=cut, new_events=again),
        EvalRequest(world.dir_b, None, holdout(events), 30, 12),
    ]
    split = evaluate_many(world.base, requests, probes=world.probes[:3], batch_size=3)
    # labelled rows batched apart from probe rows (PERSONA_GATE_ROWS_PER_FORWARD): 2 labelled, 3 probe rows a batch
    apart = evaluate_many(world.base, requests, probes=world.probes[:3], batch_size=3, labelled_batch=2)
    monkeypatch.setattr(metrics, "_split_head", lambda model: None)
    full = evaluate_many(world.base, requests, probes=world.probes[:3], batch_size=7)
    for got, other, want in zip(split, apart, full, strict=True):
        assert isinstance(got, dict) and isinstance(other, dict) and isinstance(want, dict), (got, want)
        _assert_close_tree(got, want)
        _assert_close_tree(other, want)


def test_stacked_row_sums_and_probe_kl_equal_the_per_row_computation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The stacked gate's arithmetic on crafted tensors: labelled rows of different lengths and one with no target
    token (sum 0) through the head in chunks of 2 tokens equal the full log-softmax; a batch of one probe's rows
    gives each row `F.kl_div` of its log-probs against the reference."""
    import torch.nn.functional as F

    from pipeline.evaluation import metrics
    from pipeline.models.encoding import IGNORE

    torch.manual_seed(0)
    rows, width, hidden_size, vocab = 3, 6, 5, 11
    head = torch.nn.Linear(hidden_size, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(rows, width, hidden_size)
    labels = torch.randint(vocab, (rows, width - 1))
    labels[0, :2] = IGNORE  # a prompt
    labels[1, 3:] = IGNORE  # a shorter row: padding
    labels[2] = IGNORE  # no target token
    want = metrics._label_sums_full(head(hidden), labels)
    keep = labels != IGNORE
    flat = keep.flatten().nonzero().squeeze(1)
    owner = flat // (width - 1)
    picked = owner * width + flat % (width - 1)
    monkeypatch.setattr(metrics, "HEAD_CHUNK", 2)
    got = metrics._label_sums_split(head, hidden.reshape(-1, hidden_size)[picked], labels.flatten()[flat], owner, rows)
    assert got.dtype == torch.float64 and float(got[2]) == 0.0
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6), (got, want)

    logits, ref = torch.randn(4, 3, vocab), torch.randn(3, vocab)
    ref_lp = F.log_softmax(ref, dim=-1)
    kl = metrics._kl_rows(logits, ref_lp, ref_lp.exp())
    each = torch.stack(
        [F.kl_div(F.log_softmax(row, dim=-1), ref_lp, log_target=True, reduction="sum") for row in logits]
    )
    assert kl.dtype == torch.float64 and torch.allclose(kl, each.double(), rtol=1e-5, atol=1e-7), (kl, each)


def test_split_head_refuses_final_logit_processing() -> None:
    """A model whose logits are more than ``lm_head(hidden)`` (soft-capping, a scale, LoRA on the head) keeps the
    full forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.evaluation.metrics import _split_head
    from pipeline.models import multilora

    shape = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    plain = LlamaForCausalLM(LlamaConfig(vocab_size=16, **shape))
    assert _split_head(plain) is not None
    with multilora.wrap_linears(plain, {"lm_head": multilora.LoraStack.zeros(plain.lm_head, 2, 1)}):
        assert _split_head(plain) is None  # LoRA on the head: the head is no plain Linear
    assert _split_head(plain) is not None
    for extra in ({"final_logit_softcapping": 30.0}, {"logit_scale": 0.5}):
        assert _split_head(LlamaForCausalLM(LlamaConfig(vocab_size=16, **shape, **extra))) is None, extra


def test_a_later_gate_reuses_the_serving_revisions_rows(world: SimpleNamespace) -> None:
    """The stacked gate leaves each candidate's rows (and the base's) in its result's ``scores``; the next round,
    given them as ``known``, runs only the rows they do not hold (the serving revision's holdout, pair, general and
    probe rows and the base's rows of the same events) and gives the same result within float rounding. Scores of
    another fingerprint, or that do not read as rows, are not used."""
    from pipeline.evaluation.metrics import EvalRequest, evaluate_many

    events = holdout(world.events_a)
    cut = events[len(events) // 2].seq
    companion = EvalRequest(world.dir_a, None, events, 32, 32)  # two requests: the stacked path

    def gate(req: EvalRequest) -> dict[str, Any]:
        result = evaluate_many(world.base, [req, companion], probes=world.probes, batch_size=5)[0]
        assert isinstance(result, dict), result
        return result

    # Round 1: B is judged against A; its rows are kept.
    first = gate(EvalRequest(world.dir_b, world.dir_a, events, 30, 12, parent_last_seq=cut))
    kept = first["scores"]
    assert kept["reused"] == 0 and kept["version"] == 1 and len(kept["fingerprint"]) == 64
    n_pairs = len(preference_pairs(events))
    n_scored = sum(1 for e in events if example_of(e) is not None)
    assert len(kept["base"]) == n_scored + 2 * n_pairs
    assert len(kept["candidate"]) == n_scored + 2 * n_pairs + len(load_general()) + len(world.probes)

    # Round 2: B serves, A is the candidate again. With B's rows known, the same result.
    later = EvalRequest(world.dir_a, world.dir_b, events, 30, 12, parent_last_seq=cut)
    plain = gate(later)
    reusing = gate(dataclasses.replace(later, known=kept))
    assert plain["scores"]["reused"] == 0
    assert reusing["scores"]["reused"] == len(kept["candidate"]) + len(kept["base"])
    for result in (plain, reusing):
        result.pop("scores")
    _assert_close_tree(reusing, plain)
    assert reusing["current"]["general_nll"] == first["candidate"]["general_nll"]  # B's own, not recomputed

    # Another fingerprint (another base, probe set or setting), or rows that do not read: computed again.
    for known in ({**kept, "fingerprint": "0" * 64}, {**kept, "candidate": {"h:x": "not a row"}}, {"version": 9}):
        assert gate(dataclasses.replace(later, known=known))["scores"]["reused"] == 0
