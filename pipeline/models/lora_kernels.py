"""Triton kernels of the per-row LoRA branch at small rank, on CUDA: each row's tokens read once per pass.

`pipeline.models.multilora.MultiLoraLinear` adds to a frozen projection ``y = x W^T`` each batch row's own adapter,
``y += ((x A[s]^T) * scaling[s]) B[s]^T`` (row ``i`` uses stack row ``s = index[i]``). With torch ops that is a
batched GEMM per row: at rank 1, cuBLAS pads each row's ``[tokens, in] x [in, 1]`` to 64-wide tiles or runs a
GEMV per row, and a K=256 training step spent more time in the branch than in the frozen projections it rides on
(bench/results/retrain_throughput.md). Here one program takes a block of one row's tokens:

- `forward`: ``h = (x A[s]^T) * scaling[s]`` (the input read once), then ``y += h B[s]^T`` in place (the output read
  and written once); returns ``h`` (fp32, ``[rows, tokens, r]``) for the backward.
- `backward`: ``dh = (dy B[s]) * scaling[s]`` and ``dB[s] += dy^T h`` (``dy`` read once), then ``dx += dh A[s]``
  in place and ``dA[s] += dh^T x`` (the input and ``dx`` read once); the stacks' gradients are summed over a
  program's tokens first, then added to the user's row with fp32 atomics.

The four kernels are callable apart (`shrink`, `expand`, `dshrink`, `dexpand`; `forward` and `backward` are a
projection's pass): a group of projections that read the same input (`pipeline.models.multilora._TrainGroup`, q|k|v
and gate|up) runs one `shrink` over their A stacks side by side (``h`` ``[tokens, r_1 + r_2 + ...]``, a scale per
column), each projection's `expand` / `dshrink` on its block of columns of ``h`` / ``dh`` (a row stride apart from
the rank), and one `dexpand`.

Each pass is two kernels: ``h`` (``dh``) first, then the work over the other width. With `SPLIT` (the default) the
expand and both halves of the backward run one program per `SPAN` columns of the width they walk (``dh``'s sum
over the output width's blocks goes through fp32 atomics, its rounding and scale applied once it is whole), so a
step of a few hundred rows (Llama-1B's micro-batches) still fills the GPU; with ``SPLIT = False`` a program walks
the whole width (as the single kernel a pass before 2026-11-30's evening did). Both are tested equal to the torch
path.

The products run on tensor cores in the input's dtype (A and B cast to it, as the torch path does) with fp32
accumulation; the rank is padded to 16 in registers only. `available` says whether they can run (Triton imports, a
CUDA tensor of a half dtype, rank <= `MAX_RANK`); tests/unit/models/test_lora_kernels.py holds them equal to the
torch path on a GPU.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

#: The largest rank the kernels take (the padded rank lives in registers).
MAX_RANK = 64

#: Split (True): the forward's expand and both halves of the backward spread over blocks of `SPAN` columns of the
#: output (input) width as well as over blocks of a row's tokens, so a step of few long rows still fills the GPU;
#: False: one program per token block walks the whole width.
SPLIT = True
SPAN = 256
#: Tokens of a row per program (at most), and warps per program. On an H200 (`bench/retrain_kernels.py
#: --packed-only --sweep`), 32 tokens took the node's forward + backward from 2.1 to 1.5 ms at 576 -> 1536 and
#: from 3.6 to 2.6 ms at 2048 -> 8192 against 64 (rows of 20..128 tokens).
TOKEN_BLOCK = 32
WARPS = 4
#: Columns of the width one loop iteration of a program loads (a ``[tokens, WIDTH_BLOCK]`` tile); `SPAN` is a
#: multiple of it. 64 since the kernels were written; `bench/retrain_kernels.py --packed-only --sweep` tries 128.
WIDTH_BLOCK = 64


@functools.cache
def triton_modules() -> tuple[Any, Any] | None:
    """``(triton, triton.language)``, or None where Triton does not import (the CPU wheels, no GPU backend)."""
    try:
        import triton
        import triton.language as tl
    except Exception:
        return None
    return triton, tl


@functools.cache
def _triton() -> Any:
    modules = triton_modules()
    return _build(*modules) if modules is not None else None


def available(x: torch.Tensor, rank: int) -> bool:
    """Whether the kernels run for input ``x`` and LoRA rank ``rank``."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and 0 < rank <= MAX_RANK and _triton() is not None


