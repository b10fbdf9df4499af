"""The serving worker's OpenAI-compatible API on a real socket, with the registry on real PostgreSQL and S3, the
promotions topic on real Kafka, and the tiny model."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
import orjson
import pytest
import torch
import uvicorn
from peft import LoraConfig, PeftModel, get_peft_model

from pipeline.config import ModelSettings, ServingSettings, Settings
from pipeline.domain.revisions import EventsUsed
from pipeline.evaluation.promotion import announce
from pipeline.models.base import TINY_RANDOM_ID, LoadedBase, ref, tiny_random, tiny_tokenizer
from pipeline.serving.api import Server, create_app, listen_for_promotions
from pipeline.storage.objects import ObjectStore
from pipeline.storage.registry import Registry
from tests.integration.helpers import free_port, fresh_topics

pytestmark = pytest.mark.integration


def make_adapter(out: Path, seed: int, targets=("q_proj", "v_proj"), r: int = 4) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_random(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
    )
    with torch.no_grad():  # large enough to change what the model says
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["reference", "fast"])
def world(services, tmp_path_factory, request):
    """A serving worker on a real socket; every test runs against both engines (the fast one on the CPU here)."""
    tmp = tmp_path_factory.mktemp("serving")
    kafka = fresh_topics(services.kafka)
    settings = Settings(
        services.db,
        services.s3,
        kafka,
        ModelSettings(base=TINY_RANDOM_ID),
        ServingSettings(slots=2, max_rank=8, cache_dir=tmp / "cache", max_tokens=32, engine=request.param),
    )
    base_model = tiny_random()  # the server's own base: the engine injects its multi-LoRA layers into it
    base = LoadedBase(base_model, tiny_tokenizer(), ref(base_model, TINY_RANDOM_ID))
    server = Server(settings, base)
    assert type(server.engine).__name__ == {"reference": "Engine", "fast": "FastEngine"}[request.param]
    listener = listen_for_promotions(server, kafka)
    assert listener.wait_ready(30)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    registry = Registry(services.db, ObjectStore(services.s3))
    yield {"url": f"http://127.0.0.1:{port}", "registry": registry, "settings": settings, "tmp": tmp, "server": server}
    uv.should_exit = True
    thread.join(timeout=10)
    listener.stop()
    server.close()


def new_revision(world, user: str, seed: int, parent: str | None = None, **kw):
    d = make_adapter(world["tmp"] / f"{user}-{seed}", seed, **kw)
    base_ref = ref(tiny_random(), TINY_RANDOM_ID)
    return world["registry"].write_revision(
        user, d, parent_id=parent, base=base_ref, training={"seed": seed}, events=EventsUsed.of([]), app="serve"
    )


def test_a_users_adapter_serves_with_its_revision_named(world):
    u = f"srv-{uuid.uuid4().hex[:6]}"
    rev = new_revision(world, u, 1)
    world["registry"].promote(u, rev.revision_id)
    body = {"model": f"user:{u}", "prompt": "Hello there", "max_tokens": 8}
    r = httpx.post(f"{world['url']}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["x-persona-revision"] == rev.revision_id
    out = r.json()
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] >= 1
    base = httpx.post(f"{world['url']}/v1/completions", json={**body, "model": TINY_RANDOM_ID}, timeout=60)
    assert base.status_code == 200 and base.headers["x-persona-revision"] == "base"
    named = httpx.post(
        f"{world['url']}/v1/completions", json={**body, "model": f"user:{u}@{rev.revision_id}"}, timeout=60
    )
    assert named.headers["x-persona-revision"] == rev.revision_id and named.json()["choices"] == out["choices"]


def test_score_equals_stock_peft_with_the_users_adapter(world):
    u = f"score-{uuid.uuid4().hex[:6]}"
    rev = new_revision(world, u, 2, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    world["registry"].promote(u, rev.revision_id)
    text = "Dear colleagues, our results suggest"
    r = httpx.post(f"{world['url']}/v1/score", json={"model": f"user:{u}", "text": text}, timeout=60)
    assert r.status_code == 200, r.text
    served = r.json()["token_logprobs"]
    exported = world["tmp"] / f"export-{u}"
    world["registry"].export(u, exported)
    peft_model = PeftModel.from_pretrained(tiny_random(), exported).eval()
    ids = tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(peft_model(torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(logprobs[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert served == pytest.approx(expected, abs=1e-4)


def test_chat_streams_server_sent_events(world):
    u = f"chat-{uuid.uuid4().hex[:6]}"
    rev = new_revision(world, u, 3)
    world["registry"].promote(u, rev.revision_id)
    body = {"model": f"user:{u}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", f"{world['url']}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["x-persona-revision"] == rev.revision_id
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [orjson.loads(line[6:]) for line in lines[:-1]]
    assert 1 <= len(chunks) <= 6 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    full = httpx.post(f"{world['url']}/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
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
    r = httpx.post(f"{world['url']}/v1/completions", json=body, timeout=30)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text


def test_the_next_request_after_a_promotion_serves_the_new_revision(world):
    u = f"promo-{uuid.uuid4().hex[:6]}"
    first = new_revision(world, u, 4)
    world["registry"].promote(u, first.revision_id)
    body = {"model": f"user:{u}", "prompt": "Status:", "max_tokens": 4}
    assert (
        httpx.post(f"{world['url']}/v1/completions", json=body, timeout=60).headers["x-persona-revision"]
        == first.revision_id
    )
    second = new_revision(world, u, 5, parent=first.revision_id)
    world["registry"].promote(u, second.revision_id)
    announce(world["settings"].kafka, second, reason="gate")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = httpx.post(f"{world['url']}/v1/completions", json=body, timeout=60)
        if r.headers["x-persona-revision"] == second.revision_id:
            break
        time.sleep(0.3)
    assert r.headers["x-persona-revision"] == second.revision_id

    def first_gone() -> bool:  # the listener heard the promotion and dropped the old revision
        return all(k is None or k.revision_id != first.revision_id for k in world["server"].cache.stats().slots)

    deadline = time.monotonic() + 20
    while not first_gone() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert first_gone()


def test_a_forgotten_user_leaves_every_cache_tier(world):
    """`persona forget` announces forget.v1; every serving worker drops the user's adapters from device slots and
    host memory and deletes the disk copies; the next request is a 404."""
    from pipeline.evaluation.promotion import announce_forget

    u = f"forget-{uuid.uuid4().hex[:6]}"
    rev = new_revision(world, u, 9)
    world["registry"].promote(u, rev.revision_id)
    body = {"model": f"user:{u}", "prompt": "Hello", "max_tokens": 2}
    assert httpx.post(f"{world['url']}/v1/completions", json=body, timeout=60).status_code == 200
    disk_copy = world["settings"].serving.cache_dir / rev.sha256
    assert disk_copy.exists()
    report = world["registry"].forget(u)
    assert report.sha256s == [rev.sha256]
    announce_forget(world["settings"].kafka, u, report.sha256s)

    def cached() -> bool:
        stats = world["server"].cache.stats()
        return disk_copy.exists() or any(k is not None and k.user_id == u for k in stats.slots)

    deadline = time.monotonic() + 20
    while cached() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not cached()
    r = httpx.post(f"{world['url']}/v1/completions", json=body, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_models_health_and_metrics(world):
    assert httpx.get(f"{world['url']}/healthz").json()["status"] == "ok"
    ids = [m["id"] for m in httpx.get(f"{world['url']}/v1/models").json()["data"]]
    assert TINY_RANDOM_ID in ids
    assert "persona_adapter_cache_hits_total" in httpx.get(f"{world['url']}/metrics").text


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text ``text`` (0.0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_request_and_token_metrics_count_what_was_served(world):
    url = world["url"]
    before = httpx.get(f"{url}/metrics").text
    body = {"model": TINY_RANDOM_ID, "prompt": "Hello there", "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        list(r.iter_lines())
    bad = httpx.post(f"{url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=60)
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

    u = f"oai-{uuid.uuid4().hex[:6]}"
    rev = new_revision(world, u, 6)
    world["registry"].promote(u, rev.revision_id)
    client = OpenAI(base_url=f"{world['url']}/v1", api_key="unused", max_retries=0)
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
