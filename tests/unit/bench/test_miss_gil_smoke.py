"""bench/miss_gil.py at a small size: store misses (on the request thread, then through 2 fill processes) and host
misses through the real AdapterCache and FastEngine."""

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
    store, host, filled = report["rows"]
    assert (store["kind"], host["kind"], filled["kind"]) == ("store (fill 0)", "host", "store (fill 2)")
    assert store["misses"] == host["misses"] == filled["misses"] == 12
    assert store["ms_per_miss"] > 0 and host["ms_per_miss"] > 0 and filled["ms_per_miss"] > 0
    for row in (store, host, filled):
        assert 0 <= row["counter_lost"] <= 1
    assert 0 < store["pack_own_ms"] <= store["pack_ms"]  # the packs ran, through pack_adapter_bytes
    text = (tmp_path / "miss_gil.md").read_text()
    assert "| store (fill 0) | 12 |" in text and "| store (fill 2) | 12 |" in text
