"""bench/retrain_throughput.py on the CPU at tiny sizes: a wave through train, write, batched gate and rules, both
loss paths, both baselines, the table and the JSON, in seconds."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.unit.bench import load_bench as load_shared


def load_bench() -> ModuleType:
    return load_shared("retrain_throughput")


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_tiny_wave_runs_every_part(tmp_path: Path, threads: None) -> None:
    bench = load_bench()
    argv = ["--model", "tiny", "--k", "3", "--baseline-users", "1", "--device", "cpu", "--set", "max_steps=4"]
    report = bench.main([*argv, "--out", str(tmp_path)])
    data = json.loads((tmp_path / "retrain_throughput-tiny.json").read_text())
    assert data["waves"] == json.loads(json.dumps(report["waves"]))
    assert [w["fused"] for w in data["waves"]] == [
        "on (loss chunked, LoRA branch base)",
        "off (loss off, LoRA branch fp32)",
    ]
    on, off = data["waves"]
    for w in (on, off):
        s = w["seconds"]
        assert w["users"] == 3 and w["steps_max"] == 4 and w["tokens"] > 0
        assert s["total"] == pytest.approx(s["data"] + s["train"] + s["gate"] + s["decide"])
        assert 0 < s["train_loop"] < s["train"] and s["gate"] > 0
        assert w["retrains_per_gpu_hour"] == pytest.approx(3 * 3600 / s["total"])
        assert 0 <= w["promoted"] <= 3 and w["gain_vs_current"] is not None and w["gain_vs_base"] is not None
    # The same users, data and steps: the chunked loss trains what the unfused one trains.
    assert on["tokens"] == off["tokens"]
    assert on["gain_vs_current"] == pytest.approx(off["gain_vs_current"], abs=1e-4)
    for key in ("plain_peft", "sequential"):
        assert data[key]["users"] == 1 and data[key]["retrains_per_gpu_hour"] > 0 and data[key]["tokens_per_s"] > 0
    md = (tmp_path / "retrain_throughput-tiny.md").read_text()
    assert md.count("| batched wave | 3 |") == 2 and "warm plain-peft loop" in md and "project sequential" in md
