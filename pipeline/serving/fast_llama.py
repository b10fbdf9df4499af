"""The fast engine's Llama (`FastLlama`): the base's weights read once, a static KV cache, the adapter slots, and
the forward passes. `pipeline.serving.fast_engine.FastEngine` schedules requests over it.

For Llama-architecture bases (SmolLM2, Llama 3.x) without biases. The base's weights are read once (fusing q|k|v
and gate|up into one matrix each); the base itself is never modified.

- **KV cache**: preallocated ``[layers, max_batch, kv_heads, max_seq, head_dim]`` for keys and values; batch row i
  is cache row i.
- **Decode step** (`FastLlama._decode_body`): one token for every row, written as plain torch ops (RMSNorm, RoPE
  from the base's own rotary table, grouped-query attention as two batched matmuls over the cache up to a context
  bucket with a per-row length mask, SwiGLU), then greedy argmax on the device, and the next token and position
  fed back on the device, so the step can be captured in a CUDA graph and replayed.
- **Sequence forward** (`FastLlama._seq_forward`): whole sequences in one batched forward
  (``scaled_dot_product_attention``), for prefill (writing cache rows) and scoring (padding on either side).
- **Adapters**: every slot is one contiguous row of a device buffer (``[slots + 1, P]``, bf16 on CUDA) holding
  all its LoRA weights in the layout of `pipeline.models.lora_ops`; the last row is the base (rank 0).
  `FastLlama.pack_adapter` checks a PEFT adapter and lays it out as one such row on the host.
- **LoRA**: decode uses the Triton kernels of `lora_ops` (per-row slot gather, masked to each slot's rank) on CUDA
  and the torch gather+bmm path elsewhere; the sequence forward always uses the torch path (rows share their
  adapter over all their tokens, so that is two well-shaped batched matmuls). Both equal, up to float rounding,
  `pipeline.models.multilora.MultiLoraLinear` on the same adapters (tests/unit/serving/test_engine_fast.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.models import lora_ops, multilora
from pipeline.models.multilora import AdapterLimitError
from pipeline.serving.engine import EngineError

#: Projection groups: projections that share their input, fused into one matmul (base and LoRA).
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("q_proj", "k_proj", "v_proj")),
    ("o", ("o_proj",)),
    ("gu", ("gate_proj", "up_proj")),
    ("down", ("down_proj",)),
)
_MODULE_GROUP = {m: (g, j) for g, ms in GROUPS for j, m in enumerate(ms)}


@dataclass
class PackedAdapter:
    """An adapter in the slot layout: one flat tensor (pinned on CUDA hosts) and its rank."""

    data: torch.Tensor
    rank: int

    @property
    def nbytes(self) -> int:
        """Size of the packed data in bytes (what one load copies)."""
        return self.data.numel() * self.data.element_size()


@dataclass
class _Group:
    """One layer's LoRA group: views into the slot buffer and its output segments."""

    a: torch.Tensor  # [slots + 1, nseg * R, K]
    bt: torch.Tensor  # [slots + 1, R, N]
    seg: tuple[int, ...]  # output column offsets, nseg + 1 of them
    a_off: int
    b_off: int
    k: int


