"""Benchmark: batched training of K users' LoRA adapters on one GPU vs sequential peft training of the same users.

Bases with random weights in the shapes of SmolLM2-135M and Llama-3.2-1B (bfloat16, SDPA attention), built on the
GPU from a LlamaConfig (no download). Each simulated user has 100 events, 80 of them train-split messages (40 to 120
bytes, the byte-level tokenizer of the tiny test model: one token per byte). Both paths train with the same settings:
r=8 on q_proj,v_proj, batch 8 per user, <= 128 tokens, AdamW 1e-3, clipping at 1.0, no validation, a fixed number of
steps (no early stopping), so they do the same work:

- sequential: `pipeline.training.lora.train_adapter` (stock peft on the shared base) for a few users one after
  another; its throughput does not depend on K, so one measurement serves every row;
- batched: `pipeline.training.multi.train_adapters` for K users at once.

tokens/s counts trained (target) tokens of the training loop; MFU = model FLOPs / (seconds x 989 TFLOP/s, the H200's
dense bf16 peak), with model FLOPs per processed token = 4 x (linear + lm_head parameters) (forward, and the backward
to the activations; the frozen base needs no weight gradients) + causal attention (x3 for the backward), LoRA's own
FLOPs left out. User-retrains per GPU-hour for 100-event users: 40 steps at the measured step time plus the measured
per-batch setup and save (peft initialisation of each user's LoRA, writing its PEFT directory), validation left out.

    python bench/train_gpu.py --out /tmp/results            # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import TrainingSettings
from pipeline.domain.examples import Example
from pipeline.domain.revisions import BaseModelRef
from pipeline.models.base import LoadedBase, tiny_tokenizer
from pipeline.training.lora import train_adapter
from pipeline.training.multi import UserJob, train_adapters

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RESULTS = Path(__file__).parent / "results"
PEAK_FLOPS = 989e12  # H200 SXM, dense bf16
SHAPES = {
    "smollm2-135m": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
    },
    "tiny-check": {  # a CPU check of this script
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 384,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
    },
}
WORDS = "the a of to and in is it you that he was for on are with as his they be at one have this from".split()


def build(name: str) -> LoadedBase:
    config = LlamaConfig(
        **SHAPES[name],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).eval().requires_grad_(False)
    return LoadedBase(model, tiny_tokenizer(), BaseModelRef(name, "0" * 64))


def user_examples(u: int, n_events: int = 100) -> list[Example]:
    rng = random.Random(u)
    vocab = [w + rng.choice(["", "s", "ing", "!"]) for w in WORDS] + [f"w{u}x{i}" for i in range(10)]
    out = []
    for i in range(n_events):
        if rng.random() < 0.2:  # the holdout split: never trained on
            continue
        text, target = "", rng.randint(40, 120)
        while len(text) < target:
            text += rng.choice(vocab) + " "
        out.append(Example(None, text[:target].strip(), f"u{u}e{i}"))
    return out


def linear_flops_per_token(model: torch.nn.Module, mean_len: float) -> float:
    cfg = model.config
    linear = sum(m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    attention = 4 * cfg.hidden_size * (mean_len / 2) * cfg.num_hidden_layers  # QK^T and AV, causal
    return 4 * linear + 3 * attention


def settings(steps: int, micro: int, **extra: object) -> TrainingSettings:
    return TrainingSettings(
        rank=8,
        alpha=16.0,
        target_modules="q_proj,v_proj",
        learning_rate=1e-3,
        batch_size=8,
        max_length=128,
        max_steps=steps,
        eval_every=10_000,
        val_fraction=0.0,
        max_grad_norm=1.0,
        micro_batch_tokens=micro,
        **extra,
    )


def measure(fn) -> tuple[object, float, float]:
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - started, torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


def bench_model(name: str, ks: list[int], steps: dict[int, int], seq_users: int, micro: int, tmp: Path) -> dict:
    t0 = time.perf_counter()
    base = build(name)
    params = sum(p.numel() for p in base.model.parameters())
    log.info("%s: %.1fM parameters, built in %.1f s", name, params / 1e6, time.perf_counter() - t0)
    users = [user_examples(u) for u in range(max([*ks, seq_users + 1]))]
    mean_len = sum(len(e.target) + 1 for ex in users for e in ex) / sum(len(ex) for ex in users)
    fpt = linear_flops_per_token(base.model, mean_len)
    rows_out: list[dict] = []

    # Warm-up both paths (CUDA context, cuBLAS handles, kernels for the shapes).
    train_adapter(base, users[0], tmp / "warm-seq", settings(3, micro), parent_dir=None, seed=0)
    train_adapters(base, [UserJob(users[i], tmp / f"warm{i}", None, i) for i in range(4)], settings(2, micro))

    seq_steps = steps[1]
    seq = []
    for u in range(seq_users):
        res, wall, mem = measure(
            lambda u=u: train_adapter(
                base, users[u], tmp / f"seq{u}", settings(seq_steps, micro), parent_dir=None, seed=u
            )
        )
        seq.append((res, wall, mem))
    tokens = sum(r.tokens for r, _, _ in seq)
    loop_s = sum(r.seconds for r, _, _ in seq)
    wall_s = sum(w for _, w, _ in seq)
    rows = seq_users * seq_steps * 8
    seq_tps = tokens / loop_s
    step_s = loop_s / (seq_users * seq_steps)
    setup_s = (wall_s - loop_s) / seq_users
    rows_out.append(
        {
            "base": name,
            "path": "sequential peft (train_adapter)",
            "users": seq_users,
            "steps": seq_steps,
            "tokens": tokens,
            "loop_seconds": loop_s,
            "step_seconds": step_s,
            "setup_save_seconds_per_batch": setup_s,
            "tokens_per_s": seq_tps,
            "gpu_mem_gib": max(m for _, _, m in seq),
            "mfu": (tokens + rows) * fpt / loop_s / PEAK_FLOPS,
            "retrains_per_gpu_hour": 3600 / (setup_s + 40 * step_s),
            "speedup": 1.0,
        }
    )
    log.info("%s sequential: %.0f tokens/s, %.1f ms/step", name, seq_tps, step_s * 1e3)

    for k in ks:
        n = steps.get(k, steps[max(steps)])
        jobs = [UserJob(users[u], tmp / f"k{k}-{u}", None, 1000 + u) for u in range(k)]
        results, wall, mem = measure(lambda jobs=jobs, n=n: train_adapters(base, jobs, settings(n, micro)))
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise RuntimeError(f"{len(failed)} users failed: {failed[0]!r}")
        loop_s = results[0].seconds
        tokens = sum(r.tokens for r in results)
        rows = k * n * 8
        row = {
            "base": name,
            "path": "batched (train_adapters)",
            "users": k,
            "steps": n,
            "tokens": tokens,
            "loop_seconds": loop_s,
            "step_seconds": loop_s / n,
            "setup_save_seconds_per_batch": wall - loop_s,
            "tokens_per_s": tokens / loop_s,
            "gpu_mem_gib": mem,
            "mfu": (tokens + rows) * fpt / loop_s / PEAK_FLOPS,
            "retrains_per_gpu_hour": 3600 * k / ((wall - loop_s) + 40 * loop_s / n),
            "speedup": tokens / loop_s / seq_tps,
        }
        rows_out.append(row)
        log.info(
            "%s K=%d: %.0f tokens/s (x%.1f), %.2f s/step, %.1f GiB, MFU %.1f%%, setup+save %.1f s",
            name,
            k,
            row["tokens_per_s"],
            row["speedup"],
            row["step_seconds"],
            mem,
            100 * row["mfu"],
            wall - loop_s,
        )
    return {
        "base": name,
        "parameters": params,
        "mean_tokens_per_row": mean_len,
        "flops_per_token": fpt,
        "rows": rows_out,
    }


def equivalence_on_gpu(tmp: Path, name: str) -> dict:
    """Two users, 5 steps: batched vs alone on the bf16 SmolLM2-shaped base (largest weight difference)."""
    base = build(name)
    cfg = settings(5, 32768)
    jobs = [UserJob(user_examples(u), tmp / f"eqb{u}", None, 7 + u) for u in range(2)]
    train_adapters(base, jobs, cfg)
    from safetensors.torch import load_file

    worst, scale, diff2, norm2 = 0.0, 0.0, 0.0, 0.0
    for u, job in enumerate(jobs):
        train_adapter(base, job.examples, tmp / f"eqa{u}", cfg, parent_dir=None, seed=job.seed)
        a = load_file(tmp / f"eqb{u}" / "adapter_model.safetensors")
        b = load_file(tmp / f"eqa{u}" / "adapter_model.safetensors")
        worst = max(worst, max(float((a[k].float() - b[k].float()).abs().max()) for k in a))
        scale = max(scale, max(float(b[k].float().abs().max()) for k in b))
        diff2 += sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a)
        norm2 += sum(float(b[k].float().pow(2).sum()) for k in b)
    del base
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return {
        "max_abs_weight_difference": worst,
        "max_abs_weight": scale,
        "relative_l2_difference": (diff2 / norm2) ** 0.5,
        "steps": 5,
        "users": 2,
    }


def profile(name: str, k: int, micro: int, tmp: Path, out: Path) -> dict:
    """torch.profiler over a K-user batched training of 2 steps: where the GPU time goes, and how busy it is."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    out.mkdir(parents=True, exist_ok=True)
    base = build(name)
    users = [user_examples(u) for u in range(k)]
    train_adapters(base, [UserJob(users[i], tmp / f"pw{i}", None, i) for i in range(16)], settings(2, micro))
    jobs = [UserJob(users[u], tmp / f"p{u}", None, u) for u in range(k)]
    cuda = DEVICE == "cuda"
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]  # kernels only: light on the host
    with torch_profile(activities=activities) as prof:
        started = time.perf_counter()
        results = train_adapters(base, jobs, settings(2, micro))
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - started
    loop = results[0].seconds
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    gpu_us = sum(getattr(e, key) for e in events)
    text = events.table(sort_by=key, row_limit=30, max_name_column_width=70)
    (out / f"profile-{name}.txt").write_text(f"K={k}, 2 steps, loop {loop:.2f} s, wall {wall:.2f} s\n{text}\n")
    summary = {
        "base": name,
        "users": k,
        "loop_seconds": loop,
        "wall_seconds": wall,
        "gpu_kernel_seconds": gpu_us / 1e6,
    }
    log.info("profile %s", summary)
    return summary


