"""Batched multi-LoRA application over adapter slots: one Triton path (CUDA decode) and one torch path (reference).

Layout (fixed by the fast serving engine, `pipeline.serving.fast_llama`): every adapter slot is one row of a flat
buffer; the LoRA weights of one projection *group* (projections that share their input, e.g. q/k/v or gate/up) are
views of that row:

- ``a  [slots + 1, nseg * R, K]``: the A matrices of the group's ``nseg`` projections stacked, each padded to ``R``
  rows (the slots' maximum rank);
- ``bt [slots + 1, R, N]``: the B matrices transposed and concatenated along the output (``N`` = the group's total
  output width), already multiplied by the adapter's scaling; segment ``j`` of the output (columns
  ``seg[j]..seg[j+1]``) uses rows ``j*R .. j*R + rank`` of ``a``;
- ``ranks [slots + 1]`` (int32): each slot's rank; the last slot is the base (rank 0).

``y = base_out + per row b: sum_j (x_b @ a[s_b, jR:jR+r]^T) @ bt[s_b, :r, seg_j]`` with ``s_b = idx[b]``.

The Triton kernels (decode: one token per row) read only the first ``rank`` rows of a slot (masked loads fetch
nothing), so an r=1 adapter in an r=8 slot moves 1/8 of the bytes: mixed ranks cost what they hold, not the
padding. The torch path gathers the rows' slots and runs two batched matmuls; padded rows are zero, so it is
exact too. The torch path is the CPU path and the reference the Triton kernels are checked against; both are
tested against the project's one per-row LoRA layer, `pipeline.models.multilora.MultiLoraLinear`, through the
fast engine (tests/unit/serving/test_engine_fast.py; the Triton kernels where CUDA is present). The kernels work per
row, and a row may be one token of a flat list (the fast engine's step: decode tokens and prefill chunks together).
Paged attention (grouped-query, each token over its sequence's KV blocks up to its position) has a Triton kernel and
a torch reference too.
"""

from __future__ import annotations

import torch

try:  # Triton is optional: absent on CPU-only machines (the torch path is used there).
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None
    tl = None


def triton_available() -> bool:
    """Whether the Triton kernels can run (Triton importable and a CUDA device present)."""
    return triton is not None and torch.cuda.is_available()


