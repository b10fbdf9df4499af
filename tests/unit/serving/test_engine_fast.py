"""The fast engine (paged KV cache, chunked prefill mixed into decode steps, slot-packed LoRA) on CPU: equal to
stock peft per user, to the reference engine's continuous batching (also when prompts are cut into chunks and when
the KV cache is too small and requests are preempted), and its torch LoRA and attention paths equal to per-row
loops. The Triton kernels and CUDA graphs are checked against these same references on a GPU (bench/serving_gpu.py
and the CUDA tests)."""

from __future__ import annotations

import orjson
import pytest
import torch

from pipeline.models import lora_ops, multilora
from pipeline.models.base import LoadedBase, tiny_random, tiny_tokenizer, weights_sha256
from pipeline.models.multilora import ALL_TARGETS, AdapterLimitError, read_adapter_dir
from pipeline.serving.engine import Engine, EngineError, Request
from pipeline.serving.fast_engine import FastEngine
from pipeline.serving.fast_llama import GROUPS
from tests.unit.serving import PROMPTS, padded


def _fast(adapter_dirs, **kw) -> FastEngine:
    kw.setdefault("max_batch", 8)
    eng = FastEngine(LoadedBase(tiny_random(), tiny_tokenizer(), None), slots=6, max_rank=8, max_seq=64, **kw)
    for slot, path in enumerate(adapter_dirs):
        eng.load_adapter(slot, path)
    return eng


@pytest.fixture(scope="module")
def fast(adapter_dirs):
    return _fast(adapter_dirs)


