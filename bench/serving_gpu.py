"""Benchmark (GPU): the fast serving engine with many distinct LoRA adapters in one batch, against the base alone
in the same engine, HF ``generate`` on the base and peft's mixed batch (``adapter_names``), all in one run.

One device call: ``python3 bench/serving_gpu.py --out $OUT`` prints one table and writes ``serving_gpu.json`` and
``serving_gpu.md`` under ``--out``. Bases are random weights of SmolLM2-135M and Llama-3.2-1B shapes (speed does not
depend on the values); correctness on the GPU is checked on random weights against stock peft, and on real SmolLM2
weights on the CPU with ``--cpu-real-check`` (writes ``bench/results/serving_gpu_cpu_check.json``).

The import chain needs torch, transformers, peft, safetensors and (on CUDA) triton only: no pydantic.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.models import lora_ops
from pipeline.models.multilora import ALL_TARGETS
from pipeline.serving.engine import Request
from pipeline.serving.fast_engine import FastEngine

RESULTS = Path(__file__).parent / "results"

SHAPES = {
    "smollm2-135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
    ),
    "llama-1b": dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, head_dim=64,
    ),
}  # fmt: skip


class _NoText:
    """Random-weight bases have no tokenizer: token ids only (stop strings unused here)."""

    def __len__(self) -> int:
        return 0

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


class _Base:
    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else _NoText()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_model(shape: str, device: str, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=None, eos_token_id=2, pad_token_id=0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype).eval().requires_grad_(False)


def random_adapter(model, r: int, seed: int, b_std: float = 0.05) -> dict[str, torch.Tensor]:
    """PEFT-format LoRA tensors on all 7 projections (A ~ N(0, 1/in), B ~ N(0, b_std)): a visible delta."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ALL_TARGETS:
            k, n = mod.in_features, mod.out_features
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, k, generator=g) / k**0.5
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(n, r, generator=g) * b_std
    return state


def lora_config(r: int) -> dict:
    return {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(ALL_TARGETS)}


def peft_model(base, states: list[dict[str, torch.Tensor]], rank: int | list[int]):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    ranks = rank if isinstance(rank, list) else [rank] * len(states)
    pm = get_peft_model(base, LoraConfig(r=ranks[0], lora_alpha=2 * ranks[0], target_modules=list(ALL_TARGETS)), "a0")
    for i in range(1, len(states)):
        pm.add_adapter(f"a{i}", LoraConfig(r=ranks[i], lora_alpha=2 * ranks[i], target_modules=list(ALL_TARGETS)))
    for i, st in enumerate(states):
        set_peft_model_state_dict(pm, st, adapter_name=f"a{i}")
    return pm.eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


# -- ceilings ---------------------------------------------------------------------------------------------------


def ceilings() -> dict:
    x = torch.randn(256 * 1024 * 1024, device="cuda", dtype=torch.bfloat16)  # 512 MB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(10):
        y.copy_(x)
    e.record()
    sync()
    bw = 2 * x.numel() * 2 * 10 / (s.elapsed_time(e) / 1e3)
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    s.record()
    for _ in range(10):
        a @ b
    e.record()
    sync()
    flops = 2 * 8192**3 * 10 / (s.elapsed_time(e) / 1e3)
    return {"copy_bytes_per_s": bw, "bf16_flops_per_s": flops}


# -- correctness on the GPU (random weights) ---------------------------------------------------------------------