def _blocks(tokens: int, rank: int) -> tuple[int, int]:
    """(tokens per program, padded rank)."""
    bt = 16
    while bt < min(tokens, TOKEN_BLOCK):
        bt *= 2
    rp = 16
    while rp < rank:
        rp *= 2
    return bt, rp


def _span(width: int) -> int:
    """Columns of the width one program walks: `SPAN` (split), or all of them, in whole `WIDTH_BLOCK` tiles."""
    if SPLIT:
        return max(SPAN // WIDTH_BLOCK, 1) * WIDTH_BLOCK
    return (width + WIDTH_BLOCK - 1) // WIDTH_BLOCK * WIDTH_BLOCK


def _offsets(x: torch.Tensor, offsets: torch.Tensor | None, longest: int | None) -> tuple[torch.Tensor, int, int]:
    """(row offsets into the flat tokens, rows, tokens of the longest row) of ``x``: ``[rows, tokens, in]`` rows of
    equal length (offsets: ``x`` itself, unused: the kernels compute them), or ``[1, T, in]`` packed rows at
    ``offsets`` (``[rows + 1]``; the longest read from them when not given)."""
    if offsets is None:
        return x, x.shape[0], x.shape[1]
    if longest is None:
        longest = int((offsets[1:] - offsets[:-1]).max()) if offsets.shape[0] > 1 else 0
    return offsets.to(torch.int64).contiguous(), offsets.shape[0] - 1, longest


def _scales(scaling: torch.Tensor) -> tuple[torch.Tensor, int, bool]:
    """(the scales as the kernels read them, their row stride, per column): ``scaling`` ``[n]`` (one per stack row)
    or ``[n, r]`` (one per column of ``h``: a group's stacks side by side, `shrink`)."""
    scaling = scaling.contiguous()
    if scaling.dim() == 2:
        return scaling, scaling.stride(0), True
    return scaling, 1, False


def prepared(
    x: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor | None, longest: int | None
) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """``(index, offsets, longest)`` as the kernels read them (contiguous, int64 offsets, the longest packed row:
    read from ``offsets`` when not given, a sync), once for the several kernels of a pass."""
    if offsets is None:
        return index.contiguous(), None, longest
    offsets, _, longest = _offsets(x, offsets, longest)
    return index.contiguous(), offsets, longest


def shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    scaling: torch.Tensor,
    index: torch.Tensor,
    offsets: torch.Tensor | None = None,
    longest: int | None = None,
) -> torch.Tensor:
    """``h = (x A[index]^T) * scaling[index]`` per row (fp32 ``[tokens, r]``, the product rounded to ``x``'s dtype
    first): ``x`` ``[rows, tokens, in]`` contiguous or packed ``[1, T, in]`` at ``offsets`` (as `forward`),
    ``lora_a`` ``[n, r, in]``, ``scaling`` ``[n]`` or ``[n, r]`` (a scale per column: the A stacks of projections
    that read the same input side by side, one pass over the input for all of them)."""
    k = _triton()
    d_in = x.shape[-1]
    rank = lora_a.shape[1]
    starts, rows, tokens = _offsets(x, offsets, longest)
    bt, rp = _blocks(tokens, rank)
    scales, ss, cols = _scales(scaling)
    h = torch.empty((x.numel() // d_in, rank), dtype=torch.float32, device=x.device)
    k.shrink[(rows, (tokens + bt - 1) // bt)](
        x, lora_a, scales, index.contiguous(), h, starts,
        tokens, d_in, rank, lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), ss, h.stride(0),
        EVEN=offsets is None, SCALE_COLS=cols, BT=bt, BI=WIDTH_BLOCK, RP=rp, num_warps=WARPS,
    )  # fmt: skip
    return h


def expand(
    y: torch.Tensor,
    lora_b: torch.Tensor,
    index: torch.Tensor,
    h: torch.Tensor,
    offsets: torch.Tensor | None = None,
    longest: int | None = None,
) -> None:
    """``y += h B[index]^T`` in place per row (``h`` ``[tokens, r]`` fp32, its columns contiguous: it may be a block
    of a group's ``h``); ``y`` as `forward`'s."""
    k = _triton()
    d_out, rank = lora_b.shape[1], lora_b.shape[2]
    starts, rows, tokens = _offsets(y, offsets, longest)
    bt, rp = _blocks(tokens, rank)
    span = _span(d_out)
    k.expand[(rows, (tokens + bt - 1) // bt, (d_out + span - 1) // span)](
        y, lora_b, index.contiguous(), h, starts,
        tokens, d_out, rank, lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), h.stride(0),
        EVEN=offsets is None, BT=bt, BO=WIDTH_BLOCK, RP=rp, SPAN=span, num_warps=WARPS,
    )  # fmt: skip


def dshrink(
    dy: torch.Tensor,
    lora_b: torch.Tensor,
    index: torch.Tensor,
    h: torch.Tensor,
    dh: torch.Tensor,
    offsets: torch.Tensor | None = None,
    longest: int | None = None,
) -> torch.Tensor:
    """The expand's backward: ``dh += dy B[index]`` (fp32 ``[tokens, r]``, zeroed by the caller, before the
    scale: `dexpand` applies it) and returns ``dB`` (fp32, ``lora_b``'s shape), ``dB[s] += dy^T h``."""
    k = _triton()
    d_out, rank = lora_b.shape[1], lora_b.shape[2]
    starts, rows, tokens = _offsets(dy, offsets, longest)
    bt, rp = _blocks(tokens, rank)
    db = torch.zeros(lora_b.shape, dtype=torch.float32, device=dy.device)
    span = _span(d_out)
    k.dshrink[(rows, (tokens + bt - 1) // bt, (d_out + span - 1) // span)](
        dy, lora_b, index.contiguous(), h, dh, db, starts,
        tokens, d_out, rank, lora_b.stride(0), lora_b.stride(1), lora_b.stride(2), h.stride(0), dh.stride(0),
        EVEN=offsets is None, BT=bt, BO=WIDTH_BLOCK, RP=rp, SPAN=span, num_warps=WARPS,
    )  # fmt: skip
    return db


def dexpand(
    dx: torch.Tensor | None,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    scaling: torch.Tensor,
    index: torch.Tensor,
    dh: torch.Tensor,
    offsets: torch.Tensor | None = None,
    longest: int | None = None,
) -> torch.Tensor:
    """The shrink's backward for `dshrink`'s ``dh``: the scale applied (``bf16(bf16(dh) * s)``), ``dx += dh
    A[index]`` in place when ``dx`` is given, and returns ``dA`` (fp32, ``lora_a``'s shape), ``dA[s] += dh^T x``;
    ``scaling`` as `shrink`'s."""
    k = _triton()
    d_in = x.shape[-1]
    rank = lora_a.shape[1]
    starts, rows, tokens = _offsets(x, offsets, longest)
    bt, rp = _blocks(tokens, rank)
    scales, ss, cols = _scales(scaling)
    da = torch.zeros(lora_a.shape, dtype=torch.float32, device=x.device)
    span = _span(d_in)
    k.dexpand[(rows, (tokens + bt - 1) // bt, (d_in + span - 1) // span)](
        dx if dx is not None else x, x, lora_a, scales, index.contiguous(), dh, da, starts,
        tokens, d_in, rank, lora_a.stride(0), lora_a.stride(1), lora_a.stride(2), ss, dh.stride(0),
        HAS_DX=dx is not None, EVEN=offsets is None, SCALE_COLS=cols,
        BT=bt, BI=WIDTH_BLOCK, RP=rp, SPAN=span, num_warps=WARPS,
    )  # fmt: skip
    return da


def forward(
    x: torch.Tensor,
    y: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    index: torch.Tensor,
    keep_h: bool = True,
    offsets: torch.Tensor | None = None,
    longest: int | None = None,
) -> torch.Tensor | None:
    """``y += ((x A[index]^T) * scaling[index]) B[index]^T`` in place, per row; ``x`` ``[rows, tokens, in]`` and
    ``y`` ``[rows, tokens, out]`` contiguous, or with ``offsets`` (``[rows + 1]``, on the device) ``[1, T, in]``
    and ``[1, T, out]``: packed rows, row ``i`` at tokens ``offsets[i] .. offsets[i + 1]`` (``longest``: the
    longest row, else read from ``offsets``: a sync); ``lora_a`` ``[n, r, in]``, ``lora_b`` ``[n, out, r]``,
    ``scaling`` ``[n]``, ``index`` ``[rows]`` (long, on the device). Returns ``h`` (fp32, ``[tokens, r]`` in the
    rows' order) when ``keep_h``."""
    index, offsets, longest = prepared(x, index, offsets, longest)
    # h first (each token block's input read once), then the expand over blocks of the output width
    h = shrink(x, lora_a, scaling, index, offsets, longest)
    expand(y, lora_b, index, h, offsets, longest)
    return h if keep_h else None


def backward(
    dy: torch.Tensor,
    dx: torch.Tensor | None,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    index: torch.Tensor,
    h: torch.Tensor,
    offsets: torch.Tensor | None = None,
    longest: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The branch's backward for `forward`'s arguments and ``h``: adds ``dh A[index]`` into ``dx`` in place (when
    given: ``dy W`` already there) and returns the stacks' gradients ``(dA, dB)`` (fp32, the stacks' shapes)."""
    index, offsets, longest = prepared(x, index, offsets, longest)
    # dh summed over blocks of the output width (with dB), then dx and dA over blocks of the input width
    dh = torch.zeros((h.shape[0], lora_b.shape[2]), dtype=torch.float32, device=x.device)
    db = dshrink(dy, lora_b, index, h, dh, offsets, longest)
    da = dexpand(dx, x, lora_a, scaling, index, dh, offsets, longest)
    return da, db


def _build(triton: Any, tl: Any) -> Any:
    """The jitted kernels (built where Triton imports)."""

    @triton.jit
    def lora_shrink(
        X, A, S, IDX, H, OFF,
        tokens, d_in, rank, sa_n, sa_r, sa_i, ss, sh,
        EVEN: tl.constexpr, SCALE_COLS: tl.constexpr, BT: tl.constexpr, BI: tl.constexpr, RP: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        if EVEN:
            start = row * tokens
            length = tokens
        else:
            start = tl.load(OFF + row)
            length = tl.load(OFF + row + 1) - start
        t0 = tl.program_id(1) * BT
        if t0 >= length:  # a block past this row's end (rows shorter than the longest)
            return
        toks = t0 + tl.arange(0, BT)
        tmask = toks < length
        slot = tl.load(IDX + row)
        rr = tl.arange(0, RP)
        rmask = rr < rank
        if SCALE_COLS:  # a scale per column (a group's stacks side by side)
            scale = tl.load(S + slot * ss + rr, mask=rmask, other=0.0).to(tl.float32)[None, :]
        else:
            scale = tl.load(S + slot).to(tl.float32)
        x_row = X + start * d_in
        acc = tl.zeros((BT, RP), dtype=tl.float32)
        for i0 in range(0, d_in, BI):
            ii = i0 + tl.arange(0, BI)
            imask = ii < d_in
            x = tl.load(x_row + toks[:, None] * d_in + ii[None, :], mask=tmask[:, None] & imask[None, :], other=0.0)
            a = tl.load(
                A + slot * sa_n + ii[:, None] * sa_i + rr[None, :] * sa_r,
                mask=imask[:, None] & rmask[None, :],
                other=0.0,
            )
            acc += tl.dot(x, a.to(x.dtype))
        h = acc.to(X.dtype.element_ty).to(tl.float32) * scale
        tl.store(H + (start + toks)[:, None] * sh + rr[None, :], h, mask=tmask[:, None] & rmask[None, :])

    @triton.jit
    def lora_expand(
        Y, B, IDX, H, OFF,
        tokens, d_out, rank, sb_n, sb_o, sb_r, sh,
        EVEN: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr, RP: tl.constexpr, SPAN: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        if EVEN:
            start = row * tokens
            length = tokens
        else:
            start = tl.load(OFF + row)
            length = tl.load(OFF + row + 1) - start
        t0 = tl.program_id(1) * BT
        if t0 >= length:
            return
        toks = t0 + tl.arange(0, BT)
        tmask = toks < length
        slot = tl.load(IDX + row)
        rr = tl.arange(0, RP)
        rmask = rr < rank
        h = tl.load(H + (start + toks)[:, None] * sh + rr[None, :], mask=tmask[:, None] & rmask[None, :], other=0.0)
        hb = h.to(Y.dtype.element_ty)
        y_row = Y + start * d_out
        first = tl.program_id(2) * SPAN
        for o0 in range(first, first + SPAN, BO):
            oo = o0 + tl.arange(0, BO)
            omask = oo < d_out
            b = tl.load(
                B + slot * sb_n + rr[:, None] * sb_r + oo[None, :] * sb_o,
                mask=rmask[:, None] & omask[None, :],
                other=0.0,
            )
            m = tmask[:, None] & omask[None, :]
            ptr = y_row + toks[:, None] * d_out + oo[None, :]
            y = tl.load(ptr, mask=m, other=0.0).to(tl.float32) + tl.dot(hb, b.to(hb.dtype))
            tl.store(ptr, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def lora_dshrink(
        DY, B, IDX, H, DH, DB, OFF,
        tokens, d_out, rank, sb_n, sb_o, sb_r, sh, sdh,
        EVEN: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr, RP: tl.constexpr, SPAN: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        if EVEN:
            start = row * tokens
            length = tokens
        else:
            start = tl.load(OFF + row)
            length = tl.load(OFF + row + 1) - start
        t0 = tl.program_id(1) * BT
        if t0 >= length:
            return
        toks = t0 + tl.arange(0, BT)
        tmask = toks < length
        slot = tl.load(IDX + row)
        rr = tl.arange(0, RP)
        rmask = rr < rank
        hmask = tmask[:, None] & rmask[None, :]
        h = tl.load(H + (start + toks)[:, None] * sh + rr[None, :], mask=hmask, other=0.0)
        hb = h.to(DY.dtype.element_ty)
        dy_row = DY + start * d_out
        acc = tl.zeros((BT, RP), dtype=tl.float32)
        first = tl.program_id(2) * SPAN
        for o0 in range(first, first + SPAN, BO):
            oo = o0 + tl.arange(0, BO)
            omask = oo < d_out
            dy = tl.load(dy_row + toks[:, None] * d_out + oo[None, :], mask=tmask[:, None] & omask[None, :], other=0.0)
            b = tl.load(
                B + slot * sb_n + oo[:, None] * sb_o + rr[None, :] * sb_r,
                mask=omask[:, None] & rmask[None, :],
                other=0.0,
            )
            acc += tl.dot(dy, b.to(dy.dtype))
            db = tl.dot(tl.trans(dy), hb)
            tl.atomic_add(
                DB + slot * d_out * rank + oo[:, None] * rank + rr[None, :], db, mask=omask[:, None] & rmask[None, :]
            )
        # this block of the output width's share of dh (before the scale): summed over the blocks in fp32
        tl.atomic_add(DH + (start + toks)[:, None] * sdh + rr[None, :], acc, mask=hmask)

    @triton.jit
    def lora_dexpand(
        DX, X, A, S, IDX, DH, DA, OFF,
        tokens, d_in, rank, sa_n, sa_r, sa_i, ss, sdh,
        HAS_DX: tl.constexpr, EVEN: tl.constexpr, SCALE_COLS: tl.constexpr,
        BT: tl.constexpr, BI: tl.constexpr, RP: tl.constexpr, SPAN: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        if EVEN:
            start = row * tokens
            length = tokens
        else:
            start = tl.load(OFF + row)
            length = tl.load(OFF + row + 1) - start
        t0 = tl.program_id(1) * BT
        if t0 >= length:
            return
        toks = t0 + tl.arange(0, BT)
        tmask = toks < length
        slot = tl.load(IDX + row)
        rr = tl.arange(0, RP)
        rmask = rr < rank
        if SCALE_COLS:
            scale = tl.load(S + slot * ss + rr, mask=rmask, other=0.0).to(tl.float32)[None, :]
        else:
            scale = tl.load(S + slot).to(tl.float32)
        dhmask = tmask[:, None] & rmask[None, :]
        acc = tl.load(DH + (start + toks)[:, None] * sdh + rr[None, :], mask=dhmask, other=0.0)
        dh = (acc.to(X.dtype.element_ty).to(tl.float32) * scale).to(X.dtype.element_ty)
        x_row = X + start * d_in
        dx_row = DX + start * d_in
        first = tl.program_id(2) * SPAN
        for i0 in range(first, first + SPAN, BI):
            ii = i0 + tl.arange(0, BI)
            imask = ii < d_in
            m = tmask[:, None] & imask[None, :]
            x = tl.load(x_row + toks[:, None] * d_in + ii[None, :], mask=m, other=0.0)
            a = tl.load(
                A + slot * sa_n + rr[:, None] * sa_r + ii[None, :] * sa_i,
                mask=rmask[:, None] & imask[None, :],
                other=0.0,
            )
            if HAS_DX:
                ptr = dx_row + toks[:, None] * d_in + ii[None, :]
                dx = tl.load(ptr, mask=m, other=0.0).to(tl.float32) + tl.dot(dh, a.to(dh.dtype))
                tl.store(ptr, dx.to(DX.dtype.element_ty), mask=m)
            da = tl.dot(tl.trans(dh), x)
            tl.atomic_add(
                DA + slot * rank * d_in + rr[:, None] * d_in + ii[None, :], da, mask=rmask[:, None] & imask[None, :]
            )

    class Kernels:
        shrink = lora_shrink
        expand = lora_expand
        dshrink = lora_dshrink
        dexpand = lora_dexpand

    return Kernels
