"""The fast serving engine: continuous batching over `pipeline.serving.fast_llama.FastLlama` (own Llama decode
step over a static KV cache, batched multi-LoRA slots), with CUDA graphs.

Same public API as `pipeline.serving.engine.Engine` (submit / step / generate / logits / load_adapter_state /
clear_adapter / abort_all / close), for Llama-architecture bases (SmolLM2, Llama 3.x). `FastLlama` holds the
base's weights (read once, fused; the base is never modified), the KV cache, the adapter slots and the forward
passes; this module decides what runs when.

- **Rows**: running requests occupy KV cache rows ``0..n-1``; a request that leaves is replaced by the last row
  (one copy of that row).
- **Decode**: one step advances every row by one token. On CUDA each (batch bucket, context bucket, with/without
  LoRA) step is captured once in a CUDA graph and replayed; the host launches step k+1 before it reads step k's
  tokens (when every row is greedy), so Python bookkeeping overlaps the GPU. A Triton kernel that fails to build
  falls back to the torch path.
- **Adapters**: an adapter is *packed* on the host into its slot row once (`pack_adapter`, pinned memory), then
  loaded with one host-to-device copy on a side stream (`load_packed`), which does not wait for, or hold up,
  decode steps.
- **Prefill**: waiting requests are grouped by prompt length and each group runs as one batched forward, writing
  its cache rows; not graph-captured.

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

from pipeline.models.multilora import ALL_TARGETS, BASE_SLOT, AdapterLimitError
from pipeline.serving.engine import BaseLike, Engine, EngineError, Generation, GenerationLoop, StepOutput
from pipeline.serving.fast_llama import FastLlama, PackedAdapter

if TYPE_CHECKING:
    from pipeline.config import ServingSettings

__all__ = ["FastEngine", "PackedAdapter", "make_engine"]

log = logging.getLogger(__name__)

_CTX_STEP = 64


@dataclass
class _Launch:
    """A decode step launched and not yet read back."""

    gens: list[Generation]
    lengths: list[int]  # tokens in each row's cache after the step
    next_host: torch.Tensor
    logits: torch.Tensor | None  # kept when a row samples on the host
    event: Any


def _batch_buckets(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, 16, 32) if b < max_batch]
    sizes += [*range(64, max_batch, 64), max_batch]
    return sorted(set(sizes))


class FastEngine(FastLlama, GenerationLoop):
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
        super().__init__(
            model, slots, max_rank, targets, device, max_batch, max_seq=max_seq, dtype=dtype, use_triton=use_triton
        )
        cuda = self.device.type == "cuda"
        self.eos_token_id: int | None = getattr(model.config, "eos_token_id", None)
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None
        self.use_graphs = cuda if cuda_graphs is None else (cuda_graphs and cuda)
        self.prefill_tokens = prefill_tokens
        self._ids = itertools.count()
        self._waiting: deque[Generation] = deque()
        self._rows: list[Generation] = []
        self._lengths: list[int] = []  # tokens in each row's cache
        self._inflight: _Launch | None = None
        self._graphs: dict[tuple[int, int, bool], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._load_stream = torch.cuda.Stream(self.device) if cuda else None
        self._next_host = [torch.zeros(self.max_batch, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._host_flip = 0
        log.info(
            "fast engine: %d layers, %d slots (max rank %d, %.1f MB each), batch %d, seq %d, %s, graphs %s, triton %s",
            len(self.layers), slots, max_rank, self.slot_bytes / 1e6, max_batch, self.max_seq, self.dtype,
            self.use_graphs, self.use_triton,
        )  # fmt: skip

    # -- adapters ---------------------------------------------------------------------------------------------

    def _slot_in_use(self, slot: int) -> bool:
        return any(g.request.slot == slot for g in itertools.chain(self._rows, self._waiting))

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
