"""Training: examples from events, replay, and LoRA training on the tiny random base (CPU, seconds)."""

from __future__ import annotations

import copy
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.config import TrainingSettings
from pipeline.domain.errors import PersonaError
from pipeline.domain.examples import (
    Example,
    PreferencePair,
    TrainingEvent,
    examples_from_events,
    preference_pairs,
    replay_sample,
    select_training_events,
)
from pipeline.models.base import LoadedBase, load_base, tiny_random, weights_sha256
from pipeline.models.encoding import IGNORE, encode_example
from pipeline.training.lora import TrainingError, mean_nll, train_adapter
from tests.unit.training import tiny_settings


def ev(seq: int, kind: str, split: str = "train", **payload: object) -> TrainingEvent:
    return TrainingEvent(f"e{seq}", seq, kind, split, dict(payload))


# ---- examples ---------------------------------------------------------------------------------------------------


def test_examples_follow_the_rules_per_kind_and_split() -> None:
    events = [
        ev(1, "message", text="hi there"),
        ev(2, "message", prompt="how are you?", text="grand, thanks"),
        ev(3, "edit", prompt="write", original="Dear Sir", edited="hey"),
        ev(4, "feedback", prompt="p", completion="liked", rating=1),
        ev(5, "feedback", prompt="p", completion="meh", rating=0),
        ev(6, "feedback", prompt="p", completion="bad", rating=-1),
        ev(7, "preference", prompt="p", chosen="a", rejected="b"),
        ev(8, "message", "holdout", text="never trained on"),
        ev(9, "edit", "holdout", prompt="p", original="x", edited="y"),
    ]
    assert examples_from_events(events) == [
        Example(None, "hi there", "e1"),
        Example("how are you?", "grand, thanks", "e2"),
        Example("write", "hey", "e3"),
        Example("p", "liked", "e4"),
    ]


def test_preference_pairs_from_preferences_and_edits_of_any_split() -> None:
    events = [
        ev(1, "preference", prompt="p", chosen="a", rejected="b"),
        ev(2, "edit", "holdout", prompt="q", original="long", edited="short"),
        ev(3, "edit", prompt="q", original="same", edited="same"),
        ev(4, "message", text="t"),
        ev(5, "feedback", prompt="p", completion="c", rating=1),
    ]
    assert preference_pairs(events) == [
        PreferencePair("p", "a", "b", "e1"),
        PreferencePair("q", "short", "long", "e2"),
    ]


def test_replay_is_bounded_seeded_and_in_ingestion_order() -> None:
    older = [ev(i, "message", text=str(i)) for i in range(100)]
    a = replay_sample(older, 10, "user-1:rev")
    assert len(a) == 10 and [e.seq for e in a] == sorted(e.seq for e in a)
    assert replay_sample(list(reversed(older)), 10, "user-1:rev") == a
    assert replay_sample(older, 10, "user-2:rev") != a
    assert replay_sample(older[:5], 10, 1) == older[:5]
    assert replay_sample(older, 0, 1) == []


def test_select_training_events_new_and_replay() -> None:
    events = [ev(i, "message", "holdout" if i % 4 == 0 else "train", text=str(i)) for i in range(1, 41)]
    new, replay = select_training_events(events, parent_last_seq=None, replay_max=5, seed=3)
    assert [e.seq for e in new] == [i for i in range(1, 41) if i % 4] and replay == []
    new, replay = select_training_events(reversed(events), parent_last_seq=20, replay_max=5, seed=3)
    assert [e.seq for e in new] == [i for i in range(21, 41) if i % 4]
    assert len(replay) == 5 and all(e.seq <= 20 and e.split == "train" for e in replay)
    assert select_training_events(events, parent_last_seq=20, replay_max=5, seed=3)[1] == replay


