"""The fast serving engine: own Llama decode step over a static KV cache, CUDA graphs, batched multi-LoRA slots.

Same public API as `pipeline.serving.engine.Engine` (submit / step / generate / logits / load_adapter_state /
clear_adapter / abort_all / close), for Llama-architecture bases (SmolLM2, Llama 3.x). It reads the base's weights
once (fusing q|k|v and gate|up into one matrix each) and never modifies the base.

- **KV cache**: preallocated ``[layers, max_batch, kv_heads, max_seq, head_dim]`` for keys and values. Running
  requests occupy rows ``0..n-1``; a request that leaves is replaced by the last row (one copy of that row).
- **Decode step**: one token for every row, written as plain torch ops (RMSNorm, RoPE from the base's own rotary
  table, grouped-query attention as two batched matmuls over the cache up to a context bucket with a per-row
  length mask, SwiGLU), then greedy argmax on the device, and the next token and position fed back on the device.
  On CUDA each (batch bucket, context bucket, with/without LoRA) step is captured once in a CUDA graph and
  replayed; the host launches step k+1 before it reads step k's tokens (when every row is greedy), so Python
  bookkeeping overlaps the GPU.
- **Adapters**: every slot is one contiguous row of a device buffer (``[slots + 1, P]``, bf16 on CUDA) holding
  all its LoRA weights in the layout of `pipeline.serving.lora_ops`; the last row is the base (rank 0). An adapter
  is *packed* on the host into that layout once (`pack_adapter`, pinned memory), then loaded with one
  host-to-device copy on a side stream (`load_packed`), which does not wait for, or hold up, decode steps.
- **LoRA**: decode uses the Triton kernels of `lora_ops` (per-row slot gather, masked to each slot's rank) on CUDA
  and the torch gather+bmm path elsewhere; prefill always uses the torch path (rows share their adapter over all
  their tokens, so that is two well-shaped batched matmuls).
- **Prefill**: waiting requests are grouped by prompt length and each group runs as one batched forward
  (``scaled_dot_product_attention``, causal), writing its cache rows; not graph-captured.

Sampling and stop rules are those of `engine.GenerationLoop` (greedy on the device; temperature/top-p on the host
from the row's logits, seeded per request).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from pipeline.models import multilora
from pipeline.models.multilora import ALL_TARGETS, BASE_SLOT, AdapterLimitError
from pipeline.serving import lora_ops
from pipeline.serving.engine import BaseLike, Engine, EngineError, Generation, GenerationLoop, StepOutput

if TYPE_CHECKING:
    from pipeline.config import ServingSettings

log = logging.getLogger(__name__)

#: Projection groups: projections that share their input, fused into one matmul (base and LoRA).
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("q_proj", "k_proj", "v_proj")),
    ("o", ("o_proj",)),
    ("gu", ("gate_proj", "up_proj")),
    ("down", ("down_proj",)),
)
_MODULE_GROUP = {m: (g, j) for g, ms in GROUPS for j, m in enumerate(ms)}
_CTX_STEP = 64


@dataclass
class PackedAdapter:
    """An adapter in the slot layout: one flat tensor (pinned on CUDA hosts) and its rank."""

    data: torch.Tensor
    rank: int

    @property
    def nbytes(self) -> int:
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


@dataclass
class _Launch:
    """A decode step launched and not yet read back."""

    gens: list[Generation]
    lengths: list[int]  # tokens in each row's cache after the step
    next_host: torch.Tensor
    logits: torch.Tensor | None  # kept when a row samples on the host
    event: Any


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def _batch_buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, 16, 32) if b < max_batch]
    sizes += [*range(64, max_batch, 64), max_batch]
    return sorted(set(sizes))


class FastEngine(GenerationLoop):
    """Continuous-batching generation with many LoRA adapters per batch (see the module doc).

    ``dtype`` defaults to bfloat16 on CUDA and float32 elsewhere; ``max_seq`` bounds prompt + generated tokens of a
    request (default: the model's limit, at most 2048); ``cuda_graphs`` defaults to True on CUDA.
    """

    def __init__(
        self,
        base: BaseLike,
        slots: int,
        max_rank: int,
        targets: Sequence[str] = ALL_TARGETS,
        device: str | torch.device = "cpu",
        max_batch: int = 32,
        *,
        max_seq: int | None = None,
        dtype: torch.dtype | None = None,
        cuda_graphs: bool | None = None,
        use_triton: bool | None = None,
        prefill_tokens: int = 32768,
    ) -> None:
        model = base.model
        self.tokenizer = base.tokenizer
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
        self.max_batch = max_batch
        self.slots = slots
        self.max_rank = max_rank
        self.targets = tuple(targets)
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown or slots < 1 or max_rank < 1:
            raise AdapterLimitError(f"targets {unknown} unknown or slots/max_rank < 1 ({slots}, {max_rank})")
        cfg = model.config
        if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
            raise EngineError("the fast engine serves Llama bases without biases")
        self.eos_token_id: int | None = getattr(cfg, "eos_token_id", None)
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None
        model_max = int(getattr(cfg, "max_position_embeddings", 2048))
        self.max_seq = int(max_seq or min(model_max, 2048))
        self.max_positions = min(model_max, self.max_seq)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = float(cfg.rms_norm_eps)
        self.hidden = cfg.hidden_size
        self.use_graphs = cuda if cuda_graphs is None else (cuda_graphs and cuda)
        self.use_triton = (lora_ops.triton_available() and cuda) if use_triton is None else use_triton
        self.triton_attention = self.use_triton
        self.prefill_tokens = prefill_tokens
        self._extract(model)
        self._alloc()
        self._ids = itertools.count()
        self._waiting: deque[Generation] = deque()
        self._rows: list[Generation] = []
        self._lengths: list[int] = []  # tokens in each row's cache
        self._inflight: _Launch | None = None
        self._graphs: dict[tuple[int, int, bool], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._load_stream = torch.cuda.Stream(self.device) if cuda else None
        self._host_flip = 0
        log.info(
            "fast engine: %d layers, %d slots (max rank %d, %.1f MB each), batch %d, seq %d, %s, graphs %s, triton %s",
            len(self.layers), slots, max_rank, self.slot_bytes / 1e6, max_batch, self.max_seq, self.dtype,
            self.use_graphs, self.use_triton,
        )  # fmt: skip

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
            for name in ALL_TARGETS:
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
        pin = dev.type == "cuda"
        self._next_host = [torch.zeros(self.max_batch, dtype=torch.long, pin_memory=pin) for _ in range(2)]

    # -- adapters ---------------------------------------------------------------------------------------------

    def _slot_in_use(self, slot: int) -> bool:
        return any(g.request.slot == slot for g in itertools.chain(self._rows, self._waiting))

    def pack_adapter(self, state: dict[str, torch.Tensor], config: dict[str, Any]) -> PackedAdapter:
        """Check a PEFT LoRA adapter against the slots' limits and lay it out as one slot row (host memory).

        Raises AdapterLimitError (see `multilora.load_slot`) when it does not fit; nothing is changed.
        """
        multilora._check_config(config)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            path, which = multilora._module_path(key)
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
            b_view[:r, grp.seg[j] : grp.seg[j + 1]] = b.T * multilora._scaling(config, r)
        data = flat.to(self.dtype)
        if self.device.type == "cuda":
            data = data.pin_memory()
        return PackedAdapter(data, rank)

    def load_packed(self, slot: int, packed: PackedAdapter) -> None:
        """Copy a packed adapter into ``slot``: one host-to-device copy on a side stream; returns when it landed.

        Decode steps keep running meanwhile (they never read a slot no queued or running request uses).
        """
        if not 0 <= slot < self.slots:
            raise AdapterLimitError(f"slot {slot} is out of range: allowed 0..{self.slots - 1}")
        if self._slot_in_use(slot):
            raise EngineError(f"slot {slot} is used by a queued or running request; wait until they finish")
        if packed.data.numel() != self.slot_numel:
            raise AdapterLimitError(f"packed adapter has {packed.data.numel()} values; a slot holds {self.slot_numel}")
        if self._load_stream is None:
            self.lora[slot].copy_(packed.data)
            self.ranks[slot] = packed.rank
            return
        with torch.cuda.stream(self._load_stream):
            self.lora[slot].copy_(packed.data, non_blocking=True)
            self.ranks[slot : slot + 1].fill_(packed.rank)
            done = torch.cuda.Event()
            done.record()
        done.synchronize()

    def load_adapter_state(self, slot: int, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Load adapter tensors + config into ``slot`` (pack on the host, then one copy)."""
        if self._slot_in_use(slot):
            raise EngineError(f"slot {slot} is used by a queued or running request; wait until they finish")
        self.load_packed(slot, self.pack_adapter(state, config))

    def clear_adapter(self, slot: int) -> None:
        """Empty ``slot`` (refused while a queued or running request uses it)."""
        if not 0 <= slot < self.slots:
            raise AdapterLimitError(f"slot {slot} is out of range: allowed 0..{self.slots - 1}")
        if self._slot_in_use(slot):
            raise EngineError(f"slot {slot} is used by a queued or running request; wait until they finish")
        self.lora[slot].zero_()
        self.ranks[slot] = 0

    def close(self) -> None:
        """Drop the device buffers and graphs (the base was never modified)."""
        self._graphs.clear()
        self.abort_all()

    # -- forward passes ---------------------------------------------------------------------------------------

    def _lora(self, y: torch.Tensor, x: torch.Tensor, grp: _Group | None, idx: torch.Tensor) -> torch.Tensor:
        if grp is None:
            return y
        if self.use_triton and x.dim() == 2:
            return lora_ops.lora_triton(y, x, grp.a, grp.bt, idx, self.ranks, grp.seg, self.max_rank)
        if x.dim() == 2:
            out = lora_ops.lora_torch(y[:, None], x[:, None], grp.a, grp.bt, idx.long(), grp.seg, self.max_rank)
            return out[:, 0]
        return lora_ops.lora_torch(y, x, grp.a, grp.bt, idx.long(), grp.seg, self.max_rank)

    def _mlp_and_proj(self, h: torch.Tensor, o: torch.Tensor, layer: _Layer, idx: torch.Tensor | None) -> torch.Tensor:
        g = layer.groups if idx is not None else {}
        h = h + self._lora(F.linear(o, layer.wo), o, g.get("o"), idx)  # type: ignore[arg-type]
        x = _rms(h, layer.ln2, self.eps)
        gu = self._lora(F.linear(x, layer.wgu), x, g.get("gu"), idx)  # type: ignore[arg-type]
        half = gu.shape[-1] // 2
        m = F.silu(gu[..., :half]) * gu[..., half:]
        return h + self._lora(F.linear(m, layer.wd), m, g.get("down"), idx)  # type: ignore[arg-type]

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

    # -- scoring ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, slot_per_row: torch.Tensor | Sequence[int]
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` (float32) of a batch whose row i runs the adapter in ``slot_per_row[i]`` (-1 = base).

        Padding may be on either side (mask 0); a row's logits at its real tokens equal those of the row alone.
        """
        input_ids = input_ids.to(self.device)
        if input_ids.shape[1] > self.max_seq:
            raise EngineError(f"input has {input_ids.shape[1]} tokens; this engine allows {self.max_seq}")
        slots = torch.as_tensor(slot_per_row, dtype=torch.long)
        if slots.numel() != input_ids.shape[0] or (slots.numel() and (slots.max() >= self.slots or slots.min() < -1)):
            raise AdapterLimitError(f"slot indices must be in [-1, {self.slots - 1}], one per row")
        idx = torch.where(slots < 0, self.slots, slots).to(device=self.device, dtype=torch.int32)
        mask = None if attention_mask is None else attention_mask.to(self.device)
        lora = bool((slots >= 0).any())
        return self._seq_forward(input_ids, idx, None, mask, last_only=False, lora=lora).float()

    # -- generation -------------------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Number of running requests."""
        return len(self._rows)

    def has_work(self) -> bool:
        """Whether a `step` would do anything."""
        return bool(self._rows or self._waiting or self._inflight)

    def abort_all(self) -> list[Generation]:
        """Drop every queued and running request (after a step failed) and return them, marked ``error``."""
        gens = [*self._rows, *self._waiting]
        if self._inflight is not None:
            gens += [g for g in self._inflight.gens if g not in gens]
        self._rows, self._lengths, self._inflight = [], [], None
        self._waiting.clear()
        self._idx.fill_(self.slots)
        for g in gens:
            g.finish_reason = g.finish_reason or "error"
        return gens

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Advance every running request by one token, then admit waiting requests (each gets its first token).

        On CUDA with greedy rows only, the next step is launched before this one's tokens are read back, so one
        extra step may run for a request that just finished (its token is discarded).
        """
        outputs: list[StepOutput] = []
        if self._rows or self._inflight is not None:
            cur = self._inflight
            self._inflight = None
            if cur is None:
                cur = self._launch()
            if self._rows and cur.logits is None and self.device.type == "cuda":
                self._inflight = self._launch()  # overlap: the GPU runs step k+1 while the host reads step k
            outputs += self._finish(cur)
        if self._waiting and len(self._rows) < self.max_batch:
            outputs += self._admit()
        return outputs

    def _ctx(self) -> int:
        longest = max(self._lengths) + 1
        return min(self.max_seq, -(-longest // _CTX_STEP) * _CTX_STEP)

    def _run_decode(self, nb: int, ctx: int, lora: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.use_graphs:
            return self._decode_body(nb, ctx, lora)
        key = (nb, ctx, lora)
        entry = self._graphs.get(key)
        if entry is None:
            saved = (self._tok.clone(), self._pos.clone())
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                try:
                    self._decode_body(nb, ctx, lora)  # warm-up: Triton compiles, cuBLAS picks its kernels
                except Exception:
                    if not (self.use_triton or self.triton_attention):
                        raise
                    # A Triton kernel that fails to build here must not take serving down: fall back to torch.
                    log.exception("Triton decode kernels failed; falling back to the torch path")
                    self.triton_attention = self.use_triton = False
                    self._tok.copy_(saved[0])
                    self._pos.copy_(saved[1])
                    self._graphs.clear()
                    self._decode_body(nb, ctx, lora)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._tok.copy_(saved[0])
            self._pos.copy_(saved[1])
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits, nxt = self._decode_body(nb, ctx, lora)
            entry = self._graphs[key] = (graph, logits, nxt)
            self._tok.copy_(saved[0])
            self._pos.copy_(saved[1])
        entry[0].replay()
        return entry[1], entry[2]

    def _launch(self) -> _Launch:
        n = len(self._rows)
        nb = next(b for b in _batch_buckets(self.max_batch) if b >= n)
        lora = any(g.request.slot >= 0 for g in self._rows)
        greedy = all(g.request.temperature == 0 for g in self._rows)
        logits, nxt = self._run_decode(nb, self._ctx(), lora)
        host = self._next_host[self._host_flip][:n]
        self._host_flip ^= 1
        host.copy_(nxt[:n], non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self._lengths = [x + 1 for x in self._lengths]
        return _Launch(list(self._rows), list(self._lengths), host, None if greedy else logits, event)

    def _finish(self, run: _Launch) -> list[StepOutput]:
        if run.event is not None:
            run.event.synchronize()
        tokens = run.next_host.tolist()
        outputs = []
        done_rows = []
        for i, gen in enumerate(run.gens):
            if gen.done:
                continue  # finished at the previous step; this token ran ahead and is dropped
            token = tokens[i]
            if run.logits is not None and gen.request.temperature > 0:
                token = self._sample(gen, run.logits[i])
                self._tok[i] = token  # row i is still the gen's row: nothing moved since this launch
            out = self._emit(gen, token, run.lengths[i])
            outputs.append(out)
            if out.finished:
                done_rows.append(i)
        if done_rows:
            current = {id(g): r for r, g in enumerate(self._rows)}
            self._remove(sorted((current[id(run.gens[i])] for i in done_rows), reverse=True))
        return outputs

    def _remove(self, rows_desc: list[int]) -> None:
        """Drop rows (descending order): the last row moves into each hole, so rows stay ``0..n-1``."""
        for r in rows_desc:
            last = len(self._rows) - 1
            if r != last:
                self.k_cache[:, r].copy_(self.k_cache[:, last])
                self.v_cache[:, r].copy_(self.v_cache[:, last])
                for buf in (self._tok, self._pos, self._idx):
                    buf[r] = buf[last]
                self._rows[r] = self._rows[last]
                self._lengths[r] = self._lengths[last]
            self._rows.pop()
            self._lengths.pop()
            self._idx[last] = self.slots

    def _admit(self) -> list[StepOutput]:
        room = self.max_batch - len(self._rows)
        take = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        by_len: dict[int, list[Generation]] = {}
        for gen in take:
            by_len.setdefault(len(gen.request.prompt_ids), []).append(gen)
        outputs: list[StepOutput] = []
        for t, gens in by_len.items():
            per = max(1, self.prefill_tokens // t)
            for c in range(0, len(gens), per):
                outputs += self._prefill(gens[c : c + per], t)
        return outputs

    def _prefill(self, gens: list[Generation], t: int) -> list[StepOutput]:
        dev = self.device
        start = len(self._rows)
        g = len(gens)
        ids = torch.tensor([list(x.request.prompt_ids) for x in gens], dtype=torch.long, device=dev)
        slots = [self.slots if x.request.slot == BASE_SLOT else x.request.slot for x in gens]
        idx = torch.tensor(slots, dtype=torch.int32, device=dev)
        rows = self._ar[start : start + g]
        logits = self._seq_forward(ids, idx, rows, lora=any(s < self.slots for s in slots))
        greedy = logits.argmax(-1).tolist()
        tokens = [greedy[i] if x.request.temperature == 0 else self._sample(x, logits[i]) for i, x in enumerate(gens)]
        self._rows.extend(gens)
        self._lengths.extend([t] * g)
        self._tok[start : start + g].copy_(torch.tensor(tokens, dtype=torch.long))
        self._pos[start : start + g].fill_(t)
        self._idx[start : start + g].copy_(idx)
        outputs = [self._emit(x, tokens[i], t) for i, x in enumerate(gens)]
        done = [start + i for i, o in enumerate(outputs) if o.finished]
        if done:
            self._remove(sorted(done, reverse=True))
        return outputs


def make_engine(base: BaseLike, cfg: ServingSettings) -> Engine | FastEngine:
    """The engine PERSONA_SERVE_ENGINE asks for; ``auto`` takes the fast one on CUDA unless the base rules it out."""
    choice = cfg.engine
    if choice == "auto":
        choice = "fast" if torch.device(cfg.device).type == "cuda" else "reference"
    if choice == "fast":
        try:
            return FastEngine(
                base, cfg.slots, cfg.max_rank, cfg.targets, cfg.device, cfg.max_batch, max_seq=cfg.max_seq
            )
        except EngineError as e:
            if cfg.engine == "fast":
                raise
            log.warning("the fast engine cannot serve this base (%s); using the reference engine", e)
    return Engine(base, cfg.slots, cfg.max_rank, cfg.targets, cfg.device, cfg.max_batch)
