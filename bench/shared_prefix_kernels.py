"""What running the rows' common first tokens once per user costs and saves, on a GPU (issue 18).

    python bench/shared_prefix_kernels.py [--rows 3072] [--prefix 29] [--tail 42] [--users 256] [--out DIR]

1. Attention, forward + backward, of ``rows`` rows (SmolLM2-135M's 9 query and 3 key/value heads of 64): the full
   rows (``prefix + tail`` tokens, square causal: what the plain path runs) against the tail's queries over the
   prefix's and tail's keys, computed four ways: torch's lower-right causal bias with grouped heads (what
   `pipeline.models.shared_prefix` runs), the same with the key/value heads repeated, the queries padded with
   ``prefix`` dummy rows in front (square causal, the dummies' outputs dropped), and the key/value gather alone
   (index_select + cat, forward and backward). The CUDA kernels each ran are listed (torch.profiler).
2. One micro-batch of batched training (`pipeline.training.batching.nll_sums`, forward + backward) at the
   SmolLM2-135M shape with random weights and K users' r=1 LoRA on the seven projections: the rows whole (padded),
   with their common first tokens run once per user, and packed without padding (`pipeline.models.packed`); the
   fused kernels as the trainer uses them.

Prints a table and writes shared_prefix_kernels.json to --out. Times: CUDA events over 20 calls after 3 warm-ups (a
training step: 5 after 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from retrain_kernels import timed

from pipeline.config import TrainingSettings
from pipeline.models import fused_layers, multilora
from pipeline.models.base import varied_shape_attention
from pipeline.models.encoding import IGNORE, EncodedExample
from pipeline.training.batching import nll_sums
from pipeline.training.fused import Fused

RESULTS = Path(__file__).resolve().parent / "results"


def kernels(fn: Any, top: int = 6) -> list[str]:
    """The CUDA kernels one call of ``fn`` launches (names cut at 80 characters), most time first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(e.device_time_total, e.key[:80]) for e in prof.key_averages() if e.device_time_total > 0]
    return [f"{name} ({t / 1000:.3f} ms)" for t, name in sorted(rows, reverse=True)[:top]]


def step_profile(fn: Any) -> dict[str, Any]:
    """One call of ``fn`` under torch.profiler (host and device): its wall time, the device's kernel time, the
    kernel launches, the host's waits for the device, and the top kernels and host ops."""
    import time

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    events = prof.key_averages()
    waits = ("Synchronize", "_local_scalar_dense", "is_nonzero", "cudaMemcpy", "item")
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return {
        "profiled_wall_ms": wall * 1000,
        "device_ms": sum(e.self_device_time_total for e in events) / 1000,
        "launches": launches,
        "waits": {
            e.key: [e.count, round(e.self_cpu_time_total / 1000, 2)] for e in events if any(w in e.key for w in waits)
        },
        "top_device": [
            f"{e.key[:70]} {e.self_device_time_total / 1000:.1f} ms x{e.count}"
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:15]
        ],
        "top_host": [
            f"{e.key[:70]} {e.self_cpu_time_total / 1000:.1f} ms x{e.count}"
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]
        ],
    }


def attention(rows: int, prefix: int, tail: int, users: int) -> list[dict[str, Any]]:
    from torch.nn.attention.bias import causal_lower_right

    gen = torch.Generator(device="cuda").manual_seed(0)
    heads, kv_heads, dim = 9, 3, 64

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()

    full = prefix + tail
    q_full, k_full, v_full = (
        rand(rows, heads, full, dim),
        rand(rows, kv_heads, full, dim),
        rand(rows, kv_heads, full, dim),
    )
    q = rand(rows, heads, tail, dim)
    k_pre, v_pre = rand(users, kv_heads, prefix, dim), rand(users, kv_heads, prefix, dim)
    k_own, v_own = rand(rows, kv_heads, tail, dim), rand(rows, kv_heads, tail, dim)
    owner = torch.randint(0, users, (rows,), device="cuda", generator=gen)
    grad_full, grad = torch.randn_like(q_full), torch.randn_like(q)

    def gathered() -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([k_pre.index_select(0, owner), k_own], dim=2)
        v = torch.cat([v_pre.index_select(0, owner), v_own], dim=2)
        return k, v

    def square() -> None:
        out = F.scaled_dot_product_attention(q_full, k_full, v_full, is_causal=True, enable_gqa=True)
        out.backward(grad_full)

    def lower_right() -> None:
        k, v = gathered()
        mask = causal_lower_right(tail, full)
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).backward(grad)

    def lower_right_repeated() -> None:
        k, v = gathered()
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(tail, full)).backward(grad)

    def dummy_queries() -> None:
        k, v = gathered()
        padded = torch.cat([q.new_zeros(rows, heads, prefix, dim), q], dim=2)
        out = F.scaled_dot_product_attention(padded, k, v, is_causal=True, enable_gqa=True)[:, :, prefix:]
        out.backward(grad)

    def gather_only() -> None:
        k, v = gathered()
        (k.sum() + v.sum()).backward()

    out = []
    with varied_shape_attention():
        for name, fn in (
            ("full rows, square causal (plain path)", square),
            ("tail over prefix + tail, lower-right bias, grouped heads", lower_right),
            ("the same, key/value heads repeated", lower_right_repeated),
            ("tail queries padded with dummy rows, square causal", dummy_queries),
            ("key/value gather alone (index_select + cat)", gather_only),
        ):
            try:
                ms = timed(fn)
                out.append({"variant": name, "ms": ms, "kernels": kernels(fn)})
            except Exception as e:  # a variant a torch build cannot run
                out.append({"variant": name, "error": repr(e)[:300]})
            print(json.dumps(out[-1]), flush=True)
    return out


