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

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (.ci/run installs it)"),
]


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


def test_each_user_sticks_to_one_worker_and_users_spread(pool):
    body = {"model": TINY_RANDOM_ID, "prompt": "hi", "max_tokens": 1}
    seen: dict[str, set[str]] = defaultdict(set)
    users = [f"user-{i:03d}" for i in range(24)]
    for _ in range(3):
        for u in users:
            r = httpx.post(f"{pool}/v1/completions", json=body, headers={"X-Persona-User": u}, timeout=30)
            assert r.status_code == 200, r.text
            seen[u].add(r.headers["x-persona-worker"])
    assert all(len(w) == 1 for w in seen.values())  # sticky
    assert {next(iter(w)) for w in seen.values()} == {"w0", "w1"}  # spread over the pool
    # The path prefix routes like the header.
    for u in users[:6]:
        r = httpx.post(f"{pool}/u/{u}/v1/completions", json=body, timeout=30)
        assert r.status_code == 200 and {r.headers["x-persona-worker"]} == seen[u]
