"""liger-kernel's Triton kernels in a Llama-like Hugging Face model's own modules, for a block: batched training
(`pipeline.training.fused`) and the stacked gate (`pipeline.evaluation.metrics.evaluate_many`) run their forwards
through them on CUDA.

`patched` puts liger's RMSNorm (``casting_mode="llama"``: HF's numerics, the inverse RMS in fp32) and SiLU-mul
(SwiGLU) into the model's norm and MLP modules for the block's duration (instance ``forward``s, taken out
afterwards; the classes and every other user of the model are untouched): one kernel each where HF's modules run
about seven (the RMSNorm's casts, power, mean, rsqrt and products) and two. Rotary embedding is a module-level
function of ``modeling_llama`` (HF's attention calls it by name), so it is replaced once by a dispatcher that runs
liger's rotary kernel (one launch instead of ~8 for q and k) only in a thread inside `patched`: a serving engine or
any other thread of the process keeps HF's own (`_rope_dispatch`).

`liger` gives liger's functions, or None where the package (the ``gpu`` extra) or Triton does not import. Its
RMSNorm's backward, when the weight takes no gradient (the frozen base's norms), runs liger's row kernel with one
program per row (`ROW_BACKWARD`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

#: The fused RMSNorm's backward without a weight gradient: one program per row (`_row_backward_rms_norm`), or False:
#: liger's own launch (the benchmark compares the two).
ROW_BACKWARD = True


@functools.cache
def liger() -> Any:
    """liger-kernel's fused linear cross-entropy (its autograd function and its chunked forward), RMSNorm, SiLU-mul
    and rotary functions, or None when not installed."""
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyFunction,
            fused_linear_cross_entropy_forward,
        )
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.rope import LigerRopeFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception as e:  # not installed, or no triton / no GPU backend
        log.info("liger-kernel not available (%s): plain torch kernels", e)
        return None
    return types.SimpleNamespace(
        flce=LigerFusedLinearCrossEntropyFunction,
        flce_forward=fused_linear_cross_entropy_forward,
        rms_norm=_row_backward_rms_norm(LigerRMSNormFunction),
        silu_mul=LigerSiLUMulFunction,
        rope=LigerRopeFunction,
    )


def _row_backward_rms_norm(liger_rms_norm: Any) -> Any:
    """liger's RMSNorm whose backward, when the weight takes no gradient (the frozen base's norms), runs liger's own
    row kernel with one program per row instead of one per SM.

    For rows wider than 256 (SmolLM2: 576) liger 0.8.5's backward launches one program per SM (132 on an H200), and
    each walks its ~1,000 rows of a 131k-token micro-batch one after the other, accumulating the weight's gradient
    as it goes: 583 us a call in the profile of a K=256 training step, 7x its forward (86 us, one program per row).
    Without a weight gradient nothing needs accumulating, so every row is a program of its own. Same kernel, same
    arithmetic per row (dX equal bit for bit: bench/retrain_kernels.py checks it on the device)."""
    from liger_kernel.ops.rms_norm import _rms_norm_backward_kernel
    from liger_kernel.ops.utils import torch_to_triton_dtype

    class RowBackwardRMSNorm(liger_rms_norm):
        @staticmethod
        def backward(ctx: Any, dY: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            if ctx.needs_input_grad[1] or not ctx.elementwise_affine or not dY.is_cuda or not ROW_BACKWARD:
                out: tuple[torch.Tensor | None, ...] = liger_rms_norm.backward(ctx, dY)
                return out
            X, W, RSTD = ctx.saved_tensors
            shape = dY.shape
            dY = dY.contiguous().view(-1, shape[-1])
            n_rows, n_cols = dY.shape
            dX = dY if ctx.in_place else torch.empty_like(dY)
            with torch.cuda.device(dY.device):
                _rms_norm_backward_kernel[(n_rows,)](
                    dY, dY.stride(0), dX, dX.stride(0), X, X.stride(0), torch_to_triton_dtype[X.dtype],
                    W, W.stride(0), RSTD, RSTD.stride(0), None, 0, n_rows, n_cols, ctx.offset, 1,
                    ctx.casting_mode, elementwise_affine=True, BLOCK_SIZE=ctx.BLOCK_SIZE, COMPUTE_DW=False,
                    num_warps=ctx.num_warps,
                )  # fmt: skip
            return dX.view(*shape), None, None, None, None, None, None

    return RowBackwardRMSNorm


def available(device: torch.device) -> bool:
    """Whether `patched` can put liger's kernels in on ``device`` (CUDA, liger-kernel importable)."""
    return device.type == "cuda" and liger() is not None