def gpu_correctness(out: dict) -> None:
    model = make_model("smollm2-135m", "cuda", torch.bfloat16, seed=1)
    ranks = [8, 8, 8, 8, 1, 1, 1, 1]
    states = [random_adapter(model, r, 100 + i) for i, r in enumerate(ranks)]
    eng = FastEngine(_Base(model), slots=16, max_rank=8, device="cuda", max_batch=16, max_seq=96)
    for i, st in enumerate(states):
        eng.load_adapter_state(i, st, lora_config(ranks[i]))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 49152, (int(n),), generator=g).tolist() for n in (17, 33, 5, 64, 40, 9, 23, 50, 30)]
    slots = [*list(range(8)), -1]
    ref_base = make_model("smollm2-135m", "cuda", torch.float32, seed=1)
    pm = peft_model(copy.deepcopy(ref_base), states, ranks)
    # 1. the Triton kernels against the torch path, on random inputs, output poisoned first
    kern = []
    for nseg, k, n in ((3, 576, 960), (1, 576, 576), (2, 576, 3072), (1, 1536, 576)):
        a = torch.randn(17, nseg * 8, k, device="cuda").bfloat16()
        bt = torch.randn(17, 8, n, device="cuda").bfloat16()
        rk = torch.randint(0, 9, (17,), device="cuda", dtype=torch.int32)
        rk[16] = 0
        for s in range(17):
            for j in range(nseg):
                a[s, j * 8 + int(rk[s]) : (j + 1) * 8] = 0
            bt[s, int(rk[s]) :] = 0
        seg = tuple(range(0, n + 1, n // nseg))
        idx = torch.randint(0, 17, (300,), device="cuda", dtype=torch.int32)
        x = torch.randn(300, k, device="cuda").bfloat16()
        y = torch.randn(300, n, device="cuda").bfloat16()
        got = lora_ops.lora_triton(y, x, a, bt, idx, rk, seg, 8)
        want = lora_ops.lora_torch(y.float()[:, None], x.float()[:, None], a.float(), bt.float(), idx.long(), seg, 8)
        kern.append({"nseg": nseg, "k": k, "n": n, "rel_err": rel(got.float() - y.float(), want[:, 0] - y.float())})
    out["kernel_vs_torch"] = kern
    att = []
    for hq, hkv in ((9, 3), (32, 8)):  # paged: 300 tokens of 40 sequences, blocks shuffled over the cache
        q = torch.randn(300, hq, 64, device="cuda").bfloat16()
        kc = torch.randn(40 * 13 + 1, hkv, 16, 64, device="cuda").bfloat16()
        vc = torch.randn_like(kc)
        table = (torch.randperm(40 * 13, device="cuda") + 1).view(40, 13).int()
        seq = torch.randint(0, 40, (300,), device="cuda")
        pos = torch.randint(0, 13 * 16, (300,), device="cuda")
        got = lora_ops.paged_attention(q, kc, vc, table, seq, pos)
        want = lora_ops.paged_attention_torch(q.float(), kc.float(), vc.float(), table, seq, pos, 13 * 16)
        att.append({"hq": hq, "hkv": hkv, "rel_err": rel(got.float(), want), "nan": bool(got.isnan().any())})
    out["attention_vs_torch"] = att
    # 2. per-user logits of one mixed batch against stock peft (fp32), users side by side
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    got = eng.logits(ids, mask, slots)
    errs, effect = [], []
    for i, p in enumerate(prompts):
        with torch.no_grad():
            if slots[i] >= 0:
                pm.set_adapter(f"a{slots[i]}")
                want = pm(torch.tensor([p], device="cuda")).logits[0].float()
                with pm.disable_adapter():
                    plain = pm(torch.tensor([p], device="cuda")).logits[0].float()
                effect.append(rel(want, plain))
            else:
                want = ref_base(torch.tensor([p], device="cuda")).logits[0].float()
        errs.append(rel(got[i, width - len(p) :], want))
    out["logits_rel_err_vs_peft_fp32"] = errs
    # what bf16 costs stock peft itself on the same users: the tolerance to judge the engine's error by
    pm16 = peft_model(copy.deepcopy(ref_base).bfloat16(), states, ranks)
    errs16 = []
    for i, p in enumerate(prompts[:8]):
        pm.set_adapter(f"a{slots[i]}")
        pm16.set_adapter(f"a{slots[i]}")
        x = torch.tensor([p], device="cuda")
        errs16.append(rel(pm16(x).logits[0].float(), pm(x).logits[0].float()))
    out["peft_bf16_rel_err_vs_peft_fp32"] = errs16
    del pm16
    out["adapter_effect_rel"] = effect
    # 3. greedy decode (CUDA graphs + Triton) for all users in one batch, teacher-forced against peft fp32
    reqs = [Request(p, slot=s, max_tokens=24, ignore_eos=True) for p, s in zip(prompts, slots, strict=True)]
    gens = eng.generate(reqs)
    agree, gaps = 0, []
    steps = 0
    for gen, p, s in zip(gens, prompts, slots, strict=True):
        seq = torch.tensor([p + gen.output_ids[:-1]], device="cuda")
        with torch.no_grad():
            if s >= 0:
                pm.set_adapter(f"a{s}")
                lg = pm(seq).logits[0, len(p) - 1 :].float()
            else:
                lg = ref_base(seq).logits[0, len(p) - 1 :].float()
        for t, tok in enumerate(gen.output_ids):
            steps += 1
            agree += int(lg[t].argmax()) == tok
            gaps.append(float(lg[t].max() - lg[t, tok]))
    out["decode_greedy_steps"] = steps
    out["decode_greedy_equal_peft_argmax"] = agree
    out["decode_max_logit_gap"] = max(gaps)
    # 4. the same batch through the torch LoRA path without graphs: the fast path must give the same tokens
    eng.use_triton = eng.triton_attention = eng.use_graphs = False
    plain = [g.output_ids for g in eng.generate(reqs)]
    out["decode_triton_graphs_equal_torch_eager"] = sum(a.output_ids == b for a, b in zip(gens, plain, strict=True))
    out["users"] = len(reqs)
    del eng, pm, ref_base, model
    gc.collect()
    torch.cuda.empty_cache()


# -- speed ------------------------------------------------------------------------------------------------------


def fill_slots(eng: FastEngine, n: int, r: int, seed: int) -> None:
    """Random adapters of rank r straight into slots 0..n-1 (packed layout; rows beyond the rank zero)."""
    eng.load_packed(0, eng.pack_adapter(random_adapter_for(eng, r), lora_config(r)))
    mask = eng.lora[0] != 0  # where a rank-r adapter has values in a slot row
    g = torch.Generator(device="cuda").manual_seed(seed)
    for s in range(n):
        eng.lora[s] = (torch.randn(eng.slot_numel, device="cuda", generator=g) * 0.02).to(eng.dtype) * mask
    eng.ranks[:n] = r


def random_adapter_for(eng: FastEngine, r: int) -> dict[str, torch.Tensor]:
    state = {}
    for path, (_, name) in eng.module_of.items():
        k, n = eng.shapes[name]
        state[f"{path}.lora_A.weight"] = torch.ones(r, k)
        state[f"{path}.lora_B.weight"] = torch.ones(n, r)
    return state


def engine_run(eng: FastEngine, batch: int, users: int, prompt: int, new: int, seed: int = 0) -> dict:
    """``batch`` requests submitted together: prefill = until every request has its first token (chunked prefill:
    the first admitted ones decode meanwhile); decode = ``new`` steps with every row decoding, tokens counted."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(3, eng.vocab, (batch, prompt), generator=g).tolist()
    reqs = [
        Request(p, slot=(i % users) if users else -1, max_tokens=eng.max_seq, ignore_eos=True)
        for i, p in enumerate(prompts)
    ]
    gens = [eng.submit(r) for r in reqs]
    sync()
    t0 = time.perf_counter()
    while any(not x.output_ids for x in gens):
        eng.step()
    sync()
    t1 = time.perf_counter()
    before = sum(len(x.output_ids) for x in gens)
    for _ in range(new):
        eng.step()
    sync()
    t2 = time.perf_counter()
    tokens = sum(len(x.output_ids) for x in gens) - before
    assert all(not x.done for x in gens), "a request finished inside the timed decode window"
    eng.abort_all()
    return {
        "prefill_s": t1 - t0,
        "prefill_tokens_per_s": batch * prompt / (t1 - t0),
        "decode_s": t2 - t1,
        "decode_tokens_per_s": tokens / (t2 - t1),
    }


#: Timed repetitions of each HF/peft baseline call (after one untimed warm-up run of each); medians are reported.
HF_REPS = 3
HF_METHOD = (
    "HF `generate` / peft rows are warm: every call that is timed (`generate(1 new)` and `generate(new+1 new)` at "
    "that batch, same inputs) runs once untimed first, then each is timed {reps} times alternately; prefill = "
    "median of `generate(1 new)`, decode = median over repetitions of `generate(new+1 new)` minus "
    "`generate(1 new)` (the same decode-only definition as the engine rows)."
)


def hf_generate(model, batch: int, prompt: int, new: int, adapter_names=None, reps: int | None = None) -> dict:
    """Warm HF ``generate`` (or peft's mixed batch with ``adapter_names``): see HF_METHOD."""
    reps = reps or HF_REPS
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, prompt), generator=g).to(model.device)
    mask = torch.ones_like(ids)
    kw = {"do_sample": False, "pad_token_id": 0}
    if adapter_names is not None:
        kw["adapter_names"] = adapter_names

    def run(n: int) -> float:
        sync()
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)
        sync()
        return time.perf_counter() - t

    warm = [run(1), run(new + 1)]  # every shape timed below, once, untimed (first-call costs of each length)
    t1s, tns = [], []
    for _ in range(reps):
        t1s.append(run(1))
        tns.append(run(new + 1))
    t1 = statistics.median(t1s)
    decode = statistics.median(tn - a for tn, a in zip(tns, t1s, strict=True))
    return {
        "prefill_s": t1,
        "prefill_tokens_per_s": batch * prompt / t1,
        "decode_s": decode,
        "decode_tokens_per_s": batch * new / decode,
        "hf_method": {"warmup_s": warm, "reps": reps, "t1_s": t1s, "tn_s": tns},
    }