def test_encoding_masks_the_prompt_and_keeps_the_target_when_truncating() -> None:
    tok = load_base("tiny-random").tokenizer
    enc = encode_example(tok, Example("ask", "answer", "e"), 128)
    trained = [t for t in enc.labels if t != IGNORE]
    assert tok.decode(trained[:-1]) == "answer\n" and trained[-1] == tok.eos_token_id
    assert tok.decode(enc.input_ids[: len(enc.input_ids) - len(trained)]) == "<|user|>ask\n<|assistant|>"
    # Without a prompt: an empty user turn (the answer as served in a chat), or plain text without a chat template.
    alone = encode_example(tok, Example(None, "just text", "e"), 128)
    trained = [t for t in alone.labels if t != IGNORE]
    assert tok.decode(trained[:-1]) == "just text\n" and trained[-1] == tok.eos_token_id
    assert tok.decode(alone.input_ids[: len(alone.input_ids) - len(trained)]) == "<|user|>\n<|assistant|>"
    no_template = copy.deepcopy(tok)
    no_template.chat_template = None
    plain = encode_example(no_template, Example(None, "just text", "e"), 128)
    assert plain.labels == plain.input_ids and plain.input_ids.count(tok.eos_token_id) == 1
    long = encode_example(tok, Example("p" * 500, "t" * 20, "e"), 64)
    assert len(long.input_ids) == 64 and sum(t != IGNORE for t in long.labels) == 22  # 20 + newline + EOS


def test_encoding_many_equals_encoding_one_by_one() -> None:
    """`encode_examples` (shared user turns, batched tokenizer calls) gives exactly `encode_example`'s ids and labels:
    the tiny byte-level tokenizer with and without a chat template, and SmolLM2's BPE tokenizer with its own template
    (prompts and none, repeated prompts, unicode, empty targets, truncation at both ends)."""
    from transformers import AutoTokenizer

    from pipeline.config import ModelSettings
    from pipeline.models import prepare as prep
    from pipeline.models.encoding import encode_examples

    tiny = load_base("tiny-random").tokenizer
    no_template = copy.deepcopy(tiny)
    no_template.chat_template = None
    settings = ModelSettings()
    if prep.read_prepared(prep.prepared_dir(settings.cache_dir), prep.SMOLLM2_ID) is None:
        prep.prepare(settings)
    smol = AutoTokenizer.from_pretrained(prep.prepared_dir(settings.cache_dir))
    rng = random.Random(5)
    words = ["hello", "Grüße", "ok", "the", "日本", "?", "don't", "  spaces", "\n", "emoji 🙂"]
    examples = []
    for i in range(120):
        prompt = None if i % 3 == 0 else rng.choice(["ask", "what now?", "", "p" * rng.randrange(1, 300)])
        target = " ".join(rng.choice(words) for _ in range(rng.randrange(0, 40)))
        examples.append(Example(prompt, target, f"e{i}"))
    examples += [Example(p, t, f"m{i}") for i, (p, t) in enumerate(itertools.product(["ask", None], MARKUP))]
    templates = []
    for template in TEMPLATES:  # templates that trim, escape, look into the answer or render it apart
        other = copy.deepcopy(tiny)
        other.chat_template = template
        templates.append(other)
    for tok in (tiny, no_template, smol, *templates):
        for max_length in (16, 64, 512):
            one = [encode_example(tok, x, max_length) for x in examples]
            assert encode_examples(tok, examples, max_length) == one
            # again, in another order and with examples not seen yet: the kept encodings and new ones mixed
            mixed = [*examples[::-1][:60], Example("new", f"not seen {max_length}", "n"), *examples[:7]]
            assert encode_examples(tok, mixed, max_length) == [encode_example(tok, x, max_length) for x in mixed]
    assert encode_examples(smol, [], 64) == []
    # the renderings kept across calls follow a template changed on the same tokenizer
    changing = copy.deepcopy(tiny)
    for template in (tiny.chat_template, *TEMPLATES):
        changing.chat_template = template
        assert encode_examples(changing, examples, 64) == [encode_example(changing, x, 64) for x in examples]


#: Answers a template might treat apart (`encoding._splice` must not put them in verbatim where it would not).
MARKUP = ["<think>a</think>b", "a</think> b", " padded ", "{{ x }}", "", "   ", "tab\tand & 'quote' \"q\" \\"]
TEMPLATES = [
    # Llama-3-like: the content trimmed
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}<|eot|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    # Qwen3-like: the reasoning split off the answer
    "{% for m in messages %}<|{{ m['role'] }}|>{% if '</think>' in m['content'] %}"
    "{{ m['content'].split('</think>')[-1].lstrip() }}{% else %}{{ m['content'] }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    # HTML-escaped content
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | e }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    # an empty answer rendered as nothing at all
    "{% for m in messages %}{% if m['content'] %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    # the last assistant turn rendered differently from a generation prompt
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|bot|>{% else %}<|{{ m['role'] }}|>{% endif %}"
    "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
]


# ---- LoRA training ----------------------------------------------------------------------------------------------

