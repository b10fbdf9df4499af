"""Benchmark (CPU): decode throughput of the serving engine with 1, 8 and 64 distinct adapters in one batch, the
base alone in the same engine, and peft's mixed batch (`generate(adapter_names=...)`) as the baseline.

Every run: a batch of B requests (prompt P tokens, N new tokens, greedy, EOS ignored), timed end to end (prefill
included). Adapters are random LoRA weights of the same shapes as trained ones (r=8 on q_proj,v_proj by default):
speed does not depend on the values. Results in bench/results/serving.md and .json.

    .venv/bin/python bench/serving.py --models tiny-random smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

from pipeline.config import ModelSettings
from pipeline.models.base import TINY_RANDOM_ID, LoadedBase, load_dir, tiny_random, tiny_tokenizer
from pipeline.models.prepare import prepare
from pipeline.serving.engine import Engine, Request

RESULTS = Path(__file__).parent / "results"


def fresh_base(model_id: str) -> LoadedBase:
    """A base of its own (the engine injects its layers into it; peft wraps another copy)."""
    if model_id == TINY_RANDOM_ID:
        m = tiny_random()
        return LoadedBase(m, tiny_tokenizer(), None)  # type: ignore[arg-type]
    prepared = prepare(ModelSettings(base=model_id))
    model, tokenizer = load_dir(prepared.path)
    return LoadedBase(model, tokenizer, None)  # type: ignore[arg-type]


def adapter_state(model: torch.nn.Module, targets: list[str], r: int, seed: int) -> dict[str, torch.Tensor]:
    """PEFT-format LoRA tensors (keys without the adapter name) for every target module of ``model``."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            state[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, mod.in_features, generator=g) * 0.02
            state[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, r, generator=g) * 0.02
    return state


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def run_model(model_id: str, batch: int, prompt: int, new: int, r: int, targets: list[str]) -> list[dict]:
    rows: list[dict] = []
    served = fresh_base(model_id)
    config = {"r": r, "lora_alpha": 2 * r, "target_modules": targets, "peft_type": "LORA"}
    n_adapters = 64
    states = [adapter_state(served.model, targets, r, i) for i in range(n_adapters)]
    engine = Engine(served, slots=n_adapters, max_rank=r, targets=targets, max_batch=batch)
    for i, st in enumerate(states):
        engine.load_adapter_state(i, st, config)
    vocab = served.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, min(vocab, 250), (prompt,), generator=g).tolist() for _ in range(batch)]
    torch.set_grad_enabled(False)

    def engine_run(slot_of_row) -> float:
        reqs = [Request(p, slot_of_row(i), max_tokens=new, ignore_eos=True) for i, p in enumerate(prompts)]
        return timed(lambda: engine.generate(reqs))

    engine_run(lambda i: -1)  # warm-up
    for label, fn in (
        ("engine, base only", lambda i: -1),
        ("engine, 1 adapter", lambda i: 0),
        ("engine, 8 adapters", lambda i: i % 8),
        ("engine, 64 adapters", lambda i: i % 64),
    ):
        s = engine_run(fn)
        rows.append({"model": model_id, "path": label, "seconds": s, "tokens_per_s": batch * new / s})
        print(f"  {model_id} {label}: {batch * new / s:,.0f} tokens/s", file=sys.stderr)
    engine.close()

    ref = fresh_base(model_id)
    peft_model = get_peft_model(
        ref.model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets), adapter_name="a0"
    )
    for i in range(1, n_adapters):
        peft_model.add_adapter(f"a{i}", LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    for i, st in enumerate(states):
        set_peft_model_state_dict(peft_model, st, adapter_name=f"a{i}")
    peft_model.eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def peft_run(names) -> float:
        kw = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "pad_token_id": 0}
        return timed(lambda: peft_model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kw))

    for label, names in (
        ("HF generate, base (peft __base__)", ["__base__"] * batch),
        ("peft mixed batch, 64 adapters", [f"a{i % 64}" for i in range(batch)]),
    ):
        s = peft_run(names)
        rows.append({"model": model_id, "path": label, "seconds": s, "tokens_per_s": batch * new / s})
        print(f"  {model_id} {label}: {batch * new / s:,.0f} tokens/s", file=sys.stderr)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[TINY_RANDOM_ID, "smollm2-135m"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj")
    args = ap.parse_args()
    targets = args.targets.split(",")
    rows = [row for m in args.models for row in run_model(m, args.batch, args.prompt, args.new, args.rank, targets)]
    lines = [
        f"CPU serving benchmark ({platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads): batch {args.batch}, prompt {args.prompt} tokens, {args.new} new tokens "
        f"(greedy, prefill included), LoRA r={args.rank} on {args.targets}",
        "",
        "| base | path | seconds | tokens/s | vs engine base only |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["path"] == "engine, base only")
        lines.append(
            f"| {r['model']} | {r['path']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / base['tokens_per_s']:.0%} |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serving.md").write_text(table + "\n")
    (RESULTS / "serving.json").write_text(
        json.dumps(
            {"when": datetime.now(UTC).isoformat(timespec="seconds"), "args": vars(args), "rows": rows}, indent=2
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