def floor_model(eng: FastEngine, batch: int, users: int, r: int, ctx: int, ceil: dict) -> dict:
    """Fewest bytes a decode step must move and its FLOPs -> the floor time and tokens/s."""
    el = 2  # bf16
    base_params = sum(x.numel() for layer in eng.layers for x in (layer.wqkv, layer.wo, layer.wgu, layer.wd))
    head = eng.lm_head.numel()
    kv = batch * ctx * len(eng.layers) * 2 * eng.n_kv * eng.head_dim * el
    per_rank = eng.slot_numel // eng.max_rank  # values of one rank unit of one adapter (A row + B column, all modules)
    distinct = min(users, batch)
    lora = distinct * per_rank * r * el
    nbytes = (base_params + head) * el + kv + lora + batch * eng.vocab * el
    flops = 2 * batch * (base_params + head) + 2 * batch * per_rank * r * (1 if users else 0)
    flops += 4 * batch * ctx * eng.n_heads * eng.head_dim * len(eng.layers)
    t = max(nbytes / ceil["copy_bytes_per_s"], flops / ceil["bf16_flops_per_s"])
    return {"bytes": nbytes, "flops": flops, "floor_tokens_per_s": batch / t, "lora_bytes": lora, "kv_bytes": kv}


def speed(shape: str, cfgs: list[tuple[int, list[int]]], ranks: list[int], prompt: int, new: int, ceil: dict,
          anchors: dict, rows: list[dict]) -> None:  # fmt: skip
    model = make_model(shape, "cuda", torch.bfloat16)
    max_b = max(b for b, _ in cfgs)
    max_users = max(u for _, us in cfgs for u in us)
    # A step takes up to 8192 prompt tokens, so a wave's prefill takes a few steps and the rows admitted first
    # decode at most that many tokens ahead (max_seq leaves room for them).
    eng = FastEngine(
        _Base(model), slots=max(max_users, 1), max_rank=8, device="cuda", max_batch=max_b,
        max_seq=prompt + 2 * new + max_b * prompt // 8192 + 8, step_tokens=max_b + 8192,
    )  # fmt: skip
    ctx = prompt + new + 2
    gc.collect()
    gc.freeze()  # as a serving worker does once it is built (pipeline.serving.api.uvicorn_servers)
    log(f"{shape}: slot {eng.slot_bytes / 1e6:.2f} MB at r=8; {len(eng.layers)} layers")
    for b, _ in cfgs:  # capture each graph once (base and LoRA variants)
        fill_slots(eng, 1, 8, 0)
        engine_run(eng, b, 0, prompt, 2)
        engine_run(eng, b, 1, prompt, 2)

    def add(path: str, batch: int, users: int, r: int | None, res: dict) -> None:
        row = {"model": shape, "path": path, "batch": batch, "users": users, "rank": r, **res}
        row["triton"] = {"lora": eng.use_triton, "attention": eng.triton_attention}
        if path.startswith("engine"):
            row.update(floor_model(eng, batch, users, r or 0, ctx, ceil))
        rows.append(row)
        log(f"  {shape} {path} B={batch} U={users} r={r}: decode {res['decode_tokens_per_s']:,.0f} tok/s, "
            f"prefill {res['prefill_tokens_per_s']:,.0f} tok/s")  # fmt: skip

    for b, users_list in cfgs:
        add("engine base only", b, 0, None, engine_run(eng, b, 0, prompt, new))
        for r in ranks:
            fill_slots(eng, max(users_list), r, r)
            for u in users_list:
                add("engine LoRA", b, u, r, engine_run(eng, b, u, prompt, new))
    for b in anchors.get("hf", []):
        add("HF generate, base", b, 0, None, hf_generate(model, b, prompt, new))
    if anchors.get("peft"):
        b, u, n_new = anchors["peft"]
        states = [random_adapter(model, 8, i) for i in range(u)]
        pm = peft_model(copy.deepcopy(model), [{k: v.bfloat16() for k, v in s.items()} for s in states], 8)
        add("peft mixed batch", b, u, 8, hf_generate(pm, b, prompt, n_new, [f"a{i % u}" for i in range(b)]))
        del pm
    if anchors.get("cold"):
        cold_loads(eng, model, anchors["cold"], rows, shape)
    eng.close()
    gc.collect()
    torch.cuda.empty_cache()


