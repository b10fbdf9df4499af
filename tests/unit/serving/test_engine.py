"""The serving engine: one batch of users with different adapters equals stock peft per user; continuous batching."""

from __future__ import annotations

import pytest
import torch

from pipeline.models.base import LoadedBase, tiny_random, tiny_tokenizer, weights_sha256
from pipeline.serving.engine import Engine, EngineError, Request
from tests.unit.serving import PROMPTS, padded


@pytest.fixture(scope="module")
def engine(adapter_dirs):
    eng = Engine(LoadedBase(tiny_random(), tiny_tokenizer(), None), slots=6, max_rank=8, device="cpu", max_batch=8)
    for slot, path in enumerate(adapter_dirs):
        eng.load_adapter(slot, path)
    yield eng
    eng.close()


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_logits_equal_stock_peft_per_user(engine, stock, side):
    prompts = [*PROMPTS, PROMPTS[0]]
    slots = [0, 1, 2, 3, -1]  # the last row is the base alone
    ids, mask, width = padded(prompts, side)
    got = engine.logits(ids, mask, slots)
    base = tiny_random()
    for i, p in enumerate(prompts):
        ref_model = stock[slots[i]] if slots[i] >= 0 else base
        with torch.no_grad():
            want = ref_model(torch.tensor([p])).logits[0]
        real = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        torch.testing.assert_close(got[i, real], want, atol=1e-5, rtol=1e-5)
    # The adapters matter: users' logits differ from the base's on the same prompt.
    assert (got[0, : len(PROMPTS[0])] - got[4, : len(PROMPTS[0])]).abs().max() > 1e-2


def _stock_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_generations_in_one_batch_equal_stock_peft(engine, stock):
    n = [12, 5, 9, 12]  # different lengths: rows leave the batch at different steps
    gens = engine.generate([Request(p, slot=i, max_tokens=n[i]) for i, p in enumerate(PROMPTS)])
    for i, gen in enumerate(gens):
        assert gen.output_ids == _stock_greedy(stock[i], PROMPTS[i], n[i]), f"user {i}"
        assert gen.finish_reason in ("length", "stop")
        assert gen.text is not None
    assert engine.active == 0 and engine.pending == 0


def test_request_joining_midway_equals_alone(engine):
    alone = [engine.generate([Request(p, slot=i, max_tokens=10)])[0].output_ids for i, p in enumerate(PROMPTS)]
    first = [engine.submit(Request(PROMPTS[i], slot=i, max_tokens=10)) for i in (0, 1)]
    for _ in range(3):
        engine.step()
    assert engine.active == 2
    late = [engine.submit(Request(PROMPTS[i], slot=i, max_tokens=10)) for i in (2, 3)]
    engine.step()
    assert engine.active == 4
    engine.run_until_done()
    for i, gen in zip((0, 1, 2, 3), first + late, strict=True):
        assert gen.output_ids == alone[i], f"user {i}"


def test_seeded_sampling_is_reproducible_and_independent_of_company(engine):
    def sample(seed, company=()):
        req = Request(PROMPTS[1], slot=1, max_tokens=12, temperature=1.0, top_p=0.9, seed=seed)
        gens = engine.generate([*company, req])
        return gens[-1].output_ids

    alone = sample(7)
    assert sample(7) == alone
    others = [Request(PROMPTS[i], slot=i, max_tokens=6, temperature=0.8, seed=i) for i in (0, 2, 3)]
    assert sample(7, others) == alone
    assert sample(8) != alone


def test_stop_tokens_and_strings(engine):
    full = engine.generate([Request(PROMPTS[0], slot=0, max_tokens=12)])[0]
    stop_tok = full.output_ids[3]
    first = full.output_ids.index(stop_tok)
    gen = engine.generate([Request(PROMPTS[0], slot=0, max_tokens=12, stop_token_ids=[stop_tok])])[0]
    assert gen.output_ids == full.output_ids[: first + 1] and gen.finish_reason == "stop"

    # The random model's bytes are mostly not valid UTF-8, so its text is short: stop on its last character.
    text = full.text
    assert text, "the tiny model generated no decodable text"
    stop = text[-1]
    gen = engine.generate([Request(PROMPTS[0], slot=0, max_tokens=12, stop=["never", stop])])[0]
    assert gen.finish_reason == "stop"
    assert gen.text == text[: text.find(stop)]
    # It stops at the first token whose text completes the stop string.
    n = next(n for n in range(1, 13) if stop in engine.decode_text(full.output_ids[:n]))
    assert gen.output_ids == full.output_ids[:n]


def test_bad_requests_and_busy_slots(engine, adapter_dirs):
    with pytest.raises(EngineError, match="slot 9"):
        engine.submit(Request([5], slot=9))
    with pytest.raises(EngineError, match="top_p"):
        engine.submit(Request([5], top_p=0))
    with pytest.raises(EngineError, match="empty"):
        engine.submit(Request([]))
    engine.submit(Request([5, 6], slot=0, max_tokens=2))
    with pytest.raises(EngineError, match="slot 0 is used"):
        engine.load_adapter(0, adapter_dirs[1])
    engine.run_until_done()
    assert not engine.has_work()


def test_close_leaves_the_base_unchanged(adapter_dirs):
    model = tiny_random()
    before = weights_sha256(model)
    eng = Engine(LoadedBase(model, tiny_tokenizer(), None), slots=2, max_rank=8)
    eng.load_adapter(0, adapter_dirs[1])
    eng.generate([Request(PROMPTS[0], slot=0, max_tokens=3)])
    eng.close()
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert weights_sha256(model) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_engine_matches_stock_peft_and_cpu(engine, stock, adapter_dirs):
    eng = Engine(LoadedBase(tiny_random(), tiny_tokenizer(), None), slots=4, max_rank=8, device="cuda")
    for slot, path in enumerate(adapter_dirs):
        eng.load_adapter(slot, path)
    ids, mask, width = padded(PROMPTS, "left")
    got = eng.logits(ids, mask, [0, 1, 2, 3]).cpu()
    for i, p in enumerate(PROMPTS):
        with torch.no_grad():
            want = stock[i](torch.tensor([p])).logits[0]
        torch.testing.assert_close(got[i, width - len(p) :], want, atol=1e-4, rtol=1e-4)
    reqs = [Request(p, slot=i, max_tokens=8) for i, p in enumerate(PROMPTS)]
    reqs += [Request(p, slot=i, max_tokens=8, temperature=0.7, top_p=0.9, seed=i) for i, p in enumerate(PROMPTS)]
    on_gpu = [g.output_ids for g in eng.generate(reqs)]
    on_cpu = [g.output_ids for g in engine.generate(reqs)]
    assert on_gpu == on_cpu