STYLE = [f"yo dude, totally rad wave number {i % 5}!!" for i in range(30)]


def settings(**overrides: object) -> TrainingSettings:
    return tiny_settings(**overrides)


def style_examples(n: int = 30) -> list[Example]:
    return [Example("say something" if i % 2 else None, STYLE[i % len(STYLE)], f"e{i}") for i in range(n)]


def structure(model: torch.nn.Module) -> list[tuple[str, type, int, bool, int]]:
    return [(n, type(m), id(m), m.training, len(m._forward_hooks)) for n, m in model.named_modules()]


def learnable_base() -> LoadedBase:
    """The shared tiny-random base (its norms are at 1, so LoRA can learn on it)."""
    return load_base("tiny-random")


def test_training_reduces_the_loss_on_a_users_style(tmp_path: Path) -> None:
    base = learnable_base()
    examples = style_examples()
    before = mean_nll(base.model, base.tokenizer, examples, max_length=64)
    steps: list[int] = []
    result = train_adapter(
        base,
        examples,
        tmp_path,
        settings(max_steps=40),
        parent_dir=None,
        seed=1,
        progress=lambda s, _: steps.append(s),
    )
    trained = PeftModel.from_pretrained(tiny_random(), tmp_path)  # a fresh model: never wrap the shared base
    after = mean_nll(trained, base.tokenizer, examples, max_length=64)
    assert after < before - 0.3, (before, after)
    assert result.val_loss is not None and result.val_loss < before
    assert steps == list(range(1, result.steps + 1)) and 0 < result.best_step <= result.steps
    assert result.examples == 30 and result.config["val_examples"] == 3 and result.tokens > 0
    assert result.config["seed"] == 1 and result.config["dtype"] == "bfloat16"


def test_base_is_untouched_and_trainings_repeat(tmp_path: Path) -> None:
    base = load_base("tiny-random")
    sha, shape = weights_sha256(base.model), structure(base.model)
    for name, parent in (("a", None), ("b", tmp_path / "a"), ("c", None)):
        train_adapter(base, style_examples(12), tmp_path / name, settings(max_steps=3), parent_dir=parent, seed=2)
        assert weights_sha256(base.model) == sha and structure(base.model) == shape
        assert not hasattr(base.model, "peft_config")
        assert not any(p.requires_grad for p in base.model.parameters())


def test_base_is_untouched_after_a_failed_training(tmp_path: Path) -> None:
    base = load_base("tiny-random")
    sha, shape = weights_sha256(base.model), structure(base.model)
    with pytest.raises(TrainingError, match=r"step \d+") as err:
        train_adapter(base, style_examples(8), tmp_path, settings(learning_rate=1e30), parent_dir=None, seed=0)
    assert isinstance(err.value, PersonaError)
    assert weights_sha256(base.model) == sha and structure(base.model) == shape
    with pytest.raises(TrainingError, match="parent adapter"):
        train_adapter(base, style_examples(8), tmp_path, settings(), parent_dir=tmp_path / "missing", seed=0)
    with pytest.raises(TrainingError, match="no training examples"):
        train_adapter(base, [], tmp_path, settings(), parent_dir=None, seed=0)
    assert weights_sha256(base.model) == sha and structure(base.model) == shape


def test_same_inputs_give_the_same_adapter_bytes(tmp_path: Path) -> None:
    base = load_base("tiny-random")
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        train_adapter(base, style_examples(), tmp_path / name, settings(max_steps=6), parent_dir=None, seed=seed)
    data = {n: (tmp_path / n / "adapter_model.safetensors").read_bytes() for n in "abc"}
    assert data["a"] == data["b"] != data["c"]
    assert (tmp_path / "a" / "adapter_config.json").read_bytes() == (
        tmp_path / "b" / "adapter_config.json"
    ).read_bytes()


def test_saved_adapter_is_bf16_and_loads_with_stock_peft(tmp_path: Path) -> None:
    base = load_base("tiny-random")
    train_adapter(base, style_examples(), tmp_path, settings(max_steps=5), parent_dir=None, seed=0)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (
        config["peft_type"] == "LORA" and config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    )
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.bfloat16 for t in saved.values())
    assert any(float(t.abs().max()) > 0 for k, t in saved.items() if "lora_B" in k)  # it trained
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(tiny_random(), tmp_path))
    assert loaded.keys() == saved.keys()
    for key, tensor in saved.items():
        assert torch.equal(loaded[key].float(), tensor.float()), key


