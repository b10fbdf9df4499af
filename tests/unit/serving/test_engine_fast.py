"""The fast engine (static KV cache, own decode step, slot-packed LoRA) on CPU: equal to stock peft per user, to
the reference engine's continuous batching, and its torch LoRA path equal to a per-row loop. The Triton kernels
and CUDA graphs are checked against these same references on a GPU (bench/serving_gpu.py and the CUDA test)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from pipeline.models import lora_ops, multilora
from pipeline.models.base import LoadedBase, tiny_random, tiny_tokenizer, weights_sha256
from pipeline.models.multilora import ALL_TARGETS, AdapterLimitError, read_adapter_dir
from pipeline.serving.engine import Engine, EngineError, Request
from pipeline.serving.fast_engine import FastEngine
from pipeline.serving.fast_llama import GROUPS

USERS = [
    (1, 2, ["q_proj", "v_proj"], torch.float32),
    (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], torch.float32),
    (8, 4, ["k_proj", "o_proj", "down_proj"], torch.bfloat16),
    (2, 16, ["gate_proj", "up_proj"], torch.float32),
]
PROMPTS = [[10, 20, 30, 40, 50], [7, 8, 9], [100, 101, 102, 103, 104, 105, 106, 107], [200, 3]]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for i, (r, alpha, targets, dtype) in enumerate(USERS):
        torch.manual_seed(100 + i)
        model = get_peft_model(
            tiny_random(), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        )
        path = root / f"user{i}"
        model.save_pretrained(path)
        if dtype != torch.float32:
            f = path / "adapter_model.safetensors"
            save_file({k: v.to(dtype) for k, v in load_file(f).items()}, f)
        dirs.append(path)
    return dirs


def _fast(adapter_dirs, **kw) -> FastEngine:
    kw.setdefault("max_batch", 8)
    eng = FastEngine(LoadedBase(tiny_random(), tiny_tokenizer(), None), slots=6, max_rank=8, max_seq=64, **kw)
    for slot, path in enumerate(adapter_dirs):
        eng.load_adapter(slot, path)
    return eng


@pytest.fixture(scope="module")
def fast(adapter_dirs):
    return _fast(adapter_dirs)


@pytest.fixture(scope="module")
def stock(adapter_dirs):
    return [PeftModel.from_pretrained(tiny_random(), path).eval() for path in adapter_dirs]


def _padded(prompts, side):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, sl] = torch.tensor(p)
        mask[i, sl] = 1
    return ids, mask, width


def _greedy_peft(model, prompt, n):
    out = model.generate(
        input_ids=torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_equal_stock_peft_per_user(fast, stock, side):
    prompts = [*PROMPTS, PROMPTS[0]]
    slots = [0, 1, 2, 3, -1]
    ids, mask, width = _padded(prompts, side)
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
    assert packed.rank == 1 and packed.nbytes == eng.slot_bytes
    eng.load_packed(0, packed)
    gen = eng.submit(Request(PROMPTS[0], slot=0, max_tokens=2))
    with pytest.raises(EngineError):
        eng.load_packed(0, packed)
    eng.run_until_done()
    assert gen.done
    eng.clear_adapter(0)
    assert int(eng.ranks[0]) == 0 and not eng.lora[0].any()


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