# -- cold loads -------------------------------------------------------------------------------------------------


def cold_loads(eng: FastEngine, model, n: int, rows: list[dict], shape: str) -> None:
    from safetensors.torch import load as st_load
    from safetensors.torch import save

    states = [random_adapter(model, 8, 1000 + i) for i in range(n)]
    packed = [eng.pack_adapter(s, lora_config(8)) for s in states]  # the host tier keeps adapters packed, pinned
    slots = list(range(eng.slots - n, eng.slots)) if eng.slots >= 2 * n else list(range(n))
    host = []
    for i, p in enumerate(packed):
        sync()
        t = time.perf_counter()
        eng.load_packed(slots[i], p)
        host.append(time.perf_counter() - t)
    host = host[3:]
    # object store -> host -> slot: files in the bucket layout on local disk, sha256-verified, parsed and packed
    with tempfile.TemporaryDirectory() as d:
        keys = []
        for i, s in enumerate(states):
            data = save({k: v.bfloat16() for k, v in s.items()})
            folder = Path(d) / f"users/u{i}/revisions/r{i}"
            folder.mkdir(parents=True)
            (folder / "adapter_model.safetensors").write_bytes(data)
            (folder / "adapter_config.json").write_text(json.dumps(lora_config(8)))
            keys.append((folder, hashlib.sha256(data).hexdigest()))
        fetch, total = [], []
        for i, (folder, sha) in enumerate(keys):
            t = time.perf_counter()
            data = (folder / "adapter_model.safetensors").read_bytes()
            if hashlib.sha256(data).hexdigest() != sha:
                raise RuntimeError("sha256 mismatch")
            cfg = json.loads((folder / "adapter_config.json").read_text())
            p = eng.pack_adapter(st_load(data), cfg)
            t_host = time.perf_counter()
            eng.load_packed(slots[i], p)
            t_end = time.perf_counter()
            fetch.append(t_host - t)
            total.append(t_end - t)
        fetch, total = fetch[3:], total[3:]
    # loads do not hold up decode: decode throughput while another thread loads adapters continuously
    b, u = min(256, eng.max_batch), min(64, eng.slots - n) if eng.slots > n else 1
    engine_run(eng, b, u, 128, 4)  # this batch size's graphs
    quiet = engine_run(eng, b, u, 128, 32)["decode_tokens_per_s"]
    stop = threading.Event()
    loads = [0]

    def loader() -> None:
        i = 0
        while not stop.is_set():
            eng.load_packed(slots[i % n], packed[i % n])
            loads[0] += 1
            i += 1

    th = threading.Thread(target=loader)
    th.start()
    busy = engine_run(eng, b, u, 128, 32)
    stop.set()
    th.join()
    rows.append({
        "model": shape, "path": "cold loads", "adapter_bytes": packed[0].nbytes,
        "host_to_slot_p50_ms": 1e3 * statistics.median(host), "host_to_slot_p99_ms": 1e3 * pct(host, 0.99),
        "store_to_host_p50_ms": 1e3 * statistics.median(fetch), "store_to_host_p99_ms": 1e3 * pct(fetch, 0.99),
        "store_to_slot_p50_ms": 1e3 * statistics.median(total), "store_to_slot_p99_ms": 1e3 * pct(total, 0.99),
        "decode_tok_s_quiet": quiet, "decode_tok_s_while_loading": busy["decode_tokens_per_s"],
        "loads_during_decode": loads[0], "decode_window_s": busy["decode_s"] + busy["prefill_s"],
        "batch": b, "users": u,
    })  # fmt: skip
    log(f"  cold loads: {rows[-1]}")


