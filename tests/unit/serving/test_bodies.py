"""Bounds of the serving API's bodies: pydantic's static ranges and the configured limits (no services)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.config import ServingSettings
from pipeline.domain.errors import InvalidInput
from pipeline.serving.bodies import (
    ChatBody,
    CompletionBody,
    ContextLengthExceeded,
    check_sampling,
    check_score_length,
    completion_budget,
)

CFG = ServingSettings(max_tokens=32, max_stop=4, max_stop_chars=8, max_messages=3)


def completion(**kw) -> CompletionBody:
    return CompletionBody.model_validate({"model": "m", "prompt": "p", **kw})


def chat(n_messages: int = 1, **kw) -> ChatBody:
    messages = [{"role": "user", "content": "hi"}] * n_messages
    return ChatBody.model_validate({"model": "m", "messages": messages, **kw})


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": -0.1},
        {"temperature": 2.01},
        {"top_p": 0},
        {"top_p": 1.5},
        {"max_tokens": 0},
        {"max_tokens": -5},
        {"seed": 2**63},
        {"seed": -(2**63) - 1},
        {"stop": [1, 2]},
        {"prompt": None},
        {"prompt": ["a", "b"]},
    ],
)
def test_static_ranges_are_refused(fields):
    with pytest.raises(ValidationError):
        completion(**fields)


def test_nulls_mean_the_defaults_and_unknown_openai_fields_are_ignored():
    body = completion(temperature=None, top_p=None, n=None, stream=None, user="x", logprobs=None, echo=False)
    assert (body.temperature, body.top_p, body.n, body.stream) == (0.0, 1.0, 1, False)


@pytest.mark.parametrize("role", ["tool", "function", "", "USER"])
def test_unknown_chat_roles_are_refused(role):
    with pytest.raises(ValidationError):
        ChatBody.model_validate({"model": "m", "messages": [{"role": role, "content": "x"}]})


def test_developer_is_rendered_as_system():
    body = ChatBody.model_validate({"model": "m", "messages": [{"role": "developer", "content": "be brief"}]})
    assert body.rendered_messages() == [{"role": "system", "content": "be brief"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (completion(n=2), "n"),
        (completion(stop=["a"] * 5), "stop"),
        (completion(stop="x" * 9), "stop"),
        (completion(max_tokens=33), "max_tokens"),
        (chat(max_completion_tokens=33), "max_tokens"),
        (chat(4), "messages"),
    ],
)
def test_configured_limits(body, param):
    with pytest.raises(InvalidInput) as e:
        check_sampling(body, CFG)
    assert e.value.param == param and e.value.http_status == 400


def test_within_limits_passes():
    check_sampling(completion(stop=["a"] * 4, max_tokens=32), CFG)
    check_sampling(chat(3, stop="x" * 8), CFG)


def test_the_budget_of_a_request_that_names_none_is_capped_by_what_is_left():
    assert completion_budget(completion(), 10, 100, CFG) == 16
    assert completion_budget(chat(), 10, 100, CFG) == 32  # 64 by default, the configured maximum is 32
    assert completion_budget(chat(), 95, 100, CFG) == 5
    with pytest.raises(ContextLengthExceeded) as e:
        completion_budget(chat(), 100, 100, CFG)
    assert e.value.code == "context_length_exceeded" and e.value.param == "messages"


def test_prompt_plus_asked_tokens_must_fit_the_context():
    assert completion_budget(completion(max_tokens=10), 90, 100, CFG) == 10
    with pytest.raises(ContextLengthExceeded) as e:
        completion_budget(completion(max_tokens=11), 90, 100, CFG)
    assert e.value.param == "prompt" and "100 tokens" in str(e.value) and "101" in str(e.value)


def test_score_input_must_fit_the_context():
    check_score_length(40, 60, 100)
    with pytest.raises(ContextLengthExceeded):
        check_score_length(41, 60, 100)


def test_streamed_pieces_join_to_the_whole_text_and_never_split_a_character():
    """The incremental detokenizer of streams: byte-level tokens of multi-byte characters come out whole."""
    from pipeline.models.base import tiny_tokenizer
    from pipeline.serving.api import Detokenizer

    tok = tiny_tokenizer()
    text = "héllo 日本語 — ok ✓ end"
    fast = _byte_bpe()
    for tk, backend in ((tok, None), (fast, fast.backend_tokenizer)):  # the reference window; the Rust stream
        ids = tk(text, add_special_tokens=False)["input_ids"]

        def decode(x: list[int], tk=tk) -> str:
            return tk.decode(x, skip_special_tokens=True)

        for run in (1, 2, 5):
            d = Detokenizer(decode, backend, len(tk))
            pieces = [d.add(ids[i : i + run]) for i in range(0, len(ids), run)] + [d.flush()]
            assert "".join(pieces) == decode(ids) == text
            assert not any("\ufffd" in p for p in pieces)
            assert "".join(pieces[:-1]).startswith("héllo 日本語")  # streamed as it comes, not all at the flush


def test_the_stream_detokenizer_equals_whole_decoding_on_random_ids_and_ends_what_is_incomplete():
    """Random ids (byte pieces of characters cut anywhere, ids past the tokenizer's vocabulary, special tokens):
    the streamed pieces, then the flush, join to the decoding of all ids, whatever the backend."""
    import random

    from pipeline.models.base import tiny_tokenizer
    from pipeline.serving.api import Detokenizer

    rng = random.Random(5)
    fast = _byte_bpe()
    for tok, backend in ((tiny_tokenizer(), None), (fast, fast.backend_tokenizer)):
        known = len(tok)

        def decode(x: list[int], tok=tok, known=known) -> str:
            return tok.decode([i for i in x if 0 <= i < known], skip_special_tokens=True)

        for n in range(60):
            ids = [rng.randrange(known + 20) for _ in range(rng.randrange(1, 60))]
            run = 1 + n % 4  # tokens that arrive together (a stream interval)
            d = Detokenizer(decode, backend, known)
            pieces = [d.add(ids[i : i + run]) for i in range(0, len(ids), run)] + [d.flush()]
            assert "".join(pieces) == decode(ids)
            if backend is not None:  # the Rust decoding the worker checks the flush against: the same text
                from pipeline.serving.api import _rust_decode

                assert _rust_decode(backend, known)(ids) == decode(ids)


def _byte_bpe():
    """A small byte-level BPE fast tokenizer (GPT-2 / SmolLM2 style), trained here: a character of several bytes
    may be cut over tokens, and ids of special tokens exist."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["héllo 日本語 — ok ✓ end", "the quick brown fox", "naïve café 你好 🙂", "hello hello world"] * 5
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
