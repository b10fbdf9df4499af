"""Keys and tenancy on a real serving worker: every /v1 request needs an application key with the ``serve`` scope,
and a key reaches the base and its own application's users only; another application's user reads exactly like a
user that does not exist. Keys are issued and revoked in the real registry (PostgreSQL)."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client import REGISTRY

from pipeline.domain.revisions import new_revision_id
from pipeline.models.base import TINY_RANDOM_ID
from pipeline.serving.api import uvicorn_servers
from pipeline.serving.server import Server
from pipeline.storage import apps
from tests.integration.helpers import free_port
from tests.integration.serving.conftest import OTHER_APP, issue_key, running_world, serving_settings, tiny_base

pytestmark = pytest.mark.integration

TTL_S = 2.0
COMPLETION = {"model": TINY_RANDOM_ID, "prompt": "Hello", "max_tokens": 2}


@pytest.fixture(scope="module")
def world(services, stores, tmp_path_factory):
    """A reference-engine worker whose key cache forgets after TTL_S (so a revocation shows quickly)."""
    with running_world(services, stores, tmp_path_factory.mktemp("auth"), key_cache_ttl_s=TTL_S) as w:
        yield w


@pytest.fixture(scope="module")
def other(world):
    """A user of another application, with a promoted revision."""
    return world.served_user("other", 50, app=OTHER_APP)


def key_lookups(source: str) -> float:
    return REGISTRY.get_sample_value("persona_serving_key_lookups_total", {"source": source}) or 0.0


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/completions", COMPLETION),
        ("POST", "/v1/chat/completions", {"model": TINY_RANDOM_ID, "messages": [{"role": "user", "content": "x"}]}),
        ("POST", "/v1/score", {"model": TINY_RANDOM_ID, "text": "Hello there"}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/nothing-here", None),
    ],
)
@pytest.mark.parametrize(
    "authorization",
    [None, "", "Bearer", "Basic dXNlcjpwYXNz", "Bearer sk-not-ours", "Bearer pk_000000000000_" + "A" * 43],
)
def test_no_or_an_invalid_key_is_401_with_www_authenticate(world, method, path, body, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    r = httpx.request(method, f"{world.url}{path}", json=body, headers=headers, timeout=30)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer" and r.headers["x-persona-worker"]
    error = r.json()["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error" and error["message"]


def test_a_key_without_the_serve_scope_is_403(world, stores):
    _, ingest_only = issue_key(stores, scopes=("ingest",))
    _, admin_only = issue_key(stores, scopes=("admin",))
    _, operator = issue_key(stores, app=None, scopes=("admin",))
    for key in (ingest_only, admin_only, operator):
        r = world.client(key).post("/v1/completions", json=COMPLETION)
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", r.text
        assert "serve" in r.json()["error"]["message"]


def test_a_revoked_key_is_refused_within_the_cache_ttl_and_lookups_are_cached(world, stores):
    key_id, key = issue_key(stores)
    client = world.client(key)
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200
    cached_at = time.monotonic()
    before = key_lookups("database")
    for _ in range(5):
        assert client.post("/v1/completions", json=COMPLETION).status_code == 200
    assert key_lookups("database") == before  # no database round trip per request
    with stores.db.connection() as conn:
        apps.revoke_key(conn, key_id)
    still = client.post("/v1/completions", json=COMPLETION)
    if time.monotonic() - cached_at < TTL_S * 0.9:  # the documented window: a revocation takes up to the TTL
        assert still.status_code == 200
    time.sleep(TTL_S + 0.2)
    r = client.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_an_expired_key_is_refused_at_its_expiry_even_while_cached(world, stores):
    _, key = issue_key(stores, expires_at=datetime.now(UTC) + timedelta(seconds=3))
    client = world.client(key)
    assert client.post("/v1/completions", json=COMPLETION).status_code == 200
    time.sleep(3.2)
    assert client.post("/v1/completions", json=COMPLETION).status_code == 401


def test_a_concurrent_burst_of_one_new_key_is_served(world, stores):
    _, key = issue_key(stores)
    codes: list[int] = []

    def call() -> None:
        codes.append(httpx.get(f"{world.url}/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code)

    threads = [threading.Thread(target=call) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert codes == [200] * 16


def comparable(r: httpx.Response, model: str) -> tuple:
    """What a client can see of an error, with the model string it sent itself taken out."""
    body = r.text.replace(model, "<MODEL>")
    return r.status_code, body, r.headers["content-type"], sorted(set(r.headers) - {"content-length", "date"})


def test_another_applications_user_answers_exactly_like_an_unknown_one(world, other):
    other_user, other_rev = other
    own_user, own_rev = world.served_user("own", 51)
    unknown_rev = new_revision_id()
    cases = {
        # model a key may not use -> a model that does not exist, with the same shape
        f"user:{other_user}": "user:nobody-" + uuid.uuid4().hex[:6],
        f"user:{other_user}@{other_rev.revision_id}": f"user:nobody-{uuid.uuid4().hex[:6]}@{unknown_rev}",
        f"user:nobody-{uuid.uuid4().hex[:6]}@{own_rev.revision_id}": f"user:nobody-x@{unknown_rev}",  # existing REV
        f"user:{own_user}@{other_rev.revision_id}": f"user:{own_user}@{unknown_rev}",  # another user's revision
    }
    for path, extra in [("/v1/completions", {"prompt": "x"}), ("/v1/score", {"text": "Hello there"})]:
        for forbidden, missing in cases.items():
            a = world.post(path, json={"model": forbidden, **extra})
            b = world.post(path, json={"model": missing, **extra})
            assert a.status_code == 404 and a.json()["error"]["code"] == "model_not_found", a.text
            assert comparable(a, forbidden) == comparable(b, missing)
    streamed = world.post("/v1/completions", json={"model": f"user:{other_user}", "prompt": "x", "stream": True})
    assert streamed.status_code == 404 and streamed.headers["content-type"] == "application/json"
    chat = world.post("/v1/chat/completions", json={"model": f"user:{other_user}", "messages": [{"role": "user",
                      "content": "x"}]})  # fmt: skip
    assert chat.status_code == 404
    # The owner's key serves it.
    _, owners_key = issue_key(world.stores, app=OTHER_APP)
    r = world.client(owners_key).post("/v1/completions", json={"model": f"user:{other_user}", "prompt": "x"})
    assert r.status_code == 200 and r.headers["x-persona-revision"] == other_rev.revision_id


def test_models_lists_the_base_and_the_keys_own_users_only_bounded(services, stores, tmp_path):
    app = f"models-{uuid.uuid4().hex[:6]}"
    with running_world(services, stores, tmp_path, models_list_limit=3) as w:
        users = sorted(w.served_user(f"m{i}", 60 + i, app=app)[0] for i in range(4))
        w.new_revision(f"unpromoted-{uuid.uuid4().hex[:6]}", 70, app=app)  # a candidate only: not listed
        w.served_user("elsewhere", 71, app=OTHER_APP)
        _, key = issue_key(stores, app=app)
        listed = w.client(key).get("/v1/models").json()
        ids = [m["id"] for m in listed["data"]]
        assert listed["object"] == "list" and ids == [TINY_RANDOM_ID] + [f"user:{u}" for u in users[:3]]
        assert all(m["object"] == "model" and isinstance(m["created"], int) for m in listed["data"])
        assert {m["owned_by"] for m in listed["data"][1:]} == {app}


def test_the_official_openai_client_with_a_key(world, stores):
    from openai import AuthenticationError, NotFoundError, OpenAI, PermissionDeniedError

    user, _ = world.served_user("oai-auth", 52)
    client = OpenAI(base_url=f"{world.url}/v1", api_key=world.key, max_retries=0)
    assert TINY_RANDOM_ID in [m.id for m in client.models.list()]
    done = client.completions.create(model=f"user:{user}", prompt="Status:", max_tokens=3)
    assert done.usage.completion_tokens >= 1
    chat = {"model": f"user:{user}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    full = client.chat.completions.create(**chat)
    stream = client.chat.completions.create(**chat, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == full.choices[0].message.content
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{world.url}/v1", api_key="wrong", max_retries=0).models.list()
    _, ingest_only = issue_key(stores, scopes=("ingest",))
    with pytest.raises(PermissionDeniedError):
        OpenAI(base_url=f"{world.url}/v1", api_key=ingest_only, max_retries=0).models.list()
    _, foreign = issue_key(stores, app=OTHER_APP)
    with pytest.raises(NotFoundError):
        OpenAI(base_url=f"{world.url}/v1", api_key=foreign, max_retries=0).completions.create(
            model=f"user:{user}", prompt="x", max_tokens=1
        )


def test_health_and_metrics_need_no_key(world):
    assert httpx.get(f"{world.url}/healthz").json()["status"] == "ok"
    assert "persona_serving_requests_total" in httpx.get(f"{world.url}/metrics").text
    assert httpx.get(f"{world.url}/docs").status_code == 401  # nothing else is open


def test_a_separate_admin_listener_serves_health_and_metrics(services, stores, tmp_path):
    admin_port = free_port()
    settings = serving_settings(services, services.kafka, tmp_path, port=free_port(), admin_port=admin_port)
    server = Server(settings, tiny_base())
    api, admin = uvicorn_servers(server)
    assert admin is not None
    assert api.config.access_log is False  # PERSONA_SERVE_ACCESS_LOG: off unless asked for
    threads = [threading.Thread(target=s.run, daemon=True) for s in (api, admin)]
    for t in threads:
        t.start()
    try:
        while not (api.started and admin.started):
            time.sleep(0.05)
        cfg = settings.serving
        api_url, admin_url = f"http://{cfg.host}:{cfg.port}", f"http://{cfg.admin_host}:{admin_port}"
        assert httpx.get(f"{admin_url}/metrics").status_code == 200
        assert "persona_serving_requests_total" in httpx.get(f"{admin_url}/metrics").text
        assert httpx.get(f"{admin_url}/healthz").json()["status"] == "ok"
        assert httpx.get(f"{admin_url}/v1/models").status_code == 404  # the API is not on the admin listener
        assert httpx.get(f"{api_url}/healthz").json()["status"] == "ok"  # health stays on the API port too
        assert httpx.get(f"{api_url}/metrics").status_code == 401  # metrics left the API port: not open there
        _, key = issue_key(stores)
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{api_url}/metrics", headers=auth).status_code == 404
        assert httpx.post(f"{api_url}/v1/completions", json=COMPLETION, headers=auth, timeout=60).status_code == 200
    finally:
        for s in (api, admin):
            s.should_exit = True
        for t in threads:
            t.join(timeout=10)
        server.close()
