"""Benchmark (GPU): the fast engine under continuous arrivals against static waves, at the same batch size.

Static waves: ``batch`` requests are submitted together and run to the end, then the next wave. Continuous
arrivals: ``batch`` requests are in flight from the start and each one that finishes is replaced at once by a new
one, so requests join at every step while the others decode (the serving worker's real pattern). Both run the same
requests (prompt ``--prompt`` tokens, ``--new-min``..``--new-max`` new tokens drawn uniformly, greedy, adapters
``i % batch`` resident in slots at rank ``--rank``) and count generated tokens over wall time. Each pattern runs
once untimed first, so every step shape (CUDA graph) it uses is captured before timing. One row per engine step
budget (``--step-tokens``).

``python3 bench/serving_arrivals.py --out $OUT`` on the device (random weights of the SmolLM2-135M shape);
``--cpu`` for a small smoke run.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serving_gpu as sg

from pipeline.serving.engine import Request
from pipeline.serving.fast_engine import FastEngine


def requests(n: int, batch: int, prompt: int, new_min: int, new_max: int, vocab: int, seed: int) -> list[Request]:
    rng = random.Random(seed)
    return [
        Request(
            [rng.randrange(3, vocab) for _ in range(prompt)],
            slot=i % batch,
            max_tokens=rng.randint(new_min, new_max),
            ignore_eos=True,
        )
        for i in range(n)
    ]


def static_waves(eng: FastEngine, reqs: list[Request], batch: int) -> tuple[float, int]:
    sg.sync()
    t0 = time.perf_counter()
    tokens = 0
    for w in range(0, len(reqs), batch):
        gens = [eng.submit(r) for r in reqs[w : w + batch]]
        eng.run_until_done()
        tokens += sum(len(g.output_ids) for g in gens)
    sg.sync()
    return time.perf_counter() - t0, tokens


def continuous(eng: FastEngine, reqs: list[Request], batch: int) -> tuple[float, int]:
    queue = list(reversed(reqs))
    gens = [eng.submit(queue.pop()) for _ in range(min(batch, len(queue)))]
    sg.sync()
    t0 = time.perf_counter()
    while eng.has_work():
        for out in eng.step():
            if out.finished and queue:
                gens.append(eng.submit(queue.pop()))
    sg.sync()
    return time.perf_counter() - t0, sum(len(g.output_ids) for g in gens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cpu", action="store_true", help="small smoke run on the CPU (tiny shapes)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-min", type=int, default=16)
    ap.add_argument("--new-max", type=int, default=48)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--waves", type=int, default=8, help="requests = waves x batch")
    ap.add_argument("--step-tokens", default="768,1280,0", help="engine step budgets (0 = the default)")
    args = ap.parse_args()
    device = "cpu" if args.cpu else "cuda"
    if args.cpu:
        args.batch, args.prompt, args.waves, args.new_min, args.new_max = 4, 16, 2, 4, 8
        model = sg.LlamaForCausalLM(
            sg.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, eos_token_id=2, pad_token_id=0)
        ).eval()  # fmt: skip
    else:
        model = sg.make_model("smollm2-135m", device, torch.bfloat16)
    rows = []
    for st in [int(x) for x in args.step_tokens.split(",")]:
        eng = FastEngine(
            sg._Base(model), slots=args.batch, max_rank=8, device=device, max_batch=args.batch,
            max_seq=args.prompt + args.new_max + 2, step_tokens=st or None,
        )  # fmt: skip
        if device == "cuda":
            sg.fill_slots(eng, args.batch, args.rank, 0)
        gc.collect()
        gc.freeze()  # as a serving worker does once it is built (pipeline.serving.api.uvicorn_servers)
        n = args.waves * args.batch
        res = {"step_tokens": eng.step_tokens, "batch": args.batch, "requests": n}
        for name, run in (("static", static_waves), ("continuous", continuous)):
            run(eng, requests(n, args.batch, args.prompt, args.new_min, args.new_max, eng.vocab, 1), args.batch)
            before = dict(eng.counters)
            secs, tokens = run(
                eng, requests(n, args.batch, args.prompt, args.new_min, args.new_max, eng.vocab, 2), args.batch
            )
            steps = eng.counters["steps"] - before["steps"]
            res[name] = {"seconds": secs, "tokens": tokens, "tokens_per_s": tokens / secs, "steps": steps,
                         "ms_per_step": 1e3 * secs / max(steps, 1)}  # fmt: skip
            sg.log(f"step_tokens {eng.step_tokens} {name}: {tokens / secs:,.0f} tok/s ({steps} steps)")
        res["continuous_vs_static"] = res["continuous"]["tokens_per_s"] / res["static"]["tokens_per_s"]
        rows.append(res)
        eng.close()
        del eng
        if device == "cuda":
            torch.cuda.empty_cache()
    head = (
        f"Continuous arrivals vs static waves ({device}, batch {args.batch}, prompt {args.prompt}, "
        f"{args.new_min}..{args.new_max} new tokens, r={args.rank} adapters, one per row)"
    )
    cols = "| step tokens | static tok/s | continuous tok/s | continuous / static | ms/step static / cont. |"
    lines = [head, "", cols, "| ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(
            f"| {r['step_tokens']} | {r['static']['tokens_per_s']:,.0f} | {r['continuous']['tokens_per_s']:,.0f} | "
            f"{100 * r['continuous_vs_static']:.0f}% | {r['static']['ms_per_step']:.2f} / "
            f"{r['continuous']['ms_per_step']:.2f} |"
        )
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serving_arrivals.json").write_text(json.dumps(rows, indent=1))
        (args.out / "serving_arrivals.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
