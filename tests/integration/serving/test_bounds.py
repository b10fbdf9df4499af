"""Bounded input on a real serving worker: every bad or oversized request gets its 4xx OpenAI-shaped error (never a
500, never a 200 with an empty stream), a streamed request included; an error after a stream began is its last SSE
event. The tiny model's context is 512 tokens, and its tokenizer makes one token per byte."""

from __future__ import annotations

import socket
import time

import httpx
import orjson
import pytest

from pipeline.domain.revisions import new_revision_id
from pipeline.models.base import TINY_RANDOM_ID, tiny_tokenizer
from tests.integration.serving.conftest import running_world

pytestmark = pytest.mark.integration

LIMIT = 64 * 1024
CONTEXT = 512
MSG = [{"role": "user", "content": "hi"}]
LONG = {"role": "user", "content": "a" * 600}


@pytest.fixture(scope="module", params=["reference", "fast"])
def world(services, stores, tmp_path_factory, request):
    with running_world(
        services, stores, tmp_path_factory.mktemp("bounds"), engine=request.param, max_request_bytes=LIMIT
    ) as w:
        assert w.server.context == CONTEXT
        yield w


def tokens(text: str) -> int:
    return len(tiny_tokenizer()(text, add_special_tokens=False)["input_ids"])


def assert_error(r: httpx.Response, status: int, code: str, param: str | None = "-") -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json", r.headers
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error", error
    if param != "-":
        assert error["param"] == param, error


def completion(**kw) -> dict:
    return {"model": TINY_RANDOM_ID, "prompt": "Hello", **kw}


def chat(**kw) -> dict:
    return {"model": TINY_RANDOM_ID, "messages": MSG, **kw}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("path", "body", "status", "code", "param"),
    [
        # the context: prompt tokens + max_tokens <= 512
        ("/v1/completions", completion(prompt="a" * 600), 400, "context_length_exceeded", "prompt"),
        ("/v1/completions", completion(prompt="a" * 500, max_tokens=32), 400, "context_length_exceeded", "prompt"),
        ("/v1/completions", completion(prompt="a" * 512), 400, "context_length_exceeded", "prompt"),
        ("/v1/chat/completions", chat(messages=[LONG]), 400, "context_length_exceeded", "messages"),
        # max_tokens: >= 1, <= the configured 32
        ("/v1/completions", completion(max_tokens=33), 400, "invalid_request", "max_tokens"),
        ("/v1/completions", completion(max_tokens=0), 400, "invalid_request", "max_tokens"),
        ("/v1/chat/completions", chat(max_completion_tokens=10_000), 400, "invalid_request", "max_tokens"),
        ("/v1/completions", completion(max_tokens=2**70), 400, "invalid_request", "-"),
        # stop: at most 4 strings of at most 128 characters
        ("/v1/completions", completion(stop=["a", "b", "c", "d", "e"]), 400, "invalid_request", "stop"),
        ("/v1/completions", completion(stop="s" * 129), 400, "invalid_request", "stop"),
        ("/v1/completions", completion(stop=[None]), 400, "invalid_request", "-"),
        # n > 1 is not supported; sampling ranges as OpenAI's
        ("/v1/completions", completion(n=2), 400, "invalid_request", "n"),
        ("/v1/completions", completion(temperature=2.5), 400, "invalid_request", "temperature"),
        ("/v1/completions", completion(temperature=-1), 400, "invalid_request", "temperature"),
        ("/v1/completions", completion(top_p=0), 400, "invalid_request", "top_p"),
        ("/v1/completions", completion(top_p=1.01), 400, "invalid_request", "top_p"),
        ("/v1/completions", completion(seed=2**64), 400, "invalid_request", "seed"),
        ("/v1/completions", completion(temperature="hot"), 400, "invalid_request", "temperature"),
        # messages: at most 256, known roles, not empty
        ("/v1/chat/completions", chat(messages=MSG * 257), 400, "invalid_request", "messages"),
        ("/v1/chat/completions", chat(messages=[]), 400, "invalid_request", "messages"),
        ("/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), 400, "invalid_request", "-"),
        ("/v1/chat/completions", chat(messages=[{"role": "user"}]), 400, "invalid_request", "-"),
        # the model string: syntax, control characters, length
        ("/v1/completions", completion(model="user:alice\x00"), 400, "invalid_model", "model"),
        ("/v1/completions", completion(model="\x00"), 400, "invalid_model", "model"),
        ("/v1/completions", completion(model="user:al\x01ice"), 400, "invalid_model", "model"),
        ("/v1/completions", completion(model="user:a\nb"), 400, "invalid_model", "model"),
        ("/v1/completions", completion(model="user:" + "u" * 5000), 400, "invalid_model", "model"),
        ("/v1/completions", completion(model="user:"), 400, "invalid_model", "model"),
        ("/v1/completions", completion(model=f"user:@{new_revision_id()}"), 400, "invalid_model", "model"),
        ("/v1/completions", completion(model="gpt-4"), 400, "invalid_model", "model"),
        ("/v1/completions", completion(model=None), 400, "invalid_request", "model"),
        ("/v1/completions", completion(prompt=""), 400, "invalid_request", "prompt"),
    ],
)
def test_bad_input_gets_its_4xx_before_any_stream(world, path, body, status, code, param, stream):
    r = world.post(path, json={**body, "stream": stream})
    assert_error(r, status, code, param)


