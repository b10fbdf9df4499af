"""A real Prometheus scrapes a running persona component and answers a persona metric through its HTTP API; it also
loads the alert rules of infra/prometheus/alerts.yml and evaluates them without errors."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import yaml
from prometheus_client import REGISTRY

from pipeline.config import ROOT
from pipeline.demo import sim
from pipeline.storage import apps
from tests.integration.helpers import api_server, free_port, fresh_topics

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def prometheus(tmp_path: Path, targets: dict[str, str]) -> Iterator[str]:
    """Prometheus scraping ``targets`` (job -> host:port) every second, with persona's alert rules; yields its URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed; `make test` installs it (Debian: apt-get install prometheus)")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "infra" / "prometheus" / "alerts.yml")],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": [target]}]} for job, target in targets.items()
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited ({proc.returncode}): {(tmp_path / 'prometheus.log').read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready in 15 s: {(tmp_path / 'prometheus.log').read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _query(url: str, promql: str) -> list[dict]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def _poll(url: str, promql: str, ok, timeout_s: float = 15.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        result = _query(url, promql)
        if ok(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{promql}: {result} after {timeout_s} s")
        time.sleep(0.25)


def test_prometheus_reads_a_persona_metric_from_the_ingest_api(services, tmp_path):
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(services.db.url) as conn:
        _, key = apps.create_key(conn, app_id)
    kafka = fresh_topics(services.kafka)
    user = sim.users(1, prefix=f"obs-{uuid.uuid4().hex[:6]}")[0]
    events = list(sim.events_for(user, 5, app=app_id, seed=3))

    with api_server(services, kafka) as api:
        r = httpx.post(f"{api}/v1/events", json=events, headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert r.status_code == 202 and r.json()["accepted"] == 5, r.text
        # The API runs in this process: its counter is this process's registry (other tests may have added to it).
        expected = REGISTRY.get_sample_value("persona_ingest_events_total", {"result": "accepted"})
        assert expected is not None and expected >= 5

        target = api.removeprefix("http://")
        with prometheus(tmp_path, {"persona-ingest": target}) as prom:
            _poll(prom, 'up{job="persona-ingest"}', lambda res: res and res[0]["value"][1] == "1")
            result = _poll(
                prom,
                'persona_ingest_events_total{job="persona-ingest",result="accepted"}',
                lambda res: res and float(res[0]["value"][1]) == expected,
            )
            assert result[0]["metric"]["instance"] == target
            latency = _query(prom, 'persona_ingest_request_seconds_count{job="persona-ingest"}')
            assert latency and float(latency[0]["value"][1]) >= 1

            # persona's alert rules load and evaluate cleanly against real series.
            def rules_evaluated(_res) -> bool:
                groups = httpx.get(f"{prom}/api/v1/rules", timeout=5).json()["data"]["groups"]
                rules = [rule for g in groups for rule in g["rules"]]
                # A rule never evaluated reports lastEvaluation 0001-01-01T00:00:00Z.
                return bool(rules) and all(not rule["lastEvaluation"].startswith("0001") for rule in rules)

            _poll(prom, "vector(1)", rules_evaluated)
            groups = httpx.get(f"{prom}/api/v1/rules", timeout=5).json()["data"]["groups"]
            assert {g["name"] for g in groups} == {"persona-recording", "persona-alerts"}
            unhealthy = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"] if r["health"] != "ok"]
            assert not unhealthy, unhealthy
            alerts = {r["name"] for g in groups for r in g["rules"] if r["type"] == "alerting"}
            assert {"PersonaDeadLetterRate", "PersonaServingLatencyP99", "PersonaAdapterCacheThrash"} <= alerts
