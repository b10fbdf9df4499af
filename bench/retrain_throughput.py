"""End-to-end user-retrains per GPU-hour: a wave of K users through the worker's code path (examples in, batched
training from each user's serving revision, candidate PEFT directories written, the batched gate's metrics for
candidate / current / base, the operator's rules deciding), with its time split and the wave's holdout NLL gain;
baselines in the same run: a warm plain-peft sequential loop and the project's sequential path (train_adapter, then
evaluate, per user).

    python bench/retrain_throughput.py --model smollm2-135m --k 256 --fused on,off --out DIR   # on the GPU machine
    python bench/retrain_throughput.py --model tiny --k 3 --baseline-users 1 --out DIR         # CPU check (seconds)

What a wave is (per user, 100 events a round, 20% of them holdout, chat messages of the user's own vocabulary):

1. round 0 (not timed: it makes each user's serving revision and warms every shape): the user's first 100 events
   trained in one batch (``--parent-steps`` steps), then a first gate pass on a few of them (fills the per-base
   cache of the probes' log-probs, as a worker's first gate does);
2. round 1, timed: ``data`` (the user's events of both rounds -> the round's training events, new ones plus a
   seeded replay of older ones, `select_training_events` as the retrain flow; its holdout events), ``train``
   (`train_adapters` from each user's revision: the per-user start, the loop, and the candidate PEFT directories
   written; the loop's seconds are reported apart), ``gate`` (`evaluate_many`: the candidates and the revisions
   serving now in one stacked pass over the base) and ``decide`` (the default rules, per user).

retrains / GPU-hour = K x 3600 / (data + train + gate + decide). The gain is the mean over the wave of
1 - NLL(candidate) / NLL(reference) on each user's holdout (reference: its serving revision, and the base).
Random-weight bases of the SmolLM2-135M and Llama-3.2-1B shapes (no download), the byte-level tiny tokenizer; the
training settings are the project's defaults (`TrainingSettings`, 20 steps, r=1 on all seven projections,
validation and early stopping) except ``micro_batch_tokens``; the general-answer mix of the retrain flow is left out
(it needs the base's generated answers, computed once per base).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import hashlib
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pipeline.config import TrainingSettings
from pipeline.domain.examples import TrainingEvent, examples_from_events, select_training_events, training_pairs
from pipeline.domain.gating import decide
from pipeline.domain.revisions import BaseModelRef
from pipeline.evaluation.metrics import (
    SHIFT_EVENTS,
    EvalRequest,
    evaluate,
    evaluate_many,
    load_general,
    load_probes,
)
from pipeline.evaluation.rules import load_rules
from pipeline.models import encoding, fp8
from pipeline.models.attach import borrowed
from pipeline.models.base import LoadedBase, tiny_tokenizer
from pipeline.models.encoding import IGNORE, encode_example
from pipeline.training.fused import Fused
from pipeline.training.lora import TrainResult, train_adapter
from pipeline.training.multi import UserJob, train_adapters

log = logging.getLogger("bench.retrain_throughput")
RESULTS = Path(__file__).parent / "results"
SHAPES: dict[str, dict[str, int]] = {
    "smollm2-135m": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "intermediate_size": 1536,
        "vocab_size": 49152,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 128256,
    },
    "tiny": {  # the CPU check of this script
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 384,
    },
}
WORDS = "the a of to and in is it you that he was for on are with as his they be at one have this from".split()
EVENTS_PER_ROUND = 100
HOLDOUT_SHARE = 0.2


def build(name: str, device: str, tokenizer: str | None = None) -> LoadedBase:
    """A random-weight Llama of the named shape in bf16 (fp32 on the CPU), frozen; its own sha (the gate caches the
    base's probe log-probs by it). ``tokenizer``: a tokenizer directory (e.g. SmolLM2's: a Rust tokenizer and its
    chat template, what a worker on the real base encodes with); None: the byte-level tiny tokenizer (Python)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SHAPES[name],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).eval().requires_grad_(False)
    sha = hashlib.sha256(f"random:{name}".encode()).hexdigest()
    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else tiny_tokenizer()
    if tokenizer and len(tok) > config.vocab_size:
        raise SystemExit(f"the tokenizer in {tokenizer} has {len(tok)} ids; the {name} shape {config.vocab_size}")
    gc.freeze()  # as `pipeline.models.base.load_base` does once a worker's base is loaded
    return LoadedBase(model, tok, BaseModelRef(name, sha))


def user_events(u: int, rounds: int) -> list[TrainingEvent]:
    """``rounds`` x 100 chat messages in user ``u``'s own vocabulary, 20% of them holdout (seeded by the user)."""
    rng = random.Random(u)
    vocab = [w + rng.choice(["", "s", "ing", "!"]) for w in WORDS] + [f"w{u}x{i}" for i in range(10)]
    out = []
    for seq in range(rounds * EVENTS_PER_ROUND):
        split = "holdout" if rng.random() < HOLDOUT_SHARE else "train"
        text, target = "", rng.randint(40, 120)
        while len(text) < target:
            text += rng.choice(vocab) + " "
        out.append(TrainingEvent(f"u{u}e{seq}", seq, "message", split, {"text": text[:target].strip()}))
    return out


