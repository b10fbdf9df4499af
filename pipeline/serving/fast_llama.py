"""The fast engine's Llama (`FastLlama`): the base's weights read once, a paged KV cache, the adapter slots, and
the forward passes. `pipeline.serving.fast_engine.FastEngine` schedules requests over it.

For Llama-architecture bases (SmolLM2, Llama 3.x) without biases. The base's weights are read once (fusing q|k|v
and gate|up into one matrix each); the base itself is never modified.

- **Paged KV cache**: keys and values live in blocks of ``BLOCK`` tokens (``[layers, blocks, kv_heads, BLOCK,
  head_dim]``); a sequence owns a list of blocks, recorded in its row of the block table (``[max_batch + 1,
  blocks per sequence]``), so it holds memory for the tokens it has, not for ``max_seq``. Block 0 is a scratch
  block: padding tokens of a step write there and nothing reads it.
- **The step** (`FastLlama._step_body`): one forward over a flat list of tokens, each with its sequence (block
  table row), position, adapter slot and cache location: decode tokens (one per running sequence, its token fed
  back on the device from the previous step) and prefill chunks (consecutive prompt tokens of a sequence) in the
  same forward. Keys and values of every token are written to the cache first, then each token attends to its
  sequence's cache up to its own position (causal inside a chunk by construction). Logits are computed only for
  the tokens that produce a next token (a decode token, the last token of a prompt), greedy argmax runs on the
  device and is fed back, so a step is captured in a CUDA graph per token bucket and replayed. The step's inputs
  arrive in one host-to-device copy of a pinned buffer.
- **Scoring** (`FastLlama._seq_forward`): whole sequences in one batched forward (``scaled_dot_product_attention``,
  padding on either side), nothing cached.
- **Adapters**: every slot is one contiguous row of a device buffer (``[slots + 1, P]``, bf16 on CUDA) holding
  all its LoRA weights in the layout of `pipeline.models.lora_ops`; the last row is the base (rank 0).
  `FastLlama.pack_adapter` checks a PEFT adapter and lays out what its rank needs compactly on the host; a load
  copies that and spreads it into the slot row on the device (one scatter).
- **Kernels**: on CUDA the LoRA shrink/expand and the paged attention are Triton kernels of `lora_ops` (per-token
  slot gather, masked to each slot's rank; per-token block-table walk) and the element-wise work of a layer runs
  in three fused kernels of `fused_ops` (residual + RMSNorm, rotary + KV cache write, SwiGLU); elsewhere the torch
  paths of the same modules. Both equal, up to float rounding, `pipeline.models.multilora.MultiLoraLinear` on the
  same adapters and a dense attention (tests/unit/serving/test_engine_fast.py).
"""

from __future__ import annotations

import itertools
import math
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models import fused_ops, lora_ops, multilora
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
# safetensors dtypes `FastLlama.pack_adapter_bytes` reads straight from the file's bytes, and the engine dtypes it
# writes
_FILE_DTYPES: dict[str, torch.dtype] = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
_PACK_TARGETS = (torch.bfloat16, torch.float16, torch.float32)
_BytePlan = tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]  # FastLlama._byte_plan
# `pack_adapter_bytes` reads an adapter file's bytes (immutable) through a tensor and never writes them; torch warns
# about such a buffer once per process.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


#: Tokens per KV cache block.
BLOCK = 16


@dataclass
class PackedAdapter:
    """An adapter packed for the slots: one flat compact tensor (`FastLlama.pack_adapter`) and its rank."""

    data: torch.Tensor
    rank: int

    @property
    def nbytes(self) -> int:
        """Size of the packed data in bytes (what one load copies)."""
        return self.data.numel() * self.data.element_size()


