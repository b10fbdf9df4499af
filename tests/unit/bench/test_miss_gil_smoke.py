"""bench/miss_gil.py at a small size: store and host misses through the real AdapterCache and FastEngine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.unit.bench import load_bench


def test_a_few_misses_of_each_kind(tmp_path: Path) -> None:
    bench = load_bench("miss_gil")
    switch = sys.getswitchinterval()
    try:
        report = bench.main(["--shape", "tiny", "--adapters", "12", "--out", str(tmp_path)])
    finally:
        sys.setswitchinterval(switch)
    assert json.loads((tmp_path / "miss_gil.json").read_text()) == json.loads(json.dumps(report))
    store, host = report["rows"]
    assert (store["kind"], host["kind"]) == ("store", "host")
    assert store["misses"] == host["misses"] == 12
    assert store["ms_per_miss"] > 0 and host["ms_per_miss"] > 0
    assert 0 <= store["counter_lost"] <= 1 and 0 <= host["counter_lost"] <= 1
    assert 0 < store["pack_own_ms"] <= store["pack_ms"]  # the packs ran, through pack_adapter_bytes
    assert "| store | 12 |" in (tmp_path / "miss_gil.md").read_text()
