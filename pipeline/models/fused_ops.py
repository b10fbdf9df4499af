"""Fused element-wise kernels of the fast engine's step: fewer launches per layer, the same numbers.

Each op has a torch reference (the CPU path, written with the same rounding steps as the plain ops it replaces)
and a Triton kernel (CUDA) that computes in float32 and rounds where the reference rounds, so both agree to the
last bit or one rounding step:

- `add_rms`: ``h = h + delta`` (the residual) then ``x = RMSNorm(h) * w``: one pass instead of eight ops;
- `silu_mul`: SwiGLU's ``silu(gate) * up`` from the fused gate|up output: one pass instead of three;
- `rope_cache`: rotary embedding of q and k from the fused q|k|v output, at each token's position, and the write of
  k and v into the paged KV cache at each token's location: one launch instead of about fifteen.

Tested against the references on a GPU (tests/unit/serving/test_engine_fast.py, skipped without CUDA) and through
the engine's equality with stock peft.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: absent on CPU-only machines (the torch path is used there).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None


def add_rms_torch(
    h: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: ``(h + delta, RMSNorm(h + delta) * w)`` for ``h, delta [T, H]`` (``delta`` None: no add)."""
    if delta is not None:
        h = h + delta
    xf = h.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return h, w * xf.to(h.dtype)


def silu_mul_torch(gu: torch.Tensor) -> torch.Tensor:
    """Reference: ``silu(gu[:, :F]) * gu[:, F:]`` for the fused gate|up output ``gu [T, 2F]``."""
    half = gu.shape[-1] // 2
    return torch.nn.functional.silu(gu[..., :half]) * gu[..., half:]


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (rotate-half form) of ``x [..., D]`` with ``cos, sin`` broadcast to it."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def rope_cache_torch(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    loc: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    hq: int,
    hkv: int,
) -> torch.Tensor:
    """Reference: rotary q and k of ``qkv [T, (hq + 2 hkv) D]`` at positions ``pos``; k and v written into the
    paged cache ``[blocks, hkv, BS, D]`` at flat locations ``loc`` (block * BS + offset); returns q ``[T, hq, D]``."""
    t = qkv.shape[0]
    bs, d = k_cache.shape[2], k_cache.shape[3]
    c, s = cos[pos][:, None], sin[pos][:, None]
    q = rope_torch(qkv[:, : hq * d].view(t, hq, d), c, s)
    k = rope_torch(qkv[:, hq * d : (hq + hkv) * d].view(t, hkv, d), c, s)
    v = qkv[:, (hq + hkv) * d :].view(t, hkv, d)
    blk, off = loc // bs, loc % bs
    k_cache[blk, :, off] = k
    v_cache[blk, :, off] = v
    return q


if triton is not None:

    @triton.jit
    def _add_rms_kernel(h_ptr, d_ptr, w_ptr, hout_ptr, x_ptr, n, eps, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < n
        h = tl.load(h_ptr + row * n + offs, mask=m, other=0.0)
        if HAS_DELTA:
            h = (h.to(tl.float32) + tl.load(d_ptr + row * n + offs, mask=m, other=0.0).to(tl.float32)).to(h.dtype)
            tl.store(hout_ptr + row * n + offs, h, mask=m)
        hf = h.to(tl.float32)
        r = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / n + eps)
        normed = (hf * r).to(h.dtype).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(x_ptr + row * n + offs, (w * normed).to(h.dtype), mask=m)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, f, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < f
        g = tl.load(gu_ptr + row * 2 * f + offs, mask=m, other=0.0)
        u = tl.load(gu_ptr + row * 2 * f + f + offs, mask=m, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        tl.store(out_ptr + row * f + offs, (s * u).to(g.dtype), mask=m)

    @triton.jit
    def _rope_cache_kernel(
        qkv_ptr, cos_ptr, sin_ptr, pos_ptr, loc_ptr, kc_ptr, vc_ptr, q_ptr,
        stride_qkv, stride_kb, stride_kh, HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
        BLOCK_H: tl.constexpr,
    ):  # fmt: skip
        # one program per token: every head (q heads, then k, then v) as one [BLOCK_H, D] tile
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        offs = tl.arange(0, D)[None, :]
        half: tl.constexpr = D // 2
        hmask = h < HQ + 2 * HKV
        src = qkv_ptr + t * stride_qkv + h * D
        x = tl.load(src + offs, mask=hmask, other=0.0)
        p = tl.load(pos_ptr + t).to(tl.int64)
        partner = tl.load(src + (offs + half) % D, mask=hmask, other=0.0).to(tl.float32)
        rot = tl.where(offs < half, -partner, partner).to(x.dtype).to(tl.float32)
        c = tl.load(cos_ptr + p * D + offs).to(tl.float32)
        s = tl.load(sin_ptr + p * D + offs).to(tl.float32)
        a = (x.to(tl.float32) * c).to(x.dtype).to(tl.float32)
        b = (rot * s).to(x.dtype).to(tl.float32)
        x = tl.where(h < HQ + HKV, (a + b).to(x.dtype), x)
        tl.store(q_ptr + (t * HQ + h) * D + offs, x, mask=h < HQ)
        loc = tl.load(loc_ptr + t).to(tl.int64)
        at = (loc // BS) * stride_kb + (loc % BS) * D + offs
        kmask = (h >= HQ) & (h < HQ + HKV)
        tl.store(kc_ptr + at + (h - HQ) * stride_kh, x, mask=kmask)
        vmask = (h >= HQ + HKV) & hmask
        tl.store(vc_ptr + at + (h - HQ - HKV) * stride_kh, x, mask=vmask)


def add_rms(
    h: torch.Tensor, delta: torch.Tensor | None, w: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `add_rms_torch` (``h, delta [T, H]`` contiguous); returns new tensors."""
    t, n = h.shape
    x = torch.empty_like(h)
    hout = torch.empty_like(h) if delta is not None else h
    _add_rms_kernel[(t,)](
        h, delta if delta is not None else h, w, hout, x, n, eps, HAS_DELTA=delta is not None,
        BLOCK=triton.next_power_of_2(n),
    )  # fmt: skip
    return hout, x


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """Triton `silu_mul_torch` (``gu [T, 2F]`` contiguous)."""
    t, f2 = gu.shape
    f = f2 // 2
    out = torch.empty(t, f, dtype=gu.dtype, device=gu.device)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(f, block))](gu, out, f, BLOCK=block)
    return out


def rope_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    loc: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    hq: int,
    hkv: int,
) -> torch.Tensor:
    """Triton `rope_cache_torch`: one program per token, all its heads (q, then k, then v) as one tile."""
    t = qkv.shape[0]
    bs, d = k_cache.shape[2], k_cache.shape[3]
    assert qkv.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous() and cos.is_contiguous()
    q = torch.empty(t, hq, d, dtype=qkv.dtype, device=qkv.device)
    _rope_cache_kernel[(t,)](
        qkv, cos, sin, pos, loc, k_cache, v_cache, q, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        HQ=hq, HKV=hkv, D=d, BS=bs, BLOCK_H=triton.next_power_of_2(hq + 2 * hkv),
    )  # fmt: skip
    return q