def host_cpu() -> str:
    """The host's CPU model and logical cores (a host-bound baseline's speed depends on it)."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model or 'unknown'}, {os.cpu_count()} logical cores"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], Any]) -> tuple[Any, float]:
    sync(device)
    started = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - started


def gain(metrics: dict[str, Any], ref: str) -> float | None:
    cand, other = metrics["candidate"]["holdout_nll"], (metrics.get(ref) or {}).get("holdout_nll")
    if cand is None or other is None or not other:
        return None
    return 1.0 - cand / other


def mean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(kept) if kept else None


def wave(
    base: LoadedBase,
    k: int,
    settings: TrainingSettings,
    parent_steps: int,
    device: str,
    tmp: Path,
    rules: Any,
    gate_profile: int = 0,
    first_user: int = 0,
    gate_reuse: bool = False,
    around: Callable[[str, Callable[[], Any]], tuple[Any, float]] | None = None,
    shift_events: int = SHIFT_EVENTS,
) -> dict[str, Any]:
    """Round 0 (the users' serving revisions, not timed), then the timed round 1 (module docstring). The users are
    numbers ``first_user`` .. ``first_user + k - 1`` (each one's events seeded by its number); the result's
    ``timed_window`` is round 1's start and end in wall-clock seconds (`time.time`), for runs of several workers.
    ``around(part, fn)``: runs round 1's training (``"train"``) and gate (``"gate"``) instead of `timed`, e.g.
    under a profiler (`wave_profiler`); it returns (fn's result, seconds). ``shift_events``: the gate's
    (`metrics.shift_examples`)."""
    run = around or (lambda _name, fn: timed(device, fn))
    probes, general = load_probes(), load_general()
    numbers = range(first_user, first_user + k)
    users = [f"user-{u:05d}" for u in numbers]
    events = {u: user_events(n, 2) for n, u in zip(numbers, users, strict=True)}
    first = {u: [e for e in evs if e.seq < EVENTS_PER_ROUND] for u, evs in events.items()}
    parent_settings = settings.model_copy(update={"max_steps": parent_steps})
    jobs0 = [
        UserJob(examples_from_events(first[u]), tmp / "r0" / u, None, 10_000 + i, training_pairs(first[u]))
        for i, u in enumerate(users)
    ]
    r0, r0_s = timed(device, lambda: train_adapters(base, jobs0, parent_settings))
    bad = [r for r in r0 if not isinstance(r, TrainResult)]
    if bad:
        raise RuntimeError(f"round 0: {len(bad)} users failed: {bad[0]!r}")
    # Round 0's gate: of every user when round 1 reuses its rows (as a worker's gate of the serving revisions did),
    # else of 4 users (a warm-up).
    judged0 = users if gate_reuse else users[:4]
    warm = [EvalRequest(tmp / "r0" / u, None, [e for e in first[u] if e.split == "holdout"], 80, 80) for u in judged0]
    gated0 = evaluate_many(
        base, warm, probes=probes, general=general, max_length=settings.max_length, shift_events=shift_events
    )
    known = {u: m.get("scores") for u, m in zip(judged0, gated0, strict=True) if gate_reuse and isinstance(m, dict)}
    log.info("round 0: %d users, %d steps, %.1f s", k, parent_steps, r0_s)

    # Round 1, timed.
    def data() -> tuple[list[UserJob], list[EvalRequest]]:
        jobs, requests = [], []
        for i, u in enumerate(users):
            evs = events[u]
            new, replay = select_training_events(
                evs, parent_last_seq=EVENTS_PER_ROUND - 1, replay_max=settings.replay_max, seed=f"{u}/r1"
            )
            chosen = sorted(new + replay, key=lambda e: e.seq)
            holdout = [e for e in evs if e.split == "holdout"]
            jobs.append(
                UserJob(
                    examples_from_events(chosen), tmp / "r1" / u, tmp / "r0" / u, 20_000 + i, training_pairs(chosen)
                )
            )
            requests.append(
                EvalRequest(
                    candidate_dir=tmp / "r1" / u,
                    current_dir=tmp / "r0" / u,
                    holdout_events=holdout,
                    train_events_count=len(chosen),
                    new_events_count=len(new),
                    parent_last_seq=EVENTS_PER_ROUND - 1,
                    new_events=new,
                    known=known.get(u),
                )
            )
        return jobs, requests

    sync(device)
    window_start = time.time()
    (jobs, requests), data_s = timed(device, data)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results, train_s = run("train", lambda: train_adapters(base, jobs, settings))
    failed = [r for r in results if not isinstance(r, TrainResult)]
    if failed:
        raise RuntimeError(f"round 1: {len(failed)} users failed: {failed[0]!r}")
    trained = [r for r in results if isinstance(r, TrainResult)]
    loop_s = trained[0].seconds
    train_mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    measured, gate_s = run(
        "gate",
        lambda: evaluate_many(
            base, requests, probes=probes, general=general, max_length=settings.max_length, shift_events=shift_events
        ),
    )
    broken = [m for m in measured if isinstance(m, BaseException)]
    if broken:
        raise RuntimeError(f"gate: {len(broken)} candidates failed: {broken[0]!r}")
    ok = [m for m in measured if isinstance(m, dict)]
    decisions, decide_s = timed(
        "cpu", lambda: [decide(rules, m, user_id=u, app="bench") for u, m in zip(users, ok, strict=True)]
    )
    window_end = time.time()
    total = data_s + train_s + gate_s + decide_s
    tokens = sum(r.tokens for r in trained)
    extra: dict[str, Any] = {}
    if gate_profile and device == "cuda":  # after the timed parts: a profiled gate of the first requests
        extra["gate_profile"] = profile_gate(base, requests[:gate_profile], settings.max_length)
    return {
        **extra,
        "users": k,
        "steps_max": settings.max_steps,
        "steps_mean": statistics.fmean(r.steps for r in trained),
        "stopped_early": sum(r.stopped_early for r in trained),
        "tokens": tokens,
        "seconds": {
            "data": data_s,
            "train": train_s,
            "train_loop": loop_s,
            "train_setup_and_write": train_s - loop_s,
            "gate": gate_s,
            "decide": decide_s,
            "total": total,
        },
        "loop_tokens_per_s": tokens / loop_s if loop_s > 0 else 0.0,
        "retrains_per_gpu_hour": 3600 * k / total,
        "train_gpu_mem_gib": train_mem,
        "gain_vs_current": mean([gain(m, "current") for m in ok]),
        "gain_vs_base": mean([gain(m, "base") for m in ok]),
        "promoted": sum(d.passed for d in decisions),
        "gate_rows_reused": sum(int((m.get("scores") or {}).get("reused", 0)) for m in ok),
        "round0_seconds": r0_s,
        "timed_window": [window_start, window_end],
    }


def plain_peft(
    base: LoadedBase, users: int, settings: TrainingSettings, device: str, tmp: Path, rules: Any = None
) -> dict[str, Any]:
    """A warm plain-peft loop, one user after another: a fresh LoRA (the same r, alpha, targets) added to one peft
    model, AdamW on it, ``max_steps`` steps of ``batch_size`` examples (HF's own loss), clipping, the adapter saved,
    then deleted. Warm: a first user (not timed), then one forward and backward at every batch shape the timed users
    will run (their batches are drawn first); training only, no validation and no gate."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.rank, lora_alpha=settings.alpha, target_modules=settings.targets, lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )  # fmt: skip
    pad = encoding.pad_id(base.tokenizer)
    dev = torch.device(device)
    times, tokens = [], 0
    # Each user's batches, drawn before anything is timed: the warm-up runs every shape among them.
    drawn = []
    for u in range(users + 1):
        evs = user_events(50_000 + u, 1)
        encoded = [encode_example(base.tokenizer, e, settings.max_length) for e in examples_from_events(evs)]
        rng = random.Random(u)
        drawn.append([rng.sample(encoded, settings.batch_size) for _ in range(settings.max_steps)])
    with borrowed(base.model) as model:
        peft_model = get_peft_model(model, config, adapter_name="warm")
        peft_model.train()
        widths: dict[int, list[Any]] = {}
        for batches in drawn[1:]:
            for b in batches:
                widths.setdefault(max(len(e.input_ids) for e in b), b)
        for b in widths.values():  # every shape of the timed users' steps, once (the "warm" adapter's gradients)
            peft_model(**encoding.collate(b, pad, dev), use_cache=False).loss.backward()
        peft_model.zero_grad(set_to_none=True)
        for u in range(users + 1):
            name = f"u{u}"
            sync(device)
            started = time.perf_counter()
            peft_model.add_adapter(name, config)
            peft_model.set_adapter(name)
            params = [p for n, p in peft_model.named_parameters() if f".{name}." in n]
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.AdamW(params, lr=settings.learning_rate)
            peft_model.train()
            seen = 0
            for rows in drawn[u]:
                batch = encoding.collate(rows, pad, dev)
                loss = peft_model(**batch, use_cache=False).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
                seen += int((batch["labels"][:, 1:] != IGNORE).sum())
            peft_model.save_pretrained(str(tmp / "plain" / name), selected_adapters=[name])
            peft_model.set_adapter("warm")
            peft_model.delete_adapter(name)
            sync(device)
            if u:  # the first user warms the shapes
                times.append(time.perf_counter() - started)
                tokens += seen
        peft_model.unload()
    per_user = statistics.fmean(times)
    return {
        "users": users,
        "seconds_per_user": per_user,
        "tokens_per_s": tokens / sum(times),
        "retrains_per_gpu_hour": 3600 / per_user,
        "note": "training and save only (no validation, no gate)",
    }


def sequential(
    base: LoadedBase, users: int, settings: TrainingSettings, device: str, tmp: Path, rules: Any
) -> dict[str, Any]:
    """The project's sequential path per user: `train_adapter` from its revision (peft on the shared base), then
    `evaluate` (the single-user gate) and the rules; the first user (not timed) warms the shapes."""
    probes, general = load_probes(), load_general()
    times, train_t, gate_t, tokens, gains = [], [], [], 0, []
    for u in range(users + 1):
        evs = user_events(60_000 + u, 2)
        first = [e for e in evs if e.seq < EVENTS_PER_ROUND]
        parent = tmp / "seq" / f"p{u}"
        train_adapter(
            base,
            examples_from_events(first),
            parent,
            settings.model_copy(update={"max_steps": 2}),
            parent_dir=None,
            seed=u,
        )
        new, replay = select_training_events(
            evs, parent_last_seq=EVENTS_PER_ROUND - 1, replay_max=settings.replay_max, seed=f"s{u}/r1"
        )
        chosen = sorted(new + replay, key=lambda e: e.seq)
        sync(device)
        started = time.perf_counter()
        res = train_adapter(
            base, examples_from_events(chosen), tmp / "seq" / f"c{u}", settings, parent_dir=parent, seed=u,
            pairs=training_pairs(chosen),
        )  # fmt: skip
        trained = time.perf_counter()
        m = evaluate(
            base, candidate_dir=tmp / "seq" / f"c{u}", current_dir=parent,
            holdout_events=[e for e in evs if e.split == "holdout"], train_events_count=len(chosen),
            new_events_count=len(new), probes=probes, max_length=settings.max_length,
            parent_last_seq=EVENTS_PER_ROUND - 1, new_events=new, general=general,
        )  # fmt: skip
        decide(rules, m, user_id=f"s{u}", app="bench")
        sync(device)
        if u:
            times.append(time.perf_counter() - started)
            train_t.append(trained - started)
            gate_t.append(time.perf_counter() - trained)
            tokens += res.tokens
            gains.append(gain(m, "current"))
    per_user = statistics.fmean(times)
    return {
        "users": users,
        "seconds_per_user": per_user,
        "train_seconds_per_user": statistics.fmean(train_t),
        "gate_seconds_per_user": statistics.fmean(gate_t),
        "tokens_per_s": tokens / sum(train_t),
        "retrains_per_gpu_hour": 3600 / per_user,
        "gain_vs_current": mean(gains),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def gpu_check(base: LoadedBase, settings: TrainingSettings, tmp: Path) -> dict[str, Any]:
    """On the GPU, each fused kernel against the unfused reference, in the base's dtype and shapes: the loss (16k
    tokens; loss and input gradient, relative L2; forward + backward time and peak memory), the decoder with liger's
    RMSNorm + SwiGLU (output and input gradient), and 4 users x 5 steps of batched training (adapter weights)."""
    from pipeline.training.fused import fused_layers, linear_nll

    out: dict[str, Any] = {}
    model = base.model
    weight = model.get_output_embeddings().weight
    gen = torch.Generator("cuda").manual_seed(1)
    n = 16384
    hidden = torch.randn(n, weight.shape[1], device="cuda", generator=gen).to(weight.dtype)
    targets = torch.randint(0, weight.shape[0], (n,), device="cuda", generator=gen)
    upstream = torch.rand(n, device="cuda", generator=gen) / n
    loss_out: dict[str, Any] = {}
    ref: tuple[torch.Tensor, torch.Tensor] | None = None
    for mode in ("off", "chunked", "liger"):
        times = []
        for _ in range(6):
            h = hidden.clone().requires_grad_(True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            loss = linear_nll(h, weight, targets, mode)
            (loss * upstream).sum().backward()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        assert h.grad is not None
        row: dict[str, Any] = {
            "ms": statistics.median(times[1:]),
            "peak_gib": (torch.cuda.max_memory_allocated() - before) / 2**30,  # above the inputs and the base
        }
        if ref is None:
            ref = (loss.detach(), h.grad)
        else:
            row["loss_rel_l2"] = _rel(loss.detach(), ref[0])
            row["grad_rel_l2"] = _rel(h.grad, ref[1])
        loss_out[mode] = row
    out["loss"] = {"tokens": n, "vocab": weight.shape[0], "hidden": weight.shape[1], **loss_out}

    decoder = model.get_decoder()
    ids = torch.randint(3, 250, (64, 96), device="cuda", generator=gen)
    got: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for on in (False, True):
        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with fused_layers(model, Fused("liger" if on else "off", on)) as patched:
            last = decoder(inputs_embeds=emb, use_cache=False).last_hidden_state
            (last.float() * torch.linspace(-1, 1, last.shape[-1], device="cuda")).sum().backward()
        assert emb.grad is not None
        got["on" if on else "off"] = (last.detach(), emb.grad)
        if on:
            out["layers"] = {
                "patched_modules": patched,
                "output_rel_l2": _rel(got["on"][0], got["off"][0]),
                "grad_rel_l2": _rel(got["on"][1], got["off"][1]),
            }

    from safetensors.torch import load_file

    five = settings.model_copy(update={"max_steps": 5, "val_fraction": 0.0})
    weights: dict[str, list[dict[str, torch.Tensor]]] = {}
    for mode, branch in (("auto", "base"), ("off", "fp32")):
        jobs = [
            UserJob(examples_from_events(user_events(70_000 + u, 1)), tmp / "check" / mode / str(u), None, 7 + u)
            for u in range(4)
        ]
        res = train_adapters(base, jobs, five.model_copy(update={"fused_kernels": mode, "lora_branch": branch}))
        assert all(isinstance(r, TrainResult) for r in res), res
        weights[mode] = [load_file(j.out_dir / "adapter_model.safetensors") for j in jobs]
    diff2 = sum(
        float((a[key].float() - b[key].float()).pow(2).sum())
        for a, b in zip(weights["auto"], weights["off"], strict=True)
        for key in a
    )
    norm2 = sum(float(b[key].float().pow(2).sum()) for b in weights["off"] for key in b)
    out["training"] = {"users": 4, "steps": 5, "weights_rel_l2": (diff2 / norm2) ** 0.5}
    log.info("gpu check: %s", json.dumps(out))
    return out


#: Kernel-name fragments of each share of the profile (first match wins).
KINDS = (
    ("liger / triton (fused loss, RMSNorm, SwiGLU)", ("liger", "triton", "_rms_norm", "swiglu", "cross_entropy")),
    ("GEMM", ("gemm", "cutlass", "nvjet", "xmma", "sm90", "cublas", "matmul")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("softmax / log-softmax", ("softmax",)),
    ("reductions", ("reduce",)),
    ("element-wise, casts, copies", ("elementwise", "vectorized", "unrolled", "copy", "fill", "index", "cat")),
)


def _kernel_shares(prof: Any) -> tuple[float, dict[str, float], Any, str]:
    """(GPU kernel seconds, shares by kind, the events, the time key) of a torch.profiler run."""
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    shares: dict[str, float] = {}
    total = 0.0
    for e in events:
        t = float(getattr(e, key))
        total += t
        name = e.key.lower()
        kind = next((label for label, keys in KINDS if any(f in name for f in keys)), "other")
        shares[kind] = shares.get(kind, 0.0) + t
    ordered = {kind: t / total for kind, t in sorted(shares.items(), key=lambda kv: -kv[1])} if total else {}
    return total / 1e6, ordered, events, key


def profile_gate(base: LoadedBase, requests: list[EvalRequest], max_length: int) -> dict[str, Any]:
    """torch.profiler (CUDA kernels) over the batched gate of ``requests``: GPU busy share and kernel kinds."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    probes, general = load_probes(), load_general()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        started = time.perf_counter()
        evaluate_many(base, requests, probes=probes, general=general, max_length=max_length)
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    kernels, shares, _, _ = _kernel_shares(prof)
    return {"requests": len(requests), "wall_seconds": wall, "gpu_kernel_seconds": kernels, "shares": shares}


def profile(base: LoadedBase, k: int, settings: TrainingSettings, tmp: Path, out: Path) -> dict[str, Any]:
    """torch.profiler (CUDA kernels) over a K-user batched training of 2 steps: the shares of GPU kernel time by
    kind, and how busy the GPU was over the training loop."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    two = settings.model_copy(update={"max_steps": 2, "val_fraction": 0.0})
    jobs = [
        UserJob(examples_from_events(user_events(80_000 + u, 1)), tmp / "prof" / str(u), None, u) for u in range(k)
    ]
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        res = train_adapters(base, jobs, two)
        torch.cuda.synchronize()
    loop = next(r.seconds for r in res if isinstance(r, TrainResult))
    kernels, shares, events, key = _kernel_shares(prof)
    (out / f"profile-{base.ref.model_id}.txt").write_text(
        events.table(sort_by=key, row_limit=40, max_name_column_width=90)
    )
    return {
        "users": k,
        "steps": 2,
        "fused": two.fused_kernels,
        "loop_seconds": loop,
        "gpu_kernel_seconds": kernels,
        "gpu_busy": kernels / loop if loop else None,
        "shares": shares,
    }


def fresh_users(k: int, first: int, folder: Path) -> tuple[list[UserJob], list[EvalRequest]]:
    """K users numbered from ``first``, one round of events each: their training jobs from fresh LoRAs (candidates
    written to ``folder/N``) and the gate's requests for those candidates (no serving revision)."""
    users = [user_events(first + u, 1) for u in range(k)]
    jobs = [
        UserJob(examples_from_events(evs), folder / str(u), None, u, training_pairs(evs))
        for u, evs in enumerate(users)
    ]
    requests = [
        EvalRequest(folder / str(u), None, [e for e in evs if e.split == "holdout"], 80, 80)
        for u, evs in enumerate(users)
    ]
    return jobs, requests


def step_profile(base: LoadedBase, k: int, settings: TrainingSettings, tmp: Path, out: Path) -> dict[str, Any]:
    """torch.profiler with host and device activity over a K-user batched training of 2 steps (fresh LoRAs, no
    validation) and the batched gate of min(K, 64) of those candidates: per part the wall time, the GPU kernel time
    and launches, the host ops, and the top ops by own host time and by own device time
    (``out/step-profile-MODEL.txt``). A part whose kernels take much less than its wall is bound by the host."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    two = settings.model_copy(update={"max_steps": 2, "val_fraction": 0.0})
    jobs, requests = fresh_users(k, 85_000, tmp / "sprof")
    requests = requests[:64]
    probes, general, length = load_probes(), load_general(), settings.max_length
    train_adapters(base, jobs[:8], two)  # every kernel of this path seen once
    report: dict[str, Any] = {"users": k}
    text = []
    for name, fn in (
        ("train", lambda: train_adapters(base, jobs, two)),
        ("gate", lambda: evaluate_many(base, requests, probes=probes, general=general, max_length=length)),
    ):
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            started = time.perf_counter()
            res = fn()
            torch.cuda.synchronize()
            wall = time.perf_counter() - started
        events = prof.key_averages()
        cuda = [e for e in events if e.device_type == DeviceType.CUDA]
        host = [e for e in events if e.device_type == DeviceType.CPU]
        kernel_s = sum(e.self_device_time_total for e in cuda) / 1e6
        part = {
            "wall_seconds": wall,
            "gpu_kernel_seconds": kernel_s,
            "gpu_busy": kernel_s / wall if wall else None,
            "kernel_launches": sum(e.count for e in cuda),
            "host_ops": sum(e.count for e in host),
        }
        if name == "train":
            part["loop_seconds"] = next(r.seconds for r in res if isinstance(r, TrainResult))
        report[name] = part
        text.append(f"==== {name}: {json.dumps(part)}\n")
        for key in ("self_cpu_time_total", "self_device_time_total"):
            text.append(f"---- by {key}\n")
            text.append(events.table(sort_by=key, row_limit=45, max_name_column_width=70) + "\n")
    (out / f"step-profile-{base.ref.model_id}.txt").write_text("".join(text))
    return report


def wave_profiler(
    out: Path, model_id: str, device: str = "cuda"
) -> tuple[Callable[[str, Callable[[], Any]], tuple[Any, float]], dict]:
    """An ``around`` for `wave`: each part under torch.profiler (host and device), its wall time, GPU kernel time
    (busy share), launches, and kernel time by category (`kernel_category`); the tables by own device time are
    appended to ``out/wave-profile-MODEL.txt``. Returns (around, report): the report fills as the parts run."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    report: dict[str, Any] = {}
    path = out / f"wave-profile-{model_id}.txt"
    path.write_text("")

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])

    def around(name: str, fn: Callable[[], Any]) -> tuple[Any, float]:
        sync(device)
        with torch_profile(activities=activities) as prof:
            started = time.perf_counter()
            res = fn()
            sync(device)
            wall = time.perf_counter() - started
        events = prof.key_averages()
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        kernel_s = sum(e.self_device_time_total for e in kernels) / 1e6
        by: dict[str, float] = {}
        for e in kernels:
            cat = kernel_category(e.key)
            by[cat] = by.get(cat, 0.0) + e.self_device_time_total / 1e6
        part = {
            "wall_seconds": wall,
            "gpu_kernel_seconds": kernel_s,
            "gpu_busy": kernel_s / wall if wall else None,
            "kernel_launches": sum(e.count for e in kernels),
            "kernel_seconds_by_category": dict(sorted(by.items(), key=lambda kv: -kv[1])),
        }
        if name == "train":
            part["loop_seconds"] = next((r.seconds for r in res if isinstance(r, TrainResult)), None)
        report[name] = part
        with path.open("a") as f:
            f.write(f"==== {name}: {json.dumps(part)}\n---- by self_device_time_total\n")
            f.write(events.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90) + "\n")
        return res, wall

    return around, report


#: Kernel-name fragments -> category, first match wins (`kernel_category`).
KERNEL_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("lora_", "lora branch (Triton)"),
    ("quantize_rows", "fp8 quantization (Triton)"),
    ("e4m3", "GEMM (cuBLAS)"),
    ("flash", "attention"),
    ("fmha", "attention"),
    ("nvjet", "GEMM (cuBLAS)"),
    ("gemm", "GEMM (cuBLAS)"),
    ("cutlass", "GEMM (cuBLAS)"),
    ("cross_entropy", "loss (liger)"),
    ("swiglu", "SwiGLU (liger)"),
    ("rms_norm", "RMSNorm (liger)"),
    ("rope", "rotary (liger)"),
    ("Memcpy", "copies host/device"),
    ("Memset", "memset"),
    ("reduce_kernel", "reductions (torch)"),
    ("elementwise", "element-wise (torch)"),
    ("index", "gather/scatter (torch)"),
    ("scatter", "gather/scatter (torch)"),
    ("gather", "gather/scatter (torch)"),
    ("cat", "cat/copy (torch)"),
    ("copy", "cat/copy (torch)"),
    ("multi_tensor", "optimizer (torch)"),
)


def kernel_category(name: str) -> str:
    """A profiled kernel's category by its name (`KERNEL_CATEGORIES`); ``other`` when nothing matches. torch's
    operators (``aten::``) and autograd nodes are not kernels and are never passed here."""
    low = name.lower()
    for fragment, category in KERNEL_CATEGORIES:
        if fragment.lower() in low:
            return category
    return "other"


def host_profile(base: LoadedBase, k: int, settings: TrainingSettings, tmp: Path, out: Path) -> dict[str, Any]:
    """cProfile (the host's Python) over a K-user batched training from their parents (trained first, not
    profiled), 3 steps with a validation, and the batched gate of those K candidates against their parents: where
    the host's time goes while the device waits. Writes the top functions by own and by cumulative time to
    ``out/host-profile-MODEL.txt``."""
    import cProfile
    import io
    import pstats

    three = settings.model_copy(update={"max_steps": 3, "eval_every": 3})
    parents, _ = fresh_users(k, 90_000, tmp / "hprof-parents")
    train_adapters(base, parents, settings.model_copy(update={"max_steps": 2}))  # not profiled: each user's parent
    jobs, requests = fresh_users(k, 90_000, tmp / "hprof")
    # as a worker's retrain: from the serving revision (read from its files), gated against it
    jobs = [dataclasses.replace(job, parent_dir=parent.out_dir) for job, parent in zip(jobs, parents, strict=True)]
    requests = [
        dataclasses.replace(req, current_dir=parent.out_dir) for req, parent in zip(requests, parents, strict=True)
    ]
    probes, general, length = load_probes(), load_general(), settings.max_length
    device = next(base.model.parameters()).device.type
    report: dict[str, Any] = {"users": k}
    text = io.StringIO()
    for name, fn in (
        ("train", lambda: train_adapters(base, jobs, three)),
        ("gate", lambda: evaluate_many(base, requests, probes=probes, general=general, max_length=length)),
    ):
        sync(device)
        prof = cProfile.Profile()
        started = time.perf_counter()
        prof.enable()
        fn()
        sync(device)
        prof.disable()
        report[f"{name}_seconds_profiled"] = time.perf_counter() - started
        for key in ("tottime", "cumulative"):
            text.write(f"==== {name} ({report[f'{name}_seconds_profiled']:.1f} s under cProfile), by {key}\n")
            pstats.Stats(prof, stream=text).sort_stats(key).print_stats(35)
    (out / f"host-profile-{base.ref.model_id}.txt").write_text(text.getvalue())
    return report


def table(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"Retrain throughput ({report['model']}, {env['device']}"
        + (f", host CPU {env['host_cpu']}" if env.get("host_cpu") else "")
        + f", torch {env['torch']}): a wave of K users, 100 "
        "events each a round, the default training settings, gate metrics for candidate / current / base, the "
        "default rules",
        "",
        "| path | K | fused | retrains / GPU-hour | data s | train s (loop) | setup + write s | gate s | decide s | "
        "total s | loop tokens/s | steps (mean) | gain vs current | gain vs base | promoted | train GiB |",
        "| --- | ---: | --- " + "| ---: " * 13 + "|",
    ]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}%"

    for w in report["waves"]:
        s = w["seconds"]
        lines.append(
            f"| batched wave | {w['users']} | {w['fused']}{'; ' + w['variant'] if 'variant' in w else ''} | "
            f"{w['retrains_per_gpu_hour']:,.0f} | {s['data']:.2f} | "
            f"{s['train']:.1f} ({s['train_loop']:.1f}) | {s['train_setup_and_write']:.1f} | {s['gate']:.1f} | "
            f"{s['decide']:.2f} | {s['total']:.1f} | {w['loop_tokens_per_s']:,.0f} | {w['steps_mean']:.1f} | "
            f"{pct(w['gain_vs_current'])} | {pct(w['gain_vs_base'])} | {w['promoted']}/{w['users']} | "
            f"{w['train_gpu_mem_gib']:.1f} |"
        )
    kinds = (("plain_peft", "warm plain-peft loop (train + save)"), ("sequential", "project sequential"))
    kinds += tuple((k + "_after", label + ", after the waves") for k, label in kinds)
    for key, label in kinds:
        b = report.get(key)
        if b:
            lines.append(
                f"| {label} | 1 x {b['users']} | - | {b['retrains_per_gpu_hour']:,.0f} | - | "
                f"{b.get('train_seconds_per_user', b['seconds_per_user']):.2f} / user | - | "
                f"{b['gate_seconds_per_user']:.2f} / user | - | {b['seconds_per_user']:.2f} / user | "
                if "gate_seconds_per_user" in b
                else f"| {label} | 1 x {b['users']} | - | {b['retrains_per_gpu_hour']:,.0f} | - | "
                f"{b['seconds_per_user']:.2f} / user | - | - | - | {b['seconds_per_user']:.2f} / user | "
            )
            lines[-1] += f"{b['tokens_per_s']:,.0f} | - | {pct(b.get('gain_vs_current'))} | - | - | - |"
    for w in report["waves"]:
        for key, _ in kinds:
            b = report.get(key)
            if b:
                ratio = w["retrains_per_gpu_hour"] / b["retrains_per_gpu_hour"]
                name = key.removesuffix("_after").replace("_", "-") + (" (after)" if key.endswith("_after") else "")
                lines.append(
                    f"\nK={w['users']} fused {w['fused']}: {ratio:.1f}x "
                    f"the {name} path's retrains per GPU-hour (end to end for the wave; "
                    f"{w['loop_tokens_per_s'] / b['tokens_per_s']:.1f}x its training tokens/s)."
                )
    check = report.get("gpu_check")
    if check and "error" not in check:
        loss = check["loss"]
        lines += [
            "",
            f"GPU check of the fused kernels ({loss['tokens']:,} tokens, vocabulary {loss['vocab']:,}, hidden "
            f"{loss['hidden']}, bf16; relative L2 against the unfused path):",
            "",
            "| loss path | forward + backward ms | peak GiB (above inputs) | loss rel. L2 | input-gradient rel. L2 |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for mode in ("off", "chunked", "liger"):
            r = loss[mode]
            lines.append(
                f"| {mode} | {r['ms']:.2f} | {r['peak_gib']:.2f} | {r.get('loss_rel_l2', 0):.1e} | "
                f"{r.get('grad_rel_l2', 0):.1e} |"
            )
        lay, tr = check["layers"], check["training"]
        lines += [
            "",
            f"liger RMSNorm + SwiGLU in the decoder ({lay['patched_modules']} modules): output rel. L2 "
            f"{lay['output_rel_l2']:.1e}, input gradient {lay['grad_rel_l2']:.1e}. Batched training, {tr['users']} "
            f"users x {tr['steps']} steps, fused kernels + bf16 LoRA branch vs unfused + fp32 branch: adapter "
            f"weights rel. L2 {tr['weights_rel_l2']:.1e}.",
        ]
    for w in report["waves"]:
        gp = w.get("gate_profile")
        if gp:
            lines += [
                "",
                f"Gate profile (K={w['users']}, fused {w['fused']}; the batched gate of {gp['requests']} of its "
                f"candidates again, under torch.profiler): wall {gp['wall_seconds']:.2f} s, GPU kernels "
                f"{gp['gpu_kernel_seconds']:.2f} s ("
                + ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in gp["shares"].items())
                + ").",
            ]
    sp = report.get("step_profile")
    if sp and "error" not in sp:
        lines += [
            "",
            f"Host + device profile (torch.profiler) of a K={sp['users']} training of 2 steps and the gate of "
            f"min(K, 64) of its candidates:",
            "",
            "| part | wall s | GPU kernel s | GPU busy | kernel launches | host ops |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in ("train", "gate"):
            p = sp[name]
            lines.append(
                f"| {name} | {p['wall_seconds']:.2f} | {p['gpu_kernel_seconds']:.2f} | "
                f"{100 * (p['gpu_busy'] or 0):.0f}% | {p['kernel_launches']:,} | {p['host_ops']:,} |"
            )
    wp = report.get("wave_profile")
    if wp and "train" in wp and "gate" in wp:
        cats = sorted(
            {c for name in ("train", "gate") for c in wp[name]["kernel_seconds_by_category"]},
            key=lambda c: -(wp["train"]["kernel_seconds_by_category"].get(c, 0.0)),
        )
        lines += [
            "",
            f"A second wave ({wp['variant']}) with round 1's training and gate under torch.profiler (its wall "
            "times include the profiler's host overhead; the kernel times do not):",
            "",
            "| part | wall s | GPU kernel s | GPU busy | kernel launches |" + "".join(f" {c} s |" for c in cats),
            "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(cats),
        ]
        for name in ("train", "gate"):
            p = wp[name]
            by = p["kernel_seconds_by_category"]
            lines.append(
                f"| {name} | {p['wall_seconds']:.2f} | {p['gpu_kernel_seconds']:.2f} | "
                f"{100 * (p['gpu_busy'] or 0):.0f}% | {p['kernel_launches']:,} |"
                + "".join(f" {by.get(c, 0.0):.2f} |" for c in cats)
            )
    prof = report.get("profile")
    if prof:
        busy = prof["gpu_busy"]
        lines += [
            "",
            f"Profile (torch.profiler, CUDA kernels) of a K={prof['users']} batched training of {prof['steps']} "
            f"steps, fused {prof['fused']}: loop {prof['loop_seconds']:.2f} s, kernels "
            f"{prof['gpu_kernel_seconds']:.2f} s, GPU busy {100 * busy:.0f}% of the loop."
            if busy is not None
            else "",
            "",
            "| kind of kernel | share of GPU kernel time |",
            "| --- | ---: |",
        ]
        lines += [f"| {kind} | {100 * share:.1f}% |" for kind, share in prof["shares"].items()]
    return "\n".join(lines) + "\n"


def choices(option: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    """A comma list of ``allowed`` words (empty: the first), or SystemExit naming ``option``."""
    got = [v for v in value.split(",") if v] or [allowed[0]]
    if set(got) - set(allowed):
        raise SystemExit(f"{option}: {' or '.join(allowed)}, got {value!r}")
    return got


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(SHAPES))
    parser.add_argument("--k", type=int, nargs="+", default=[256])
    parser.add_argument("--fused", default="on,off", help="on, off or on,off: liger/chunked kernels, or unfused")
    parser.add_argument("--parent-steps", type=int, default=2, help="steps of round 0 (the serving revisions)")
    parser.add_argument("--baseline-users", type=int, default=3, help="users of each baseline (0 = none)")
    parser.add_argument("--baselines", default="plain_peft,sequential", help="which baselines run")
    parser.add_argument(
        "--baselines-at",
        default="after",
        choices=("after", "first", "both"),
        help="the baselines after the waves, before them, or both (the second run reported as KEY_after: a "
        "host-bound baseline drifts with the host's state)",
    )
    parser.add_argument(
        "--micro", default="0", help="micro_batch_tokens, a comma list: one wave each (0: the setting's auto value)"
    )
    parser.add_argument(
        "--gate-rows",
        default="",
        help="rows per forward of the stacked gate, a comma list paired with --micro: LABELLED[:PROBE] (default: "
        "metrics.SPLIT_BATCH / STACKED_BATCH)",
    )
    parser.add_argument(
        "--rms-backward",
        default="row",
        help="the fused RMSNorm's backward, a comma list paired with --micro: row (one program per row, the "
        "trainer's) or liger (liger's own, one program per SM)",
    )
    parser.add_argument(
        "--gate-kernels",
        default="fused",
        help="the stacked gate's norm and MLP kernels, a comma list paired with --micro: fused (liger's, where "
        "available: metrics.FUSED_LAYERS) or hf (the model's own modules)",
    )
    parser.add_argument(
        "--train-branch",
        default="group",
        help="batched training's LoRA layers, a comma list paired with --micro: group (one autograd node a "
        "projection, q|k|v and gate|up one node each: multilora.GROUP_BRANCH), node (one autograd node a "
        "projection, multilora.TRAIN_BRANCH) or ops (plain autograd ops)",
    )
    parser.add_argument(
        "--shift-events",
        default=str(SHIFT_EVENTS),
        help="new events the gate scores for new_shift, a comma list paired with --micro (0: all; default: the "
        "gate's, metrics.SHIFT_EVENTS)",
    )
    parser.add_argument(
        "--base-fp8",
        default="off",
        help="batched training's frozen projections in FP8 (TrainingSettings.base_fp8), a comma list paired with "
        "--micro of off, on (the projections fp8.MIN_WEIGHTS lets through) or all (every projection: MIN_WEIGHTS 0); "
        "same users in every wave: compare the gains",
    )
    parser.add_argument(
        "--gate-reuse",
        default="off",
        help="a comma list paired with --micro: on (round 0 gated for every user, round 1's gate reusing those "
        "rows, as a worker's next gate does) or off (round 1's gate runs every row)",
    )
    parser.add_argument(
        "--shared-prefix",
        default="auto",
        help="a comma list paired with --micro: on (training and the gate run the rows' common first tokens once "
        "per adapter: TrainingSettings.shared_prefix, metrics.SHARED_PREFIX), train (training only), off (every "
        "row whole) or auto (the defaults: on a GPU)",
    )
    parser.add_argument(
        "--gate-packed",
        default="auto",
        help="a comma list paired with --micro: on (the gate's labelled rows packed as one sequence a forward: "
        "metrics.PACKED_ROWS), off (padded rows) or auto (metrics.PACKED_ROWS as it is: on a GPU)",
    )
    parser.add_argument(
        "--packed-rows",
        default="auto",
        help="a comma list paired with --micro: on (training's micro-batches as one sequence without padding: "
        "TrainingSettings.packed_rows), off (right-padded rows) or auto (the setting's default: on a GPU only)",
    )
    parser.add_argument(
        "--lora-kernels",
        default="triton",
        help="a comma list paired with --micro: triton (the LoRA branch in pipeline.models.lora_kernels where "
        "available: multilora.TRITON_BRANCH), torch (batched GEMMs) or dense (training's packed rows through "
        "multilora._DenseBranch where its share rule allows, multilora.DENSE_BRANCH; the gate's Triton kernels)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a TrainingSettings field")
    parser.add_argument("--check", action="store_true", help="first the GPU check of the fused kernels")
    parser.add_argument("--profile", type=int, default=0, metavar="K", help="last, a profile of K users (fused)")
    parser.add_argument("--gate-profile", type=int, default=0, metavar="N", help="profile the gate of N users")
    parser.add_argument("--host-profile", type=int, default=0, metavar="K", help="cProfile training + gate of K users")
    parser.add_argument(
        "--step-profile", type=int, default=0, metavar="K", help="host + device profile of training and gate, K users"
    )
    parser.add_argument(
        "--wave-profile",
        action="store_true",
        help="after the first variant's timed wave, the same wave again (fresh users) with round 1's training and "
        "gate under torch.profiler: kernel time by category against wall time (wave-profile-MODEL.txt)",
    )
    parser.add_argument(
        "--lora-whole-width",
        action="store_true",
        help="the Triton LoRA kernels with each program walking the whole width, 64 tokens a program "
        "(lora_kernels.SPLIT False, TOKEN_BLOCK 64): close to the kernels before 2026-11-30's evening (one fused "
        "kernel a pass; the A/B in bench/results/retrain_throughput.md ran those, at f548dae)",
    )
    parser.add_argument(
        "--gil-switch-ms",
        type=float,
        default=0.0,
        help="Python's thread switch interval for the run (sys.setswitchinterval; 0: Python's own, 5 ms)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the byte-level tiny one)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.gil_switch_ms > 0:
        sys.setswitchinterval(args.gil_switch_ms / 1000)
    if args.lora_whole_width:
        from pipeline.models import lora_kernels

        lora_kernels.SPLIT, lora_kernels.TOKEN_BLOCK = False, 64
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("pipeline").setLevel(logging.WARNING)
    logging.getLogger("pipeline.training.multi").setLevel(logging.INFO)
    logging.getLogger("pipeline.evaluation.metrics").setLevel(logging.INFO)
    overrides: dict[str, Any] = dict(kv.split("=", 1) for kv in args.set)
    micros = [int(m) for m in args.micro.split(",")]
    gate_rows = [g for g in args.gate_rows.split(",") if g] or [""]
    rms = choices("--rms-backward", args.rms_backward, ("row", "liger"))
    gate_kernels = choices("--gate-kernels", args.gate_kernels, ("fused", "hf"))
    branches = choices("--train-branch", args.train_branch, ("group", "node", "ops"))
    reuses = choices("--gate-reuse", args.gate_reuse, ("off", "on"))
    prefixes = choices("--shared-prefix", args.shared_prefix, ("off", "on", "train", "auto"))
    lora_ways = choices("--lora-kernels", args.lora_kernels, ("triton", "torch", "dense"))
    packs = choices("--packed-rows", args.packed_rows, ("off", "on", "auto"))
    gate_packs = choices("--gate-packed", args.gate_packed, ("off", "on", "auto"))
    shifts = [int(x) for x in args.shift_events.split(",")]
    fp8s = choices("--base-fp8", args.base_fp8, ("off", "on", "all"))
    min_weights = fp8.MIN_WEIGHTS
    lists = [
        micros,
        gate_rows,
        rms,
        gate_kernels,
        branches,
        reuses,
        prefixes,
        lora_ways,
        packs,
        shifts,
        fp8s,
        gate_packs,
    ]
    n_waves = max(len(x) for x in lists)
    lists = [x * n_waves if len(x) == 1 else x for x in lists]
    if len({len(x) for x in lists}) != 1:
        raise SystemExit(
            "--micro, --gate-rows, --rms-backward, --gate-kernels, --train-branch, --gate-reuse, --shared-prefix, "
            "--lora-kernels, --packed-rows, --shift-events, --base-fp8 and --gate-packed: lists of one length (or one "
            "value)"
        )
    micros, gate_rows, rms, gate_kernels, branches, reuses, prefixes, lora_ways, packs, shifts, fp8s, gate_packs = (
        lists
    )
    if micros[0]:
        overrides["micro_batch_tokens"] = micros[0]
    base_settings = TrainingSettings(**overrides)
    rules = load_rules(Path(__file__).parents[1] / "infra" / "gating" / "default_rules.yaml")
    base = build(args.model, args.device, args.tokenizer)
    import peft
    import transformers

    report: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "bench/retrain_throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": args.model,
        "tokenizer": args.tokenizer or "tiny (byte-level, Python)",
        "parameters": sum(p.numel() for p in base.model.parameters()),
        "environment": {
            "device": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.machine() + " CPU",
            "host_cpu": host_cpu(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
        "settings": base_settings.model_dump(
            mode="json",
            include={
                "rank",
                "alpha",
                "target_modules",
                "learning_rate",
                "batch_size",
                "max_length",
                "max_steps",
                "eval_every",
                "patience",
                "val_fraction",
                "replay_max",
                "micro_batch_tokens",
                "pair_batch_size",
            },
        ),
        "waves": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        name = f"retrain_throughput-{args.model}"
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / f"{name}.md").write_text(table(report))

    with tempfile.TemporaryDirectory(prefix="retrain-bench-") as tmp_name:
        tmp = Path(tmp_name)

        def part(key: str, fn: Callable[[], Any]) -> Any:
            """One part of the run; on the device a failing part is logged and the next one still runs."""
            try:
                value = fn()
            except Exception as e:
                if args.device != "cuda":
                    raise
                log.exception("%s failed", key)
                value = {"error": repr(e)}
                torch.cuda.empty_cache()
            log.info("%s: %s", key, json.dumps(value, default=str))
            return value

        if args.check and args.device == "cuda":
            report["gpu_check"] = part("gpu check", lambda: gpu_check(base, base_settings, tmp))
            save()
        from pipeline.evaluation import metrics
        from pipeline.models import fused_layers as fused_ops
        from pipeline.models import multilora

        default_rows = (dict(metrics.SPLIT_BATCH), dict(metrics.STACKED_BATCH))
        default_gate_packed, default_gate_prefix = dict(metrics.PACKED_ROWS), dict(metrics.SHARED_PREFIX)

        def baselines(suffix: str = "") -> None:
            for key, fn in (("plain_peft", plain_peft), ("sequential", sequential)):
                if key not in args.baselines.split(","):
                    continue
                value = part(
                    key + suffix, lambda fn=fn: fn(base, args.baseline_users, base_settings, args.device, tmp, rules)
                )
                if "error" in value:
                    report.setdefault("failed", []).append({key + suffix: value})
                else:
                    report[key + suffix] = value
                save()

        if args.baseline_users and args.baselines_at in ("first", "both"):
            baselines()
        for k in args.k:
            for mode in args.fused.split(","):
                variants = zip(*lists, strict=True)
                for v, (
                    micro, rows, rms_backward, gate_k, branch_k, reuse, prefix, lora_k, pack, shift, in_fp8, gate_pack
                ) in enumerate(variants):  # fmt: skip
                    fused_ops.ROW_BACKWARD = rms_backward == "row"
                    multilora.TRITON_BRANCH = lora_k in ("triton", "dense")
                    multilora.DENSE_BRANCH = lora_k == "dense"
                    multilora.TRAIN_BRANCH = branch_k in ("group", "node")
                    multilora.GROUP_BRANCH = branch_k == "group"
                    metrics.FUSED_LAYERS = gate_k == "fused"
                    metrics.SHARED_PREFIX.clear(), metrics.SHARED_PREFIX.update(default_gate_prefix)
                    if prefix != "auto":
                        metrics.SHARED_PREFIX[args.device] = prefix == "on"
                    metrics.PACKED_ROWS.clear(), metrics.PACKED_ROWS.update(default_gate_packed)
                    if gate_pack != "auto":
                        metrics.PACKED_ROWS[args.device] = gate_pack == "on"
                    fp8.MIN_WEIGHTS = 0 if in_fp8 == "all" else min_weights
                    # on: this session's paths (fused kernels, the LoRA branch in the base's dtype); off: before.
                    kernels, branch = {"on": ("auto", "base"), "off": ("off", "fp32")}[mode]
                    update: dict[str, Any] = {
                        "fused_kernels": kernels,
                        "lora_branch": branch,
                        "shared_prefix": None if prefix == "auto" else prefix in ("on", "train"),
                        "packed_rows": None if pack == "auto" else pack == "on",
                        "base_fp8": in_fp8 != "off",
                    }
                    if micro:
                        update["micro_batch_tokens"] = micro
                    settings = base_settings.model_copy(update=update)
                    metrics.SPLIT_BATCH.clear(), metrics.STACKED_BATCH.clear()
                    metrics.SPLIT_BATCH.update(default_rows[0]), metrics.STACKED_BATCH.update(default_rows[1])
                    if rows:
                        labelled, _, probe = rows.partition(":")
                        metrics.SPLIT_BATCH[args.device] = int(labelled)
                        if probe:
                            metrics.STACKED_BATCH[args.device] = int(probe)
                    label = (
                        f"micro {settings.micro_batch_budget(args.device)}, gate rows "
                        f"{metrics.SPLIT_BATCH.get(args.device)}:{metrics.STACKED_BATCH.get(args.device)}, "
                        f"RMSNorm backward {rms_backward}, gate kernels {gate_k}, training layers {branch_k}, "
                        f"gate reuse {reuse}, shared prefix "
                        f"{'on' if settings.shares_prefix(torch.device(args.device).type) else 'off'} (training) "
                        f"{'on' if metrics.SHARED_PREFIX.get(args.device) else 'off'} (gate), LoRA kernels {lora_k}, "
                        "packed rows "
                        f"{'on' if settings.packs_rows(torch.device(args.device).type) else 'off'}, gate rows packed "
                        f"{'on' if metrics.PACKED_ROWS.get(args.device) else 'off'}, shift events "
                        f"{shift or 'all'}, base GEMMs "
                        + {"off": "bf16", "on": f"fp8 (>= {min_weights} weights)", "all": "fp8 (all)"}[in_fp8]
                    )
                    path = Fused.resolve(kernels, torch.device(args.device)).describe() + f", LoRA branch {branch}"
                    w = part(
                        f"wave K={k} fused {mode} {label}",
                        lambda k=k, settings=settings, mode=mode, v=v, reuse=reuse, shift=shift: wave(
                            base,
                            k,
                            settings,
                            args.parent_steps,
                            args.device,
                            tmp / f"k{k}-{mode}-{v}",
                            rules,
                            args.gate_profile,
                            gate_reuse=reuse == "on",
                            shift_events=shift,
                        ),
                    )
                    if "error" in w:
                        report.setdefault("failed", []).append({"wave": f"K={k} fused {mode} {label}", **w})
                        continue
                    w["fused"], w["variant"] = f"{mode} ({path})", label
                    report["waves"].append(w)
                    save()
                    if args.wave_profile and "wave_profile" not in report:
                        around, profiled = wave_profiler(args.out, base.ref.model_id, args.device)
                        pw = part(
                            f"wave profile K={k}",
                            functools.partial(
                                wave,
                                base,
                                k,
                                settings,
                                args.parent_steps,
                                args.device,
                                tmp / f"k{k}-{mode}-{v}-profiled",
                                rules,
                                first_user=k,
                                gate_reuse=reuse == "on",
                                around=around,
                                shift_events=shift,
                            ),
                        )
                        report["wave_profile"] = {"variant": label, **profiled, "wave": pw}
                        save()
                    if args.device == "cuda":
                        torch.cuda.empty_cache()
        if args.baseline_users and args.baselines_at in ("after", "both"):
            baselines("_after" if args.baselines_at == "both" else "")
        if args.host_profile and args.device == "cuda":
            value = part("host profile", lambda: host_profile(base, args.host_profile, base_settings, tmp, args.out))
            report["host_profile"] = value
            save()
        if args.step_profile and args.device == "cuda":
            value = part("step profile", lambda: step_profile(base, args.step_profile, base_settings, tmp, args.out))
            report["step_profile"] = value
            save()
        if args.profile and args.device == "cuda":
            value = part("profile", lambda: profile(base, args.profile, base_settings, tmp, args.out))
            report["profile" if "error" not in value else "profile_failed"] = value
            save()
    print(table(report))
    return report


if __name__ == "__main__":
    main()
