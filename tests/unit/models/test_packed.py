"""Packed rows (pipeline/models/packed.py): one sequence of all the rows' tokens gives each row's hidden states and
gradients as the padded batch does, with a different LoRA per row (tiny base, CPU; a CUDA test within bf16)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from pipeline.models import multilora, packed
from pipeline.models.base import tiny_random
from pipeline.models.packed import decoder_states, packing_of


def test_packing_of_gives_offsets_positions_and_rows():
    p = packing_of([3, 1, 2])
    assert p.offsets.tolist() == [0, 3, 4, 6] and p.offsets.dtype == torch.int32
    assert p.positions.tolist() == [0, 1, 2, 0, 0, 1]
    assert p.token_rows.tolist() == [0, 0, 0, 1, 2, 2]
    assert p.longest == 3


def _stacks(model: nn.Module, users: int, seed: int, device: str = "cpu") -> dict[str, multilora.LoraStack]:
    g = torch.Generator().manual_seed(seed)
    stacks = {}
    for name, module in model.named_modules():
        if name.endswith(("q_proj", "v_proj", "o_proj", "down_proj")) and isinstance(module, nn.Linear):
            a = torch.randn(users, 2, module.in_features, generator=g) * 0.3
            b = torch.randn(users, module.out_features, 2, generator=g) * 0.3
            stacks[name] = multilora.LoraStack(
                nn.Parameter(a.to(device)), nn.Parameter(b.to(device)), torch.full((users,), 2.0, device=device)
            )
    return stacks


def test_packed_rows_give_the_padded_rows_states_and_gradients():
    model = tiny_random()
    assert packed.available(model)
    stacks = _stacks(model, 3, 1)
    params = [t for s in stacks.values() for t in (s.lora_A, s.lora_B)]
    g = torch.Generator().manual_seed(2)
    lengths = [7, 3, 9, 1, 5]
    rows = [torch.randint(3, 200, (n,), generator=g) for n in lengths]
    slots = torch.tensor([2, 0, 2, 1, 0])
    width = max(lengths)
    padded = torch.stack([torch.cat([r, r.new_zeros(width - len(r))]) for r in rows])
    weight = torch.randn(sum(lengths), model.config.hidden_size, generator=g)
    decoder = model.get_decoder()
    with multilora.wrap_linears(model, stacks) as lora:
        lora.set_rows(slots)
        full = decoder(input_ids=padded, use_cache=False).last_hidden_state
        want = torch.cat([full[i, :n] for i, n in enumerate(lengths)])
        want_grads = torch.autograd.grad((want * weight).sum(), params)
        got = decoder_states(decoder, torch.cat(rows), packing_of(lengths), lora, slots)
        got_grads = torch.autograd.grad((got * weight).sum(), params)
        lora.set_rows(None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert float((a - b).norm()) <= 1e-4 * float(b.norm()), float((a - b).norm() / b.norm())
    # outside the block (and in other threads) the model builds its own masks again
    with torch.no_grad():
        plain = model(input_ids=padded[:1]).logits
        seen: list[torch.Tensor] = []
        thread = threading.Thread(target=lambda: seen.append(model(input_ids=padded[:1]).logits))
        thread.start()
        thread.join()
    torch.testing.assert_close(seen[0], plain, atol=0, rtol=0)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_packed_rows_with_a_shared_prefix_give_the_full_rows_states_and_gradients(device):
    """One prefix row per adapter first, then the rows without those tokens, each attending to its adapter's
    prefix row: the rows' states and the gradients of the full, padded rows (CPU in fp32; CUDA in bf16 over a
    frozen base, as training runs: flash varlen with unequal query and key lengths, the Triton LoRA kernels)."""
    cuda = device == "cuda"
    model = tiny_random()
    if cuda:
        model = model.to("cuda", torch.bfloat16).requires_grad_(False)
    stacks = _stacks(model, 3, 6, device)
    params = [t for s in stacks.values() for t in (s.lora_A, s.lora_B)]
    g = torch.Generator().manual_seed(7)
    p = 6
    head = torch.randint(3, 200, (p,), generator=g)
    lengths = [7, 3, 9, 1, 5]
    tails = [torch.randint(3, 200, (n,), generator=g) for n in lengths]
    slots = torch.tensor([2, 0, 2, 1, 0])
    width = p + max(lengths)
    full = torch.stack([torch.cat([head, t, t.new_zeros(width - p - len(t))]) for t in tails])
    weight = torch.randn(sum(lengths), model.config.hidden_size, generator=g)
    decoder = model.get_decoder()
    prefix_slots = [0, 1, 2]
    owner = [prefix_slots.index(s) for s in slots.tolist()]
    packing = packing_of([p] * 3 + lengths, (p, owner))
    ids = torch.cat([head, head, head, *tails])
    every_slot = torch.cat([torch.tensor(prefix_slots), slots])
    if cuda:
        full, ids, slots, every_slot, weight = (t.cuda() for t in (full, ids, slots, every_slot, weight))
        packing = packing.to(torch.device("cuda"))
    with multilora.wrap_linears(model, stacks, native=cuda) as lora:
        lora.set_rows(slots)
        states = decoder(input_ids=full, use_cache=False).last_hidden_state.float()
        want = torch.cat([states[i, p : p + n] for i, n in enumerate(lengths)])
        want_grads = torch.autograd.grad((want * weight).sum(), params)
        got = decoder_states(decoder, ids, packing, lora, every_slot)[3 * p :].float()
        got_grads = torch.autograd.grad((got * weight).sum(), params)
        lora.set_rows(None)
    tol, grad_tol = (3e-2, 3e-2) if cuda else (1e-5, 1e-4)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert float((a - b).norm()) <= grad_tol * float(b.norm()), float((a - b).norm() / b.norm())


def test_packing_of_a_shared_prefix_lists_each_rows_keys():
    p = packing_of([2, 2, 3, 1], (2, [1, 0]))  # two prefix rows of 2, then rows of 3 and 1
    assert p.positions.tolist() == [0, 1, 0, 1, 2, 3, 4, 2]
    assert p.keys is not None and p.key_offsets is not None and p.sees is not None
    assert p.keys.tolist() == [0, 1, 2, 3, 2, 3, 4, 5, 6, 0, 1, 7]
    assert p.key_offsets.tolist() == [0, 2, 4, 9, 12] and p.longest_key == 5
    assert p.sees.tolist() == [-1, -1, -1, -1, 1, 1, 1, 0]
    with pytest.raises(ValueError):
        packing_of([2, 3], (2, [1]))  # owner 1 is no prefix row


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_packed_rows_equal_the_padded_rows():
    model = tiny_random().to("cuda", torch.bfloat16).requires_grad_(False)  # frozen, as training's base
    stacks = _stacks(model, 2, 5, "cuda")
    params = [t for s in stacks.values() for t in (s.lora_A, s.lora_B)]
    g = torch.Generator().manual_seed(4)
    lengths = [37, 5, 70, 12]
    rows = [torch.randint(3, 200, (n,), generator=g) for n in lengths]
    width = max(lengths)
    padded = torch.stack([torch.cat([r, r.new_zeros(width - len(r))]) for r in rows]).cuda()
    slots = torch.tensor([0, 1, 1, 0], device="cuda")
    decoder = model.get_decoder()
    results = []
    with multilora.wrap_linears(model, stacks, native=True) as lora:
        for packed_rows in (False, True):
            if packed_rows:
                out = decoder_states(
                    decoder, torch.cat(rows).cuda(), packing_of(lengths).to(torch.device("cuda")), lora, slots
                )
            else:
                lora.set_rows(slots)
                full = decoder(input_ids=padded, use_cache=False).last_hidden_state
                out = torch.cat([full[i, :n] for i, n in enumerate(lengths)])
            grads = torch.autograd.grad(out.float().sum(), params)
            results.append((out.detach().float(), grads))
            lora.set_rows(None)
    (want, want_grads), (got, got_grads) = results
    torch.testing.assert_close(got, want, atol=3e-2, rtol=3e-2)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert float((a - b).norm()) <= 3e-2 * float(b.norm())


def test_training_sums_and_gradients_of_packed_rows_are_those_of_the_padded_rows(monkeypatch):
    """`nll_sums` with examples and preference pairs of several users: packed (and used: counted) and padded, the
    same per-user sums and gradients."""
    from pipeline.config import TrainingSettings
    from pipeline.domain.examples import Example
    from pipeline.models.base import load_base
    from pipeline.models.encoding import encode_examples
    from pipeline.training.batching import nll_sums

    base = load_base("tiny-random")
    model = base.model
    users = 3
    texts = ["hello there", "a longer answer, for the padding", "ok", "the fourth one, longer still than these"]
    examples = [Example(None if i % 2 else "q", t, f"e{i}") for i, t in enumerate(texts)]
    encoded = encode_examples(base.tokenizer, examples, 64)
    items = [(u, e) for u in range(users) for e in encoded[u:]]
    pairs = [(u, encoded[0], encoded[3]) for u in range(users)]
    calls: list[tuple[int, int]] = []  # per packed forward: (sequences, prefix rows)
    real = packed.decoder_states

    def counted(decoder, ids, packing, lora, row_slots):
        heads = len(set(row_slots.tolist())) if packing.keys is not None else 0
        calls.append((int(packing.offsets.shape[0]) - 1, heads))
        return real(decoder, ids, packing, lora, row_slots)

    monkeypatch.setattr(packed, "decoder_states", counted)
    results = {}
    for pack, share in ((False, False), (True, False), (True, True)):
        settings = TrainingSettings(
            threads=1, micro_batch_tokens=512, packed_rows=pack, shared_prefix=share, fused_kernels="off"
        )
        stacks = _stacks(model, users, 3)
        params = [t for s in stacks.values() for t in (s.lora_A, s.lora_B)]
        model.train()
        with torch.enable_grad(), multilora.wrap_linears(model, stacks) as lora:
            sums = nll_sums(model, lora, items, users, 0, torch.device("cpu"), settings, params, lambda: None, pairs)
        model.eval()
        results[(pack, share)] = (sums, [p.grad.clone() for p in params])
    # every row went through a packed forward, twice: the second time after one prefix row per user of its
    # micro-batch (one sequence per distinct slot)
    rows = len(items) + 2 * len(pairs)
    assert sum(n for n, heads in calls if not heads) == rows, calls
    assert sum(n - heads for n, heads in calls if heads) == rows, calls
    assert any(heads for _, heads in calls), calls
    plain, plain_grads = results[(False, False)]
    for key in ((True, False), (True, True)):
        got, got_grads = results[key]
        assert got.tokens.tolist() == plain.tokens.tolist() and got.pairs.tolist() == plain.pairs.tolist()
        torch.testing.assert_close(got.nll, plain.nll, atol=1e-9, rtol=1e-5)
        torch.testing.assert_close(got.preference, plain.preference, atol=1e-9, rtol=1e-5)
        for a, b in zip(got_grads, plain_grads, strict=True):
            assert float((a - b).norm()) <= 1e-4 * float(b.norm()), (key, float((a - b).norm() / b.norm()))


def test_causal_only_builds_no_mask_and_changes_no_output(monkeypatch):
    """`causal_only`: right-padded rows without a mask give the same logits, and transformers' mask builder (which
    asks the device whether positions are packed: a sync per forward) is not called; in other threads it is."""
    from transformers import masking_utils

    model = tiny_random()
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(3, 200, (3, 11), generator=g)
    asked: list[int] = []
    real = masking_utils.find_packed_sequence_indices

    def counted(*args, **kwargs):
        asked.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", counted)
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        assert asked, "transformers no longer asks: this test checks nothing"
        asked.clear()
        with packed.causal_only(model) as applies:
            got = model(input_ids=ids, use_cache=False).logits
            elsewhere = threading.Thread(target=lambda: model(input_ids=ids, use_cache=False))
            elsewhere.start()
            elsewhere.join()
    assert applies and len(asked) == 1  # the other thread's forward only
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_rows_of_packs_rows_after_one_prefix_row_per_slot():
    """`packed.rows_of`: without a prefix the rows' ids in order; with one, a prefix row per distinct slot first
    (sorted), then each row's ids after the prefix, its tokens owned by it; bad input refused."""
    ids = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 6, 7, 8]]
    plain = packed.rows_of(ids, [3, 1, 3])
    assert plain.ids.tolist() == [1, 2, 3, 4, 1, 2, 5, 1, 2, 6, 7, 8] and plain.slots.tolist() == [3, 1, 3]
    assert plain.head_tokens == 0 and plain.own.tolist() == [0] * 4 + [1] * 3 + [2] * 5
    shared = packed.rows_of(ids, [3, 1, 3], shared=2)
    assert shared.ids.tolist() == [1, 2, 1, 2, 3, 4, 5, 6, 7, 8] and shared.slots.tolist() == [1, 3, 3, 1, 3]
    assert shared.head_tokens == 4 and shared.own.tolist() == [0, 0, 1, 2, 2, 2]
    assert shared.packing.offsets.tolist() == [0, 2, 4, 6, 7, 10]
    assert shared.packing.positions.tolist() == [0, 1, 0, 1, 2, 3, 2, 2, 3, 4]  # rows continue their prefix
    with pytest.raises(ValueError, match="slot"):
        packed.rows_of(ids, [1, 2])
    with pytest.raises(ValueError, match="own"):
        packed.rows_of(ids, [1, 1, 1], shared=3)
