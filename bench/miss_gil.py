"""How much of the serving worker's GIL an adapter miss takes: the real `AdapterCache` over a real `FastEngine` (on
the CPU, or the GPU where there is one), misses run by one thread while the main thread counts in pure Python.

    python bench/miss_gil.py                       # SmolLM2-135M shape, r=1 on all seven projections, 300 misses
    python bench/miss_gil.py --shape tiny --adapters 40 --out DIR      # a quick check

Two kinds of miss, each over ``--adapters`` distinct adapters: ``store`` (not in any tier: read from a store
directory, its sha256 checked, its disk copy written, parsed, checked, packed for the slots and loaded into a slot;
with ``--fill N`` the reading, checking and writing run in N fill processes, `pipeline.serving.fill`, as in a serving
worker, and ``store (fill 0)`` on the request's thread) and ``host`` (packed in host memory already: only the slot
load; the cache has fewer slots than adapters, so every one is a slot miss). The counter's rate alone is measured a
second before and after; while the misses run, the counter gets the GIL only when the miss thread does not hold it,
so the share of its rate lost x the wall time / misses estimates the GIL a miss holds, with its hand-overs (the
worker's switch interval: ``--switch-ms``, the serving default 0.1 ms). On a machine with few cores, work that
releases the GIL but competes for a core counts too (the fill processes' work as well): read the column as an upper
bound. ``pack ms`` is the cProfile total of `pack_adapter_bytes` over a further pass (store misses only) and ``pack
own ms`` its own time, the part outside torch's operations (which release the GIL).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def count_for(seconds: float) -> float:
    """Pure-Python increments a second over ``seconds``."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            n += 1
    return n / seconds