def training(users: int, rows_per_user: int, prefix: int, tail: int, budget: int) -> list[dict[str, Any]]:
    from retrain_throughput import build

    base = build("smollm2-135m", "cuda")
    model = base.model
    gen = torch.Generator().manual_seed(1)
    rng = random.Random(2)
    head = torch.randint(3, 40000, (prefix,), generator=gen).tolist()
    items = []
    for u in range(users):
        for _ in range(rows_per_user):
            n = rng.randint(tail // 2, tail * 3 // 2)
            own = torch.randint(3, 40000, (n,), generator=gen).tolist()
            prompt_end = 1  # the row's first own token ends the prompt; the rest is the target
            labels = [IGNORE] * (prefix + prompt_end) + own[prompt_end:]
            items.append((u, EncodedExample(head + own, labels)))
    stacks: dict[str, multilora.LoraStack] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in (
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ):
            a = nn.Parameter(torch.randn(users, 1, module.in_features, device="cuda") * 0.01)
            b = nn.Parameter(torch.randn(users, module.out_features, 1, device="cuda") * 0.01)
            stacks[name] = multilora.LoraStack(a, b, torch.full((users,), 2.0, device="cuda"))
    params: list[nn.Parameter] = [t for s in stacks.values() for t in (s.lora_A, s.lora_B)]  # type: ignore[misc]
    device = torch.device("cuda")
    fused = Fused.resolve("auto", device)
    out: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        lora = stack.enter_context(multilora.wrap_linears(model, stacks, native=True))
        stack.enter_context(fused_layers.patched(model, fused.layers))
        stack.enter_context(varied_shape_attention())
        model.train()
        for way in ("off", "lower_right", "packed", "off", "lower_right", "packed"):
            settings = TrainingSettings(
                micro_batch_tokens=budget, shared_prefix=way == "lower_right", packed_rows=way == "packed"
            )

            def step(settings: TrainingSettings = settings) -> None:
                nll_sums(model, lora, items, users, 0, device, settings, params, lambda: None, (), fused)
                for p in params:
                    p.grad = None

            ms = timed(step, warm=2, n=5)
            out.append({"shared_prefix": way, "rows": len(items), "ms_per_step": ms})
            if len(out) <= 3:
                out[-1].update(step_profile(step))
            print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3072)
    ap.add_argument(
        "--prefix", type=int, default=29, help="common first tokens (SmolLM2's template: 29 without a prompt)"
    )
    ap.add_argument("--tail", type=int, default=42, help="mean tokens of a row after them")
    ap.add_argument("--users", type=int, default=256)
    ap.add_argument("--budget", type=int, default=131072, help="micro-batch tokens of the training step")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    settings = {**vars(args), "out": str(args.out)}
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": settings}
    report["attention"] = attention(args.rows, args.prefix, args.tail, args.users)
    report["training"] = training(args.users, args.rows // args.users, args.prefix, args.tail, args.budget)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "shared_prefix_kernels.json").write_text(json.dumps(report, indent=1))
    print("| attention (fwd + bwd) | ms | kernels |\n| --- | ---: | --- |")
    for r in report["attention"]:
        ran = "; ".join(r.get("kernels", [r.get("error", "")]))
        print(f"| {r['variant']} | {r.get('ms', float('nan')):.3f} | {ran} |")
    print("\n| training step (one nll_sums, fwd + bwd) | rows | ms |\n| --- | ---: | ---: |")
    for r in report["training"]:
        print(f"| shared prefix {r['shared_prefix']} | {r['rows']} | {r['ms_per_step']:.1f} |")


if __name__ == "__main__":
    main()
