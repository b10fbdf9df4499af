"""A serving pool: two real serving workers behind a real nginx with consistent hashing on the user."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections import defaultdict

import httpx
import pytest
import uvicorn

from pipeline.config import ModelSettings, ServingSettings, Settings
from pipeline.models.base import TINY_RANDOM_ID, LoadedBase, ref, tiny_random, tiny_tokenizer
from pipeline.serving.api import Server, create_app
from pipeline.serving.router import nginx_config
from tests.integration.helpers import free_port
from tests.integration.serving.conftest import issue_key

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (.ci/run installs it)"),
]


@pytest.fixture(scope="module")
def key(stores):
    return issue_key(stores)[1]


@pytest.fixture(scope="module")
def pool(services, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router")
    servers, uvs, ports = [], [], []
    for i in range(2):
        settings = Settings(
            services.db,
            services.s3,
            ModelSettings(base=TINY_RANDOM_ID),
            ServingSettings(slots=2, max_rank=8, cache_dir=tmp / f"cache{i}"),
        )
        model = tiny_random()
        server = Server(settings, LoadedBase(model, tiny_tokenizer(), ref(model, TINY_RANDOM_ID)), name=f"w{i}")
        port = free_port()
        uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
        threading.Thread(target=uv.run, daemon=True).start()
        servers.append(server)
        uvs.append(uv)
        ports.append(port)
    while not all(uv.started for uv in uvs):
        time.sleep(0.05)
    listen = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_config([f"127.0.0.1:{p}" for p in ports], listen=f"127.0.0.1:{listen}", run_dir=tmp))
    nginx = subprocess.Popen(["nginx", "-c", str(conf), "-g", "daemon off;"], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{listen}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield url
    nginx.terminate()
    nginx.wait(timeout=10)
    for uv, server in zip(uvs, servers, strict=True):
        uv.should_exit = True
        server.close()


def test_each_user_sticks_to_one_worker_and_users_spread(pool, key):
    body = {"model": TINY_RANDOM_ID, "prompt": "hi", "max_tokens": 1}
    auth = {"Authorization": f"Bearer {key}"}
    seen: dict[str, set[str]] = defaultdict(set)
    users = [f"user-{i:03d}" for i in range(24)]
    for _ in range(3):
        for u in users:
            r = httpx.post(f"{pool}/v1/completions", json=body, headers={"X-Persona-User": u, **auth}, timeout=30)
            assert r.status_code == 200, r.text
            seen[u].add(r.headers["x-persona-worker"])
    assert all(len(w) == 1 for w in seen.values())  # sticky
    assert {next(iter(w)) for w in seen.values()} == {"w0", "w1"}  # spread over the pool
    # The path prefix routes like the header (and passes the key too: that location sets headers of its own).
    for u in users[:6]:
        r = httpx.post(f"{pool}/u/{u}/v1/completions", json=body, headers=auth, timeout=30)
        assert r.status_code == 200 and {r.headers["x-persona-worker"]} == seen[u]


@pytest.mark.parametrize("path", ["/v1/completions", "/u/user-001/v1/completions"])
def test_the_router_passes_the_key_and_the_workers_check_it(pool, key, path):
    body = {"model": TINY_RANDOM_ID, "prompt": "hi", "max_tokens": 1}
    missing = httpx.post(f"{pool}{path}", json=body, timeout=30)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"] == "Bearer" and missing.headers["x-persona-worker"] in ("w0", "w1")
    wrong = httpx.post(f"{pool}{path}", json=body, headers={"Authorization": "Bearer pk_000000000000_" + "x" * 43})
    assert wrong.status_code == 401
    ok = httpx.post(f"{pool}{path}", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert ok.status_code == 200, ok.text


def test_an_oversized_body_gets_the_workers_413_in_the_openai_shape(pool, key):
    big = {"model": TINY_RANDOM_ID, "prompt": "x" * (1 << 20), "max_tokens": 1}  # over the worker's 1 MiB default
    r = httpx.post(f"{pool}/v1/completions", json=big, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
