"""bench/serving_load.py's store of adapters: every user's files in the bucket layout, the index's sha256 of each
weights file, PEFT files that stock safetensors reads with the model's LoRA shapes, each user's adapter different;
a second call reuses the store."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors.torch import load_file

from tests.unit.bench import load_bench

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_the_store_holds_every_users_adapter_and_is_reused(tmp_path: Path) -> None:
    bench = load_bench("serving_load")
    base = bench.resolve_base("tiny-random", None)
    store, index = bench.make_store(tmp_path, base, 12, 2, TARGETS, 3, 3)
    assert sorted(index) == [bench.user_id(i) for i in range(12)]
    shapes = {
        f"base_model.model.{name}": (k, n) for name, k, n in bench.lora_shapes(bench.model_config(base), TARGETS)
    }
    seen = set()
    for user, (rev, sha) in index.items():
        folder = store / "users" / user / "revisions" / rev
        weights = (folder / "adapter_model.safetensors").read_bytes()
        assert hashlib.sha256(weights).hexdigest() == sha
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 2
        tensors = load_file(folder / "adapter_model.safetensors")
        assert len(tensors) == 2 * len(shapes)
        for module, (k, n) in shapes.items():
            a, b = tensors[f"{module}.lora_A.weight"], tensors[f"{module}.lora_B.weight"]
            assert a.shape == (2, k) and b.shape == (n, 2) and str(a.dtype) == "torch.bfloat16"
            assert bool(a.isfinite().all()) and float(a.float().abs().sum()) > 0
        seen.add(sha)
    assert len(seen) == 12  # one adapter per user, each different
    again = bench.make_store(tmp_path, base, 12, 2, TARGETS, 3, 3)
    assert again == (store, index)