def test_continuing_starts_from_the_parents_weights(tmp_path: Path) -> None:
    base = load_base("tiny-random")
    train_adapter(base, style_examples(), tmp_path / "parent", settings(max_steps=5), parent_dir=None, seed=0)
    one_tiny_step = {"max_steps": 1, "learning_rate": 1e-7, "val_fraction": 0.0}
    # The parent's LoRA shape wins over the settings' (rank 4 on q,v, not rank 2 on k).
    child_settings = settings(**one_tiny_step, rank=2, target_modules="k_proj")
    child = train_adapter(
        base, style_examples(), tmp_path / "child", child_settings, parent_dir=tmp_path / "parent", seed=9
    )
    fresh = train_adapter(
        base, style_examples(), tmp_path / "fresh", settings(**one_tiny_step), parent_dir=None, seed=9
    )
    assert child.config["rank"] == 4 and child.config["targets"] == ["q_proj", "v_proj"]
    assert child.config["continued_from_parent"] and not fresh.config["continued_from_parent"]
    p, c, f = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("parent", "child", "fresh"))
    assert p.keys() == c.keys() == f.keys()
    for key in p:
        assert torch.allclose(c[key].float(), p[key].float(), atol=1e-3), key
    assert max(float((f[k].float() - p[k].float()).abs().max()) for k in p) > 0.1


def test_the_anchor_keeps_a_continued_adapter_near_its_parent(tmp_path: Path) -> None:
    """With ``anchor``, a continued training moves less far from the parent's weights than without (and is recorded
    in the manifest's training field); 0 is the plain AdamW run."""
    base = load_base("tiny-random")
    train_adapter(base, style_examples(), tmp_path / "parent", settings(max_steps=5), parent_dir=None, seed=0)
    other = [Example(None, f"zzz qqq {i} xxx", f"o{i}") for i in range(30)]  # something else to learn
    cfg = {"max_steps": 10, "val_fraction": 0.0}
    distance = {}
    for anchor in (0.0, 50.0):
        out = tmp_path / f"child-{anchor}"
        result = train_adapter(
            base, other, out, settings(**cfg, anchor=anchor), parent_dir=tmp_path / "parent", seed=1
        )
        assert result.config["anchor"] == anchor
        p, c = (load_file(d / "adapter_model.safetensors") for d in (tmp_path / "parent", out))
        distance[anchor] = sum(float((c[k].float() - p[k].float()).norm() ** 2) for k in p) ** 0.5
    assert distance[50.0] < 0.7 * distance[0.0], distance


def test_early_stopping_keeps_the_best_state(tmp_path: Path) -> None:
    base = learnable_base()
    # One text repeated: the validation slice is that text, whichever examples the seed picks.
    examples = [Example(None, STYLE[0], f"e{i}") for i in range(20)]
    # A learning rate this high overshoots after a few steps: validation gets worse, and training stops.
    overshoot = settings(max_steps=40, learning_rate=10.0, eval_every=2, patience=2)
    result = train_adapter(base, examples, tmp_path, overshoot, parent_dir=None, seed=1)
    assert result.stopped_early and result.best_step < result.steps < 40
    trained = PeftModel.from_pretrained(tiny_random(), tmp_path)  # a fresh model: never wrap the shared base
    # The saved adapter is the best one (up to its bf16 rounding), not the last one.
    assert result.val_loss is not None
    assert mean_nll(trained, base.tokenizer, examples[:1], max_length=64) == pytest.approx(result.val_loss, abs=0.05)


def test_adapter_config_bytes_do_not_depend_on_the_process_hash_seed(tmp_path):
    """peft keeps target_modules in a set; the saved file must not follow the string-hash seed of the process."""
    import os
    import subprocess
    import sys

    from pipeline.config import ROOT

    script = (
        "import sys; from pathlib import Path; from peft import LoraConfig; "
        "from pipeline.training.lora import save_adapter_config; "
        "save_adapter_config(LoraConfig(r=4, target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', "
        "'up_proj', 'down_proj']), Path(sys.argv[1]))"
    )
    texts = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        subprocess.run(
            [sys.executable, "-c", script, str(out)], check=True, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": seed}
        )
        texts.append((out / "adapter_config.json").read_text())
    assert texts[0] == texts[1]
    import json

    assert json.loads(texts[0])["target_modules"] == sorted(json.loads(texts[0])["target_modules"])