def table(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"GPU LoRA training benchmark ({env['gpu']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}): bf16 random-weight bases, r=8 on q_proj,v_proj, batch 8 per user, <= 128 tokens, "
        "AdamW, clipping 1.0, no validation",
        "",
        "| base | path | users (K) | steps | tokens/s | vs sequential | s / step | GPU mem GiB | MFU | "
        "retrains / GPU-hour (100 events) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model in report["models"]:
        for r in model["rows"]:
            lines.append(
                f"| {r['base']} | {r['path']} | {r['users']} | {r['steps']} | {r['tokens_per_s']:,.0f} | "
                f"{r['speedup']:.1f}x | {r['step_seconds']:.3f} | {r['gpu_mem_gib']:.1f} | {100 * r['mfu']:.1f}% | "
                f"{r['retrains_per_gpu_hour']:,.0f} |"
            )
    eq = report.get("equivalence")
    if eq:
        lines += [
            "",
            f"GPU spot check: {eq['users']} users x {eq['steps']} steps on the bf16 SmolLM2-shaped base, batched vs "
            f"alone: largest weight difference {eq['max_abs_weight_difference']:.2e} (largest weight "
            f"{eq['max_abs_weight']:.2e})"
            + (
                f", relative L2 difference {eq['relative_l2_difference']:.2e}."
                if "relative_l2_difference" in eq
                else "."
            ),
        ]
    return "\n".join(lines) + "\n"


log = logging.getLogger("bench.train_gpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-1b"])
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 16, 256])
    parser.add_argument("--steps", nargs="+", default=["1:10", "16:8", "256:4"], help="K:steps pairs")
    parser.add_argument("--seq-users", type=int, default=3)
    parser.add_argument("--micro", nargs="+", default=["smollm2-135m:65536", "llama-1b:32768"])
    parser.add_argument("--no-equivalence", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--profile", action="store_true", help="also profile a K=256 batched training per model")
    parser.add_argument("--only-profile", action="store_true", help="the profiles alone, no table")
    parser.add_argument("--profile-users", type=int, default=256)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    steps = {int(k): int(v) for k, v in (s.split(":") for s in args.steps)}
    micro = {k: int(v) for k, v in (s.split(":") for s in args.micro)}
    import peft
    import transformers

    report: dict = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": {
            "gpu": torch.cuda.get_device_name(0) if DEVICE == "cuda" else platform.machine() + " CPU",
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "models": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_equivalence:
            report["equivalence"] = equivalence_on_gpu(Path(tmp), args.models[0])
            log.info("equivalence: %s", report["equivalence"])
        for name in [] if args.only_profile else args.models:
            report["models"].append(
                bench_model(name, args.ks, steps, args.seq_users, micro.get(name, 32768), Path(tmp) / name)
            )
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "train_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
            (args.out / "train_gpu.md").write_text(table(report))
        if args.profile or args.only_profile:
            report["profiles"] = [
                profile(n, args.profile_users, micro.get(n, 32768), Path(tmp) / "prof", args.out) for n in args.models
            ]
            (args.out / "train_gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


if __name__ == "__main__":
    main()
