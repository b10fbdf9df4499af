"""The fault benchmark's short version (`bench/faults.py --quick`) as a test: 2,000+ events through the ingest API
while the buffer consumer is SIGKILLed, the broker is SIGKILLed and restarted, PostgreSQL is restarted, S3 is stopped
during a promotion and a training worker is SIGKILLed mid-training; nothing acknowledged is lost or duplicated, and
the pipeline flows again within 30 s of each dependency's return, by its processes' own code.

It runs a stack of its own (every service embedded, on free ports, data in a temporary folder), not the shared test
stack, so it needs no lock; it takes about four minutes on two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ROOT
from tests.integration.helpers import free_port_block

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

#: weed mini takes a block of 10 ports from the S3 port; then Kafka, PostgreSQL, Redis and the ingest API.
PORTS = 14


def test_no_acknowledged_event_is_lost_or_duplicated_and_every_fault_heals_in_30_s(tmp_path: Path) -> None:
    base = free_port_block(PORTS)
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "faults.py"),
        "--quick",
        "--data-dir",
        str(tmp_path / "stack"),
        "--json",
        str(tmp_path / "faults_quick.json"),
        "--s3-port",
        str(base),
        "--kafka-port",
        str(base + 10),
        "--pg-port",
        str(base + 11),
        "--redis-port",
        str(base + 12),
        "--ingest-port",
        str(base + 13),
        # A killed worker's task comes back after the visibility timeout (live workers keep theirs fresh).
        "--env",
        "PERSONA_WORKER_VISIBILITY_TIMEOUT_S=15",
    ]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1100)
    print(run.stdout[-20000:], run.stderr[-5000:])  # shown by pytest when the test fails
    results = tmp_path / "faults_quick.json"
    assert results.exists(), f"the benchmark did not finish (exit {run.returncode})"
    result = json.loads(results.read_text())

    assert result["acked"] >= 2000
    assert result["lost"] == 0, [(p["label"], p["lost"]) for p in result["phases"] if p["lost"]]
    assert result["duplicated_rows"] == 0
    assert all(v == 0 for v in result["counter_drift"].values()), result["counter_drift"]
    assert result["dlq"] == {}, result["dlq"]
    faults = [p for p in result["phases"] if p["key"] not in ("calm", "after")]
    assert [p["key"] for p in faults] == ["a1", "b", "c", "d", "e"]
    for p in faults:
        assert p["recovery_s"] is not None and p["recovery_s"] <= 30, (p["label"], p["recovery_s"], p["notes"])
        assert not any("by the harness" in n or "not injected" in n for n in p["notes"]), (p["label"], p["notes"])
    assert run.returncode == 0
