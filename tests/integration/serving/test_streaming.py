"""Many requests at once on one serving worker: none holds a thread while it waits for tokens, and a stream whose
client goes away stops generating (real socket, registry, broker; the tiny model on the fast engine)."""

from __future__ import annotations

import asyncio
import itertools
import time

import httpx
import pytest

from pipeline.models.base import TINY_RANDOM_ID
from tests.integration.serving.conftest import running_world

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def busy(services, stores, tmp_path_factory):
    with running_world(
        services, stores, tmp_path_factory.mktemp("busy"), engine="fast", max_batch=64, max_tokens=300
    ) as w:
        yield w


def test_more_requests_than_the_thread_pool_run_together(busy):
    """48 answers at once, more than the 40 threads of the server's pool: a request waits for its tokens on the
    event loop, not in a thread, so all 48 decode in the same batch and take about as long as each other (with a
    thread per waiting request, the last 8 would start when the first ones end: twice as long)."""
    body = {"model": TINY_RANDOM_ID, "prompt": "Hello there", "max_tokens": 200, "temperature": 0}

    async def one(client: httpx.AsyncClient) -> float:
        start = time.monotonic()
        r = await client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 200
        return time.monotonic() - start

    async def main() -> list[float]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=busy.url, headers=busy.auth, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client) for _ in range(48)))

    took = asyncio.run(main())
    assert max(took) < 1.5 * min(took), sorted(took)


def test_a_stream_whose_client_leaves_stops_generating(busy):
    engine = busy.server.engine
    cancelled = []
    real_cancel = engine.cancel

    def spy(gen):
        cancelled.append(gen)
        real_cancel(gen)

    engine.cancel = spy
    try:
        body = {"model": TINY_RANDOM_ID, "prompt": "Hello there", "max_tokens": 300, "stream": True}
        with busy.client().stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # the first token arrived: leave
        deadline = time.monotonic() + 20
        while not (cancelled and cancelled[0].done) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.cancel = real_cancel
    (gen,) = cancelled
    assert gen.finish_reason == "cancelled" and len(gen.output_ids) < 300
    deadline = time.monotonic() + 10
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.active == 0


def test_a_stream_can_end_with_its_token_counts(busy):
    """OpenAI's stream_options.include_usage: a last event with empty choices and the usage of the answer."""
    import orjson

    body = {"model": TINY_RANDOM_ID, "prompt": "Hello there", "max_tokens": 12, "stream": True}
    with busy.client().stream(
        "POST", "/v1/completions", json={**body, "stream_options": {"include_usage": True}}
    ) as r:
        events = [orjson.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    *chunks, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 12
    assert last["usage"]["prompt_tokens"] + 12 == last["usage"]["total_tokens"]
    assert chunks and all(c["choices"] and "usage" not in c for c in chunks)
    full = busy.post("/v1/completions", json={**body, "stream": False}).json()
    assert (
        full["usage"] == last["usage"]
        and "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    )


def test_a_stream_interval_sends_the_tokens_between_in_one_event_and_the_text_is_the_same(busy):
    """PERSONA_SERVE_STREAM_INTERVAL_MS: the tokens of the steps within one interval travel as one server-sent event;
    the first comes at once, nothing is lost or reordered (the text equals the answer without streaming)."""
    import orjson

    holding = busy.server._holding
    assert holding.interval == busy.settings.serving.stream_interval_ms / 1e3 == 0.0
    body = {"model": TINY_RANDOM_ID, "prompt": "Hello there", "max_tokens": 120, "temperature": 0}
    started = time.monotonic()
    full = busy.post("/v1/completions", json=body).json()
    interval = max(0.005, (time.monotonic() - started) / 8)  # about eight intervals in an answer, however fast here
    holding.interval = interval
    try:
        seen: list[float] = []
        events = []
        with busy.client().stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen.append(time.monotonic())
                    events.append(orjson.loads(line[6:]))
    finally:
        holding.interval = 0.0
    assert "".join(e["choices"][0]["text"] for e in events) == full["choices"][0]["text"]
    assert full["usage"]["completion_tokens"] == 120
    assert 3 <= len(events) <= 60, (len(events), interval)  # not one a token
    gaps = sorted(b - a for a, b in itertools.pairwise(seen))
    assert gaps[len(gaps) // 2] >= 0.7 * interval, (gaps, interval)  # events an interval apart
