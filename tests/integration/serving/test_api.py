"""The serving worker's OpenAI-compatible API on a real socket, with the registry on real PostgreSQL and S3, the
promotions topic on real Kafka, and the tiny model."""

from __future__ import annotations

import io
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import orjson
import pytest
import torch
from peft import PeftModel

from pipeline.config import ServingSettings, Settings
from pipeline.flows import promotion
from pipeline.flows.export import export
from pipeline.models.base import TINY_RANDOM_ID, tiny_random, tiny_tokenizer
from pipeline.serving.admission import Admission
from pipeline.serving.api import create_app
from pipeline.serving.server import Server
from pipeline.storage.objects import revision_prefix
from tests.integration.helpers import free_port
from tests.integration.serving.conftest import on_socket, tiny_base

pytestmark = pytest.mark.integration


def test_a_users_adapter_serves_with_its_revision_named(world):
    u, rev = world.served_user("srv", 1)
    body = {"model": f"user:{u}", "prompt": "Hello there", "max_tokens": 8}
    r = world.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-persona-revision"] == rev.revision_id
    out = r.json()
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] >= 1
    base = world.post("/v1/completions", json={**body, "model": TINY_RANDOM_ID})
    assert base.status_code == 200 and base.headers["x-persona-revision"] == "base"
    named = world.post("/v1/completions", json={**body, "model": f"user:{u}@{rev.revision_id}"})
    assert named.headers["x-persona-revision"] == rev.revision_id and named.json()["choices"] == out["choices"]