def _greedy_peft(model, prompt, n):
    out = model.generate(
        input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_equal_stock_peft_per_user(fast, stock, side):
    prompts = [*PROMPTS, PROMPTS[0]]
    slots = [0, 1, 2, 3, -1]
    ids, mask, width = padded(prompts, side)
    got = fast.logits(ids, mask, slots)
    base = tiny_random()
    for i, p in enumerate(prompts):
        ref = stock[slots[i]] if slots[i] >= 0 else base
        with torch.no_grad():
            want = ref(torch.tensor([p])).logits[0]
        real = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        torch.testing.assert_close(got[i, real], want, atol=1e-5, rtol=1e-5)
    assert (got[0, : len(PROMPTS[0])] - got[4, : len(PROMPTS[0])]).abs().max() > 1e-2


def test_greedy_decode_equals_stock_peft_for_users_in_one_batch(fast, stock):
    reqs = [Request(p, slot=i, max_tokens=12, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    reqs.append(Request(PROMPTS[0], slot=-1, max_tokens=12, ignore_eos=True))
    gens = fast.generate(reqs)
    for i, p in enumerate(PROMPTS):
        assert gens[i].output_ids == _greedy_peft(stock[i], p, 12), f"user {i}"
    assert gens[-1].output_ids == _greedy_peft(tiny_random(), PROMPTS[0], 12)
    assert gens[0].output_ids != gens[-1].output_ids


def test_continuous_batching_equals_the_reference_engine(adapter_dirs):
    """More requests than rows, different lengths and budgets: joins, leaves and row moves change nothing."""
    fast = _fast(adapter_dirs, max_batch=3)
    ref = Engine(LoadedBase(tiny_random(), tiny_tokenizer(), None), slots=6, max_rank=8, max_batch=3)
    for slot, path in enumerate(adapter_dirs):
        ref.load_adapter(slot, path)
    reqs = [Request(PROMPTS[i % 4], slot=(i % 5) - 1, max_tokens=2 + (i * 3) % 7, ignore_eos=True) for i in range(11)]
    reqs.append(Request(PROMPTS[1], slot=1, max_tokens=9, temperature=0.8, top_p=0.9, seed=7))
    reqs.append(Request(PROMPTS[2], slot=2, max_tokens=1))
    got = [g.output_ids for g in fast.generate(reqs)]
    want = [g.output_ids for g in ref.generate(reqs)]
    assert got == want
    assert not fast.has_work() and fast.active == 0


def _reference(adapter_dirs, max_batch):
    ref = Engine(LoadedBase(tiny_random(), tiny_tokenizer(), None), slots=6, max_rank=8, max_batch=max_batch)
    for slot, path in enumerate(adapter_dirs):
        ref.load_adapter(slot, path)
    return ref


def _mixed_requests():
    g = torch.Generator().manual_seed(5)
    reqs = []
    for i in range(9):
        n = int(torch.randint(1, 40, (1,), generator=g))
        prompt = torch.randint(3, 250, (n,), generator=g).tolist()
        reqs.append(Request(prompt, slot=(i % 5) - 1, max_tokens=3 + (i * 5) % 11, ignore_eos=True))
    reqs.append(Request(PROMPTS[1], slot=1, max_tokens=9, temperature=0.8, top_p=0.9, seed=7))
    return reqs


def test_chunked_prefill_mixed_into_decode_equals_the_reference_engine(adapter_dirs):
    """A step budget of 7 tokens: prompts up to 39 tokens are prefilled in chunks over several steps while the
    other requests keep decoding in the same steps; every request's tokens equal the reference engine's."""
    fast = _fast(adapter_dirs, max_batch=3, step_tokens=7)
    reqs = _mixed_requests()
    got = [g.output_ids for g in fast.generate(reqs)]
    assert got == [g.output_ids for g in _reference(adapter_dirs, 3).generate(reqs)]
    c = fast.counters
    assert c["prefill_tokens"] == sum(len(r.prompt_ids) for r in reqs)
    assert c["steps"] < c["prefill_tokens"] / 3  # chunks, not one token per step
    assert not fast.has_work() and fast.active == 0
    assert len(fast._free_blocks) == fast.kv_blocks - 1 and sorted(fast._free_rows) == [0, 1, 2]


def test_a_full_kv_cache_preempts_and_recomputes_without_changing_tokens(adapter_dirs):
    """KV memory for 64 tokens (4 blocks) shared by 4 rows: requests hold blocks only for the tokens they have,
    the newest one is preempted when blocks run out and continues exactly where it was."""
    fast = _fast(adapter_dirs, max_batch=4, kv_tokens=64, step_tokens=12)
    reqs = [Request(list(range(5 + i, 25 + i)), slot=i - 1, max_tokens=30, ignore_eos=True) for i in range(4)]
    got = [g.output_ids for g in fast.generate(reqs)]
    assert got == [g.output_ids for g in _reference(adapter_dirs, 4).generate(reqs)]
    assert fast.counters["preemptions"] > 0
    assert len(fast._free_blocks) == fast.kv_blocks - 1


def test_a_request_holds_kv_blocks_for_its_tokens_only(adapter_dirs):
    fast = _fast(adapter_dirs, max_batch=4)
    fast.submit(Request(list(range(3, 21)), slot=0, max_tokens=20, ignore_eos=True))  # 18 tokens: 2 blocks
    fast.step()
    (seq,) = fast._seqs.values()
    assert len(fast._blocks_of(seq)) == 2 and fast._filled[seq.row] == 18
    assert len(fast._free_blocks) == fast.kv_blocks - 1 - 2
    fast.run_until_done()
    assert len(fast._free_blocks) == fast.kv_blocks - 1


def test_paged_attention_reference_equals_a_per_token_softmax():
    g = torch.Generator().manual_seed(2)
    bs, blocks = 4, 9
    kc = torch.randn(blocks, 2, bs, 8, generator=g)
    vc = torch.randn(blocks, 2, bs, 8, generator=g)
    table = torch.tensor([[3, 1, 7, 0], [5, 2, 0, 0], [8, 4, 6, 0]], dtype=torch.int32)
    seq = torch.tensor([0, 0, 1, 2, 2])
    pos = torch.tensor([0, 10, 6, 3, 11])
    q = torch.randn(5, 6, 8, generator=g)
    got = lora_ops.paged_attention_torch(q, kc, vc, table, seq, pos, 12)
    for t in range(5):
        blk = table[seq[t]].long()
        keys = kc[blk].permute(1, 0, 2, 3).reshape(2, -1, 8)[:, : pos[t] + 1]
        values = vc[blk].permute(1, 0, 2, 3).reshape(2, -1, 8)[:, : pos[t] + 1]
        for h in range(6):
            w = torch.softmax(q[t, h] @ keys[h // 3].T / 8**0.5, dim=-1)
            torch.testing.assert_close(got[t, h], w @ values[h // 3])


@pytest.mark.skipif(not lora_ops.triton_available(), reason="needs CUDA and Triton")
def test_triton_paged_attention_equals_the_reference():
    g = torch.Generator().manual_seed(4)
    kc = torch.randn(40, 3, 16, 64, generator=g).cuda()
    vc = torch.randn(40, 3, 16, 64, generator=g).cuda()
    table = torch.randperm(39, generator=g)[:36].add(1).view(3, 12).int().cuda()
    seq = torch.tensor([0, 1, 2, 2, 1, 0]).cuda()
    pos = torch.tensor([0, 17, 191, 64, 100, 5]).cuda()
    q = torch.randn(6, 9, 64, generator=g).cuda()
    got = lora_ops.paged_attention(q, kc, vc, table, seq, pos)
    want = lora_ops.paged_attention_torch(q, kc, vc, table, seq, pos, 192)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


def test_stop_rules_and_length_limit(fast):
    first = fast.generate([Request(PROMPTS[0], slot=1, max_tokens=6, ignore_eos=True)])[0].output_ids
    stopped = fast.generate([Request(PROMPTS[0], slot=1, max_tokens=6, stop_token_ids=[first[2]])])[0]
    assert stopped.output_ids == first[: first.index(first[2]) + 1] and stopped.finish_reason == "stop"
    long = fast.generate([Request(list(range(3, 60)), slot=0, max_tokens=50, ignore_eos=True)])[0]
    assert long.finish_reason == "length" and 57 + len(long.output_ids) <= 64


def test_lora_torch_equals_a_per_row_loop():
    g = torch.Generator().manual_seed(0)
    slots, r, k, seg = 5, 4, 12, (0, 6, 9, 13)
    a = torch.randn(slots + 1, 3 * r, k, generator=g)
    bt = torch.randn(slots + 1, r, seg[-1], generator=g)
    ranks = [1, 4, 2, 3, 4, 0]
    for s, rk in enumerate(ranks):  # what packing guarantees: rows beyond the rank are zero
        for j in range(3):
            a[s, j * r + rk : (j + 1) * r] = 0
        bt[s, rk:] = 0
    idx = torch.tensor([0, 3, 5, 1, 1, 2])
    x = torch.randn(6, 2, k, generator=g)
    y = torch.randn(6, 2, seg[-1], generator=g)
    got = lora_ops.lora_torch(y, x, a, bt, idx, seg, r)
    want = y.clone()
    for b, s in enumerate(idx.tolist()):
        for j in range(3):
            t = x[b] @ a[s, j * r : (j + 1) * r].T
            want[b, :, seg[j] : seg[j + 1]] += t @ bt[s, :, seg[j] : seg[j + 1]]
    torch.testing.assert_close(got, want)


def _lora_equals_the_shared_layer(eng: FastEngine, adapter_dirs, tokens: tuple[int, ...]) -> None:
    """Every projection group of ``eng``, through its LoRA path (``_lora``: the Triton kernels for one token per
    row on CUDA when enabled, else ``lora_ops.lora_torch``), against `multilora.MultiLoraLinear` (the layer of the
    reference engine and of batched training) holding the same adapters in the same slots."""
    handle = multilora.inject(tiny_random().to(eng.device), ALL_TARGETS, slots=eng.slots, max_rank=eng.max_rank)
    for slot, path in enumerate(adapter_dirs):
        multilora.load_slot(handle, slot, *read_adapter_dir(path))
    slots = [0, 1, 2, 3, -1, 4, 1, 0]  # slot 4 holds nothing: base only, like -1
    multilora.set_rows(handle, torch.tensor(slots))
    idx = torch.tensor([s if s >= 0 else eng.slots for s in slots], dtype=torch.int32, device=eng.device)
    path_of = {where: path for path, where in eng.module_of.items()}
    g = torch.Generator().manual_seed(3)
    moved = torch.zeros(len(slots))
    for i, layer in enumerate(eng.layers):
        fused = {"qkv": layer.wqkv, "o": layer.wo, "gu": layer.wgu, "down": layer.wd}
        for group, modules in GROUPS:
            x = torch.randn(len(slots), *tokens, layer.groups[group].k, generator=g).to(eng.device)
            y = torch.nn.functional.linear(x, fused[group])
            with torch.no_grad():
                got = eng._lora(y, x, layer.groups[group], idx)
                want = torch.cat([handle.layers[path_of[(i, m)]](x) for m in modules], dim=-1)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            moved += (got - y).abs().flatten(1).amax(1).cpu()
    assert all(moved[row] > 1e-3 for row in (0, 1, 2, 3, 6, 7)), moved
    assert moved[4] == 0 and moved[5] == 0


@pytest.mark.parametrize("tokens", [(), (3,)], ids=["decode", "prefill"])
def test_lora_path_equals_the_shared_multilora_layer(adapter_dirs, tokens):
    _lora_equals_the_shared_layer(_fast(adapter_dirs), adapter_dirs, tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens", [(), (3,)], ids=["decode", "prefill"])
def test_cuda_lora_path_equals_the_shared_multilora_layer(adapter_dirs, tokens):
    eng = _fast(adapter_dirs, device="cuda", dtype=torch.float32)
    assert eng.use_triton == lora_ops.triton_available()
    _lora_equals_the_shared_layer(eng, adapter_dirs, tokens)


def test_packing_refuses_what_does_not_fit_and_loads_into_free_slots(adapter_dirs):
    eng = FastEngine(LoadedBase(tiny_random(), tiny_tokenizer(), None), slots=2, max_rank=2, targets=["q_proj"])
    state, config = read_adapter_dir(adapter_dirs[1])  # rank 4 on all 7 modules
    with pytest.raises(AdapterLimitError):
        eng.pack_adapter(state, config)
    state, config = read_adapter_dir(adapter_dirs[0])  # rank 1 on q and v
    with pytest.raises(AdapterLimitError, match="not a served target"):
        eng.pack_adapter(state, config)
    q_only = {k: v for k, v in state.items() if ".q_proj." in k}
    packed = eng.pack_adapter(q_only, config)
    assert packed.rank == 1 and packed.nbytes * 2 == eng.slot_bytes  # what rank 1 needs, not a rank-2 slot
    eng.load_packed(0, packed)
    gen = eng.submit(Request(PROMPTS[0], slot=0, max_tokens=4))
    with pytest.raises(EngineError, match="slot 0 is used"):  # queued
        eng.load_packed(0, packed)
    eng.step()
    assert not gen.done and not eng._waiting  # running now
    with pytest.raises(EngineError, match="slot 0 is used"):
        eng.load_packed(0, packed)
    eng.load_packed(1, packed)  # a slot no request uses
    eng.run_until_done()
    assert gen.done
    eng.clear_adapter(0)  # free again once its request finished
    assert int(eng.ranks[0]) == 0 and not eng.lora[0].any()
    # A request cancelled before it started, and requests dropped by abort_all, free their slots too.
    cancelled = eng.submit(Request(PROMPTS[0], slot=0, max_tokens=4))
    eng.cancel(cancelled)
    eng.run_until_done()
    assert cancelled.finish_reason == "cancelled"
    eng.load_packed(0, packed)
    eng.submit(Request(PROMPTS[0], slot=0, max_tokens=4))
    eng.submit(Request(PROMPTS[1], slot=1, max_tokens=4))
    eng.step()
    eng.abort_all()
    eng.load_packed(0, packed)
    eng.load_packed(1, packed)
    assert eng._slot_users == [0, 0]
    with pytest.raises(EngineError):  # a refused submit counts nothing
        eng.submit(Request([], slot=0))
    assert eng._slot_users == [0, 0]


def test_a_packed_adapter_takes_what_its_rank_needs_and_loads_like_the_unpacked_one(adapter_dirs):
    """Compact packing: an r=1 adapter packs to 1/8 of what an r=8 one does in the same engine, and loading it
    yields exactly the slot row of the direct layout (A rows and scaled B^T columns, zeros beyond the rank)."""
    eng = _fast(adapter_dirs)
    small = eng.pack_adapter(*read_adapter_dir(adapter_dirs[0]))  # r=1 on q, v
    state, config = read_adapter_dir(adapter_dirs[1])  # r=4 on all seven
    packed = eng.pack_adapter(state, config)
    assert packed.nbytes * 2 == eng.slot_bytes  # rank 4 of max rank 8
    assert small.nbytes * 8 == eng.slot_bytes
    eng.load_packed(5, packed)
    row = eng.lora[5]
    scale = multilora.lora_scaling(config, 4)
    for path, (layer, name) in eng.module_of.items():
        group, j = next((g, ms.index(name)) for g, ms in GROUPS if name in ms)
        grp = eng.layers[layer].groups[group]
        a = state[f"{path}.lora_A.weight"]
        b = state[f"{path}.lora_B.weight"]
        torch.testing.assert_close(grp.a[5, j * 8 : j * 8 + 4], a)
        assert not grp.a[5, j * 8 + 4 : (j + 1) * 8].any()
        torch.testing.assert_close(grp.bt[5, :4, grp.seg[j] : grp.seg[j + 1]], b.T * scale)
    assert not grp.bt[5, 4:].any() and int(eng.ranks[5]) == 4 and row.any()


def test_slot_maps_are_built_once_per_rank_and_place_every_value(adapter_dirs):
    """The map from a compact rank-r adapter to a slot row: each group's first r rows of A per module (row stride
    max_rank), then B^T's first r rows, with no position twice; threads missing together share one build."""
    import threading

    eng = _fast([])
    for r in (1, 3, 8):
        index = eng._slot_index(r).cpu()
        want = []
        for layer in eng.layers:
            for grp in layer.groups.values():
                nseg, k, n = len(grp.seg) - 1, grp.k, grp.seg[-1]
                want += [grp.a_off + (j * 8 + q) * k + c for j in range(nseg) for q in range(r) for c in range(k)]
                want += [grp.b_off + q * n + c for q in range(r) for c in range(n)]
        assert index.tolist() == want and len(set(want)) == len(want)
        assert index.numel() == eng._compact_layout(r)[1]
    got: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: got.append(eng._slot_index(5))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and all(x is got[0] for x in got)


@pytest.mark.parametrize("engine_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packing_from_the_file_bytes_equals_packing_the_parsed_tensors(adapter_dirs, engine_dtype):
    """`pack_adapter_bytes` (header + one gather map per layout, torch operations over the file's bytes) gives the
    very bits `pack_adapter` gives, for float32, float16 and bfloat16 files, any rank and subset of modules, into
    every engine dtype; a second adapter of the same layout reuses the gather map and still packs its own values; the
    refusals are the same."""
    from safetensors.torch import save

    eng = FastEngine(
        LoadedBase(tiny_random(), tiny_tokenizer(), None), slots=2, max_rank=8, max_seq=32, dtype=engine_dtype
    )
    for path in adapter_dirs:
        weights = (path / "adapter_model.safetensors").read_bytes()
        state, config = read_adapter_dir(path)
        for file_dtype in (None, torch.float16, torch.bfloat16):  # bfloat16: what training saves
            if file_dtype is not None:
                state = {k: v.to(file_dtype) for k, v in state.items()}
                weights = save(state)
            want = eng.pack_adapter(state, config)
            got = eng.pack_adapter_bytes(weights, config)
            assert got.rank == want.rank and got.data.dtype == want.data.dtype == engine_dtype
            assert torch.equal(got.data.view(-1).view(torch.uint8), want.data.view(-1).view(torch.uint8))
            other = {k: torch.randn_like(v, dtype=torch.float32).to(v.dtype) for k, v in state.items()}
            torch.testing.assert_close(
                eng.pack_adapter_bytes(save(other), config).data, eng.pack_adapter(other, config).data, rtol=0, atol=0
            )
    big = FastEngine(LoadedBase(tiny_random(), tiny_tokenizer(), None), slots=2, max_rank=2, targets=["q_proj"])
    weights = (adapter_dirs[1] / "adapter_model.safetensors").read_bytes()
    with pytest.raises(AdapterLimitError, match="not a served target"):
        big.pack_adapter_bytes(weights, read_adapter_dir(adapter_dirs[1])[1])
    with pytest.raises(AdapterLimitError, match="header"):
        big.pack_adapter_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", {})
    # a header that claims more values than its bytes hold is refused, not read past
    state, config = read_adapter_dir(adapter_dirs[0])
    q_only = {f"base_model.model.{k}": v.float() for k, v in state.items() if ".q_proj." in k}
    raw = bytearray(save(q_only))
    n = int.from_bytes(raw[:8], "little")
    header = orjson.loads(bytes(raw[8 : 8 + n]))
    for key, entry in header.items():  # rank 1 -> 2 in the header only: A (2, k), B (n, 2); the bytes stay
        if ".lora_A." in key:
            entry["shape"] = [2, int(q_only[key].shape[1])]
        elif ".lora_B." in key:
            entry["shape"] = [int(q_only[key].shape[0]), 2]
    text = orjson.dumps(header)
    text += b" " * (-len(text) % 8)
    forged = len(text).to_bytes(8, "little") + text + bytes(raw[8 + n :])
    with pytest.raises(AdapterLimitError, match="do not match its shape"):
        big.pack_adapter_bytes(forged, {**config, "r": 2})


def test_the_base_is_never_modified(adapter_dirs):
    model = tiny_random()
    before = weights_sha256(model)
    eng = FastEngine(LoadedBase(model, tiny_tokenizer(), None), slots=2, max_rank=8)
    eng.load_adapter(0, adapter_dirs[1])
    eng.generate([Request(PROMPTS[0], slot=0, max_tokens=3)])
    eng.close()
    assert weights_sha256(model) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fast_engine_matches_the_cpu_one(adapter_dirs, fast):
    gpu = _fast(adapter_dirs, device="cuda", dtype=torch.float32)
    reqs = [Request(p, slot=i, max_tokens=8, ignore_eos=True) for i, p in enumerate(PROMPTS)]
    assert [g.output_ids for g in gpu.generate(reqs)] == [g.output_ids for g in fast.generate(reqs)]


def test_decode_attention_reference_equals_a_per_row_softmax():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 6, 8, generator=g)
    k = torch.randn(5, 2, 10, 8, generator=g)
    v = torch.randn(5, 2, 10, 8, generator=g)
    pos = torch.tensor([0, 3, 9, 5, 7])
    got = lora_ops.decode_attention_torch(q, k, v, pos, 10)
    for b in range(5):
        for h in range(6):
            kv = h // 3
            w = torch.softmax(q[b, h] @ k[b, kv, : pos[b] + 1].T / 8**0.5, dim=-1)
            torch.testing.assert_close(got[b, h], w @ v[b, kv, : pos[b] + 1])


def test_the_serving_setting_chooses_the_engine():
    """PERSONA_SERVE_ENGINE: auto is the reference engine on the CPU; fast is asked for by name; a base the fast
    engine cannot serve (biases) is an error when asked for by name."""
    from pipeline.config import ServingSettings
    from pipeline.models.base import TINY_RANDOM_ID, ref
    from pipeline.serving.fast_engine import make_engine

    def loaded(model):
        return LoadedBase(model, tiny_tokenizer(), ref(model, TINY_RANDOM_ID))

    assert type(make_engine(loaded(tiny_random()), ServingSettings(engine="auto"))) is Engine
    fast = make_engine(loaded(tiny_random()), ServingSettings(engine="fast", max_seq=64))
    assert type(fast) is FastEngine and fast.max_seq == 64
    biased = tiny_random()
    biased.config.attention_bias = True
    with pytest.raises(EngineError, match="without biases"):
        make_engine(loaded(biased), ServingSettings(engine="fast"))


def test_fused_references_equal_the_plain_ops():
    """The torch references of the fused ops are the plain ops of the reference path, step for step."""
    from pipeline.models import fused_ops

    g = torch.Generator().manual_seed(6)
    h, delta, w = (torch.randn(5, 24, generator=g).bfloat16() for _ in range(3))
    w = w[0]
    h2, x = fused_ops.add_rms_torch(h, delta, w, 1e-5)
    s = h + delta
    sf = s.float()
    assert torch.equal(h2, s)
    assert torch.equal(x, w * (sf * torch.rsqrt(sf.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16())
    gu = torch.randn(5, 16, generator=g)
    torch.testing.assert_close(fused_ops.silu_mul_torch(gu), torch.nn.functional.silu(gu[:, :8]) * gu[:, 8:])


@pytest.mark.skipif(not lora_ops.triton_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fused_ops_equal_their_references(dtype):
    from pipeline.models import fused_ops

    g = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to("cuda", dtype)

    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    h, delta, w = rnd(37, 576), rnd(37, 576), rnd(576)
    for d in (delta, None):
        got = fused_ops.add_rms(h, d, w, 1e-5)
        want = fused_ops.add_rms_torch(h, d, w, 1e-5)
        torch.testing.assert_close(got[0], want[0], **tol)
        torch.testing.assert_close(got[1], want[1], **tol)
    gu = rnd(37, 3072)
    torch.testing.assert_close(fused_ops.silu_mul(gu), fused_ops.silu_mul_torch(gu), **tol)
    hq, hkv, d, bs = 9, 3, 64, 16
    qkv = rnd(37, (hq + 2 * hkv) * d)
    cos, sin = rnd(256, d), rnd(256, d)
    pos = torch.randint(0, 256, (37,), generator=g).cuda()
    loc = torch.randperm(20 * bs, generator=g)[:37].cuda()
    caches = [torch.zeros(20, hkv, bs, d, device="cuda", dtype=dtype) for _ in range(4)]
    q1 = fused_ops.rope_cache(qkv, cos, sin, pos, loc, caches[0], caches[1], hq, hkv)
    q2 = fused_ops.rope_cache_torch(qkv, cos, sin, pos, loc, caches[2], caches[3], hq, hkv)
    torch.testing.assert_close(q1, q2, **tol)
    torch.testing.assert_close(caches[0], caches[2], **tol)
    torch.testing.assert_close(caches[1], caches[3], **tol)


@pytest.mark.skipif(not lora_ops.triton_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("nseg,k,n", [(3, 64, 96), (1, 64, 64), (2, 64, 600), (1, 160, 64)])
def test_triton_lora_kernels_equal_the_torch_path(nseg, k, n):
    """Both Triton LoRA paths (shrink + expand, and the one-kernel variant) against lora_torch, mixed ranks."""
    g = torch.Generator().manual_seed(nseg * 1000 + n)
    r = 8
    a = torch.randn(9, nseg * r, k, generator=g)
    bt = torch.randn(9, r, n, generator=g)
    ranks = torch.randint(0, r + 1, (9,), generator=g, dtype=torch.int32)
    ranks[8] = 0
    for s in range(9):
        for j in range(nseg):
            a[s, j * r + int(ranks[s]) : (j + 1) * r] = 0
        bt[s, int(ranks[s]) :] = 0
    seg = tuple(round(i * n / nseg) for i in range(nseg + 1))
    idx = torch.randint(0, 9, (37,), generator=g)
    x, y = torch.randn(37, k, generator=g), torch.randn(37, n, generator=g)
    want = lora_ops.lora_torch(y[:, None], x[:, None], a, bt, idx, seg, r)[:, 0]
    cuda = [t.cuda() for t in (y, x, a, bt, idx, ranks.cuda())]
    for kernel in (lora_ops.lora_triton, lora_ops.lora_triton_one):
        got = kernel(*cuda, seg, r).cpu()
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA"))]
)
def test_slot_loads_from_many_threads_land_in_batches_equal_to_loads_one_at_a_time(adapter_dirs, device):
    """Concurrent `load_packed` calls land together (`SlotLoads`: one copy and one scatter per rank for a batch);
    each slot ends up exactly as a lone load leaves it, a lower rank over a higher one included (the rest of the row
    zeroed)."""
    import threading

    def engine() -> FastEngine:
        base = LoadedBase(tiny_random(), tiny_tokenizer(), None)
        return FastEngine(base, slots=12, max_rank=8, max_seq=64, device=device)

    lone, batched = engine(), engine()
    packs = [lone.pack_adapter(*read_adapter_dir(adapter_dirs[i % len(adapter_dirs)])) for i in range(12)]
    assert len({p.rank for p in packs}) > 1
    for slot, packed in enumerate(reversed(packs)):  # every slot first holds another adapter (other ranks)
        lone.load_packed(slot, packed)
        batched.load_packed(slot, packed)
    for slot, packed in enumerate(packs):
        lone.load_packed(slot, packed)
    gate = threading.Barrier(len(packs))
    before = batched._loads.batches

    def load(slot: int) -> None:
        gate.wait()
        batched.load_packed(slot, packs[slot])

    threads = [threading.Thread(target=load, args=(slot,)) for slot in range(len(packs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert batched._loads.batches - before < len(packs)  # some landed together
    assert torch.equal(batched.lora, lone.lora) and torch.equal(batched.ranks, lone.ranks)
    ids = PROMPTS[0]
    out = lone.logits(torch.tensor([ids] * 3, device=device), None, [0, 5, 11])
    assert torch.equal(batched.logits(torch.tensor([ids] * 3, device=device), None, [0, 5, 11]), out)
    with pytest.raises(AdapterLimitError):  # a caller's error comes back to it
        batched.load_packed(99, packs[0])
    lone.close()
    batched.close()
    with pytest.raises(EngineError, match="closed"):
        batched.load_packed(0, packs[0])