# -- table --------------------------------------------------------------------------------------------------------


def table(res: dict) -> str:
    rows = res["rows"]
    lines = [
        f"GPU serving benchmark ({res['device']}, torch {res['torch']}, transformers {res['transformers']}, "
        f"peft {res['peft']}): prompt {res['prompt']} tokens, {res['new']} new tokens (greedy), bf16, random "
        "weights, LoRA on all 7 projections, slots of max rank 8; ceilings measured: copy "
        f"{res['ceilings']['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
        f"{res['ceilings']['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s",
        "",
        "| base | path | batch | distinct adapters | rank | decode tok/s | vs engine base | "
        "vs HF base (same batch) | floor tok/s (bytes) | % of floor | prefill tok/s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["path"] == "cold loads":
            continue
        same = [x for x in rows if x["model"] == r["model"] and x.get("batch") == r["batch"]]
        base = next((x for x in same if x["path"] == "engine base only"), None)
        hf = next((x for x in same if x["path"] == "HF generate, base"), None)
        d = r["decode_tokens_per_s"]
        lines.append(
            f"| {r['model']} | {r['path']} | {r['batch']} | {r['users'] or '-'} | {r['rank'] or '-'} | {d:,.0f} | "
            + (f"{d / base['decode_tokens_per_s']:.0%} | " if base else "- | ")
            + (f"{d / hf['decode_tokens_per_s']:.1f}x | " if hf else "- | ")
            + (f"{r['floor_tokens_per_s']:,.0f} | {d / r['floor_tokens_per_s']:.0%} | " if "floor_tokens_per_s" in r
               else "- | - | ")
            + f"{r['prefill_tokens_per_s']:,.0f} |"
        )  # fmt: skip
    if any(r["path"] in ("HF generate, base", "peft mixed batch") for r in rows):
        lines += ["", "Note: " + res.get("hf_method", HF_METHOD.format(reps=HF_REPS))]
    cold = [r for r in rows if r["path"] == "cold loads"]
    if cold:
        lines += [
            "",
            "| base | adapter MB | host->slot p50 / p99 ms | store->host p50 / p99 ms | store->slot p50 / p99 ms "
            "| decode tok/s quiet / while loading (loads) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c in cold:
            lines.append(
                f"| {c['model']} | {c['adapter_bytes'] / 1e6:.2f} | {c['host_to_slot_p50_ms']:.3f} / "
                f"{c['host_to_slot_p99_ms']:.3f} | {c['store_to_host_p50_ms']:.1f} / {c['store_to_host_p99_ms']:.1f} "
                f"| {c['store_to_slot_p50_ms']:.1f} / {c['store_to_slot_p99_ms']:.1f} | "
                f"{c['decode_tok_s_quiet']:,.0f} / {c['decode_tok_s_while_loading']:,.0f} "
                f"({c['loads_during_decode']}) |"
            )
    peft_row = next((r for r in rows if r["path"] == "peft mixed batch"), None)
    if peft_row:
        eng64 = [
            r for r in rows if r["model"] == peft_row["model"] and r["path"] == "engine LoRA" and r["users"] == 64
        ]
        same = next((r for r in eng64 if r["batch"] == peft_row["batch"] and r["rank"] == 8), None)
        best = max(eng64, key=lambda r: r["decode_tokens_per_s"], default=None)
        if same and best:
            lines.append(
                f"\nEngine with 64 distinct adapters vs peft's mixed batch (batch {peft_row['batch']}, 64 adapters, "
                f"r=8): {same['decode_tokens_per_s'] / peft_row['decode_tokens_per_s']:.0f}x at the same batch; "
                f"{best['decode_tokens_per_s'] / peft_row['decode_tokens_per_s']:.0f}x at batch {best['batch']} "
                f"(r={best['rank']})."
            )
    c = res.get("correctness")
    if c and "decode_triton_graphs_equal_torch_eager" in c:
        lines.append(
            f"\nCorrectness (GPU, random SmolLM2-shape weights, {c['users']} users incl. base in one batch, "
            "ranks 8 and 1): "
            f"logits rel. error vs peft fp32 max {max(c['logits_rel_err_vs_peft_fp32']):.2e} (stock peft in bf16: "
            f"{max(c['peft_bf16_rel_err_vs_peft_fp32']):.2e}; adapter effect "
            f"{min(c['adapter_effect_rel']):.2f}-{max(c['adapter_effect_rel']):.2f}); greedy decode tokens equal to "
            f"peft fp32 argmax {c['decode_greedy_equal_peft_argmax']}/{c['decode_greedy_steps']} (max logit gap "
            f"{c['decode_max_logit_gap']:.3f}); Triton+graphs vs torch eager equal sequences "
            f"{c['decode_triton_graphs_equal_torch_eager']}/{c['users']}; Triton kernels vs torch rel. error max "
            f"{max(k['rel_err'] for k in c['kernel_vs_torch']):.1e} (LoRA), "
            f"{max(k['rel_err'] for k in c['attention_vs_torch']):.1e} (decode attention)."
        )
    return "\n".join(lines)


# -- CPU check on real SmolLM2 weights ----------------------------------------------------------------------------


def cpu_real_check() -> None:
    from peft import PeftModel

    from pipeline.models.base import load_base

    loaded = load_base("smollm2-135m")
    base = copy.deepcopy(loaded.model)
    tok = loaded.tokenizer
    ranks = [8, 1, 8, 1]
    states = [random_adapter(base, r, 200 + i, b_std=0.02) for i, r in enumerate(ranks)]
    eng = FastEngine(_Base(copy.deepcopy(base), tok), slots=4, max_rank=8, max_batch=8, max_seq=256)
    for i, st in enumerate(states):
        eng.load_adapter_state(i, st, lora_config(ranks[i]))
    texts = ["Write a haiku about the sea.", "What is the capital of France?", "List three fruits.",
             "Explain gravity to a child.", "Say hello."]  # fmt: skip
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
    slots = [0, 1, 2, 3, -1]
    gens = eng.generate(
        [Request(p, slot=s, max_tokens=24, ignore_eos=True) for p, s in zip(prompts, slots, strict=True)]
    )
    result = {"users": []}
    for i, (p, s) in enumerate(zip(prompts, slots, strict=True)):
        m = copy.deepcopy(base)
        if s >= 0:
            with tempfile.TemporaryDirectory() as d:
                from safetensors.torch import save_file

                save_file({k: v.contiguous() for k, v in states[s].items()}, f"{d}/adapter_model.safetensors")
                Path(d, "adapter_config.json").write_text(
                    json.dumps({**lora_config(ranks[s]), "base_model_name_or_path": None})
                )
                m = PeftModel.from_pretrained(m, d).eval()
        with torch.no_grad():
            want = m.generate(input_ids=torch.tensor([p]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                              pad_token_id=0)[0, len(p):].tolist()  # fmt: skip
            lg_ref = m(torch.tensor([p])).logits[0]
        lg = eng.logits(torch.tensor([p]), None, [s])[0]
        result["users"].append({
            "slot": s, "rank": ranks[s] if s >= 0 else 0, "equal": gens[i].output_ids == want,
            "engine_text": tok.decode(gens[i].output_ids), "peft_text": tok.decode(want),
            "logits_rel_err": rel(lg, lg_ref),
        })  # fmt: skip
        log(f"user slot {s}: equal={result['users'][-1]['equal']} {tok.decode(gens[i].output_ids)!r}")
    result["all_equal"] = all(u["equal"] for u in result["users"])
    result["torch"] = torch.__version__
    (RESULTS / "serving_gpu_cpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"all_equal": result["all_equal"], "max_rel": max(u["logits_rel_err"] for u in result["users"])}))


def profile() -> None:
    """Decode at B=1024 (and 256, 64): tokens/s with CUDA graphs and where the host's time goes per step (plan +
    launch, read back, waiting for the GPU), then the kernel time breakdown of eager steps (no graphs)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    torch.set_grad_enabled(False)
    model = make_model("smollm2-135m", "cuda", torch.bfloat16)
    eng = FastEngine(
        _Base(model), slots=1024, max_rank=8, device="cuda", max_batch=1024, max_seq=128 + 64 + 16 + 8,
        step_tokens=1024 + 8192,
    )  # fmt: skip
    fill_slots(eng, 1024, 8, 0)
    gc.collect()
    gc.freeze()  # as a serving worker does once it is built (pipeline.serving.api.uvicorn_servers)
    gc_s = [0.0, 0.0]

    def gc_timer(phase: str, info: dict) -> None:
        if phase == "start":
            gc_s[1] = time.perf_counter()
        else:
            gc_s[0] += time.perf_counter() - gc_s[1]

    gc.callbacks.append(gc_timer)
    runs = [(1024, 0, 8, False), (1024, 1, 8, False), (1024, 64, 8, False), (1024, 1024, 8, False),
            (1024, 1024, 8, True), (1024, 1024, 1, False), (1024, 1024, 1, True), (256, 0, 8, False),
            (256, 256, 8, False), (256, 256, 8, True), (64, 0, 8, False)]  # fmt: skip
    for batch, users, rank, one_kernel in runs:
        if rank != int(eng.ranks[0]):
            fill_slots(eng, 1024, rank, rank)
        eng.one_kernel_lora = one_kernel
        engine_run(eng, batch, users, 128, 4)
        before = dict(eng.counters)
        gc_s[0] = 0.0
        r = engine_run(eng, batch, users, 128, 32)
        print(f"  garbage collection {1e3 * gc_s[0]:.1f} ms in the run", flush=True)
        d = {k: eng.counters[k] - before[k] for k in before}
        steps = max(d["steps"], 1)
        ms = {k: 1e3 * d[k] / steps for k in ("plan_s", "finish_s", "wait_s")}
        print(f"B={batch} users={users} r={rank}{' one-kernel LoRA' if one_kernel else ''}: "
              f"{r['decode_tokens_per_s']:,.0f} tok/s; per step (ms): plan+launch "
              f"{ms['plan_s']:.2f}, read back {ms['finish_s']:.2f}, wait {ms['wait_s']:.2f}; "
              f"{1e3 * r['decode_s'] / 32:.2f} ms/decode step", flush=True)  # fmt: skip
    eng.one_kernel_lora = False
    eng.use_graphs = False
    for users in (0, 64, 1024):
        engine_run(eng, 1024, users, 128, 2)
        prompts = torch.randint(3, eng.vocab, (1024, 128)).tolist()
        gens = [
            eng.submit(Request(p, slot=(i % users) if users else -1, max_tokens=64, ignore_eos=True))
            for i, p in enumerate(prompts)
        ]
        while any(not g.output_ids for g in gens):
            eng.step()
        sync()
        with prof(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as pr:
            for _ in range(4):
                eng.step()
            sync()
        print(f"== eager, B=1024, users {users}")
        print(pr.key_averages().table(sort_by="cuda_time_total", row_limit=16, max_name_column_width=50))
        eng.abort_all()


def main() -> None:
    global HF_REPS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="a small grid (smoke test)")
    ap.add_argument("--cpu-real-check", action="store_true")
    ap.add_argument("--profile", action="store_true", help="kernel time breakdown of decode steps")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--hf-reps", type=int, default=HF_REPS, help="timed repetitions of each HF/peft baseline call")
    args = ap.parse_args()
    HF_REPS = max(1, args.hf_reps)
    if args.cpu_real_check:
        cpu_real_check()
        return
    if args.profile:
        profile()
        return
    import peft
    import transformers

    torch.set_grad_enabled(False)
    res = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "triton": getattr(lora_ops.triton, "__version__", None), "prompt": args.prompt,
        "new": args.new, "python": platform.python_version(), "rows": [], "errors": [],
        "hf_method": HF_METHOD.format(reps=HF_REPS),
    }  # fmt: skip
    t0 = time.perf_counter()
    res["ceilings"] = ceilings()
    log(f"ceilings {res['ceilings']}")
    res["correctness"] = {}
    try:
        gpu_correctness(res["correctness"])
    except Exception:
        res["errors"].append(traceback.format_exc())
        log(res["errors"][-1])
    log(f"correctness {res['correctness']} ({time.perf_counter() - t0:.0f}s)")
    if args.quick:
        plan = [
            ("smollm2-135m", [(64, [64]), (1024, [1, 1024])], [8, 1], {"hf": [64], "peft": (64, 64, 2), "cold": 16}),
            ("llama-1b", [(256, [256])], [8], {"hf": [256]}),
        ]
    else:
        plan = [
            ("smollm2-135m", [(64, [1, 64]), (256, [1, 64, 256]), (1024, [1, 64, 1024])], [1, 8],
             {"hf": [64, 256, 1024], "peft": (64, 64, 2), "cold": 100}),
            ("llama-1b", [(256, [1, 64, 256]), (1024, [1, 64, 1024])], [1, 8], {"hf": [256], "cold": 50}),
        ]  # fmt: skip
    for shape, cfgs, ranks, anchors in plan:
        try:
            speed(shape, cfgs, ranks, args.prompt, args.new, res["ceilings"], anchors, res["rows"])
        except Exception:
            res["errors"].append(traceback.format_exc())
            log(res["errors"][-1])
        log(f"{shape} done ({time.perf_counter() - t0:.0f}s)")
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serving_gpu.json").write_text(json.dumps(res, indent=2) + "\n")  # partial results survive
    res["wall_s"] = time.perf_counter() - t0
    text = table(res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving_gpu.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.out / "serving_gpu.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