def measure(cache: Any, keys: list[Any]) -> dict[str, float]:
    """The misses of ``keys`` on a thread while this one counts: ms a miss, the counter's loss against its rate alone
    (the mean of a second before and a second after), GIL ms a miss."""
    took: list[float] = []
    before = count_for(1.0)

    def misses() -> None:
        started = time.perf_counter()
        for k in keys:
            cache.acquire(k)
            cache.release(k)
        took.append(time.perf_counter() - started)

    thread = threading.Thread(target=misses)
    started = time.perf_counter()
    thread.start()
    n = 0
    while thread.is_alive():
        for _ in range(1000):
            n += 1
    wall = time.perf_counter() - started
    thread.join()
    rate = (before + count_for(1.0)) / 2
    lost = max(0.0, 1.0 - (n / wall) / rate)
    return {
        "misses": len(keys),
        "ms_per_miss": 1000 * took[0] / len(keys),
        "counter_lost": lost,
        "gil_ms_per_miss": 1000 * lost * wall / len(keys),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="smollm2-135m", help="a shape of bench/serving_gpu.py, or tiny")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer directory (random shapes)")
    ap.add_argument("--adapters", type=int, default=300)
    ap.add_argument("--rank", type=int, default=1)
    ap.add_argument("--switch-ms", type=float, default=0.1, help="sys.setswitchinterval, as the serving worker sets")
    ap.add_argument("--fill", default="0,2", help="fill processes for the store misses, one run each (0: none)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import serving_load as sl

    from pipeline.domain.revisions import BaseModelRef
    from pipeline.models.base import LoadedBase, tiny_random, tiny_tokenizer
    from pipeline.serving.adapters import AdapterKey, AdapterLimits, EngineSlots
    from pipeline.serving.cache import AdapterCache
    from pipeline.serving.fast_engine import FastEngine
    from pipeline.serving.fill import DirectoryFetchSpec, FillPool

    torch.set_num_threads(1)
    sys.setswitchinterval(args.switch_ms / 1000)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.shape == "tiny":
        spec = sl.resolve_base("tiny-random", None)
        base = LoadedBase(tiny_random(), tiny_tokenizer(), BaseModelRef("tiny-random", "0" * 64))
    else:
        spec = sl.resolve_base(f"random:{args.shape}", args.tokenizer)
        base = sl.build_worker_base(spec, device)
    targets = [t for t in TARGETS if any(n.endswith(t) for n, _ in base.model.named_modules())]
    engine = FastEngine(
        base,
        slots=32,
        max_rank=8,
        targets=tuple(targets),
        max_seq=64,
        max_batch=8,
        dtype=torch.bfloat16,
        device=device,
    )
    shapes = sl.lora_shapes(sl.model_config(spec), targets)
    fills = [int(n) for n in args.fill.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="miss-gil-") as tmp:
        store = Path(tmp) / "store"
        keys = []
        # A set of timed store misses per --fill value, then the profiled ones (a new user each: a cold adapter).
        for i in range((len(fills) + 1) * args.adapters):
            f = sl.adapter_files(shapes, args.rank, targets, 1000 + i)
            key = AdapterKey(f"u{i}", "r1", hashlib.sha256(f["adapter_model.safetensors"]).hexdigest())
            folder = store / "users" / key.user_id / "revisions" / key.revision_id
            folder.mkdir(parents=True)
            for name, data in f.items():
                (folder / name).write_bytes(data)
            keys.append(key)
        spec = DirectoryFetchSpec(str(store))
        profiled = keys[len(fills) * args.adapters :]
        for j, n_fill in enumerate(fills):
            timed = keys[j * args.adapters : (j + 1) * args.adapters]
            cache = AdapterCache(
                spec.open(), disk_dir=Path(tmp) / f"disk-{j}", disk_bytes=1 << 36, host_bytes=1 << 36, slots=32,
                limits=AdapterLimits(max_rank=8, targets=frozenset(targets)), loader=EngineSlots(engine),
                fill=FillPool(spec, n_fill) if n_fill else None,
            )  # fmt: skip
            if cache.fill is not None:
                cache.fill.pids()  # the processes up (a serving worker waits for them before it serves)
            cache.acquire(profiled[-1 - j])  # the header layout's plan, made once per process: not timed
            cache.release(profiled[-1 - j])
            rows.append({"kind": f"store (fill {n_fill})", **measure(cache, timed)})
            if j == 0:
                rows.append({"kind": "host", **measure(cache, timed)})  # all in host memory now, 32 slots
                first = cache
            else:
                cache.close()
        cache = first
        prof = cProfile.Profile()
        prof.enable()
        for k in profiled[: -len(fills)]:
            cache.acquire(k)
            cache.release(k)
        prof.disable()
        cache.close()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    pack = [v for (file, _, name), v in stats.items() if name == "pack_adapter_bytes" and "fast_llama" in file]
    n = max(1, len(profiled) - len(fills))
    rows[0]["pack_ms"] = 1000 * pack[0][3] / n if pack else None
    rows[0]["pack_own_ms"] = 1000 * pack[0][2] / n if pack else None
    report = {
        "shape": args.shape,
        "device": device,
        "rank": args.rank,
        "switch_ms": args.switch_ms,
        "rows": rows,
    }
    lines = [
        f"adapter misses and the GIL: {args.shape} shape, r={args.rank} on {', '.join(targets)}, engine on {device} "
        f"(bf16), switch interval {args.switch_ms} ms",
        "",
        "| miss | misses | ms a miss | counter slowed | GIL ms a miss (upper bound) | pack ms | pack own ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        pk = f"{r['pack_ms']:.2f}" if r.get("pack_ms") is not None else "-"
        own = f"{r['pack_own_ms']:.2f}" if r.get("pack_own_ms") is not None else "-"
        lines.append(
            f"| {r['kind']} | {r['misses']} | {r['ms_per_miss']:.2f} | {100 * r['counter_lost']:.0f}% | "
            f"{r['gil_ms_per_miss']:.2f} | {pk} | {own} |"
        )
    print("\n".join(lines))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "miss_gil.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "miss_gil.md").write_text("\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
