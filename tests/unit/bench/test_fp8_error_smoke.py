"""bench/fp8_error.py on the tiny random model: a row per base, every projection patched, the FP8 rounding moves the
predictions (and nothing stays patched)."""

from __future__ import annotations

import math

import torch

from pipeline.models.base import load_base, weights_sha256
from tests.unit.bench import load_bench


def test_smoke_run_rounds_every_projection_and_moves_the_predictions(tmp_path):
    bench = load_bench("fp8_error")
    base = load_base("tiny-random")  # the process's shared base: the bench must leave it as it was
    sha, dtype = weights_sha256(base.model), next(base.model.parameters()).dtype
    rows = bench.main(["--base", "tiny-random", "--out", str(tmp_path / "fp8.md")])
    assert weights_sha256(base.model) == sha and next(base.model.parameters()).dtype == dtype == torch.float32
    assert not any("forward" in vars(m) for m in base.model.modules())
    assert len(rows) == 2 and all(r["projections"] > 0 for r in rows)
    for r in rows:
        assert all(math.isfinite(v) for key in ("general", "messages") for v in r[key])
        assert r["probe_kl"] > 0 and 0 <= r["probe_top1"] <= 1
    assert (tmp_path / "fp8.md").read_text().count("\n") == 4
