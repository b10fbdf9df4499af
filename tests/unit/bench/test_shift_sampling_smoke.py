"""bench/shift_sampling.py on the tiny random model: a row per user and round, and a sample as large as the round
gives the same new_shift as every event."""

from __future__ import annotations

import math

from tests.unit.bench import load_bench


def test_smoke_run_gives_a_row_per_round_and_equal_values_without_sampling():
    bench = load_bench("shift_sampling")
    argv = ["--model", "tiny-random", "--users", "1", "--events", "60"]
    sampled = bench.main([*argv, "--limit", "8"])
    assert [r["scenario"] for r in sampled] == list(bench.SCENARIOS)
    assert all(math.isfinite(r["all"]) and math.isfinite(r["sampled"]) and r["events"] > 8 for r in sampled)
    whole = bench.main([*argv, "--limit", "1000"])
    assert all(r["all"] == r["sampled"] for r in whole)
    assert any(r["all"] != r["sampled"] for r in sampled)
