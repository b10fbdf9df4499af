"""Base models. For now the tiny random-initialised Llama used by tests (built from a config with a fixed seed,
no download); `persona model prepare` and the packaged SmolLM2 come with continual training."""

from __future__ import annotations

import hashlib

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.domain.revisions import BaseModelRef

TINY_RANDOM_ID = "tiny-random"


def tiny_random(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer Llama with a 256-token vocabulary, the same for a given seed on every machine."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    gen = torch.Generator().manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


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
