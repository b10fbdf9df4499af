"""Rows' common first tokens run once per adapter (pipeline/models/shared_prefix.py): the same hidden states,
losses and gradients as the full rows, on the tiny base with a different LoRA per user."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from pipeline.config import TrainingSettings
from pipeline.domain.examples import Example
from pipeline.models import multilora, shared_prefix
from pipeline.models.base import load_base, tiny_random
from pipeline.models.encoding import IGNORE, EncodedExample, encode_examples
from pipeline.models.shared_prefix import MIN_PREFIX, Prefix, common_length, decoder_states, prefix_of
from pipeline.training import batching
from pipeline.training.batching import nll_sums


def test_common_length_stops_at_the_first_difference_and_before_the_first_label():
    a, b = list(range(10)), [*range(7), 99, 98, 97]
    none = [IGNORE] * 10
    assert common_length([a, b], [none, none]) == 7
    assert common_length([a, a], [none, none]) == 9  # every row keeps its last token
    labelled = [IGNORE] * 5 + [5, 6, 7, 8, 9]  # position 4 predicts the first label: it stays in the row
    assert common_length([a, b], [labelled, none]) == 4
    assert common_length([a, b], [[IGNORE] * 4 + [4] * 6, none]) == 0  # 3 < MIN_PREFIX
    assert common_length([a, list(range(MIN_PREFIX - 1)) + [50] * 7], [none, none]) == 0
    assert common_length([a, b], [none, None]) == 0  # a probe row is scored at every position
    assert common_length([], []) == 0


def _stacks(model: nn.Module, users: int, seed: int) -> dict[str, multilora.LoraStack]:
    g = torch.Generator().manual_seed(seed)
    stacks = {}
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj")) and isinstance(module, nn.Linear):
            a = torch.randn(users, 2, module.in_features, generator=g) * 0.3
            b = torch.randn(users, module.out_features, 2, generator=g) * 0.3
            stacks[name] = multilora.LoraStack(nn.Parameter(a), nn.Parameter(b), torch.full((users,), 2.0))
    return stacks


def test_a_prefix_run_once_per_adapter_gives_the_full_rows_states_and_gradients():
    model = tiny_random()
    assert shared_prefix.available(model)
    users, p = 3, 6
    stacks = _stacks(model, users, 1)
    params = [t for s in stacks.values() for t in (s.lora_A, s.lora_B)]
    g = torch.Generator().manual_seed(2)
    head = torch.randint(3, 200, (p,), generator=g)
    tails = torch.randint(3, 200, (5, 9), generator=g)
    slots = torch.tensor([2, 0, 2, 1, 0])
    full = torch.cat([head.expand(5, p), tails], 1)
    decoder = model.get_decoder()
    # a random projection of the states (their sum of squares would be constant after the final RMSNorm)
    weight = torch.randn(5, 9, model.config.hidden_size, generator=g)
    with multilora.wrap_linears(model, stacks) as lora:
        lora.set_rows(slots)
        want = decoder(input_ids=full, use_cache=False).last_hidden_state[:, p:]
        want_grads = torch.autograd.grad((want * weight).sum(), params)
        prefix = prefix_of(full[0].tolist(), p, slots.tolist())
        assert prefix.slots.tolist() == [0, 1, 2] and prefix.owner.tolist() == [2, 0, 2, 1, 0]
        got = decoder_states(decoder, tails, prefix, lora.set_rows, slots)
        got_grads = torch.autograd.grad((got * weight).sum(), params)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):  # float32 sums in another order: within 1e-4 of the norm
        assert float((a - b).norm()) <= 1e-4 * float(b.norm()), float((a - b).norm() / b.norm())
    # the attention of other calls (and of other threads) is the original one
    with torch.no_grad():
        plain = model(input_ids=full[:1]).logits
        seen: list[torch.Tensor] = []
        thread = threading.Thread(target=lambda: seen.append(model(input_ids=full[:1]).logits))
        thread.start()
        thread.join()
    torch.testing.assert_close(seen[0], plain, atol=0, rtol=0)


def test_training_sums_and_gradients_are_those_of_the_full_rows(monkeypatch):
    """`nll_sums` over rows that share the chat template's head: with the prefix shared (and used: counted) and
    without, the same per-user sums and the same gradients."""
    base = load_base("tiny-random")
    model = base.model
    users = 3
    texts = ["hello there", "a longer answer, for the padding", "ok", "the fourth one, longer still than these"]
    encoded = encode_examples(
        base.tokenizer, [Example(None if i % 2 else "q", t, f"e{i}") for i, t in enumerate(texts)], 64
    )
    items = [(u, e) for u in range(users) for e in encoded]
    pairs = [(u, encoded[0], encoded[3]) for u in range(users)]
    calls: list[int] = []
    real = shared_prefix.decoder_states

    def counted(decoder, ids, prefix, set_rows, row_slots):
        calls.append(prefix.length if prefix is not None else 0)
        return real(decoder, ids, prefix, set_rows, row_slots)

    monkeypatch.setattr(shared_prefix, "decoder_states", counted)
    results = {}
    for share in (False, True):
        settings = TrainingSettings(threads=1, micro_batch_tokens=256, shared_prefix=share, fused_kernels="off")
        stacks = _stacks(model, users, 3)
        params = [t for s in stacks.values() for t in (s.lora_A, s.lora_B)]
        model.train()
        with torch.enable_grad(), multilora.wrap_linears(model, stacks) as lora:
            sums = nll_sums(model, lora, items, users, 0, torch.device("cpu"), settings, params, lambda: None, pairs)
        model.eval()
        results[share] = (sums, [p.grad.clone() for p in params])
    assert calls and all(n >= MIN_PREFIX for n in calls), calls
    (plain, plain_grads), (shared, shared_grads) = results[False], results[True]
    assert shared.tokens.tolist() == plain.tokens.tolist()
    torch.testing.assert_close(shared.nll, plain.nll, atol=1e-9, rtol=1e-5)
    torch.testing.assert_close(shared.preference, plain.preference, atol=1e-9, rtol=1e-5)
    for a, b in zip(shared_grads, plain_grads, strict=True):
        assert float((a - b).norm()) <= 1e-4 * float(b.norm()), float((a - b).norm() / b.norm())


def test_a_micro_batch_leaves_the_prefix_out_of_its_rows():
    head = list(range(10, 18))
    rows = [
        EncodedExample([*head, 1, 2, 3], [IGNORE] * 9 + [2, 3]),
        EncodedExample([*head, 4, 5], [IGNORE] * 9 + [5]),
    ]
    chunk = [batching._Unit(0, (rows[0],), False), batching._Unit(2, (rows[1],), False)]
    batch = batching._prepare(chunk, pad_id=0, pin=False, shared=8)
    assert isinstance(batch.prefix, Prefix)
    assert batch.prefix.ids.tolist() == head and batch.prefix.slots.tolist() == [0, 2]
    assert batch.prefix.owner.tolist() == [0, 1]
    assert batch.width == 3 and batch.packed[:, 2:].tolist() == [[1, 2, 3], [4, 5, 0]]
    # labelled positions, flat in the trimmed rows' [2, width - 1]: row 0's positions 0 and 1 predict 2 and 3,
    # row 1's position 0 (flat 2) predicts 5
    assert batch.picked[:, :2].tolist() == [[0, 2], [1, 3], [2, 5]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_lower_right_attention_equals_the_full_rows():
    model = tiny_random().to("cuda", torch.bfloat16)
    decoder = model.get_decoder()
    p = 12
    g = torch.Generator().manual_seed(4)
    head = torch.randint(3, 200, (p,), generator=g)
    tails = torch.randint(3, 200, (6, 20), generator=g)
    full = torch.cat([head.expand(6, p), tails], 1).cuda()
    stacks = {
        k: multilora.LoraStack(s.lora_A.detach().cuda(), s.lora_B.detach().cuda(), s.scaling.cuda())
        for k, s in _stacks(model, 2, 5).items()
    }
    slots = torch.tensor([0, 1, 1, 0, 0, 1], device="cuda")
    with torch.no_grad(), multilora.wrap_linears(model, stacks, native=True) as lora:
        lora.set_rows(slots)
        want = decoder(input_ids=full, use_cache=False).last_hidden_state[:, p:].float()
        prefix = prefix_of(full[0].tolist(), p, slots.tolist()).to(torch.device("cuda"))
        got = decoder_states(decoder, tails.cuda(), prefix, lora.set_rows, slots).float()
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
