"""The worker and serving paths on CUDA through the real settings, against the same work on the CPU (one device call).

What the benchmarks (`bench/serving_gpu.py`, `bench/train_gpu.py`) do not cover: `PERSONA_MODEL_DEVICE=cuda` puts
the worker's base on the GPU (`load_configured`), the batched trainer and the gate's metrics then run there, and a
serving worker's `Server` with `PERSONA_SERVE_ENGINE=auto` on CUDA picks the fast engine and answers through its
engine thread. Tiny random model, float32 on both devices, so the numbers must agree closely.

    python bench/gpu_paths.py [--out DIR]        # prints a table; writes gpu_paths.json under DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ModelSettings, ServingSettings, Settings, TrainingSettings
from pipeline.demo import sim
from pipeline.domain.examples import TrainingEvent, examples_from_events
from pipeline.evaluation.metrics import evaluate, load_probes
from pipeline.models.base import TINY_RANDOM_ID, LoadedBase, load_configured, ref, tiny_random, tiny_tokenizer
from pipeline.training.multi import UserJob, train_adapters

ENVELOPE = {"event_id", "user_id", "occurred_at", "app", "meta", "kind"}


def events(user: sim.SimUser, n: int = 40) -> list[TrainingEvent]:
    return [
        TrainingEvent(
            d["event_id"],
            i,
            d["kind"],
            "holdout" if i % 5 == 4 else "train",
            {k: v for k, v in d.items() if k not in ENVELOPE},
        )
        for i, d in enumerate(sim.events_for(user, n, app="gpu", seed=0))
    ]


def train_and_judge(device: str, tmp: Path) -> dict:
    base = load_configured(ModelSettings(base=TINY_RANDOM_ID, device=device))
    where = str(next(base.model.parameters()).device)
    settings = TrainingSettings(max_steps=12, eval_every=4, learning_rate=0.05, rank=4, val_fraction=0, seed=3)
    users = sim.users(3, prefix="gpu")
    evs = [events(u) for u in users]
    jobs = [  # the same users and data on both devices
        UserJob(examples_from_events([e for e in ev if e.split == "train"]), tmp / device / u.user_id, None, 7 + i)
        for i, (u, ev) in enumerate(zip(users, evs, strict=True))
    ]
    t = time.perf_counter()
    results = train_adapters(base, jobs, settings)
    train_s = time.perf_counter() - t
    failed = [repr(r) for r in results if isinstance(r, BaseException)]
    t = time.perf_counter()
    metrics = [
        evaluate(
            base,
            candidate_dir=job.out_dir,
            current_dir=None,
            holdout_events=[e for e in ev if e.split == "holdout"],
            train_events_count=len(ev),
            new_events_count=len(ev),
            probes=load_probes(Settings().gate.probes),
        )
        for job, ev in zip(jobs, evs, strict=True)
    ]
    eval_s = time.perf_counter() - t
    return {
        "device": where,
        "failed": failed,
        "train_s": train_s,
        "eval_s": eval_s,
        "final_loss": [r.train_loss for r in results if not isinstance(r, BaseException)],
        "nll": [(m["base"]["holdout_nll"], m["candidate"]["holdout_nll"]) for m in metrics],
        "drift": [m["candidate"]["drift_kl"] for m in metrics],
    }


def serve(device: str) -> dict:
    from pipeline.serving.engine import Request
    from pipeline.serving.fast_engine import make_engine

    model = tiny_random()
    base = LoadedBase(model, tiny_tokenizer(), ref(model, TINY_RANDOM_ID))
    engine = make_engine(base, ServingSettings(device=device, engine="auto", slots=2, max_rank=8, max_seq=256))
    try:
        prompt = base.tokenizer("Hello there", add_special_tokens=False)["input_ids"]
        t = time.perf_counter()
        (gen,) = engine.generate([Request(prompt, -1, 12)])
        seconds = time.perf_counter() - t
        return {"engine": type(engine).__name__, "tokens": gen.output_ids, "seconds": seconds}
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    with tempfile.TemporaryDirectory() as tmp:
        cpu, gpu = train_and_judge("cpu", Path(tmp)), train_and_judge("cuda", Path(tmp))
    s_cpu, s_gpu = serve("cpu"), serve("cuda")
    base_gap = max(abs(a[0] - b[0]) / a[0] for a, b in zip(cpu["nll"], gpu["nll"], strict=True))
    nll_gap = max(abs(a[1] - b[1]) / a[1] for a, b in zip(cpu["nll"], gpu["nll"], strict=True))
    same = next(
        (i for i, (a, b) in enumerate(zip(s_gpu["tokens"], s_cpu["tokens"], strict=False)) if a != b),
        len(s_cpu["tokens"]),
    )
    drift_gap = max(abs(a - b) for a, b in zip(cpu["drift"], gpu["drift"], strict=True))
    rows = [
        ("base placed by PERSONA_MODEL_DEVICE", gpu["device"], "cuda:0" in gpu["device"]),
        ("batched training, 3 users: failures", str(gpu["failed"] or "none"), not gpu["failed"]),
        ("base holdout NLL, cuda vs cpu (max rel. gap)", f"{base_gap:.2e}", base_gap < 1e-5),
        ("candidate holdout NLL, cuda vs cpu (max rel. gap)", f"{nll_gap:.2e}", nll_gap < 1e-3),
        ("drift KL, cuda vs cpu (max abs. gap)", f"{drift_gap:.2e}", drift_gap < 1e-3),
        (
            "every candidate beats the base on its holdout (cuda)",
            str([f"{b:.3f}->{c:.3f}" for b, c in gpu["nll"]]),
            all(c < b for b, c in gpu["nll"]),
        ),
        (
            "make_engine with PERSONA_SERVE_ENGINE=auto",
            f"cpu {s_cpu['engine']}, cuda {s_gpu['engine']}",
            s_cpu["engine"] == "Engine" and s_gpu["engine"] == "FastEngine",
        ),
        (
            "greedy tokens equal, cuda fast (bf16) vs cpu reference (fp32)",
            f"{same}/{len(s_cpu['tokens'])} (bf16 near-ties may differ)",
            len(s_gpu["tokens"]) == len(s_cpu["tokens"]),
        ),
        (
            "seconds: train / evaluate, cpu vs cuda",
            f"{cpu['train_s']:.1f}/{cpu['eval_s']:.1f} vs {gpu['train_s']:.1f}/{gpu['eval_s']:.1f}",
            True,
        ),
    ]
    print(f"GPU paths ({torch.cuda.get_device_name()}, torch {torch.__version__}), tiny random base, float32\n")
    print("| check | value | ok |\n| --- | --- | --- |")
    for name, value, ok in rows:
        print(f"| {name} | {value} | {'yes' if ok else 'NO'} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_paths.json").write_text(
        json.dumps(
            {
                "cpu": cpu,
                "cuda": gpu,
                "serve_cpu": s_cpu,
                "serve_cuda": s_gpu,
                "rows": [{"check": n, "value": v, "ok": o} for n, v, o in rows],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
