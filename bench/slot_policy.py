"""How often requests find their adapter in a device slot, by the slot tier's eviction policy, under skewed traffic.

Drives the serving worker's real `pipeline.serving.cache.AdapterCache` (its tiers, pinning and eviction code) with a
request trace: users drawn Zipf(s) over N adapters (rank k with probability proportional to 1/(k+1)^s), each request
acquiring its adapter and releasing it ``--in-flight`` requests later (requests in flight pin their slots, as a
batch of running requests does). The adapters are small hand-made PEFT files held in memory, and the slot loader
records loads without a device: this measures the slot tier's hit ratio (every miss is a slot load, the cost issue
17 measured at 0.14-0.17 ms of copying plus the miss path's host work), not throughput. Policies: ``segmented``
(the cache's default: a segmented LRU, ``protected_share`` 0.8) and ``lru`` (``protected_share`` 0: one LRU, the
cache before), and the bound of an oracle that keeps the ``slots`` most popular adapters resident.

    python bench/slot_policy.py            # prints a table; --out writes it as JSON too
"""

from __future__ import annotations

import argparse
import bisect
import collections
import hashlib
import itertools
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import torch
from safetensors.torch import save

from pipeline.serving.adapters import AdapterKey, AdapterLimits
from pipeline.serving.cache import SLOT, AdapterCache

LIMITS = AdapterLimits(max_rank=8, targets=frozenset({"q_proj"}))


class _Slots:
    """A slot loader without a device: packing keeps the bytes' length, a load is counted."""

    def __init__(self) -> None:
        self.loads = 0

    def pack(self, weights: bytes, config: dict[str, Any]) -> Any:
        return _Packed(len(weights))

    def load(self, slot: int, packed: Any) -> None:
        self.loads += 1

    def clear(self, slot: int) -> None:
        pass


class _Packed:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def _files(seed: int) -> dict[str, bytes]:
    gen = torch.Generator().manual_seed(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{prefix}.lora_A.weight": torch.randn(1, 8, generator=gen),
        f"{prefix}.lora_B.weight": torch.zeros(8, 1),
    }
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["q_proj"]}
    return {"adapter_config.json": orjson.dumps(config), "adapter_model.safetensors": save(tensors)}


def trace(n: int, requests: int, s: float, seed: int) -> list[int]:
    rng = random.Random(seed)
    cum = list(itertools.accumulate(1 / (k + 1) ** s for k in range(n)))
    return [min(n - 1, bisect.bisect(cum, rng.random() * cum[-1])) for _ in range(requests)]


def run(n: int, slots: int, requests: list[int], in_flight: int, share: float) -> dict[str, Any]:
    files = {u: _files(u) for u in set(requests)}
    keys = {
        u: AdapterKey(f"u{u}", "r1", hashlib.sha256(f["adapter_model.safetensors"]).hexdigest())
        for u, f in files.items()
    }
    by_key = {keys[u]: files[u] for u in files}
    loader = _Slots()
    with tempfile.TemporaryDirectory() as disk:
        cache = AdapterCache(
            lambda key: dict(by_key[key]), disk_dir=Path(disk), disk_bytes=0, host_bytes=1 << 40, slots=slots,
            limits=LIMITS, loader=loader, protected_share=share,
        )  # fmt: skip
        started = time.perf_counter()
        pending: collections.deque[AdapterKey] = collections.deque()
        for u in requests:
            if len(pending) >= in_flight:
                cache.release(pending.popleft())
            cache.acquire(keys[u])
            pending.append(keys[u])
        while pending:
            cache.release(pending.popleft())
        seconds = time.perf_counter() - started
        stats = cache.stats()
        cache.close()
    hits = stats.hits.get(SLOT, 0)
    return {"slot_hits": hits, "slot_loads": loader.loads, "hit_ratio": hits / len(requests), "seconds": seconds}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", default="1000,10000", help="N, a comma list")
    parser.add_argument("--slots", default="256,1024", help="device slots, a comma list")
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--in-flight", type=int, default=256)
    parser.add_argument("--zipf", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = []
    for n in (int(x) for x in args.adapters.split(",")):
        reqs = trace(n, args.requests, args.zipf, args.seed)
        weights = sorted(collections.Counter(reqs).values(), reverse=True)
        for slots in (int(x) for x in args.slots.split(",")):
            if slots >= n:
                continue
            # The oracle: the `slots` most requested adapters of this trace always resident (first touches of the
            # others miss each time); compulsory misses: each adapter's first request.
            oracle = sum(weights[:slots]) - min(slots, len(weights))
            row: dict[str, Any] = {
                "adapters": n,
                "slots": slots,
                "requests": args.requests,
                "in_flight": args.in_flight,
            }
            for name, share in (("lru", 0.0), ("segmented", 0.8)):
                row[name] = run(n, slots, reqs, args.in_flight, share)
            row["oracle_hit_ratio"] = oracle / args.requests
            rows.append(row)
    report = {"zipf": args.zipf, "seed": args.seed, "rows": rows}
    print(
        f"Slot hit ratio under Zipf({args.zipf}) traffic, {args.requests:,} requests, {args.in_flight} in flight "
        "(the real AdapterCache, no device)\n"
    )
    print(
        "| adapters | slots | LRU hit % | segmented LRU hit % | slot loads LRU -> segmented | oracle (top-slots "
        "resident) hit % |"
    )
    print("| ---: | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        lru, seg = r["lru"], r["segmented"]
        change = (seg["slot_loads"] - lru["slot_loads"]) / lru["slot_loads"]
        print(
            f"| {r['adapters']:,} | {r['slots']:,} | {100 * lru['hit_ratio']:.1f} | {100 * seg['hit_ratio']:.1f} | "
            f"{lru['slot_loads']:,} -> {seg['slot_loads']:,} ({100 * change:+.1f}%) | "
            f"{100 * r['oracle_hit_ratio']:.1f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
