"""Fused training kernels of the batched trainer: the loss without the whole vocabulary's fp32 logits, and (on CUDA,
with liger-kernel installed) RMSNorm and SwiGLU in one kernel each.

`linear_nll` gives the NLL of each labelled token from the decoder's hidden states and the output embedding, the
same function as ``F.cross_entropy(F.linear(h, W).float(), targets, reduction="none")`` (the unfused reference,
``mode="off"``), without ever holding the fp32 logits of all the tokens at once:

- ``liger``: liger-kernel's fused linear cross-entropy (Triton, CUDA only), per token (``reduction="none"``): the
  logits are computed chunk by chunk in the weight's dtype, the softmax and its gradient in fp32 inside one kernel.
  Over a frozen head (`LigerTokenNLL`, batched training's case) the forward also projects each chunk's gradient
  back to the hidden states, for an upstream gradient of 1 per token, and the backward scales each token's row by
  its upstream gradient: a token's loss depends on its own hidden state only, so that is its exact gradient, and
  the logits are computed once. (liger's own `LigerFusedLinearCrossEntropyFunction`, used when the head trains,
  recomputes every chunk's logits in the backward to fold the per-token gradient in before the weight's gradient
  sums over tokens: a third more of the head's GEMMs, ~0.6 s of a Llama-1B K=64 wave on an H200.)
- ``chunked``: the same in plain torch (`ChunkedLinearNLL`, any device): per chunk of tokens, logits in the
  weight's dtype, log-sum-exp in fp32, the target's logit gathered; the backward recomputes the chunk's logits,
  softmax minus one-hot times the upstream gradient, cast to the weight's dtype (as autograd casts the gradient
  of ``logits.float()``), times the weight. Equal to the reference within float rounding
  (tests/unit/training/test_fused.py: float32, relative 1e-6 on losses and gradients).

`fused_layers` puts liger's RMSNorm and SiLU-mul (SwiGLU) into a Llama-like model's norm and MLP modules for the
block's duration (`pipeline.models.fused_layers`, which the stacked gate uses too).

Which path a run takes (`Fused.resolve`): ``TrainingSettings.fused_kernels`` ``auto`` = liger on CUDA when the
package imports (the ``gpu`` extra), else ``chunked``; ``chunked`` = plain torch everywhere; ``off`` = the
unfused reference. The trainer logs the path it used.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.encoding import IGNORE
from pipeline.models.fused_layers import liger as _liger
from pipeline.models.fused_layers import patched

log = logging.getLogger(__name__)

#: Elements of one chunk's logits in the chunked path (2^26 = 256 MiB in fp32: 1,365 tokens of a 49k vocabulary).
CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class Fused:
    """The kernels a run uses: ``loss`` is ``liger``, ``chunked`` or ``off``; ``layers`` whether liger's RMSNorm
    and SwiGLU replace the model's own."""

    loss: str
    layers: bool

    @classmethod
    def resolve(cls, setting: str, device: torch.device) -> Fused:
        """The path for ``TrainingSettings.fused_kernels`` on ``device`` (module docstring)."""
        if setting == "off":
            return cls("off", False)
        if setting == "auto" and device.type == "cuda" and _liger() is not None:
            return cls("liger", True)
        if setting not in ("auto", "chunked"):
            raise ValueError(f"fused_kernels must be auto, chunked or off, got {setting!r}")
        return cls("chunked", False)

    def describe(self) -> str:
        return f"loss {self.loss}" + (", liger RMSNorm + SwiGLU" if self.layers else "")


