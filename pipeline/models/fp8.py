"""FP8 GEMMs for a frozen base's projections in batched training (``TrainingSettings.base_fp8``), on GPUs with FP8
tensor cores (compute capability 8.9 and up: Ada, Hopper).

A personal adapter's training never changes the base: its projections are two GEMMs a step each, the forward
``y = x W^T`` and the input gradient ``dx = dy W`` (no weight gradient). On an H200 those GEMMs are about half of a
Llama-1B training step's GPU time (bench/results/retrain_throughput.md), and FP8 tensor cores do twice the
operations of bf16 per clock at half the bytes. Here both run in FP8 e4m3 with one scale per row:

- the weight, once per base (cached by tensor, dropped with it): ``W`` quantized per output channel for the
  forward, ``W^T`` per input channel for the input gradient (two copies of 1 byte a value);
- the activation ``x`` (and the incoming gradient ``dy``) per token, at each GEMM (`quantize_rows`: one Triton
  kernel on CUDA; an input that several projections share, q/k/v and gate/up, is quantized once);
- ``torch._scaled_mm`` multiplies with fp32 accumulation and applies both scales, the output in the input's dtype.

Each value is rounded to 3 mantissa bits against its row's largest: a GEMM's output differs from bf16's by about
1-3% relative (`linear` against `reference_linear`: tests/unit/models/test_fp8.py). The adapters are trained
against that rounded base and are written, gated and served as usual on the base itself; whether they train as
well is measured, not assumed (bench/retrain_throughput.py ``--base-fp8``). The LoRA branch, the loss head and
everything else stay in the base's dtype. Off by default.

Where FP8 cannot run (a CPU, an older GPU, a width that is not a multiple of 16), `supported` says so and the
caller keeps the base's dtype. On the CPU `reference_linear` computes the same function from the quantized values
in fp32, for tests.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.models import lora_kernels

E4M3 = torch.float8_e4m3fn
#: The largest finite e4m3 value: a row's largest magnitude maps to it.
E4M3_MAX = 448.0
#: Scales never go below this (an all-zero row).
MIN_SCALE = 1e-12
#: ``use_fast_accum`` of the forward GEMM (as torchao's float8 training does); the input gradient accumulates
#: exactly.
FAST_ACCUM_FORWARD = True


#: Projections with fewer weights than this keep the base's dtype under ``base_fp8`` (`pays`). On an H200 at ~21k
#: tokens, a training node's forward and backward in FP8 took 2.60 -> 1.83 ms (2048 -> 8192, 16.8M weights) and
#: 2.72 -> 1.98 ms (8192 -> 2048), but 0.93 -> 1.19 ms (2048 -> 2048, 4.2M) and 1.06 -> 1.63 ms (2048 -> 512): below
#: ~8M weights quantizing the input and the gradient costs more than the smaller GEMM saves
#: (bench/results/retrain_throughput.md). 0: every projection FP8 can run.
MIN_WEIGHTS = 8 * 2**20


def pays(weight: torch.Tensor) -> bool:
    """Whether a projection of this weight runs in FP8 under ``base_fp8`` (at least `MIN_WEIGHTS` values), where it
    can (`supported`); the others keep the base's dtype."""
    return weight.numel() >= MIN_WEIGHTS


def supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` / `input_grad` run in FP8 for input ``x`` over ``weight`` ``[out, in]``: CUDA with FP8 tensor
    cores, a half dtype, both widths multiples of 16, a frozen weight."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and hasattr(torch, "_scaled_mm")):
        return False
    if weight.requires_grad or weight.dim() != 2 or weight.shape[0] % 16 or weight.shape[1] % 16:
        return False
    return _capable(x.device.index if x.device.index is not None else torch.cuda.current_device())


def device_supported(device: torch.device) -> bool:
    """Whether ``device`` has FP8 GEMMs (CUDA, compute capability 8.9+, a torch with ``_scaled_mm``)."""
    if device.type != "cuda" or not hasattr(torch, "_scaled_mm"):
        return False
    return _capable(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``[rows, width]`` as e4m3 values and one fp32 scale a row (``[rows, 1]``): ``x ~= q * scale``, the row's
    largest magnitude at `E4M3_MAX`. One Triton kernel on CUDA, torch elsewhere (the same arithmetic: fp32 divide,
    round to nearest even)."""
    if x.dim() != 2:
        raise ValueError(f"quantize_rows takes [rows, width], got {tuple(x.shape)}")
    k = _triton() if x.is_cuda else None
    if k is None or x.shape[1] > MAX_TRITON_WIDTH:
        xf = x.float()
        scale = (xf.abs().amax(1, keepdim=True) / E4M3_MAX).clamp(min=MIN_SCALE)
        return (xf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale
    x = x.contiguous()
    q = torch.empty(x.shape, dtype=E4M3, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    if x.shape[0]:
        width = x.shape[1]
        block = 1 << max(width - 1, 1).bit_length()
        k.quantize_rows[(x.shape[0],)](
            x, q, scale, width, FMAX=E4M3_MAX, SMALLEST=MIN_SCALE, BLOCK=block, num_warps=8 if block >= 4096 else 4
        )
    return q, scale


#: Widest row the Triton kernel takes in one program (wider ones go through torch).
MAX_TRITON_WIDTH = 16384


@dataclass(frozen=True)
class QuantizedWeight:
    """One frozen weight ``[out, in]`` in e4m3: ``forward`` ``[out, in]`` with ``forward_scale`` ``[1, out]`` (per
    output channel), ``backward`` ``[in, out]`` with ``backward_scale`` ``[1, in]`` (per input channel)."""

    forward: torch.Tensor
    forward_scale: torch.Tensor
    backward: torch.Tensor
    backward_scale: torch.Tensor


_weights: dict[int, tuple[weakref.ref[torch.Tensor], int, QuantizedWeight]] = {}


def quantized(weight: torch.Tensor) -> QuantizedWeight:
    """``weight``'s e4m3 copies, made at the first call and kept while the tensor lives and is not changed in place
    (its version counter)."""
    key = id(weight)
    entry = _weights.get(key)
    if entry is not None and entry[0]() is weight and entry[1] == weight._version:
        return entry[2]
    with torch.no_grad():
        fq, fs = quantize_rows(weight)
        bq, bs = quantize_rows(weight.t().contiguous())
    q = QuantizedWeight(fq, fs.reshape(1, -1).contiguous(), bq, bs.reshape(1, -1).contiguous())
    _weights[key] = (weakref.ref(weight, functools.partial(_drop, key)), weight._version, q)
    return q


def _drop(key: int, _: object) -> None:
    _weights.pop(key, None)


def release() -> int:
    """Drop every cached e4m3 weight (a worker done with training); returns how many there were."""
    n = len(_weights)
    _weights.clear()
    return n


class _LastInput:
    """The last activation quantized: q, k and v (gate and up) read the same tensor, which is quantized once."""

    def __init__(self) -> None:
        self.ref: weakref.ref[torch.Tensor] | None = None
        self.version = -1
        self.value: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self, x: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` quantized; ``source``: the tensor object ``x`` is a view of (the module's input), the cache's key
        with its version counter (a dead or changed source never matches)."""
        if (
            self.ref is not None
            and self.ref() is source
            and self.version == source._version
            and self.value is not None
            and self.value[0].shape == x.shape
        ):
            return self.value
        value = quantize_rows(x)
        self.ref, self.version, self.value = weakref.ref(source), source._version, value
        return value

    def clear(self) -> None:
        self.ref, self.value = None, None


_last = _LastInput()


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, source: torch.Tensor | None = None
) -> torch.Tensor:
    """``x W^T + b`` in FP8 (``x`` ``[tokens, in]``, `supported`), the output in ``x``'s dtype. ``source``: the
    tensor ``x`` was reshaped from, when other projections read it too (its quantized values are then reused)."""
    xq, xs = _last.get(x, source) if source is not None else quantize_rows(x)
    w = quantized(weight)
    out: torch.Tensor = torch._scaled_mm(
        xq,
        w.forward.t(),
        scale_a=xs,
        scale_b=w.forward_scale,
        bias=bias.to(x.dtype) if bias is not None else None,
        out_dtype=x.dtype,
        use_fast_accum=FAST_ACCUM_FORWARD,
    )
    return out


def input_grad(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``dy W`` in FP8 (``dy`` ``[tokens, out]``), the output in ``dy``'s dtype."""
    dq, ds = quantize_rows(dy)
    w = quantized(weight)
    out: torch.Tensor = torch._scaled_mm(
        dq, w.backward.t(), scale_a=ds, scale_b=w.backward_scale, out_dtype=dy.dtype, use_fast_accum=False
    )
    return out


def forget_input() -> None:
    """Drop the last quantized activation (the end of a forward)."""
    _last.clear()


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What `linear` computes, from the same quantized values, in fp32 on any device: for tests and `EMULATE`."""
    xq, xs = quantize_rows(x)
    w = quantized(weight)
    y = (xq.float() * xs) @ (w.forward.float() * w.forward_scale.t()).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def reference_input_grad(dy: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What `input_grad` computes, in fp32 on any device: for tests and `EMULATE`."""
    dq, ds = quantize_rows(dy)
    w = quantized(weight)
    return ((dq.float() * ds) @ (w.backward.float() * w.backward_scale.t()).t()).to(dy.dtype)


#: Run `base_fp8` where FP8 GEMMs cannot (the CPU): the frozen projections through `Emulated`, the same rounding in
#: fp32 arithmetic, slowly. For measuring what the rounding does to training on a real base without a GPU
#: (bench/fp8_error.py ``--train``); never set by the pipeline.
EMULATE = False


class Emulated(torch.autograd.Function):
    """A frozen projection ``x W^T + b`` as `linear` and `input_grad` round it, in fp32 (`reference_linear`,
    `reference_input_grad`): forward and input gradient; no gradient for the weight or bias."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.x_shape = x.shape
        y = reference_linear(x.reshape(-1, x.shape[-1]), weight, bias)
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (weight,) = ctx.saved_tensors
        dx = reference_input_grad(dy.reshape(-1, dy.shape[-1]).contiguous(), weight)
        return dx.view(ctx.x_shape), None, None


@functools.cache
def _triton() -> Any:
    modules = lora_kernels.triton_modules()
    return _build(*modules) if modules is not None else None


def _build(triton: Any, tl: Any) -> Any:
    @triton.jit
    def quantize_rows(X, Q, S, width, FMAX: tl.constexpr, SMALLEST: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < width
        x = tl.load(X + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0) / FMAX, SMALLEST)
        q = tl.minimum(tl.maximum(x / scale, -FMAX), FMAX)
        tl.store(Q + row * width + cols, q.to(tl.float8e4nv), mask=mask)
        tl.store(S + row, scale)

    class Kernels:
        pass

    k = Kernels()
    k.quantize_rows = quantize_rows  # type: ignore[attr-defined]
    return k