def decode_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, ctx: int
) -> torch.Tensor:
    """Reference decode attention (grouped-query): ``q [B, Hq, D]``, ``k, v [B, Hkv, >=ctx, D]``, ``pos [B]``."""
    bsz, hq, d = q.shape
    hkv = k.shape[1]
    keys, values = k[:, :, :ctx], v[:, :, :ctx]
    bias = torch.zeros(bsz, ctx, dtype=torch.float32, device=q.device)
    bias = bias.masked_fill(torch.arange(ctx, device=q.device)[None] > pos[:, None], float("-inf"))
    scores = torch.matmul(q.view(bsz, hkv, hq // hkv, d), keys.transpose(-1, -2)).float() / d**0.5
    probs = torch.softmax(scores + bias[:, None, None], dim=-1).to(q.dtype)
    return torch.matmul(probs, values).reshape(bsz, hq, d)


def paged_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    seq: torch.Tensor,
    pos: torch.Tensor,
    ctx: int,
) -> torch.Tensor:
    """Reference paged attention: token t (``q [T, Hq, D]``) attends to the first ``pos[t] + 1`` cached tokens of
    sequence ``seq[t]``, whose blocks are ``table[seq[t]]`` of ``k_cache, v_cache [blocks, Hkv, BS, D]``; ``ctx``
    (a multiple of BS, at least ``max(pos) + 1``) bounds the blocks gathered."""
    t = q.shape[0]
    hkv, bs, d = k_cache.shape[1:]
    nblk = -(-ctx // bs)
    blocks = table.index_select(0, seq)[:, :nblk].long()  # [T, nblk]

    def dense(c: torch.Tensor) -> torch.Tensor:
        return c[blocks].permute(0, 2, 1, 3, 4).reshape(t, hkv, nblk * bs, d)

    return decode_attention_torch(q, dense(k_cache), dense(v_cache), pos, nblk * bs)


def lora_torch(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    idx: torch.Tensor,
    seg: tuple[int, ...],
    rank: int,
) -> torch.Tensor:
    """Reference: ``y [B, T, N] + LoRA(x [B, T, K])`` per row slot ``idx [B]`` (see module doc); returns a new tensor.

    ``rank`` is the slots' padded rank R (padding rows are zero, so the result is exact for every slot's rank).
    """
    ag = a.index_select(0, idx)  # [B, nseg*R, K]
    bg = bt.index_select(0, idx)  # [B, R, N]
    t = torch.bmm(x, ag.transpose(1, 2).to(x.dtype))  # [B, T, nseg*R]
    parts = []
    for j in range(len(seg) - 1):
        tj = t[:, :, j * rank : (j + 1) * rank]
        parts.append(torch.bmm(tj, bg[:, :, seg[j] : seg[j + 1]].to(x.dtype)))
    delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return y + delta.to(y.dtype)


if triton is not None:

    @triton.jit
    def _shrink_kernel(
        x_ptr,
        a_ptr,
        idx_ptr,
        rank_ptr,
        t_ptr,
        K,
        stride_x,
        stride_as,
        stride_ar,
        R: tl.constexpr,
        NR: tl.constexpr,
        BLOCK_R: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        b = tl.program_id(0)
        s = tl.load(idx_ptr + b)
        r = tl.load(rank_ptr + s)
        offs_r = tl.arange(0, BLOCK_R)
        rmask = (offs_r < NR) & ((offs_r % R) < r)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            xv = tl.load(x_ptr + b * stride_x + offs_k, mask=kmask & (r > 0), other=0.0).to(tl.float32)
            av = tl.load(
                a_ptr + s.to(tl.int64) * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :],
                mask=rmask[:, None] & kmask[None, :],
                other=0.0,
            ).to(tl.float32)
            acc += tl.sum(av * xv[None, :], axis=1)
        tl.store(t_ptr + b * NR + offs_r, acc, mask=offs_r < NR)

    @triton.jit
    def _expand_kernel(
        y_ptr,
        t_ptr,
        bt_ptr,
        idx_ptr,
        rank_ptr,
        out_ptr,
        N,
        seg1,
        seg2,
        stride_y,
        stride_bs,
        stride_br,
        stride_out,
        R: tl.constexpr,
        NR: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        b = tl.program_id(0)
        nb = tl.program_id(1)
        s = tl.load(idx_ptr + b)
        r = tl.load(rank_ptr + s)
        offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < N
        t_off = ((offs_n >= seg1).to(tl.int32) + (offs_n >= seg2).to(tl.int32)) * R
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        base = bt_ptr + s.to(tl.int64) * stride_bs
        for rr in tl.static_range(R):
            m = nmask & (rr < r)
            tv = tl.load(t_ptr + b * NR + t_off + rr, mask=m, other=0.0)
            bv = tl.load(base + rr * stride_br + offs_n, mask=m, other=0.0).to(tl.float32)
            acc += tv * bv
        yv = tl.load(y_ptr + b * stride_y + offs_n, mask=nmask, other=0.0).to(tl.float32)
        tl.store(out_ptr + b * stride_out + offs_n, (yv + acc).to(out_ptr.dtype.element_ty), mask=nmask)


if triton is not None:

    @triton.jit
    def _paged_attn_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        table_ptr,
        seq_ptr,
        pos_ptr,
        o_ptr,
        sm_scale,
        stride_qt,
        stride_kb,
        stride_kh,
        stride_tab,
        G: tl.constexpr,
        BLOCK_G: tl.constexpr,
        D: tl.constexpr,
        BS: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        t = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.load(seq_ptr + t).to(tl.int64)
        end = tl.load(pos_ptr + t) + 1
        offs_g = tl.arange(0, BLOCK_G)
        gmask = offs_g < G
        offs_d = tl.arange(0, D)
        q_rows = q_ptr + t * stride_qt + (h * G + offs_g)[:, None] * D + offs_d[None, :]
        q = tl.load(q_rows, mask=gmask[:, None], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, D], dtype=tl.float32)
        tab = table_ptr + s * stride_tab
        for t0 in range(0, end, BLOCK_T):
            offs_t = t0 + tl.arange(0, BLOCK_T)
            tmask = offs_t < end
            blk = tl.load(tab + offs_t // BS, mask=tmask, other=0).to(tl.int64)
            at = blk[:, None] * stride_kb + h * stride_kh + (offs_t % BS)[:, None] * D + offs_d[None, :]
            k = tl.load(k_ptr + at, mask=tmask[:, None], other=0.0)
            sc = tl.dot(q, tl.trans(k)) * sm_scale
            sc = tl.where(tmask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, 1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + at, mask=tmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + t * stride_qt + (h * G + offs_g)[:, None] * D + offs_d[None, :], out, mask=gmask[:, None])


# Launch configuration of the paged-attention kernel (tokens per loop step, warps, pipeline stages); chosen on an
# H200 by bench/serving_kernels.py (bench/results/serving_kernels.md).
PAGED_ATTN_CONFIG: dict[str, int] = {"BLOCK_T": 64, "num_warps": 2, "num_stages": 3}


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    seq: torch.Tensor,
    pos: torch.Tensor,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Triton paged attention (equals `paged_attention_torch`): one program per token and kv head walks the
    token's sequence's blocks up to its position (online softmax in float32); no context bound is needed."""
    t, hq, d = q.shape
    hkv, bs = k_cache.shape[1], k_cache.shape[2]
    o = torch.empty_like(q)
    g = hq // hkv
    assert q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous() and table.is_contiguous()
    cfg = config or PAGED_ATTN_CONFIG
    _paged_attn_kernel[(t, hkv)](
        q, k_cache, v_cache, table, seq, pos, o, 1.0 / d**0.5, q.stride(0), k_cache.stride(0), k_cache.stride(1),
        table.stride(0), G=g, BLOCK_G=max(16, triton.next_power_of_2(g)), D=d, BS=bs, BLOCK_T=cfg["BLOCK_T"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )  # fmt: skip
    return o


if triton is not None:

    @triton.jit
    def _lora_one_kernel(
        y_ptr, x_ptr, a_ptr, bt_ptr, idx_ptr, rank_ptr, out_ptr, K, N, seg1, seg2,
        stride_x, stride_y, stride_out, stride_as, stride_ar, stride_bs, stride_br,
        R: tl.constexpr, NSEG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0)
        s = tl.load(idx_ptr + b).to(tl.int64)
        r = tl.load(rank_ptr + s)
        offs_r = tl.arange(0, BLOCK_R)
        rmask = (offs_r < NSEG * R) & ((offs_r % R) < r)
        t = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # shrink: t = A[s] x, the rank-r rows of each segment
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < K
            xv = tl.load(x_ptr + b * stride_x + offs_k, mask=kmask & (r > 0), other=0.0).to(tl.float32)
            av = tl.load(
                a_ptr + s * stride_as + offs_r[:, None] * stride_ar + offs_k[None, :],
                mask=rmask[:, None] & kmask[None, :],
                other=0.0,
            ).to(tl.float32)
            t += tl.sum(av * xv[None, :], axis=1)
        base = bt_ptr + s * stride_bs
        for n0 in range(0, N, BLOCK_N):  # expand: out = y + t_seg(n) B^T[s][:, n], column block by block
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < N
            segi = (offs_n >= seg1).to(tl.int32) + (offs_n >= seg2).to(tl.int32)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for rr in tl.static_range(R):
                tcol = tl.zeros([BLOCK_N], dtype=tl.float32)
                for j in tl.static_range(NSEG):
                    tj = tl.sum(tl.where(offs_r == j * R + rr, t, 0.0), axis=0)
                    tcol += tl.where(segi == j, tj, 0.0)
                bv = tl.load(base + rr * stride_br + offs_n, mask=nmask & (rr < r), other=0.0).to(tl.float32)
                acc += tcol * bv
            yv = tl.load(y_ptr + b * stride_y + offs_n, mask=nmask, other=0.0).to(tl.float32)
            tl.store(out_ptr + b * stride_out + offs_n, (yv + acc).to(out_ptr.dtype.element_ty), mask=nmask)


def lora_triton_one(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    idx: torch.Tensor,
    ranks: torch.Tensor,
    seg: tuple[int, ...],
    rank: int,
) -> torch.Tensor:
    """`lora_triton` in one kernel instead of two (one program per row: its shrink, then its expand over all
    columns): half the launches, each row's A read once. Not the default until measured against the two kernels
    (`FastLlama.one_kernel_lora`); equals `lora_torch` (tests/unit/serving/test_engine_fast.py, CUDA)."""
    bsz, k = x.shape
    n = y.shape[1]
    nseg = len(seg) - 1
    assert a.stride(2) == 1 and bt.stride(2) == 1 and x.stride(1) == 1 and y.stride(1) == 1
    out = torch.empty_like(y)
    block_r = max(triton.next_power_of_2(nseg * rank), 2)
    _lora_one_kernel[(bsz,)](
        y, x, a, bt, idx, ranks, out, k, n, seg[1] if nseg > 1 else n, seg[2] if nseg > 2 else n,
        x.stride(0), y.stride(0), out.stride(0), a.stride(0), a.stride(1), bt.stride(0), bt.stride(1),
        R=rank, NSEG=nseg, BLOCK_R=block_r, BLOCK_K=128 if block_r >= 16 else 256, BLOCK_N=256,
    )  # fmt: skip
    return out


def lora_triton(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    idx: torch.Tensor,
    ranks: torch.Tensor,
    seg: tuple[int, ...],
    rank: int,
) -> torch.Tensor:
    """Triton decode path: ``y [B, N] + LoRA(x [B, K])`` per row slot ``idx [B]`` (int32); one token per row."""
    bsz, k = x.shape
    n = y.shape[1]
    nseg = len(seg) - 1
    nr = nseg * rank
    assert a.stride(2) == 1 and bt.stride(2) == 1 and x.stride(1) == 1 and y.stride(1) == 1
    t = torch.empty(bsz, nr, device=x.device, dtype=torch.float32)
    block_r = max(triton.next_power_of_2(nr), 2)
    _shrink_kernel[(bsz,)](
        x, a, idx, ranks, t, k, x.stride(0), a.stride(0), a.stride(1),
        R=rank, NR=nr, BLOCK_R=block_r, BLOCK_K=128 if block_r >= 16 else 256,
    )  # fmt: skip
    out = torch.empty_like(y)
    seg1 = seg[1] if nseg > 1 else n
    seg2 = seg[2] if nseg > 2 else n
    block_n = 512
    _expand_kernel[(bsz, triton.cdiv(n, block_n))](
        y, t, bt, idx, ranks, out, n, seg1, seg2, y.stride(0), bt.stride(0), bt.stride(1), out.stride(0),
        R=rank, NR=nr, BLOCK_N=block_n,
    )  # fmt: skip
    return out
