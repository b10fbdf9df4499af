"""liger's kernels in a Llama model's own modules for a block (pipeline/models/fused_layers.py).

The CPU tests check the switch and the refusals; the CUDA ones (skipped without CUDA and liger-kernel, run on the
device: bench/train_device.sh) check the patched forward and backward against HF's modules and that the rotary
dispatch stays off in other threads.
"""

from __future__ import annotations

import threading

import pytest
import torch

from pipeline.models import fused_layers
from pipeline.models.base import load_base

CUDA_LIGER = torch.cuda.is_available() and fused_layers.liger() is not None
needs_cuda_liger = pytest.mark.skipif(not CUDA_LIGER, reason="needs CUDA and liger-kernel (the gpu extra)")


def _forwards(model: torch.nn.Module) -> dict[str, object]:
    return {name: m.__dict__.get("forward") for name, m in model.named_modules()}


def test_off_changes_nothing_and_on_without_liger_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_base("tiny-random").model
    before = _forwards(model)
    with fused_layers.patched(model, False) as n:
        assert n == 0
        assert _forwards(model) == before
    monkeypatch.setattr(fused_layers, "liger", lambda: None)
    with pytest.raises(RuntimeError, match="liger-kernel is not available"), fused_layers.patched(model, True):
        pass
    assert _forwards(model) == before
    assert not fused_layers.available(torch.device("cpu"))


def _llama(layers: int) -> torch.nn.Module:
    """A random Llama of SmolLM2-135M's widths (its own object: the cached bases stay as they are)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )  # fmt: skip
    return LlamaForCausalLM(config).requires_grad_(False)


@needs_cuda_liger
def test_patched_forward_and_backward_match_hf_modules_and_are_taken_out() -> None:
    model = _llama(2).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 512, (4, 40), device="cuda")

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        logits = model(inputs_embeds=embeds).logits
        logits.float().square().mean().backward()
        assert embeds.grad is not None
        return logits.detach().float(), embeds.grad.float()

    ref_logits, ref_grad = run()
    before = _forwards(model)
    with fused_layers.patched(model, True) as n:
        assert n == 2 * 3 + 1 + 1  # per layer two norms and the MLP; the final norm; the rotary dispatch
        logits, grad = run()
    assert _forwards(model) == before
    # bf16 throughout: HF's modules round after each op, liger's kernels once; relative differences of bf16 size.
    assert (logits - ref_logits).norm() / ref_logits.norm() < 2e-2
    assert (grad - ref_grad).norm() / ref_grad.norm() < 5e-2
    again, _ = run()
    assert torch.equal(again, ref_logits)  # out of the block: HF's modules again, bit for bit


@needs_cuda_liger
def test_rotary_dispatch_is_liger_in_the_patched_thread_only() -> None:
    from transformers.models.llama import modeling_llama

    model = _llama(1)
    q = torch.randn(2, 4, 8, 16, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 2, 8, 16, device="cuda", dtype=torch.bfloat16)
    # As HF's rotary embedding makes them: the angles of the first half of the head repeated for the second.
    angles = torch.rand(2, 8, 8, device="cuda") * 6.3
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).bfloat16() for f in (torch.cos, torch.sin))
    with fused_layers.patched(model, True):
        dispatch = modeling_llama.apply_rotary_pos_emb
        original = dispatch.__wrapped__
        reference = original(q.clone(), k.clone(), cos, sin)
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        other = threading.Thread(target=lambda: seen.append(dispatch(q.clone(), k.clone(), cos, sin)))
        other.start()
        other.join()
        assert all(torch.equal(a, b) for a, b in zip(seen[0], reference, strict=True))  # HF's own, bit for bit
        here = dispatch(q.clone(), k.clone(), cos, sin)  # liger's kernel: equal within bf16 rounding
        for a, b in zip(here, reference, strict=True):
            assert (a.float() - b.float()).norm() / b.float().norm() < 1e-2
    outside = dispatch(q.clone(), k.clone(), cos, sin)
    assert all(torch.equal(a, b) for a, b in zip(outside, reference, strict=True))