def linear_nll(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mode: str = "chunked"
) -> torch.Tensor:
    """Per token, ``-log softmax(hidden @ weight.T)[target]`` in fp32 (``hidden [N, H]``, ``weight [V, H]``,
    ``targets [N]``; a target of ``IGNORE`` gives 0 and no gradient), by ``mode``: ``liger``, ``chunked`` or
    ``off`` (module docstring)."""
    shapes_ok = hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] == weight.shape[1]
    if not shapes_ok or targets.shape != hidden.shape[:1]:
        raise ValueError(
            f"linear_nll takes hidden [N, H], weight [V, H], targets [N]; got {tuple(hidden.shape)}, "
            f"{tuple(weight.shape)}, {tuple(targets.shape)}"
        )
    if mode == "off":
        return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE, reduction="none")
    if mode == "liger":
        liger = _liger()
        if liger is None or not hidden.is_cuda:
            raise RuntimeError("the liger loss needs liger-kernel and a CUDA device")
        if hidden.shape[0]:
            if not weight.requires_grad:
                frozen: torch.Tensor = LigerTokenNLL.apply(hidden.contiguous(), weight, targets)
                return frozen
            loss: torch.Tensor = liger.flce.apply(
                hidden.contiguous(), weight, targets, None, None, IGNORE, 0.0, 0.0, "none"
            )[0]
            return loss
        mode = "chunked"  # no token: nothing for a kernel to do
    if mode == "chunked":
        chunk = max(1, CHUNK_ELEMENTS // max(weight.shape[0], 1))
        out: torch.Tensor = ChunkedLinearNLL.apply(hidden, weight, targets, chunk)
        return out
    raise ValueError(f"unknown linear_nll mode {mode!r}")


class LigerTokenNLL(torch.autograd.Function):
    """`linear_nll`'s liger path over a frozen head: liger's chunked forward computes each token's loss and, when
    the hidden states need a gradient, each token's gradient for an upstream gradient of 1 (softmax minus one-hot,
    times the weight); the backward scales row ``t`` by the upstream gradient of token ``t``."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        liger = _liger()
        needs = bool(ctx.needs_input_grad[0])
        loss, _, _, _, grad, _, _ = liger.flce_forward(
            hidden,
            weight,
            targets,
            ignore_index=IGNORE,
            reduction="none",
            compute_gradients=needs,
            weight_requires_grad=False,
        )
        if needs:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx: Any, upstream: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad.float() * upstream.float().unsqueeze(1)).to(grad.dtype), None, None


class ChunkedLinearNLL(torch.autograd.Function):
    """`linear_nll`'s plain-torch path: logits of ``chunk`` tokens at a time, forward and backward."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int
    ) -> torch.Tensor:
        n = hidden.shape[0]
        out = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        valid = targets != IGNORE
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        for s in range(0, n, chunk):
            logits = F.linear(hidden[s : s + chunk], weight).float()
            picked = logits.gather(1, safe[s : s + chunk, None]).squeeze(1)
            out[s : s + chunk] = torch.where(valid[s : s + chunk], torch.logsumexp(logits, -1) - picked, 0.0)
        ctx.save_for_backward(hidden, weight, safe, valid)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        hidden, weight, safe, valid = ctx.saved_tensors
        chunk = ctx.chunk
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        scale = torch.where(valid, grad.float(), 0.0)
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s : s + chunk]
            probs = torch.softmax(F.linear(h, weight).float(), -1)
            rows = torch.arange(probs.shape[0], device=probs.device)
            probs[rows, safe[s : s + chunk]] -= 1.0
            g = (probs * scale[s : s + chunk, None]).to(weight.dtype)
            if grad_h is not None:
                grad_h[s : s + chunk] = g @ weight
            if grad_w is not None:
                grad_w += (g.t() @ h).float()
        return grad_h, grad_w.to(weight.dtype) if grad_w is not None else None, None, None


@contextlib.contextmanager
def fused_layers(model: nn.Module, fused: Fused) -> Iterator[int]:
    """With ``fused.layers``: liger's RMSNorm and SiLU-mul in the model's norm and MLP modules until the block ends
    (`pipeline.models.fused_layers.patched`). Yields how many modules were patched."""
    with patched(model, fused.layers) as n:
        yield n
