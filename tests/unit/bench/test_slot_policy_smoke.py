"""bench/slot_policy.py at a small size: the real AdapterCache through a Zipf trace, both policies, the oracle."""

from __future__ import annotations

import json
from pathlib import Path

from tests.unit.bench import load_bench


def test_a_small_trace_runs_both_policies(tmp_path: Path) -> None:
    bench = load_bench("slot_policy")
    out = tmp_path / "slot_policy.json"
    argv = ["--adapters", "300", "--slots", "32,400", "--requests", "3000", "--in-flight", "8", "--out", str(out)]
    report = bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (row,) = report["rows"]  # 400 slots >= 300 adapters: skipped
    lru, seg = row["lru"], row["segmented"]
    assert lru["slot_hits"] + lru["slot_loads"] == seg["slot_hits"] + seg["slot_loads"] == 3000
    assert 0 < lru["hit_ratio"] <= seg["hit_ratio"] <= row["oracle_hit_ratio"] < 1
