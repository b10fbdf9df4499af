"""Benchmark: the fast serving engine's per-layer kernels at decode shapes, and the paged-attention launch configs.

For SmolLM2-135M's attention shape (9 query heads, 3 KV heads, head dim 64, KV blocks of 16 tokens) and each batch
(B tokens, one per sequence) and context length, it times `pipeline.models.lora_ops.paged_attention` under every
launch configuration of a grid (tokens per loop step, warps, pipeline stages), checks each against the torch
reference, and reports microseconds per call and the KV bytes read per second; then the fused rotary + cache write
(`pipeline.models.fused_ops.rope_cache`), residual + RMSNorm and SwiGLU kernels against their torch references.
The sequences' blocks are scattered over the cache (a random permutation), as in a running server.

    python3 bench/serving_kernels.py --out OUT     # CUDA only; prints a table, writes OUT/serving_kernels.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.models import fused_ops, lora_ops

HQ, HKV, D, BS = 9, 3, 64, 16


def bench_us(fn, reps: int = 50) -> float:
    """Median microseconds of ``fn`` (CUDA events, after warm-up)."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(1e3 * a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def attn_case(batch: int, ctx: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    nblk = -(-ctx // BS)
    blocks = batch * nblk + 1
    k = torch.randn(blocks, HKV, BS, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(blocks, HKV, BS, D, device="cuda", dtype=torch.bfloat16, generator=g)
    perm = torch.randperm(blocks - 1, device="cuda", generator=g)[: batch * nblk] + 1
    table = perm.view(batch, nblk).to(torch.int32).contiguous()
    q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    seq = torch.arange(batch, device="cuda", dtype=torch.int64)
    pos = torch.full((batch,), ctx - 1, device="cuda", dtype=torch.int64)
    return q, k, v, table, seq, pos


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--batches", default="256,1024")
    ap.add_argument("--contexts", default="160,512,2048")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "CUDA only"
    res: dict = {"device": torch.cuda.get_device_name(), "default": dict(lora_ops.PAGED_ATTN_CONFIG), "attn": [],
                 "fused": []}  # fmt: skip
    grid = list(itertools.product((16, 32, 64, 128), (1, 2, 4, 8), (1, 2, 3, 4)))
    print("paged attention (SmolLM2-135M heads), us per call; best config per case marked *", flush=True)
    for batch, ctx in itertools.product(map(int, args.batches.split(",")), map(int, args.contexts.split(","))):
        q, k, v, table, seq, pos = attn_case(batch, ctx)
        ref = lora_ops.paged_attention_torch(q, k, v, table, seq, pos, -(-ctx // BS) * BS)
        kv_bytes = 2 * batch * ctx * HKV * D * 2
        rows = []
        for bt, nw, ns in grid:
            cfg = {"BLOCK_T": bt, "num_warps": nw, "num_stages": ns}
            try:
                out = lora_ops.paged_attention(q, k, v, table, seq, pos, cfg)
                err = (out.float() - ref.float()).abs().max().item()
                us = bench_us(functools.partial(lora_ops.paged_attention, q, k, v, table, seq, pos, cfg))
            except Exception as e:  # a config the compiler rejects (shared memory) is reported, not fatal
                rows.append({"cfg": cfg, "error": str(e)[:120]})
                continue
            rows.append({"cfg": cfg, "us": us, "max_abs_err": err, "tb_per_s": kv_bytes / us / 1e6})
        ok = [r for r in rows if "us" in r]
        best = min(ok, key=lambda r: r["us"])
        dflt = next(r for r in ok if r["cfg"] == lora_ops.PAGED_ATTN_CONFIG)
        res["attn"].append({"batch": batch, "ctx": ctx, "kv_bytes": kv_bytes, "rows": rows, "best": best,
                            "default": dflt})  # fmt: skip
        print(f"B={batch:5d} ctx={ctx:5d}: default {dflt['us']:7.1f} us ({dflt['tb_per_s']:.2f} TB/s)  best "
              f"{best['us']:7.1f} us ({best['tb_per_s']:.2f} TB/s) {best['cfg']}  max err {best['max_abs_err']:.3g}",
              flush=True)  # fmt: skip
        top = sorted(ok, key=lambda r: r["us"])[:5]
        for r in top:
            print(f"    {r['us']:7.1f} us  {r['cfg']}", flush=True)
    # overall choice: the config with the least summed time over the cases, as a share of each case's best
    cfgs = [r["cfg"] for r in res["attn"][0]["rows"] if "us" in r]

    def score(cfg):
        total = 0.0
        for case in res["attn"]:
            hit = [r for r in case["rows"] if r["cfg"] == cfg and "us" in r]
            if not hit:
                return float("inf")
            total += hit[0]["us"] / case["best"]["us"]
        return total / len(res["attn"])

    overall = min(cfgs, key=score)
    res["overall"] = {"cfg": overall, "mean_ratio_to_best": score(overall),
                      "default_mean_ratio_to_best": score(lora_ops.PAGED_ATTN_CONFIG)}  # fmt: skip
    print(f"overall best config: {overall} (mean {score(overall):.3f}x of each case's best; default "
          f"{score(lora_ops.PAGED_ATTN_CONFIG):.3f}x)", flush=True)  # fmt: skip

    print("\nfused per-layer kernels, us per call (Triton vs torch reference)", flush=True)
    for batch in map(int, args.batches.split(",")):
        g = torch.Generator(device="cuda").manual_seed(1)
        h = torch.randn(batch, 576, device="cuda", dtype=torch.bfloat16, generator=g)
        dlt = torch.randn_like(h)
        w = torch.randn(576, device="cuda", dtype=torch.bfloat16, generator=g)
        gu = torch.randn(batch, 2 * 1536, device="cuda", dtype=torch.bfloat16, generator=g)
        qkv = torch.randn(batch, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16, generator=g)
        cos = torch.randn(2048, D, device="cuda", dtype=torch.bfloat16, generator=g)
        sin = torch.randn(2048, D, device="cuda", dtype=torch.bfloat16, generator=g)
        pos = torch.randint(0, 2048, (batch,), device="cuda", generator=g)
        kc = torch.zeros(batch + 1, HKV, BS, D, device="cuda", dtype=torch.bfloat16)
        vc = torch.zeros_like(kc)
        loc = (torch.randperm(batch, device="cuda", generator=g) + 1) * BS
        kc2, vc2 = kc.clone(), vc.clone()
        qa = fused_ops.rope_cache(qkv, cos, sin, pos, loc, kc, vc, HQ, HKV)
        qb = fused_ops.rope_cache_torch(qkv, cos, sin, pos, loc, kc2, vc2, HQ, HKV)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in ((qa, qb), (kc, kc2), (vc, vc2)))
        p = functools.partial
        cases = {
            "rope_cache": (p(fused_ops.rope_cache, qkv, cos, sin, pos, loc, kc, vc, HQ, HKV),
                           p(fused_ops.rope_cache_torch, qkv, cos, sin, pos, loc, kc, vc, HQ, HKV)),
            "add_rms": (p(fused_ops.add_rms, h, dlt, w, 1e-5), p(fused_ops.add_rms_torch, h, dlt, w, 1e-5)),
            "silu_mul": (p(fused_ops.silu_mul, gu), p(fused_ops.silu_mul_torch, gu)),
        }  # fmt: skip
        for name, (tri, ref) in cases.items():
            row = {"kernel": name, "batch": batch, "triton_us": bench_us(tri), "torch_us": bench_us(ref)}
            if name == "rope_cache":
                row["max_abs_diff_vs_torch"] = diff
            res["fused"].append(row)
            print(f"B={batch:5d} {name:10s} triton {row['triton_us']:6.1f} us  torch {row['torch_us']:6.1f} us"
                  + (f"  max |diff| vs torch: {diff:.3g}" if name == "rope_cache" else ""), flush=True)  # fmt: skip
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "serving_kernels.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