@dataclass
class StepInputs:
    """Views of one step's input buffer: per token its sequence (block table row), position, token id (-1: the
    sequence's fed-back token), adapter slot and cache location (block * BLOCK + offset); per output entry the
    token whose logits are wanted and the sequence its next token is fed back to (``max_batch``: none)."""

    seq: torch.Tensor
    pos: torch.Tensor
    src: torch.Tensor
    slot: torch.Tensor
    loc: torch.Tensor
    out_tok: torch.Tensor
    out_seq: torch.Tensor
    #: Block table entries to set before the step (row, column, block; padding: the sink row's column 0, block 0).
    upd: torch.Tensor


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
    return fused_ops.add_rms_torch(x, None, w, eps)[1]


_rope = fused_ops.rope_torch


class FastLlama:
    """A Llama base's fused weights, KV cache and adapter slots on ``device``, and its forward passes (module doc).

    ``dtype`` defaults to bfloat16 on CUDA and float32 elsewhere; ``max_seq`` bounds the tokens of one sequence
    (default: the model's limit, at most 2048); ``kv_tokens`` is the KV cache's size in tokens over all sequences
    (default ``max_batch * max_seq``: every sequence can reach ``max_seq``); ``step_tokens`` bounds the tokens of
    one step (decode tokens plus prefill chunks; default ``max_batch + 2048``); ``use_triton`` defaults to True on
    CUDA when Triton is installed.
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
        kv_tokens: int | None = None,
        step_tokens: int | None = None,
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
        #: LoRA in one Triton kernel per projection group instead of shrink + expand (to be measured; off).
        self.one_kernel_lora = False
        self.blocks_per_seq = -(-self.max_seq // BLOCK)
        kv = int(kv_tokens or max_batch * self.max_seq)
        # At least one sequence of max_seq fits, so every request can run (alone, at worst); + the scratch block 0.
        self.kv_blocks = max(-(-kv // BLOCK), self.blocks_per_seq) + 1
        self.step_tokens = int(step_tokens or max_batch + 2048)
        if self.step_tokens < max_batch:
            raise EngineError(f"step_tokens ({self.step_tokens}) must be at least max_batch ({max_batch})")
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
        self._slot_maps: dict[int, torch.Tensor] = {}
        self._layouts: dict[int, tuple[dict[tuple[int, str], tuple[int, int]], int]] = {}  # _compact_layout
        self._slot_maps_lock = threading.Lock()
        self._byte_plans: dict[bytes, tuple[Any, _BytePlan | None]] = {}  # pack_adapter_bytes, by header
        self._byte_plans_lock = threading.Lock()
        for i, g, mods, k, seg, a_off, b_off in plan:
            a = self.lora[:, a_off : a_off + len(mods) * r * k].unflatten(1, (len(mods) * r, k))
            bt = self.lora[:, b_off : b_off + r * seg[-1]].unflatten(1, (r, seg[-1]))
            self.layers[i].groups[g] = _Group(a, bt, seg, a_off, b_off, k)
        shape = (len(self.layers), self.kv_blocks, self.n_kv, BLOCK, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dt, device=dev)
        self.v_cache = torch.zeros(shape, dtype=dt, device=dev)
        #: Block table: row s lists sequence s's blocks; row ``max_batch`` (padding tokens) points at scratch block 0.
        self.block_table = torch.zeros(self.max_batch + 1, self.blocks_per_seq, dtype=torch.int32, device=dev)
        #: Each sequence's last produced token (fed back into the next step); index ``max_batch`` is a sink.
        self._tok = torch.zeros(self.max_batch + 1, dtype=torch.long, device=dev)
        # The step's inputs: one int64 buffer of regions (see `StepInputs`), filled from pinned host copies.
        t, o = self.step_tokens, self.max_batch
        #: Block table updates a step carries at most: a new block for each decoding row, the blocks of the step's
        #: prompt chunks (one partial block per chunk at most beyond step_tokens / BLOCK).
        self.max_table_updates = 2 * o + t // BLOCK + 1
        self._meta_len = 5 * t + 2 * o + 3 * self.max_table_updates
        self._meta = torch.zeros(self._meta_len, dtype=torch.long, device=dev)
        cuda = dev.type == "cuda"
        self._meta_host = [torch.zeros(self._meta_len, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._meta_flip = 0

    def _regions(self, buf: torch.Tensor) -> StepInputs:
        t, o = self.step_tokens, self.max_batch
        seq, pos, src, slot, loc = (buf[i * t : (i + 1) * t] for i in range(5))
        u = 5 * t + 2 * o
        upd = buf[u:].view(3, self.max_table_updates)
        return StepInputs(seq, pos, src, slot, loc, buf[5 * t : 5 * t + o], buf[5 * t + o : u], upd)

    # -- adapters ---------------------------------------------------------------------------------------------

    def pack_adapter(self, state: dict[str, torch.Tensor], config: dict[str, Any]) -> PackedAdapter:
        """Check a PEFT LoRA adapter against the slots' limits and lay it out compactly in host memory: per
        projection group of each layer, the rank-``r`` rows of A, then of B transposed (scaled).

        It takes what its rank needs, not a whole slot (an r=1 adapter packs to 1/max_rank of a slot); `load_packed`
        spreads it into a slot on the device. Raises AdapterLimitError when it does not fit; nothing is changed.
        """
        multilora.check_lora_config(config)
        rank, placed = self._placement({k: tuple(t.shape) for k, t in state.items()})
        offsets, numel = self._compact_layout(rank)
        flat = torch.zeros(numel, dtype=torch.float32)
        scale = multilora.lora_scaling(config, rank)
        for layer, name, a_key, b_key in placed:
            gname, j = _MODULE_GROUP[name]
            grp = self.layers[layer].groups[gname]
            a_off, b_off = offsets[(layer, gname)]
            n_all = grp.seg[-1]
            flat[a_off + j * rank * grp.k : a_off + (j + 1) * rank * grp.k] = state[a_key].float().flatten()
            b_view = flat[b_off : b_off + rank * n_all].view(rank, n_all)
            b_view[:, grp.seg[j] : grp.seg[j + 1]] = state[b_key].float().T * scale
        # Pageable memory: pinning each adapter (cudaHostAlloc) stalled packing for seconds under load; a load
        # copies through one of the engine's pinned staging buffers instead (`FastEngine.load_packed`).
        return PackedAdapter(flat.to(self.dtype), rank)

    def pack_adapter_bytes(self, weights: bytes, config: dict[str, Any]) -> PackedAdapter:
        """`pack_adapter` straight from an adapter_model.safetensors file's bytes, equal to it bit for bit.

        No tensor per module is built: the file's header gives each tensor's place, a gather map from the file's data
        to the compact layout is built once per header layout (adapters written by one trainer share it) and kept,
        and packing is a few whole-array torch operations over the file's bytes. A serving worker packs every
        adapter that enters its host tier, while its engine thread and HTTP loop run: `pack_adapter`'s ~8 torch calls
        per module (~1,700 for SmolLM2) each gave the GIL away and waited to get it back, tens of milliseconds to
        seconds per adapter under load; the same gather in numpy held the GIL throughout (0.66 ms for an r=1
        SmolLM2-shaped adapter into a bf16 engine on a 2-core CPU, 0.02-0.03 ms now: bench/results/miss_gil.md),
        where torch's operations release it. Files mixing dtypes, or of dtypes other than BF16/F16/F32, take the
        `pack_adapter` path.
        """
        from pipeline.serving.adapters import header_key, safetensors_header

        multilora.check_lora_config(config)
        entries, data = safetensors_header(weights)  # parsed once per layout (kept by its header bytes)
        head = header_key(weights)  # equal headers: equal names, shapes, offsets and dtypes
        with self._byte_plans_lock:
            # Made under the lock: when a cold worker meets a layout, its first dozens of misses arrive together, and
            # each made the same plan (numpy over every module, holding the GIL: 5% of a Zipf run's GIL time). The
            # file's dtype is judged once per layout too (a pass over its ~420 entries, on every miss before).
            known = self._byte_plans.get(head)
            if known is None:
                dtypes = {e.dtype for e in entries.values()}
                src = _FILE_DTYPES.get(next(iter(dtypes))) if len(dtypes) == 1 else None
                usable = src is not None and self.dtype in _PACK_TARGETS
                known = (src, self._byte_plan(entries, src.itemsize) if usable and src is not None else None)
                if len(self._byte_plans) >= 64:  # layouts seen: one per trainer configuration, in practice
                    self._byte_plans.pop(next(iter(self._byte_plans)))
                self._byte_plans[head] = known
        src, plan = known
        if src is None or plan is None:
            from safetensors.torch import load as load_safetensors

            return self.pack_adapter(load_safetensors(bytes(weights)), config)
        rank, count, gather, absent, b_index = plan
        if len(weights) < data + count * src.itemsize:
            raise AdapterLimitError("adapter_model.safetensors holds fewer bytes than its header places")
        raw = torch.frombuffer(weights, dtype=src, count=count, offset=data)  # the file's values, not copied
        scale = multilora.lora_scaling(config, rank)
        # Torch operations (each releases the GIL while it runs); the same values as `pack_adapter`, bit for bit.
        values = raw.index_select(0, gather)
        if src == torch.bfloat16 and self.dtype == torch.bfloat16:  # bf16 -> bf16: A values move as they are
            values.index_fill_(0, absent, 0)
            values.index_copy_(0, b_index, values.index_select(0, b_index).float().mul_(scale).to(torch.bfloat16))
            return PackedAdapter(values, rank)
        packed = values.float()
        packed.index_fill_(0, absent, 0.0)
        packed.index_copy_(0, b_index, packed.index_select(0, b_index).mul_(scale))
        return PackedAdapter(packed.to(self.dtype), rank)

    def _byte_plan(self, entries: Mapping[str, Any], itemsize: int) -> _BytePlan:
        """(rank, values in the file, gather, absent, b_index) for one header layout: packed[i] = data[gather[i]],
        but zero at ``absent`` (modules the adapter does not have), and the packed positions of B values (scaled)."""
        rank, placed = self._placement({k: e.shape for k, e in entries.items()})
        offsets, numel = self._compact_layout(rank)
        count = max(e.end for e in entries.values()) // itemsize
        gather = np.full(numel, -1, dtype=np.int64)
        b_parts = []
        for layer, name, a_key, b_key in placed:
            gname, j = _MODULE_GROUP[name]
            grp = self.layers[layer].groups[gname]
            a_off, b_off = offsets[(layer, gname)]
            a, b = entries[a_key], entries[b_key]
            if a.start % itemsize or b.start % itemsize:
                raise AdapterLimitError(f"tensor {a_key!r} or {b_key!r} is not aligned to its dtype in the file")
            for key, e in ((a_key, a), (b_key, b)):
                if e.end - e.start != math.prod(e.shape) * itemsize:
                    raise AdapterLimitError(f"tensor {key!r}: its bytes do not match its shape {e.shape}")
            n_all, n = grp.seg[-1], grp.seg[j + 1] - grp.seg[j]
            a_dst = a_off + j * rank * grp.k
            gather[a_dst : a_dst + rank * grp.k] = a.start // itemsize + np.arange(rank * grp.k)
            rr, c = np.arange(rank)[:, None], np.arange(n)[None, :]
            dst = (b_off + rr * n_all + grp.seg[j] + c).ravel()
            gather[dst] = (b.start // itemsize + c * rank + rr).ravel()
            b_parts.append(dst)
        absent = np.flatnonzero(gather < 0)
        gather[absent] = 0
        return (
            rank,
            count,
            torch.from_numpy(gather),
            torch.from_numpy(absent),
            torch.from_numpy(np.concatenate(b_parts)),
        )

    def _placement(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, list[tuple[int, str, str, str]]]:
        """Check an adapter's tensor names and shapes against the slots: (its rank, per module (layer, projection
        name, A's key, B's key)). Raises AdapterLimitError when it does not fit."""
        pairs: dict[str, dict[str, str]] = {}
        for key in shapes:
            path, which = multilora.parse_lora_key(key)
            pairs.setdefault(path, {})[which] = key
        if not pairs:
            raise AdapterLimitError("the adapter has no LoRA tensors")
        placed = []
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
            a_shape, b_shape = shapes[ab["A"]], shapes[ab["B"]]
            r = a_shape[0] if a_shape else 0
            k, n = self.shapes[name]
            if r > self.max_rank:
                raise AdapterLimitError(f"adapter rank {r} at {path!r} exceeds the maximum rank {self.max_rank}")
            if tuple(a_shape) != (r, k) or tuple(b_shape) != (n, r):
                raise AdapterLimitError(
                    f"adapter shapes at {path!r} are A {tuple(a_shape)}, B {tuple(b_shape)}; the base layer needs "
                    f"A (r, {k}), B ({n}, r)"
                )
            if rank and r != rank:
                raise AdapterLimitError(f"adapter mixes ranks {rank} and {r}: one rank per adapter is served")
            rank = r
            placed.append((layer, name, ab["A"], ab["B"]))
        if rank < 1:
            raise AdapterLimitError("the adapter has rank 0")
        return rank, placed

    def _compact_layout(self, r: int) -> tuple[dict[tuple[int, str], tuple[int, int]], int]:
        """Offsets of each (layer, group)'s A and B parts in a compact rank-``r`` adapter, and its length (kept per
        rank: every slot load checks its length). Read only."""
        hit = self._layouts.get(r)
        if hit is None:
            hit = self._layouts[r] = self._build_layout(r)
        return hit

    def _build_layout(self, r: int) -> tuple[dict[tuple[int, str], tuple[int, int]], int]:
        offsets: dict[tuple[int, str], tuple[int, int]] = {}
        off = 0
        for i, layer in enumerate(self.layers):
            for gname, grp in layer.groups.items():
                nseg = len(grp.seg) - 1
                offsets[(i, gname)] = (off, off + nseg * r * grp.k)
                off += nseg * r * grp.k + r * grp.seg[-1]
        return offsets, off

    def _slot_index(self, r: int) -> torch.Tensor:
        """Where each value of a compact rank-``r`` adapter goes in a slot row (device, cached per rank)."""
        index = self._slot_maps.get(r)
        if index is not None:
            return index
        # Built once per rank, by one thread (the first loads of a rank arrive together); in numpy, whose small
        # operations keep the GIL: a few hundred torch calls each gave it away and waited for it under load.
        with self._slot_maps_lock:
            index = self._slot_maps.get(r)
            if index is None:
                pieces = []
                big_r = self.max_rank
                for layer in self.layers:
                    for grp in layer.groups.values():
                        nseg, k, n = len(grp.seg) - 1, grp.k, grp.seg[-1]
                        rows = (np.arange(nseg)[:, None] * big_r + np.arange(r)).reshape(-1)
                        pieces.append((grp.a_off + rows[:, None] * k + np.arange(k)).reshape(-1))
                        pieces.append((grp.b_off + np.arange(r)[:, None] * n + np.arange(n)).reshape(-1))
                index = torch.from_numpy(np.concatenate(pieces).astype(np.int64)).to(self.device)
                self._slot_maps[r] = index
        return index

    # -- forward passes ---------------------------------------------------------------------------------------

    def _lora(self, y: torch.Tensor, x: torch.Tensor, grp: _Group | None, idx: torch.Tensor | None) -> torch.Tensor:
        if grp is None or idx is None:
            return y
        if self.use_triton and x.dim() == 2:
            kernel = lora_ops.lora_triton_one if self.one_kernel_lora else lora_ops.lora_triton
            return kernel(y, x, grp.a, grp.bt, idx, self.ranks, grp.seg, self.max_rank)
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

    def _attend(self, q: torch.Tensor, li: int, seq: torch.Tensor, pos: torch.Tensor, ctx: int) -> torch.Tensor:
        if self.triton_attention:
            return lora_ops.paged_attention(q, self.k_cache[li], self.v_cache[li], self.block_table, seq, pos)
        return lora_ops.paged_attention_torch(q, self.k_cache[li], self.v_cache[li], self.block_table, seq, pos, ctx)

    def _step_body(self, nt: int, lora: bool, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One step over the first ``nt`` tokens of the step inputs (module doc); returns the logits and the greedy
        next token of the first ``min(nt, max_batch)`` output entries and feeds the tokens back.

        ``ctx`` (a multiple of BLOCK covering every position of the step) bounds the torch attention path only.
        The element-wise work runs in the fused kernels of `fused_ops` (Triton on CUDA, their torch references
        elsewhere): residual add + RMSNorm, rotary + KV cache write, SwiGLU.
        """
        hq, d = self.n_heads, self.head_dim
        tri = self.use_triton
        add_rms = fused_ops.add_rms if tri else fused_ops.add_rms_torch
        rope_cache = fused_ops.rope_cache if tri else fused_ops.rope_cache_torch
        silu_mul = fused_ops.silu_mul if tri else fused_ops.silu_mul_torch
        inp = self._regions(self._meta)
        # The block table entries set since the last step, in the step itself (no eager copies and kernels a step
        # on the host: each torch call there gives the GIL away).
        self.block_table.index_put_((inp.upd[0], inp.upd[1]), inp.upd[2].to(self.block_table.dtype))
        seq, pos, loc = inp.seq[:nt], inp.pos[:nt], inp.loc[:nt]
        idx = inp.slot[:nt] if lora else None
        src = inp.src[:nt]
        ids = torch.where(src >= 0, src, self._tok[seq])
        h = F.embedding(ids, self.embed)
        delta: torch.Tensor | None = None
        for li, layer in enumerate(self.layers):
            g = layer.groups if idx is not None else {}
            h, x = add_rms(h, delta, layer.ln1, self.eps)
            qkv = self._lora(F.linear(x, layer.wqkv), x, g.get("qkv"), idx)
            q = rope_cache(qkv, self.cos, self.sin, pos, loc, self.k_cache[li], self.v_cache[li], hq, self.n_kv)
            o = self._attend(q, li, seq, pos, ctx).reshape(nt, hq * d)
            h, x = add_rms(h, self._lora(F.linear(o, layer.wo), o, g.get("o"), idx), layer.ln2, self.eps)
            m = silu_mul(self._lora(F.linear(x, layer.wgu), x, g.get("gu"), idx))
            delta = self._lora(F.linear(m, layer.wd), m, g.get("down"), idx)
        no = min(nt, self.max_batch)
        out = inp.out_tok[:no]
        hs = h.index_select(0, out)
        _, x = add_rms(hs, None if delta is None else delta.index_select(0, out), self.norm, self.eps)
        logits = F.linear(x, self.lm_head)
        nxt = logits.argmax(-1)
        self._tok.index_copy_(0, inp.out_seq[:no], nxt)
        return logits, nxt

    def _seq_forward(
        self,
        ids: torch.Tensor,
        idx: torch.Tensor,
        mask: torch.Tensor | None = None,
        last_only: bool = True,
        lora: bool = True,
    ) -> torch.Tensor:
        """Forward of whole sequences ``ids [g, T]`` (row adapters ``idx``), for scoring; nothing is cached.

        Without ``mask`` the rows have no padding; with one, padding may be on either side and positions count real
        tokens only.
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
        for layer in self.layers:
            x = _rms(h, layer.ln1, self.eps)
            qkv = F.linear(x, layer.wqkv)
            if idx_l is not None:
                qkv = self._lora(qkv, x, layer.groups.get("qkv"), idx_l)
            q = _rope(qkv[..., : hq * d].view(g, t, hq, d).transpose(1, 2), cos, sin)
            k = _rope(qkv[..., hq * d : (hq + hkv) * d].view(g, t, hkv, d).transpose(1, 2), cos, sin)
            v = qkv[..., (hq + hkv) * d :].view(g, t, hkv, d).transpose(1, 2)
            if attn_mask is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=hkv != hq)
            else:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=hkv != hq)
            o = o.transpose(1, 2).reshape(g, t, hq * d)
            h = self._mlp_and_proj(h, o, layer, idx_l)
        if last_only:
            h = h[:, -1]
        return F.linear(_rms(h, self.norm, self.eps), self.lm_head)