def test_a_prompt_that_fills_the_context_gets_what_is_left_when_no_max_tokens_is_named(world):
    prompt = "a" * 500
    assert tokens(prompt) == 500
    r = world.post("/v1/completions", json=completion(prompt=prompt))
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["usage"]["completion_tokens"] <= CONTEXT - 500
    ok = world.post("/v1/completions", json=completion(prompt=prompt, max_tokens=12))
    assert ok.status_code == 200, ok.text


def test_score_text_must_fit_the_context(world):
    assert world.post("/v1/score", json={"model": TINY_RANDOM_ID, "text": "a" * 512}).status_code == 200
    assert_error(
        world.post("/v1/score", json={"model": TINY_RANDOM_ID, "text": "a" * 513}), 400, "context_length_exceeded"
    )
    r = world.post("/v1/score", json={"model": TINY_RANDOM_ID, "prompt": "p" * 300, "text": "a" * 300})
    assert_error(r, 400, "context_length_exceeded", "text")
    assert_error(world.post("/v1/score", json={"model": TINY_RANDOM_ID, "text": ""}), 400, "invalid_request", "text")
    assert_error(world.post("/v1/score", json={"model": "user:\x00", "text": "x"}), 400, "invalid_model", "model")


@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b'"text"', b"\xff\xfe", b""])
def test_a_body_that_is_not_a_json_object_is_400(world, raw):
    headers = {**world.auth, "content-type": "application/json"}
    r = httpx.post(f"{world.url}/v1/completions", content=raw, headers=headers)
    assert_error(r, 400, "invalid_request")


def test_a_body_over_the_limit_is_413(world):
    big = completion(prompt="a" * LIMIT)
    assert_error(world.post("/v1/completions", json=big), 413, "request_too_large")
    assert_error(world.post("/v1/completions", json={**big, "stream": True}), 413, "request_too_large")

    def chunked():  # no Content-Length: counted while read
        yield b'{"model": "' + TINY_RANDOM_ID.encode() + b'", "prompt": "'
        for _ in range(LIMIT // 1024 + 2):
            yield b"a" * 1024
        yield b'"}'

    r = httpx.post(f"{world.url}/v1/completions", content=chunked(), headers=world.auth, timeout=60)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert_error(r, 413, "request_too_large")
    # Just under the limit is read (and then refused for its context, not its size).
    near = completion(prompt="a" * (LIMIT - 200))
    assert_error(world.post("/v1/completions", json=near), 400, "context_length_exceeded")


def test_a_declared_oversized_body_is_refused_before_it_is_sent(world):
    """Content-Length of 1 GB and no body at all: the 413 comes at once, so the worker did not wait to read it."""
    host, port = world.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {world.key}\r\nContent-Length: {10**9}\r\n\r\n".encode()
        )
        started = time.monotonic()
        got = b""
        while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < length_of(got):
            chunk = s.recv(65536)  # the head and the body may come in separate segments
            if not chunk:
                break
            got += chunk
    assert got.startswith(b"HTTP/1.1 413"), got[:200]
    assert time.monotonic() - started < 5
    assert orjson.loads(got.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"


def length_of(response: bytes) -> int:
    """The Content-Length of a raw HTTP response head."""
    for line in response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_an_error_after_the_stream_began_is_an_sse_error_event(world):
    """The engine fails mid-generation (a step raises): the stream already sent 200 and some tokens, so the error
    comes as the last event in OpenAI's shape, then [DONE]; the worker goes on serving."""
    engine = world.server.engine
    real_step = engine.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] >= 3:
            raise RuntimeError("injected engine failure")
        return real_step()

    engine.step = failing_step
    body = completion(prompt="Once upon a time", max_tokens=20, stream=True, temperature=0)
    try:
        with world.client().stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
    finally:
        engine.step = real_step
    assert lines[-1] == "data: [DONE]"
    last = orjson.loads(lines[-2].removeprefix("data: "))
    assert set(last) == {"error"} and last["error"]["code"] == "engine_error"
    assert last["error"]["type"] == "server_error" and last["error"]["message"]
    assert world.post("/v1/completions", json=completion(max_tokens=2)).status_code == 200

    from openai import APIError, OpenAI

    engine.step = failing_step
    calls["n"] = 0
    try:
        client = OpenAI(base_url=f"{world.url}/v1", api_key=world.key, max_retries=0)
        with pytest.raises(APIError):
            for _ in client.completions.create(model=TINY_RANDOM_ID, prompt="Once", max_tokens=20, stream=True):
                pass
    finally:
        engine.step = real_step


def test_odd_but_valid_text_is_served_and_broken_unicode_is_400(world):
    for prompt in ["a\x00b", "\x01\x02\x7f", "\u200b\ufeff", "😀" * 10]:
        r = world.post("/v1/completions", json=completion(prompt=prompt, max_tokens=2))
        assert r.status_code == 200, (prompt, r.text)
    chat_nul = world.post("/v1/chat/completions", json=chat(messages=[{"role": "user", "content": "a\x00"}]))
    assert chat_nul.status_code == 200, chat_nul.text
    raw = b'{"model": "' + TINY_RANDOM_ID.encode() + b'", "prompt": "a\\ud800b"}'  # a lone surrogate
    r = httpx.post(
        f"{world.url}/v1/completions", content=raw, headers={**world.auth, "content-type": "application/json"}
    )
    assert_error(r, 400, "invalid_request")
