"""bench/quality.py in its smoke mode (tiny random model, CPU): every section is computed and printed, in seconds."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.unit.bench import load_bench as load_shared


def load_bench() -> ModuleType:
    return load_shared("quality")


@pytest.fixture
def threads() -> Iterator[None]:
    before = torch.get_num_threads()  # the smoke mode trains with 1 thread, which is process-wide
    yield
    torch.set_num_threads(before)


def test_smoke_run_prints_every_section(tmp_path: Path, threads: None):
    bench = load_bench()
    out, js = tmp_path / "quality.md", tmp_path / "quality.json"
    argv = ["--model", "tiny-random", "--users", "3", "--rounds", "2", "--events-per-round", "40"]
    argv += ["--set", "max_steps=4", "--seeds", "0,1", "--out", str(out), "--json", str(js)]
    started = time.perf_counter()
    result = bench.main(argv)
    seconds = time.perf_counter() - started

    md = result["markdown"]
    assert out.read_text() == md
    for section in ("## seed 0", "## seed 1", "### rounds", "### cross matrix", "### poison"):
        assert md.count(section) == (1 if section.startswith("## seed") else 2), section
    assert md.count("### plain-peft reference") == 2 and md.count("## summary") == 1
    for needle in (
        "project / best plain",
        "max off-diagonal gain",
        "poison rejected, with rules",
        "overtrained rejected, with rules",
        "general NLL / base",
        "round 2: promoted",
    ):
        assert needle in md, needle
    for scenario in ("| foreign |", "| salad |", "| repeat |"):
        assert md.count(scenario) == 2, scenario
    assert md.count("| overtrained |") == 2 * 3  # every poisoned user, both seeds

    data = json.loads(js.read_text())
    assert [r["seed"] for r in data["results"]] == [0, 1]
    for seed in data["results"]:
        assert [rd["round"] for rd in seed["rounds"]] == [1, 2]
        assert all(len(rd["rows"]) == 3 for rd in seed["rounds"])
        assert all(row["steps"] == 4 for rd in seed["rounds"] for row in rd["rows"])
        assert len(seed["cross"]["gains"]) == 3 and len(seed["poison"]) == 3 + 3  # rotated, then overtrained
        assert set(seed["reference"]["configs"]) == {"r8-qv-1e-3", "r8-all-1e-3", "r1-all-1e-3"}
        styles = [style for _, style in seed["users"]]
        assert len(set(styles)) == 3
    assert seconds < 60, f"the smoke mode took {seconds:.0f} s"


def test_the_retrain_seed_is_the_flows():
    from pipeline.flows.retrain import seed_for

    bench = load_bench()
    for args in ((0, "u", "s0-round1"), (7, "q1-03-content-bullets", "s1-poison-salad")):
        assert bench.seed_for(*args) == seed_for(*args)