@contextlib.contextmanager
def patched(model: nn.Module, on: bool = True) -> Iterator[int]:
    """With ``on``: liger's RMSNorm and SiLU-mul in place of the forward of every Llama-style RMSNorm and gated MLP of
    ``model``, and liger's rotary kernel for this thread's Llama attention, until the block ends (module docstring).
    Yields how many modules were patched (the rotary dispatch counts one). Raises RuntimeError when liger-kernel is
    not available."""
    if not on:
        yield 0
        return
    kernels = liger()
    if kernels is None:
        raise RuntimeError("liger-kernel is not available: fused layers need it (the gpu extra) and CUDA")
    patched: list[nn.Module] = []

    def rms_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = kernels.rms_norm.apply(x, self.weight, self.variance_epsilon, 0.0, "llama", True)
        return out

    def mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(kernels.silu_mul.apply(self.gate_proj(x), self.up_proj(x)))

    rope = False
    try:
        for module in model.modules():
            kind = type(module).__name__
            if kind == "LlamaAttention" and not rope:
                rope = _rope_dispatch(sys.modules[type(module).__module__], kernels.rope)
                if rope:
                    _ROPE.depth = getattr(_ROPE, "depth", 0) + 1
            if kind.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and kind.startswith("Llama"):
                module.forward = types.MethodType(rms_forward, module)
                patched.append(module)
            elif (
                kind == "LlamaMLP"
                and getattr(getattr(module, "config", None), "hidden_act", None) in ("silu", "swish")
                and all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))
            ):
                module.forward = types.MethodType(mlp_forward, module)
                patched.append(module)
        yield len(patched) + int(rope)
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
        if rope:
            _ROPE.depth -= 1


#: The block depth of `patched` in this thread: the rotary dispatch uses liger's kernel only while it is > 0.
_ROPE = threading.local()
_ROPE_LOCK = threading.Lock()


def _rope_dispatch(modeling: types.ModuleType, rope: Any) -> bool:
    """Put a dispatcher in place of ``modeling.apply_rotary_pos_emb`` (once per module, kept for the process): in a
    thread inside `patched`, liger's rotary kernel (one launch forward, one backward, q and k rotated in place);
    everywhere else, and for any call other than HF's ``(q, k, cos, sin)`` on CUDA, the original function. HF's
    attention looks the function up in its module at each call, so a module-level function is the only place to
    put it in; the thread-local switch keeps every other thread (a serving engine, another trainer) on HF's own.
    False when the module has no such function."""
    with _ROPE_LOCK:
        original = getattr(modeling, "apply_rotary_pos_emb", None)
        if original is None:
            return False
        if getattr(original, "persona_dispatch", False):
            return True

        def apply_rotary_pos_emb(
            q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            if getattr(_ROPE, "depth", 0) > 0 and not args and not kwargs and q.is_cuda:
                out: tuple[torch.Tensor, torch.Tensor] = rope.apply(q, k, cos, sin)
                return out
            result: tuple[torch.Tensor, torch.Tensor] = original(q, k, cos, sin, *args, **kwargs)
            return result

        apply_rotary_pos_emb.persona_dispatch = True  # type: ignore[attr-defined]
        apply_rotary_pos_emb.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(modeling, "apply_rotary_pos_emb", apply_rotary_pos_emb)  # noqa: B010 (a module, not an object)
        return True