@dataclass
class _Layer:
    wqkv: torch.Tensor
    wo: torch.Tensor
    wgu: torch.Tensor
    wd: torch.Tensor
    ln1: torch.Tensor
    ln2: torch.Tensor
    groups: dict[str, _Group]


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class FastLlama:
    """A Llama base's fused weights, KV cache and adapter slots on ``device``, and its forward passes (module doc).

    ``dtype`` defaults to bfloat16 on CUDA and float32 elsewhere; ``max_seq`` bounds the tokens of a cache row
    (default: the model's limit, at most 2048); ``use_triton`` defaults to True on CUDA when Triton is installed.
    """

    def __init__(
        self,
        model: Any,
        slots: int,
        max_rank: int,
        targets: Sequence[str],
        device: str | torch.device,
        max_batch: int,
        *,
        max_seq: int | None = None,
        dtype: torch.dtype | None = None,
        use_triton: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
        self.max_batch = max_batch
        self.slots = slots
        self.max_rank = max_rank
        self.targets = tuple(targets)
        unknown = sorted(set(self.targets) - set(multilora.ALL_TARGETS))
        if unknown or slots < 1 or max_rank < 1:
            raise AdapterLimitError(f"targets {unknown} unknown or slots/max_rank < 1 ({slots}, {max_rank})")
        cfg = model.config
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise EngineError("the fast engine serves Llama bases without biases")
        model_max = int(getattr(cfg, "max_position_embeddings", 2048))
        self.max_seq = int(max_seq or min(model_max, 2048))
        self.max_positions = min(model_max, self.max_seq)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = float(cfg.rms_norm_eps)
        self.hidden = cfg.hidden_size
        self.use_triton = (lora_ops.triton_available() and cuda) if use_triton is None else use_triton
        self.triton_attention = self.use_triton
        self._extract(model)
        self._alloc()

    # -- set-up -----------------------------------------------------------------------------------------------

    def _extract(self, model: Any) -> None:
        dev, dt = self.device, self.dtype
        inner = model.model

        def w(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=dev, dtype=dt).contiguous()

        self.embed = w(inner.embed_tokens.weight)
        self.lm_head = w(model.lm_head.weight)
        self.norm = w(inner.norm.weight)
        self.vocab = self.lm_head.shape[0]
        pos = torch.arange(self.max_seq, device=inner.rotary_emb.inv_freq.device)[None]
        probe = torch.zeros(1, dtype=torch.float32, device=pos.device)
        cos, sin = inner.rotary_emb(probe, pos)
        self.cos, self.sin = cos[0].to(dev, dt).contiguous(), sin[0].to(dev, dt).contiguous()
        self.layers: list[_Layer] = []
        self.module_of: dict[str, tuple[int, str]] = {}
        for i, layer in enumerate(inner.layers):
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    wqkv=w(torch.cat([at.q_proj.weight, at.k_proj.weight, at.v_proj.weight])),
                    wo=w(at.o_proj.weight),
                    wgu=w(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                    wd=w(mlp.down_proj.weight),
                    ln1=w(layer.input_layernorm.weight),
                    ln2=w(layer.post_attention_layernorm.weight),
                    groups={},
                )
            )
            for name in multilora.ALL_TARGETS:
                owner = at if name in ("q_proj", "k_proj", "v_proj", "o_proj") else mlp
                part = "self_attn" if owner is at else "mlp"
                self.module_of[f"model.layers.{i}.{part}.{name}"] = (i, name)
        self.shapes = {
            "q_proj": (self.hidden, self.n_heads * self.head_dim),
            "k_proj": (self.hidden, self.n_kv * self.head_dim),
            "v_proj": (self.hidden, self.n_kv * self.head_dim),
            "o_proj": (self.n_heads * self.head_dim, self.hidden),
            "gate_proj": (self.hidden, self.layers[0].wgu.shape[0] // 2),
            "up_proj": (self.hidden, self.layers[0].wgu.shape[0] // 2),
            "down_proj": (self.layers[0].wgu.shape[0] // 2, self.hidden),
        }

    def _alloc(self) -> None:
        dev, dt, r = self.device, self.dtype, self.max_rank
        plan: list[tuple[int, str, tuple[str, ...], int, tuple[int, ...], int, int]] = []
        off = 0
        for i in range(len(self.layers)):
            for g, mods in GROUPS:
                if not set(mods) & set(self.targets):
                    continue  # a group no target touches has no LoRA weights at all
                k = self.shapes[mods[0]][0]
                seg = tuple(itertools.accumulate((self.shapes[m][1] for m in mods), initial=0))
                a_off, off = off, off + len(mods) * r * k
                b_off, off = off, off + r * seg[-1]
                plan.append((i, g, mods, k, seg, a_off, b_off))
        self.slot_numel = off
        self.slot_bytes = off * torch.empty(0, dtype=dt).element_size()
        self.lora = torch.zeros(self.slots + 1, off, dtype=dt, device=dev)
        self.ranks = torch.zeros(self.slots + 1, dtype=torch.int32, device=dev)
        for i, g, mods, k, seg, a_off, b_off in plan:
            a = self.lora[:, a_off : a_off + len(mods) * r * k].unflatten(1, (len(mods) * r, k))
            bt = self.lora[:, b_off : b_off + r * seg[-1]].unflatten(1, (r, seg[-1]))
            self.layers[i].groups[g] = _Group(a, bt, seg, a_off, b_off, k)
        shape = (len(self.layers), self.max_batch, self.n_kv, self.max_seq, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dt, device=dev)
        self.v_cache = torch.zeros(shape, dtype=dt, device=dev)
        self._tok = torch.zeros(self.max_batch, dtype=torch.long, device=dev)
        self._pos = torch.zeros(self.max_batch, dtype=torch.long, device=dev)
        self._idx = torch.full((self.max_batch,), self.slots, dtype=torch.int32, device=dev)
        self._ar = torch.arange(self.max_batch, device=dev)
        self._tpos = torch.arange(self.max_seq, device=dev)

    # -- adapters ---------------------------------------------------------------------------------------------

    def pack_adapter(self, state: dict[str, torch.Tensor], config: dict[str, Any]) -> PackedAdapter:
        """Check a PEFT LoRA adapter against the slots' limits and lay it out as one slot row (host memory).

        Raises AdapterLimitError (see `multilora.load_slot`) when it does not fit; nothing is changed.
        """
        multilora.check_lora_config(config)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            path, which = multilora.parse_lora_key(key)
            pairs.setdefault(path, {})[which] = tensor
        if not pairs:
            raise AdapterLimitError("the adapter has no LoRA tensors")
        r_max = self.max_rank
        flat = torch.zeros(self.slot_numel, dtype=torch.float32)
        rank = 0
        for path, ab in sorted(pairs.items()):
            if set(ab) != {"A", "B"}:
                raise AdapterLimitError(f"module {path!r} has lora_{'A' if 'A' in ab else 'B'} but not the other half")
            where = self.module_of.get(path)
            if where is None or where[1] not in self.targets:
                raise AdapterLimitError(
                    f"adapter targets {path!r}, which is not a served target; allowed: {list(self.targets)}"
                )
            layer, name = where
            a, b = ab["A"].float(), ab["B"].float()
            r = a.shape[0]
            k, n = self.shapes[name]
            if r > r_max:
                raise AdapterLimitError(f"adapter rank {r} at {path!r} exceeds the maximum rank {r_max}")
            if a.shape != (r, k) or b.shape != (n, r):
                raise AdapterLimitError(
                    f"adapter shapes at {path!r} are A {tuple(a.shape)}, B {tuple(b.shape)}; the base layer needs "
                    f"A (r, {k}), B ({n}, r)"
                )
            if rank and r != rank:
                raise AdapterLimitError(f"adapter mixes ranks {rank} and {r}: one rank per adapter is served")
            rank = r
            gname, j = _MODULE_GROUP[name]
            grp = self.layers[layer].groups[gname]
            a_view = flat[grp.a_off : grp.a_off + grp.a.shape[1] * k].view(-1, k)
            a_view[j * r_max : j * r_max + r] = a
            b_view = flat[grp.b_off : grp.b_off + r_max * grp.seg[-1]].view(r_max, -1)
            b_view[:r, grp.seg[j] : grp.seg[j + 1]] = b.T * multilora.lora_scaling(config, r)
        data = flat.to(self.dtype)
        if self.device.type == "cuda":
            data = data.pin_memory()
        return PackedAdapter(data, rank)

    # -- forward passes ---------------------------------------------------------------------------------------

    def _lora(self, y: torch.Tensor, x: torch.Tensor, grp: _Group | None, idx: torch.Tensor | None) -> torch.Tensor:
        if grp is None or idx is None:
            return y
        if self.use_triton and x.dim() == 2:
            return lora_ops.lora_triton(y, x, grp.a, grp.bt, idx, self.ranks, grp.seg, self.max_rank)
        if x.dim() == 2:
            out = lora_ops.lora_torch(y[:, None], x[:, None], grp.a, grp.bt, idx.long(), grp.seg, self.max_rank)
            return out[:, 0]
        return lora_ops.lora_torch(y, x, grp.a, grp.bt, idx.long(), grp.seg, self.max_rank)

    def _mlp_and_proj(self, h: torch.Tensor, o: torch.Tensor, layer: _Layer, idx: torch.Tensor | None) -> torch.Tensor:
        g = layer.groups if idx is not None else {}
        h = h + self._lora(F.linear(o, layer.wo), o, g.get("o"), idx)
        x = _rms(h, layer.ln2, self.eps)
        gu = self._lora(F.linear(x, layer.wgu), x, g.get("gu"), idx)
        half = gu.shape[-1] // 2
        m = F.silu(gu[..., :half]) * gu[..., half:]
        return h + self._lora(F.linear(m, layer.wd), m, g.get("down"), idx)

    def _decode_body(self, nb: int, ctx: int, lora: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step for rows ``0..nb-1`` over the first ``ctx`` cache columns; feeds back token and position."""
        hq, hkv, d = self.n_heads, self.n_kv, self.head_dim
        tok = self._tok[:nb]
        pos = self._pos[:nb].clamp(max=self.max_seq - 1)
        idx = self._idx[:nb] if lora else None
        rows = self._ar[:nb]
        h = F.embedding(tok, self.embed)
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]
        for li, layer in enumerate(self.layers):
            x = _rms(h, layer.ln1, self.eps)
            qkv = F.linear(x, layer.wqkv)
            if idx is not None:
                qkv = self._lora(qkv, x, layer.groups.get("qkv"), idx)
            q = _rope(qkv[:, : hq * d].view(nb, hq, d), cos, sin)
            k = _rope(qkv[:, hq * d : (hq + hkv) * d].view(nb, hkv, d), cos, sin)
            v = qkv[:, (hq + hkv) * d :].view(nb, hkv, d)
            self.k_cache[li][rows, :, pos] = k
            self.v_cache[li][rows, :, pos] = v
            attend = lora_ops.decode_attention if self.triton_attention else lora_ops.decode_attention_torch
            o = attend(q, self.k_cache[li, :nb], self.v_cache[li, :nb], pos, ctx).reshape(nb, hq * d)
            h = self._mlp_and_proj(h, o, layer, idx)
        logits = F.linear(_rms(h, self.norm, self.eps), self.lm_head)
        nxt = logits.argmax(-1)
        self._tok[:nb].copy_(nxt)
        self._pos[:nb].add_(1)
        return logits, nxt

    def _seq_forward(
        self,
        ids: torch.Tensor,
        idx: torch.Tensor,
        rows: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        last_only: bool = True,
        lora: bool = True,
    ) -> torch.Tensor:
        """Forward of whole sequences ``ids [g, T]`` (row adapters ``idx``); writes cache ``rows`` when given.

        Without ``mask`` the rows have no padding (prefill); with one, padding may be on either side and positions
        count real tokens only (scoring; nothing is cached).
        """
        g, t = ids.shape
        hq, hkv, d = self.n_heads, self.n_kv, self.head_dim
        idx_l = idx if lora else None
        h = F.embedding(ids, self.embed)
        if mask is None:
            cos, sin = self.cos[:t][None, None], self.sin[:t][None, None]
            attn_mask = None
        else:
            positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
            causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
            attn_mask = (causal[None] & mask.bool()[:, None, :]) | torch.eye(t, dtype=torch.bool, device=ids.device)
            attn_mask = attn_mask[:, None]
        for li, layer in enumerate(self.layers):
            x = _rms(h, layer.ln1, self.eps)
            qkv = F.linear(x, layer.wqkv)
            if idx_l is not None:
                qkv = self._lora(qkv, x, layer.groups.get("qkv"), idx_l)
            q = _rope(qkv[..., : hq * d].view(g, t, hq, d).transpose(1, 2), cos, sin)
            k = _rope(qkv[..., hq * d : (hq + hkv) * d].view(g, t, hkv, d).transpose(1, 2), cos, sin)
            v = qkv[..., (hq + hkv) * d :].view(g, t, hkv, d).transpose(1, 2)
            if rows is not None:
                self.k_cache[li, rows, :, :t] = k
                self.v_cache[li, rows, :, :t] = v
            if attn_mask is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != hq)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=hkv != hq)
            o = o.transpose(1, 2).reshape(g, t, hq * d)
            h = self._mlp_and_proj(h, o, layer, idx_l)
        if last_only:
            h = h[:, -1]
        return F.linear(_rms(h, self.norm, self.eps), self.lm_head)