def test_score_equals_stock_peft_with_the_users_adapter(world):
    u, _ = world.served_user("score", 2, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    text = "Dear colleagues, our results suggest"
    r = world.post("/v1/score", json={"model": f"user:{u}", "text": text})
    assert r.status_code == 200, r.text
    served = r.json()["token_logprobs"]
    exported = world.tmp / f"export-{u}"
    export(world.stores, u, exported)
    peft_model = PeftModel.from_pretrained(tiny_random(), exported).eval()
    ids = tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(peft_model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert served == pytest.approx(expected, abs=1e-4)


def test_chat_streams_server_sent_events(world):
    u, rev = world.served_user("chat", 3)
    body = {"model": f"user:{u}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    with world.client().stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["x-persona-revision"] == rev.revision_id
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(line[6:]) for line in lines[:-1]]
    assert 1 <= len(chunks) <= 6 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    full = world.post("/v1/chat/completions", json={**body, "stream": False}).json()
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == full["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "user:nobody-here", "prompt": "x"}, 404, "model_not_found"),
        ({"model": "gpt-4", "prompt": "x"}, 400, "invalid_model"),
        ({"model": TINY_RANDOM_ID, "prompt": "x", "max_tokens": 0}, 400, "invalid_request"),
        ({"model": TINY_RANDOM_ID, "prompt": "x", "temperature": -1}, 400, "invalid_request"),
        ({"model": TINY_RANDOM_ID}, 400, "invalid_request"),
    ],
)
def test_bad_requests_get_openai_style_errors(world, body, status, code):
    r = world.post("/v1/completions", json=body)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text


def test_the_next_request_after_a_promotion_serves_the_new_revision(world):
    u, first = world.served_user("promo", 4)
    body = {"model": f"user:{u}", "prompt": "Status:", "max_tokens": 4}
    assert world.post("/v1/completions", json=body).headers["x-persona-revision"] == first.revision_id
    second = world.new_revision(u, 5, parent=first.revision_id)
    world.promote(u, second.revision_id)  # announced: the worker hears it
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = world.post("/v1/completions", json=body)
        if r.headers["x-persona-revision"] == second.revision_id:
            break
        time.sleep(0.3)
    assert r.headers["x-persona-revision"] == second.revision_id

    def first_gone() -> bool:  # the listener heard the promotion and dropped the old revision
        return all(k is None or k.revision_id != first.revision_id for k in world.server.cache.stats().slots)

    deadline = time.monotonic() + 20
    while not first_gone() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first_gone()


def test_a_forgotten_user_leaves_every_cache_tier(world):
    """`persona forget` announces forget.v1; every serving worker drops the user's adapters from device slots and
    host memory and deletes the disk copies; the next request is a 404."""
    u, rev = world.served_user("forget", 9)
    body = {"model": f"user:{u}", "prompt": "Hello", "max_tokens": 2}
    assert world.post("/v1/completions", json=body).status_code == 200
    disk_copy = world.settings.serving.cache_dir / rev.sha256
    assert disk_copy.exists()
    report = promotion.forget(world.stores, world.announcer, u)
    assert report.sha256s == [rev.sha256] and report.announced

    def cached() -> bool:
        stats = world.server.cache.stats()
        return disk_copy.exists() or any(k is not None and k.user_id == u for k in stats.slots)

    deadline = time.monotonic() + 20
    while cached() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not cached()
    r = world.post("/v1/completions", json=body)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_models_health_and_metrics(world):
    assert httpx.get(f"{world.url}/healthz").json()["status"] == "ok"  # no key needed
    ids = [m["id"] for m in world.get("/v1/models").json()["data"]]
    assert TINY_RANDOM_ID in ids
    assert "persona_adapter_cache_hits_total" in httpx.get(f"{world.url}/metrics").text  # no key needed


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text`` (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_request_and_token_metrics_count_what_was_served(world):
    url = world.url
    before = httpx.get(f"{url}/metrics").text
    body = {"model": TINY_RANDOM_ID, "prompt": "Hello there", "max_tokens": 3, "stream": True}
    with world.client().stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        list(r.iter_lines())
    bad = world.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert bad.status_code == 400
    after = httpx.get(f"{url}/metrics").text
    endpoint = "/v1/completions"
    assert _sample(after, "persona_serving_requests_total", endpoint=endpoint, status="200") == (
        _sample(before, "persona_serving_requests_total", endpoint=endpoint, status="200") + 1
    )
    assert _sample(after, "persona_serving_requests_total", endpoint=endpoint, status="400") == (
        _sample(before, "persona_serving_requests_total", endpoint=endpoint, status="400") + 1
    )
    assert _sample(after, "persona_serving_request_seconds_count", endpoint=endpoint) == (
        _sample(before, "persona_serving_request_seconds_count", endpoint=endpoint) + 2
    )
    completion = _sample(after, "persona_serving_tokens_total", kind="completion") - _sample(
        before, "persona_serving_tokens_total", kind="completion"
    )
    assert 1 <= completion <= 3


def test_the_official_openai_client_completes_chats_and_streams(world):
    from openai import NotFoundError, OpenAI

    u, rev = world.served_user("oai", 6)
    client = OpenAI(base_url=f"{world.url}/v1", api_key=world.key, max_retries=0)
    done = client.completions.create(model=f"user:{u}", prompt="Status:", max_tokens=5)
    assert done.object == "text_completion" and done.usage.completion_tokens >= 1
    chat = client.chat.completions.create(
        model=f"user:{u}", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    raw = client.chat.completions.with_raw_response.create(
        model=f"user:{u}", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-persona-revision"] == rev.revision_id
    stream = client.chat.completions.create(
        model=f"user:{u}", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0, stream=True
    )
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == chat.choices[0].message.content
    with pytest.raises(NotFoundError):
        client.completions.create(model="user:nobody-at-all", prompt="x", max_tokens=1)


def assert_openai_error(r: httpx.Response, status: int, code: str, *, retry_after: bool) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and set(error) >= {"message", "type", "param", "code"}, error
    assert error["type"] == ("invalid_request_error" if status < 500 else "server_error")
    assert ("retry-after" in r.headers) is retry_after


def test_full_slots_and_a_corrupt_object_get_429_and_503_with_an_openai_body(world):
    """Every device slot holding an adapter in use -> 429 slots_exhausted with Retry-After (and the request after
    the slots free up is served); stored bytes that fail their sha256 check -> 503 adapter_corrupt, no retry hint."""
    server = world.server
    users = [world.served_user("cap", 20 + i)[0] for i in range(3)]
    principal = server.keys.principal(world.key)
    held = [server.resolve(f"user:{u}", principal).key for u in users[:2]]
    slots = [server.cache.acquire(k) for k in held]  # both slots pinned by "requests in flight"
    body = {"model": f"user:{users[2]}", "prompt": "Hello", "max_tokens": 2}
    try:
        assert_openai_error(world.post("/v1/completions", json=body), 429, "slots_exhausted", retry_after=True)
        streamed = world.post("/v1/completions", json={**body, "stream": True})
        assert_openai_error(streamed, 429, "slots_exhausted", retry_after=True)  # before the first byte
    finally:
        for k in held:
            server.cache.release(k)
    assert sorted(slots) == [0, 1]
    assert world.post("/v1/completions", json=body).status_code == 200

    u = f"corrupt-{uuid.uuid4().hex[:6]}"
    rev = world.new_revision(u, 30)
    key = revision_prefix(u, rev.revision_id) + "adapter_model.safetensors"
    objects = world.stores.objects
    data = bytearray(objects.get(key))
    data[-1] ^= 0xFF  # one flipped bit, before any worker cached the adapter
    objects.client.put_object(objects.bucket, key, io.BytesIO(bytes(data)), len(data))
    world.promote(u, rev.revision_id)
    r = world.post("/v1/completions", json={**body, "model": f"user:{u}"})
    assert_openai_error(r, 503, "adapter_corrupt", retry_after=False)


def test_past_its_queue_a_request_waits_its_turn_holding_no_slot_then_runs_or_gets_429_overloaded(world):
    """With max_batch + max_queued generations started, the next request waits (its adapter not acquired: no slot
    pinned) and runs once one ends; one that waits past the queue timeout gets 429 overloaded with Retry-After."""
    server = world.server
    u, rev = world.served_user("turn", 50)
    key = server.resolve(f"user:{u}", server.keys.principal(world.key)).key
    body = {"model": f"user:{u}", "prompt": "Hello", "max_tokens": 2}
    saved = server.admission
    server.admission = Admission(1, 0.5)
    server.admission.enter()  # the one turn, held as by a generation in flight
    try:
        assert_openai_error(world.post("/v1/completions", json=body), 429, "overloaded", retry_after=True)
        server.admission.timeout_s = 60.0
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(world.post, "/v1/completions", json=body)
            deadline = time.monotonic() + 30
            while server.admission.waiting == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert server.admission.waiting == 1 and not waiting.done()
            assert server.cache._refs.get(key, 0) == 0  # waiting, it pins nothing
            started = time.monotonic()
            metrics = world.get("/metrics")  # not queued behind the waiting generation (HTTP processes: own threads)
            assert metrics.status_code == 200 and time.monotonic() - started < 10
            assert "persona_serving_admission_waiting 1.0" in metrics.text
            server.admission.leave()  # the generation in flight ends: the waiting request takes the turn
            r = waiting.result(timeout=60)
        assert r.status_code == 200, r.text
        assert r.headers["x-persona-revision"] == rev.revision_id
        # It gives the turn back when done: with HTTP processes the client can have the last bytes (forwarded by
        # another process) a moment before the worker's generation ends, so wait for it, briefly.
        deadline = time.monotonic() + 10
        while server.admission.held and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.admission.held == 0 and server.admission.waiting == 0
    finally:
        server.admission = saved


def test_an_unreachable_object_store_or_database_gets_503_with_an_openai_body(world, services, tmp_path):
    """A serving worker whose object store (or database) does not answer starts all the same and answers 503
    object_store_unavailable (database_unavailable) with Retry-After; the base is still served."""
    u, _ = world.served_user("outage", 40)
    closed = free_port()  # nothing listens there
    base = tiny_base()
    serving = ServingSettings(slots=1, max_rank=8, cache_dir=tmp_path / "cache", max_tokens=8, engine="reference")
    body = {"model": f"user:{u}", "prompt": "Hello", "max_tokens": 2}

    no_store = Settings(services.db, services.s3.model_copy(update={"endpoint": f"127.0.0.1:{closed}"}), serving)
    server = Server(no_store, base)
    try:
        with on_socket(create_app(server)) as url:
            r = httpx.post(f"{url}/v1/completions", json=body, headers=world.auth, timeout=120)
            assert_openai_error(r, 503, "object_store_unavailable", retry_after=True)
            base_body = {**body, "model": TINY_RANDOM_ID}
            assert httpx.post(f"{url}/v1/completions", json=base_body, headers=world.auth).status_code == 200
    finally:
        server.close()

    down = services.db.model_copy(
        update={"url": f"postgresql://postgres@127.0.0.1:{closed}/x", "connect_timeout_s": 1}
    )
    server = Server(Settings(down, services.s3, serving), base)
    try:
        with on_socket(create_app(server)) as url:
            # The key cannot be checked either: 503, not 401 (a database outage is not a bad key).
            r = httpx.post(f"{url}/v1/completions", json=body, headers=world.auth, timeout=60)
            assert_openai_error(r, 503, "database_unavailable", retry_after=True)
    finally:
        server.close()


def test_unknown_paths_and_methods_answer_in_the_openai_error_shape(world):
    r = world.get("/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found" and r.headers["x-persona-worker"]
    r = world.get("/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_the_engine_threads_time_by_phase_is_in_the_metrics(world):
    """The engine thread's wall time by phase and its steps (added at most twice a second) move with the work."""
    phases = ("step", "deliver", "idle") + (
        ("plan", "wait", "finish") if world.settings.serving.engine == "fast" else ()
    )

    def sample() -> dict[str, float]:
        text = httpx.get(f"{world.url}/metrics").text
        got = {p: _sample(text, "persona_serving_engine_seconds_total", phase=p) for p in phases}
        return got | {"steps": _sample(text, "persona_serving_engine_steps_total")}

    before = sample()
    r = world.post("/v1/completions", json={"model": TINY_RANDOM_ID, "prompt": "Hello there", "max_tokens": 4})
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    while True:
        after = sample()
        if all(after[k] > before[k] for k in after) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {k for k in after if after[k] <= before[k]} == set()
    assert after["steps"] - before["steps"] >= 4  # a step per token at least
