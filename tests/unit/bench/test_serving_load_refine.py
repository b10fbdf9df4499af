"""bench/serving_load.py's search after the measured points: `refine` bisects between the highest rate that kept up
and the lowest that did not, and `sustained` reports the best kept-up point below the lowest that did not (not a
point that had already tipped over, whatever its tokens/s)."""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

from tests.unit.bench import load_bench


def _point(rate: float, capacity: float, role: str) -> dict:
    """A synthetic measured point of a worker that keeps up below ``capacity`` req/s and falls behind above it
    (where its window still shows more tokens/s: the backlog keeps the batch full)."""
    kept = rate < capacity
    achieved = rate if kept else 0.8 * rate
    return {
        "role": role,
        "offered_rps": rate,
        "offered_rps_actual": rate,
        "achieved_rps": achieved,
        "ttft_p99_ms": 50.0 if kept else 4000.0,
        "error_fraction": 0.0,
        "out_tokens_per_s": 80.0 * achieved + (5000.0 if not kept else 0.0),
    }


def _series(bench, capacity: float, rates: list[float]) -> tuple[dict, object]:
    series = {"points": [], "saturation": {"first_ttft_p99_ms": 20.0}}
    args = argparse.Namespace(refine=3, refine_within=0.06, duration=1.0, warmup=0.0)
    ctx = SimpleNamespace(args=args, deadline=time.monotonic() + 3600)

    def run(rate: float, duration: float, role: str) -> dict:
        p = _point(rate, capacity, role)
        series["points"].append(p)
        return p

    for r in rates:
        run(r, 1.0, "measure")
    return series, (ctx, run)


def test_refine_brackets_the_capacity_and_sustained_is_the_best_point_that_kept_up() -> None:
    bench = load_bench("serving_load")
    series, (ctx, run) = _series(bench, 337.0, [141.0, 234.0, 328.0, 422.0, 469.0])
    before = bench.sustained(series)
    assert before["offered_rps"] == 328.0 and before["bracket_rps"] == [328.0, 422.0]
    bench.refine(ctx, series, run)
    refined = [p["offered_rps"] for p in series["points"] if p["role"] == "refine"]
    assert 1 <= len(refined) <= 3
    high, low = bench._bracket(series)
    assert high["offered_rps"] < 337.0 <= low["offered_rps"]
    assert low["offered_rps"] <= high["offered_rps"] * 1.06 or len(refined) == 3
    held = bench.sustained(series)
    assert held["offered_rps"] == high["offered_rps"]  # not the tipped points' higher tokens/s
    assert held["out_tokens_per_s"] < max(p["out_tokens_per_s"] for p in series["points"])


def test_refine_does_nothing_without_a_bracket_or_without_time() -> None:
    bench = load_bench("serving_load")
    series, (ctx, run) = _series(bench, 1000.0, [100.0, 200.0])  # never tipped: no upper bound to bisect to
    bench.refine(ctx, series, run)
    assert [p["role"] for p in series["points"]] == ["measure", "measure"]
    assert bench.sustained(series)["bracket_rps"] == [200.0, None]
    series, (ctx, run) = _series(bench, 150.0, [100.0, 200.0])
    ctx.deadline = time.monotonic()  # no time left for a point
    bench.refine(ctx, series, run)
    assert series["refine_skipped"] == "time budget" and len(series["points"]) == 2


def test_the_latency_bar_comes_from_the_quietest_probe_not_a_first_one_that_hiccuped() -> None:
    """A cold worker's first probe can show a TTFT p99 of ~1 s at a low rate (2026-11-30h call 5: 956 ms at 64 req/s):
    10x that let a later point at 3.5 s count as keeping up. The bar is 10x the lowest p99 of the probes so far."""
    bench = load_bench("serving_load")
    p99s = {64.0: 956.0, 128.0: 25.0, 256.0: 119.0, 512.0: 3531.0}
    args = argparse.Namespace(start_rate=64.0, probe_duration=1.0, warmup=0.0, max_rate=1e9)
    ctx = SimpleNamespace(args=args, deadline=time.monotonic() + 3600)

    def run(rate: float, duration: float, role: str) -> dict:
        return {
            "role": role, "offered_rps": rate, "offered_rps_actual": rate, "achieved_rps": rate,
            "ttft_p99_ms": p99s[rate], "error_fraction": 0.0, "out_tokens_per_s": 80.0 * rate,
        }  # fmt: skip

    sat, probes = bench.saturation(ctx, run)
    assert [p["offered_rps"] for p in probes] == [64.0, 128.0, 256.0, 512.0]
    assert sat["first_ttft_p99_ms"] == 25.0
    assert "TTFT p99 3531 ms > max(1 s, 10x the quietest probe's)" in sat["stopped_because"]
    assert bench.saturated(probes[-1], sat["first_ttft_p99_ms"])
