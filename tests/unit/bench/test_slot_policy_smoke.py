"""bench/slot_policy.py at a small size: the real AdapterCache through a Zipf trace, both policies, the oracle."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from pipeline.config import ROOT


def test_a_small_trace_runs_both_policies(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_slot_policy", ROOT / "bench" / "slot_policy.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "slot_policy.json"
    argv = ["--adapters", "300", "--slots", "32,400", "--requests", "3000", "--in-flight", "8", "--out", str(out)]
    report = bench.main(argv)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    (row,) = report["rows"]  # 400 slots >= 300 adapters: skipped
    lru, seg = row["lru"], row["segmented"]
    assert lru["slot_hits"] + lru["slot_loads"] == seg["slot_hits"] + seg["slot_loads"] == 3000
    assert 0 < lru["hit_ratio"] <= seg["hit_ratio"] <= row["oracle_hit_ratio"] < 1
