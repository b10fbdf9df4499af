"""Base models: resolution from PERSONA_MODEL_BASE, loading once per process, and their identity (sha256).

`tiny-random` is a small random-initialised Llama built from a config with a fixed seed and a byte-level
tokenizer (ByT5's, algorithmic: no files), for tests. The packaged SmolLM2 and local directories: see `load_base`.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.domain.revisions import BaseModelRef

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
    return BaseModelRef(model_id, weights_sha256(model))


def _freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


_cache: dict[str, LoadedBase] = {}
_lock = threading.Lock()


def load_base(spec: str) -> LoadedBase:
    """The base named by ``spec`` (see ModelSettings.base), loaded once per process."""
    with _lock:
        if spec not in _cache:
            if spec == TINY_RANDOM_ID:
                model = _freeze(tiny_random())
                _cache[spec] = LoadedBase(model, tiny_tokenizer(), ref(model, TINY_RANDOM_ID))
            else:
                raise NotImplementedError(f"base model {spec!r}: only {TINY_RANDOM_ID!r} so far")
        return _cache[spec]
