"""A serving worker's HTTP API in processes of its own (`pipeline.serving.frontends`): every API test also runs
through two of them (the ``world`` fixture); here, what is theirs alone: a killed HTTP process loses its streams'
generations cleanly (adapters released) and is restarted, one stopped on purpose is not, and the worker stops when
none is left."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest

from pipeline.serving.api import create_app
from pipeline.serving.hub import FrontendHub
from tests.integration.helpers import free_port
from tests.integration.serving.conftest import OTHER_APP, issue_key, running_world

pytestmark = pytest.mark.integration


def _wait(cond, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def http_world(services, stores, tmp_path_factory):
    port = free_port()
    with running_world(
        services,
        stores,
        tmp_path_factory.mktemp("http-processes"),
        engine="fast",
        http_processes=2,
        port=port,
        host="127.0.0.1",
        max_tokens=256,
    ) as w:
        yield w


def _hub(world) -> FrontendHub:
    assert world.hub is not None
    return world.hub


def _holders(world, key) -> int:
    cache = world.server.cache
    with cache._lock:
        return cache._refs.get(key, 0)


def test_a_killed_http_process_releases_its_adapters_and_is_restarted(http_world):
    world = http_world
    hub = _hub(world)
    u, rev = world.served_user("kill", 5)
    key = world.server.resolve(f"user:{u}", world.server.keys.principal(world.key)).key
    body = {"model": f"user:{u}", "prompt": "Hello there", "max_tokens": 256, "stream": True}
    # Streams in flight on both processes (connections spread over them), each holding the user's adapter.
    clients = [httpx.Client(base_url=world.url, headers=world.auth, timeout=60) for _ in range(6)]
    started = threading.Barrier(len(clients) + 1)
    errors: list[BaseException] = []

    def stream(c: httpx.Client) -> None:
        try:
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                next(lines)
                started.wait(30)
                for _ in lines:
                    pass
        except BaseException as e:  # the killed process's streams end with a connection error
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    started.wait(30)
    victim = hub.links[0]
    old_pid = victim.process.pid
    assert _holders(world, key) == len(clients)  # every stream holds the adapter
    os.kill(old_pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    # Every stream ended (the survivors' ran to their end, the victim's were cut), and nothing holds the adapter.
    _wait(lambda: _holders(world, key) == 0, what="the adapter's release")
    _wait(lambda: hub.restarts == 1 and hub.links[0].ready.is_set() and not hub.links[0].gone, what="the restart")
    assert hub.links[0].process.pid != old_pid
    # Both processes serve again (a few requests land on each).
    for _ in range(8):
        r = world.post("/v1/completions", json={"model": f"user:{u}", "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.headers["x-persona-revision"] == rev.revision_id


def test_another_applications_user_is_a_404_and_key_lookups_reach_the_workers_metrics(http_world, stores):
    """Keys and resolution run in the HTTP processes: a key of APP reaches neither OTHER_APP's users (the same 404 as
    a model that does not exist) nor anything with a key of no application's; their key lookups (each process's key
    cache) are counted in the worker's metrics, which ``/metrics`` on the API port shows."""
    from prometheus_client.parser import text_string_to_metric_families

    world = http_world
    other, _ = world.served_user("other", 51, app=OTHER_APP)
    _, fresh = issue_key(stores)  # never seen by any HTTP process

    def lookups() -> float:
        text = httpx.get(f"{world.url}/metrics", timeout=30).text
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "persona_serving_key_lookups_total" and s.labels.get("source") == "database"
        )

    before = lookups()
    body = {"model": f"user:{other}", "prompt": "Hi", "max_tokens": 2}
    r = httpx.post(f"{world.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {fresh}"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    missing = world.post("/v1/completions", json={**body, "model": "user:nobody-at-all"})
    assert (
        missing.status_code == 404
        and missing.json()["error"]["message"].replace("nobody-at-all", other) == (r.json()["error"]["message"])
    )
    _wait(lambda: lookups() >= before + 1, what="the key lookup in the worker's metrics")


def test_a_process_stopped_on_purpose_is_not_restarted_and_the_last_stops_the_hub(services, stores, tmp_path):
    port = free_port()
    with running_world(
        services, stores, tmp_path, engine="reference", http_processes=2, port=port, host="127.0.0.1"
    ) as world:
        hub = _hub(world)
        assert world.get("/healthz").status_code == 200
        first, second = hub.links
        os.kill(first.process.pid, signal.SIGTERM)  # uvicorn's graceful shutdown: exit code 0
        _wait(lambda: first.gone, what="the first process to go")
        time.sleep(1.5)
        assert hub.restarts == 0 and not hub.stopped.is_set()
        assert world.get("/healthz").status_code == 200  # the other one serves alone
        os.kill(second.process.pid, signal.SIGTERM)
        _wait(hub.stopped.is_set, what="the hub to stop")
        assert hub.restarts == 0


class _Broken:
    """An HTTP process's side that cannot start."""

    def __init__(self, *_: object) -> None:
        raise RuntimeError("no registry for this process")


def test_an_http_process_that_cannot_start_fails_the_start_at_once(services, stores, tmp_path):
    from pipeline.serving.server import Server
    from tests.integration.helpers import fresh_topics
    from tests.integration.serving.conftest import serving_settings, tiny_base

    settings = serving_settings(
        services, fresh_topics(services.kafka), tmp_path, engine="reference", http_processes=2, port=free_port()
    )
    server = Server(settings, tiny_base())
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="did not start: RuntimeError: no registry for this process"):
            FrontendHub(server, 2, create_app, frontend=_Broken)  # type: ignore[arg-type]
        assert time.monotonic() - t0 < 60
    finally:
        server.close()
