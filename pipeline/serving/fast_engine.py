"""The fast serving engine: continuous batching with chunked prefill over `pipeline.serving.fast_llama.FastLlama`
(own Llama step over a paged KV cache, batched multi-LoRA slots), with CUDA graphs.

Same public API as `pipeline.serving.engine.Engine` (submit / step / generate / logits / load_adapter_state /
clear_adapter / abort_all / close), for Llama-architecture bases (SmolLM2, Llama 3.x). `FastLlama` holds the
base's weights (read once, fused; the base is never modified), the KV cache, the adapter slots and the forward
pass; this module decides what runs when.

- **One kind of step** (Sarathi-Serve style chunked prefill): every step advances each running sequence by one
  token *and* prefills up to ``step_tokens - running`` prompt tokens of sequences being admitted, all in one
  forward. A waiting request joins as soon as a sequence row and KV blocks are free; its prompt is prefilled in
  chunks over the next steps while the others keep decoding, so admission never stalls decoding and a long prompt
  cannot hold up the batch for more than its chunk. The last chunk of a prompt yields the request's first token.
- **Sequences** own a row of the block table and the KV blocks they fill (`fast_llama.BLOCK` tokens each, taken
  from a free list as they grow, returned when they finish). When the blocks run out, the most recently admitted
  sequence is preempted: its blocks are freed and it waits at the head of the queue, to be prefilled again (its
  prompt and the tokens it already produced) and continue exactly where it was. Admission keeps one block per
  running sequence in reserve, so that is rare.
- **CUDA graphs**: each (token bucket, with/without LoRA) step is captured once and replayed; the host launches step
  k+1 before it reads step k's tokens (when every sequence is greedy: decode tokens are fed back on the device), so
  Python bookkeeping overlaps the GPU; a sequence that finished at step k may run one extra token (discarded). A
  Triton kernel that fails to build falls back to the torch path, without graphs.
- **Adapters**: an adapter is *packed* on the host once (`pack_adapter`: compact, what its rank needs, in host
  memory, pageable), then loaded through a pinned staging buffer with one host-to-device copy and one scatter into
  its slot row on a side stream (`load_packed`). Loads and clears may come from another
  thread while steps run, for a slot no queued or running request uses.

Sampling and stop rules are those of `engine.GenerationLoop` (greedy on the device; temperature/top-p on the host
from the sequence's logits, seeded per request).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.models.multilora import ALL_TARGETS, BASE_SLOT, AdapterLimitError
from pipeline.serving.engine import BaseLike, Engine, EngineError, Generation, GenerationLoop, Request, StepOutput
from pipeline.serving.fast_llama import BLOCK, FastLlama, PackedAdapter, StepInputs
from pipeline.serving.slot_loads import SlotLoads

if TYPE_CHECKING:
    from pipeline.config import ServingSettings

__all__ = ["FastEngine", "PackedAdapter", "make_engine"]

log = logging.getLogger(__name__)


@dataclass
class _Seq:
    """A request holding a row of the block table. Its counters live in the engine's per-row arrays (``_filled``:
    tokens in the cache once every launched step ran, ``_outputs``: tokens produced by then, ``_nblocks``)."""

    gen: Generation
    row: int
    tokens: list[int]  # prompt (+ tokens produced before a preemption): what prefill writes


@dataclass
class _Launch:
    """A step launched and not yet read back: per output entry its sequence and the cache length after the step."""

    seqs: list[_Seq]
    lengths: list[int]
    next_host: torch.Tensor
    logits: torch.Tensor | None  # kept when a sequence samples on the host
    event: Any


def _token_buckets(max_tokens: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_tokens]
    sizes += [*range(128, min(max_tokens, 1024), 64), *range(1024, max_tokens, 256), max_tokens]
    return sorted(set(sizes))


class FastEngine(FastLlama, GenerationLoop):
    """Continuous batching with chunked prefill, many LoRA adapters per batch, paged KV cache (see the module doc).

    ``dtype`` defaults to bfloat16 on CUDA and float32 elsewhere; ``max_seq`` bounds prompt + generated tokens of a
    request (default: the model's limit, at most 2048); ``kv_tokens`` sizes the KV cache (default ``max_batch *
    max_seq``); ``step_tokens`` bounds one step's tokens (default ``max_batch + 2048``: every running sequence's
    decode token plus at least 2048 prompt tokens); ``cuda_graphs`` defaults to True on CUDA.
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
        kv_tokens: int | None = None,
        step_tokens: int | None = None,
    ) -> None:
        model = base.model
        self.tokenizer = base.tokenizer
        super().__init__(
            model, slots, max_rank, targets, device, max_batch, max_seq=max_seq, dtype=dtype, use_triton=use_triton,
            kv_tokens=kv_tokens, step_tokens=step_tokens,
        )  # fmt: skip
        cuda = self.device.type == "cuda"
        self.eos_token_id: int | None = getattr(model.config, "eos_token_id", None)
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None
        self.use_graphs = cuda if cuda_graphs is None else (cuda_graphs and cuda)
        self._ids = itertools.count()
        self._waiting: deque[Generation] = deque()
        self._seqs: dict[int, _Seq] = {}  # by generation id, in admission order
        #: Queued and running requests per slot (`_slot_in_use`): counted in at `submit`, out when they finish.
        self._slot_users = [0] * slots
        self._users_lock = threading.Lock()  # submits come from request threads, finishes from the engine thread
        self._prefilling: list[_Seq] = []  # admitted, prompt not fully planned yet (oldest first)
        b = self.max_batch
        self._row_seq: list[_Seq | None] = [None] * b
        self._filled = np.zeros(b, dtype=np.int64)
        self._outputs = np.zeros(b, dtype=np.int64)
        self._max_out = np.zeros(b, dtype=np.int64)
        self._slot_of = np.full(b, self.slots, dtype=np.int64)
        self._nblocks = np.zeros(b, dtype=np.int64)
        self._decoding = np.zeros(b, dtype=bool)  # the row's prompt is fully planned: it takes one token a step
        self._greedy = np.ones(b, dtype=bool)
        self._free_rows = list(range(b - 1, -1, -1))
        self._free_blocks = list(range(self.kv_blocks - 1, 0, -1))  # block 0 is the scratch block
        self._table_np = np.zeros(tuple(self.block_table.shape), dtype=np.int32)
        # Block table entries set since the last step (row, column, block), sent to the device with the step.
        self._table_new: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._inflight: _Launch | None = None
        # numpy views of the pinned step-input buffers' regions (seq, pos, src, slot, loc, out_tok, out_seq, upd).
        self._meta_views = [
            [getattr(self._regions(b), f.name).numpy() for f in fields(StepInputs)] for b in self._meta_host
        ]
        # Step-done events, reused in turn (at most two steps are in flight): one torch call a step fewer, and each
        # call gives the GIL away (`ServingSettings.gil_switch_interval_ms`).
        self._events = [torch.cuda.Event() for _ in range(3)] if cuda else []
        self._event_turn = 0
        self._buckets = _token_buckets(self.step_tokens)
        self._graphs: dict[tuple[int, bool, int, bool], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # Slot loads run beside the steps; at the steps' priority their few kernels queued behind a busy main stream
        # (the next step is always launched before the current one is read back), tens of ms under load.
        self._load_stream = torch.cuda.Stream(self.device, priority=-1) if cuda else None
        self._loads = SlotLoads(
            self.lora, self.ranks, self._load_stream, lambda r: self._compact_layout(r)[1], self._slot_index
        )
        self._next_host = [torch.zeros(self.max_batch, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._host_flip = 0
        #: Steps run, tokens of prefill chunks and decode tokens they held, preemptions, and host seconds spent
        #: planning + launching steps and reading them back (for benchmarks).
        self.counters: dict[str, float] = dict.fromkeys(
            ("steps", "prefill_tokens", "decode_tokens", "preemptions", "plan_s", "finish_s", "wait_s"), 0
        )
        log.info(
            "fast engine: %d layers, %d slots (max rank %d, %.1f MB each), batch %d, seq %d, KV %d blocks of %d "
            "tokens (%.2f GB), step %d tokens, %s, graphs %s, triton %s",
            len(self.layers), slots, max_rank, self.slot_bytes / 1e6, max_batch, self.max_seq, self.kv_blocks - 1,
            BLOCK, 2 * self.k_cache.numel() * self.k_cache.element_size() / 1e9, self.step_tokens, self.dtype,
            self.use_graphs, self.use_triton,
        )  # fmt: skip

    # -- adapters ---------------------------------------------------------------------------------------------

    def _slot_in_use(self, slot: int) -> bool:
        # A count per slot, not a scan: with ~800 requests in flight, even a scan in C over all of them was a third
        # of the slot loads' GIL time in a skewed-traffic worker (once per load).
        return self._slot_users[slot] > 0

    def submit(self, request: Request) -> Generation:
        slot = request.slot
        if 0 <= slot < self.slots:
            with self._users_lock:
                self._slot_users[slot] += 1
        try:
            return super().submit(request)
        except BaseException:
            self._left(request.slot)
            raise

    def _left(self, slot: int) -> None:
        """A request of ``slot`` finished (or never started)."""
        if 0 <= slot < self.slots:
            with self._users_lock:
                self._slot_users[slot] -= 1

    def load_packed(self, slot: int, packed: PackedAdapter) -> None:
        """Put a packed adapter into ``slot``; returns when it landed. Loads from several threads land together
        (`SlotLoads`: one host-to-device copy and one scatter for all of them, on a side stream).

        Safe from another thread while steps run (they never read a slot no queued or running request uses).
        """
        if not 0 <= slot < self.slots:
            raise AdapterLimitError(f"slot {slot} is out of range: allowed 0..{self.slots - 1}")
        if self._slot_in_use(slot):
            raise EngineError(f"slot {slot} is used by a queued or running request; wait until they finish")
        if not 1 <= packed.rank <= self.max_rank or packed.data.numel() != self._compact_layout(packed.rank)[1]:
            raise AdapterLimitError(
                f"packed adapter of rank {packed.rank} has {packed.data.numel()} values; it was not packed for this "
                "engine's slots"
            )
        self._loads.load(slot, packed)

    def load_adapter_state(self, slot: int, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Load adapter tensors + config into ``slot`` (pack on the host, then one copy)."""
        if self._slot_in_use(slot):
            raise EngineError(f"slot {slot} is used by a queued or running request; wait until they finish")
        self.load_packed(slot, self.pack_adapter(state, config))

    def clear_adapter(self, slot: int) -> None:
        """Empty ``slot`` (refused while a queued or running request uses it; safe from another thread)."""
        if not 0 <= slot < self.slots:
            raise AdapterLimitError(f"slot {slot} is out of range: allowed 0..{self.slots - 1}")
        if self._slot_in_use(slot):
            raise EngineError(f"slot {slot} is used by a queued or running request; wait until they finish")
        if self._load_stream is None:
            self.lora[slot].zero_()
            self.ranks[slot] = 0
            return
        with torch.cuda.stream(self._load_stream):
            self.lora[slot].zero_()
            self.ranks[slot : slot + 1].fill_(0)
            done = torch.cuda.Event()
            done.record()
        done.synchronize()

    def close(self) -> None:
        """Drop the graphs and every request (the base was never modified)."""
        self._loads.close()
        self._graphs.clear()
        self.abort_all()

    def warmup(self) -> float:
        """Capture the step graph of every token bucket, with and without LoRA, now (a serving worker calls this at
        start, so no request waits for a capture); returns the seconds it took. Nothing to do without graphs."""
        if not self.use_graphs:
            return 0.0
        t0 = time.perf_counter()
        inp = self._regions(self._meta)
        for region, pad in ((inp.seq, self.max_batch), (inp.pos, 0), (inp.src, 0), (inp.slot, self.slots),
                            (inp.loc, 0), (inp.out_tok, 0), (inp.out_seq, self.max_batch)):  # fmt: skip
            region.fill_(pad)  # padding only: the sink row, the base, the scratch block
        inp.upd[0].fill_(self.max_batch)  # no block table update: the sink row's column 0 keeps block 0
        inp.upd[1:].fill_(0)
        with torch.no_grad():
            for lora in (False, True):
                for bucket in self._buckets:
                    if self.use_graphs:
                        self._run_step(bucket, lora, 0)
        torch.cuda.synchronize(self.device)
        took = time.perf_counter() - t0
        log.info("fast engine: %d step graphs captured in %.1f s", len(self._graphs), took)
        return took

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
        return self._seq_forward(input_ids, idx, mask, last_only=False, lora=lora).float()

    # -- generation -------------------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Number of running requests (prefilling or decoding)."""
        return len(self._seqs)

    def has_work(self) -> bool:
        """Whether a `step` would do anything."""
        return bool(self._seqs or self._waiting or self._inflight)

    def abort_all(self) -> list[Generation]:
        """Drop every queued and running request (after a step failed) and return them, marked ``error``."""
        gens = [s.gen for s in self._seqs.values()] + list(self._waiting)
        if self._inflight is not None:
            gens += [s.gen for s in self._inflight.seqs if s.gen not in gens]
        for seq in list(self._seqs.values()):
            self._release(seq)
        self._inflight = None
        self._waiting.clear()
        for g in gens:
            if not g.done:
                self._left(g.request.slot)
            g.finish_reason = g.finish_reason or "error"
        return gens

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """One step: a token for every decoding request and the next prompt chunks of those being admitted.

        On CUDA with greedy requests only, the next step is launched before this one's tokens are read back, so one
        extra token may run for a request that just finished (it is discarded).
        """
        cur = self._inflight
        self._inflight = None
        if cur is None:
            cur = self._launch(preempt=True)
            if cur is None:
                return []
        if cur.logits is None and self.device.type == "cuda":
            self._inflight = self._launch(preempt=False)  # overlap: the GPU runs step k+1 while the host reads k
        return self._finish(cur)

    # -- planning -----------------------------------------------------------------------------------------------

    def _blocks_of(self, seq: _Seq) -> list[int]:
        return self._table_np[seq.row, : self._nblocks[seq.row]].tolist()

    def _grow(self, row: int, upto: int) -> None:
        """Give ``row`` the blocks to hold ``upto`` tokens (the caller checked there are enough free)."""
        have = int(self._nblocks[row])
        need = -(-upto // BLOCK) - have
        if need > 0:
            cols = np.arange(have, have + need)
            blocks = np.array([self._free_blocks.pop() for _ in range(need)], dtype=np.int64)
            self._table_np[row, cols] = blocks
            self._nblocks[row] = have + need
            self._table_new.append((np.full(need, row), cols, blocks))

    def _release(self, seq: _Seq) -> None:
        row = seq.row
        self._free_blocks.extend(reversed(self._blocks_of(seq)))
        self._nblocks[row] = 0
        self._decoding[row] = False
        self._row_seq[row] = None
        self._free_rows.append(row)
        del self._seqs[seq.gen.id]
        if seq in self._prefilling:
            self._prefilling.remove(seq)

    def _preempt(self, seq: _Seq) -> None:
        """Free ``seq``'s blocks and row; it waits at the head of the queue and is prefilled again when admitted."""
        filled = int(self._filled[seq.row])
        self._release(seq)
        self._waiting.appendleft(seq.gen)
        self.counters["preemptions"] += 1
        log.info("preempted request %d (%d tokens cached): KV blocks ran out", seq.gen.id, filled)

    def _decode_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows that take a decode token next step (their launched steps do not finish them for sure), and those of
        them that need a new block for it."""
        rows = np.flatnonzero(
            self._decoding & (self._outputs < self._max_out) & (self._filled + 1 < self.max_positions)
        )
        return rows, rows[self._filled[rows] // BLOCK >= self._nblocks[rows]]

    def _plan(self, preempt: bool) -> _Plan | None:
        """The next step's tokens; None when there is no work, or when it would need a preemption and ``preempt``
        is False (the caller reads the step in flight first)."""
        rows, short = self._decode_rows()
        while len(short) > len(self._free_blocks):
            if not preempt:
                return None
            self._preempt(next(reversed(self._seqs.values())))  # the newest
            rows, short = self._decode_rows()
        if len(short):
            nb = self._nblocks[short]
            blocks = np.array([self._free_blocks.pop() for _ in range(len(short))], dtype=np.int64)
            self._table_np[short, nb] = blocks
            self._nblocks[short] = nb + 1
            self._table_new.append((short, nb, blocks))
        pos = self._filled[rows]
        plan = _Plan()
        plan.add_decode(rows, pos, self._slot_of[rows], self._table_np[rows, pos // BLOCK] * BLOCK + pos % BLOCK)
        self._filled[rows] = pos + 1
        self._outputs[rows] += 1
        budget = self.step_tokens - len(rows)
        for seq in list(self._prefilling):  # oldest first
            if budget <= 0:
                break
            budget -= self._chunk(plan, seq, budget)
        if not plan.n and self._seqs and preempt:
            # Every running sequence is a prompt stuck without blocks: the newest gives its blocks back.
            self._preempt(next(reversed(self._seqs.values())))
            return self._plan(preempt)
        reserve = len(self._seqs)  # a block per running sequence stays free for its next decode tokens
        while budget > 0 and self._waiting and self._free_rows:
            gen = self._waiting[0]
            if gen.cancelled:  # its client went away before it started
                self._waiting.popleft()
                gen.finish_reason, gen.text = "cancelled", self.decode_text(gen.output_ids)
                self._left(gen.request.slot)
                continue
            tokens = [*gen.request.prompt_ids, *gen.output_ids]
            if -(-min(budget, len(tokens)) // BLOCK) + reserve > len(self._free_blocks):
                break
            self._waiting.popleft()
            seq = _Seq(gen, self._free_rows.pop(), tokens)
            row = seq.row
            self._row_seq[row] = seq
            self._seqs[gen.id] = seq
            self._prefilling.append(seq)
            self._filled[row] = 0
            self._outputs[row] = len(gen.output_ids)
            self._max_out[row] = gen.request.max_tokens
            self._slot_of[row] = self.slots if gen.request.slot == BASE_SLOT else gen.request.slot
            self._greedy[row] = gen.request.temperature == 0
            self._nblocks[row] = 0
            budget -= self._chunk(plan, seq, budget)
            reserve += 1
        return plan if plan.n else None

    def _chunk(self, plan: _Plan, seq: _Seq, budget: int) -> int:
        """Plan the next chunk of ``seq``'s prompt (at most ``budget`` tokens and what free blocks hold)."""
        row = seq.row
        start = int(self._filled[row])
        room = (len(self._free_blocks) + int(self._nblocks[row])) * BLOCK - start
        n = min(budget, len(seq.tokens) - start, room)
        if n <= 0:
            return 0
        end = start + n
        self._grow(row, end)
        p = np.arange(start, end)
        loc = self._table_np[row, p // BLOCK].astype(np.int64) * BLOCK + p % BLOCK
        done = end >= len(seq.tokens)
        plan.add_chunk(row, p, seq.tokens[start:end], int(self._slot_of[row]), loc, done)
        self._filled[row] = end
        if done:  # the prompt is in: its last token yields the first new token; it decodes from the next step
            self._prefilling.remove(seq)
            self._decoding[row] = True
            self._outputs[row] += 1
        return n

    def _launch(self, preempt: bool) -> _Launch | None:
        t0 = time.perf_counter()
        plan = self._plan(preempt)
        if plan is None:
            return None
        nt = plan.n
        bucket = next(b for b in self._buckets if b >= nt)
        seq, pos, src, slot, loc, out_tok, out_row = plan.arrays()
        no = min(bucket, self.max_batch)
        nout = len(out_tok)
        buf = self._meta_host[self._meta_flip]
        host = self._meta_views[self._meta_flip]
        self._meta_flip ^= 1
        pads = (self.max_batch, 0, 0, self.slots, 0)
        for dst, val, pad in zip(host[:5], (seq, pos, src, slot, loc), pads, strict=True):
            dst[:nt] = val
            dst[nt:bucket] = pad  # padding tokens: no sequence, base, the scratch block
        host[5][:nout] = out_tok
        host[5][nout:no] = 0
        host[6][:nout] = out_row
        host[6][nout:no] = self.max_batch
        seqs = [self._row_seq[r] for r in out_row.tolist()]
        lengths = (self._filled[out_row]).tolist()
        self._table_updates(host[7])
        self._meta.copy_(buf, non_blocking=True)
        greedy = bool(self._greedy[out_row].all())
        ctx = 0 if self.triton_attention else -(-int(pos.max() + 1) // BLOCK) * BLOCK
        self.counters["decode_tokens"] += plan.decode
        self.counters["prefill_tokens"] += nt - plan.decode
        self.counters["plan_s"] += time.perf_counter() - t0
        logits, nxt = self._run_step(bucket, bool((slot != self.slots).any()), ctx)
        out = self._next_host[self._host_flip][:nout]
        self._host_flip ^= 1
        out.copy_(nxt[:nout], non_blocking=True)
        event = None
        if self._events:
            event = self._events[self._event_turn]
            self._event_turn = (self._event_turn + 1) % len(self._events)
            event.record()
        self.counters["steps"] += 1
        return _Launch(seqs, lengths, out, None if greedy else logits, event)

    def _table_updates(self, upd: np.ndarray) -> None:
        """The block table entries set since the last step, into the step's inputs (the step sets them on the device;
        the rest of the region is padding: the sink row's column 0, block 0)."""
        n = 0
        for rows, cols, blocks in self._table_new:
            k = len(rows)
            if n + k > upd.shape[1]:
                raise EngineError(f"a step carries at most {upd.shape[1]} block table updates")  # never: see FastLlama
            upd[0, n : n + k], upd[1, n : n + k], upd[2, n : n + k] = rows, cols, blocks
            n += k
        self._table_new.clear()
        upd[0, n:] = self.max_batch
        upd[1:, n:] = 0

    def _run_step(self, nt: int, lora: bool, ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.use_graphs:
            return self._step_body(nt, lora, ctx)
        key = (nt, lora, ctx, self.one_kernel_lora)
        entry = self._graphs.get(key)
        if entry is None:
            saved = self._tok.clone()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                try:
                    self._step_body(nt, lora, ctx)  # warm-up: Triton compiles, cuBLAS picks its kernels
                except Exception:
                    if not (self.use_triton or self.triton_attention):
                        raise
                    # A Triton kernel that fails to build here must not take serving down: fall back to torch.
                    log.exception("Triton kernels failed; falling back to the torch path without CUDA graphs")
                    self.triton_attention = self.use_triton = self.use_graphs = False
                    self._graphs.clear()
                    self._tok.copy_(saved)
                    torch.cuda.current_stream(self.device).wait_stream(side)
                    return self._step_body(nt, lora, max(ctx, self.blocks_per_seq * BLOCK))
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._tok.copy_(saved)
            graph = torch.cuda.CUDAGraph()
            # thread_local: adapter loads on other threads (side stream) go on while this thread captures.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits, nxt = self._step_body(nt, lora, ctx)
            entry = self._graphs[key] = (graph, logits, nxt)
            self._tok.copy_(saved)
        entry[0].replay()
        return entry[1], entry[2]

    def _finish(self, run: _Launch) -> list[StepOutput]:
        t0 = time.perf_counter()
        if run.event is not None:
            run.event.synchronize()
        t1 = time.perf_counter()
        tokens = run.next_host.tolist()
        outputs = []
        emit = self._emit
        for i, seq in enumerate(run.seqs):
            gen = seq.gen
            if gen.done:
                continue  # finished at the previous step; this token ran ahead and is dropped
            token = tokens[i]
            if run.logits is not None and gen.request.temperature > 0:
                token = self._sample(gen, run.logits[i])
                self._tok[seq.row] = token  # no step was launched after this one: the next one reads it
            out = emit(gen, token, run.lengths[i])
            outputs.append(out)
            if out.finished:
                self._release(seq)
                self._left(gen.request.slot)
        self.counters["wait_s"] += t1 - t0
        self.counters["finish_s"] += time.perf_counter() - t1
        return outputs


class _Plan:
    """One step's tokens, gathered as numpy pieces: decode tokens first, then prompt chunks."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.outs: list[tuple[np.ndarray, np.ndarray]] = []  # (token index in the step, row)
        self.n = 0
        self.decode = 0

    def add_decode(self, rows: np.ndarray, pos: np.ndarray, slot: np.ndarray, loc: np.ndarray) -> None:
        k = len(rows)
        if not k:
            return
        self.parts.append((rows, pos, np.full(k, -1), slot, loc))
        self.outs.append((np.arange(self.n, self.n + k), rows))
        self.n += k
        self.decode += k

    def add_chunk(self, row: int, pos: np.ndarray, tokens: list[int], slot: int, loc: np.ndarray, done: bool) -> None:
        k = len(pos)
        self.parts.append((np.full(k, row), pos, np.asarray(tokens, dtype=np.int64), np.full(k, slot), loc))
        if done:
            self.outs.append((np.array([self.n + k - 1]), np.array([row])))
        self.n += k

    def arrays(self) -> tuple[np.ndarray, ...]:
        """seq, pos, src, slot, loc per token; out_tok, out_row per output."""
        cols = [np.concatenate([p[i] for p in self.parts]) for i in range(5)]
        if self.outs:
            out_tok = np.concatenate([o[0] for o in self.outs])
            out_row = np.concatenate([o[1] for o in self.outs])
        else:
            out_tok = out_row = np.zeros(0, dtype=np.int64)
        return (*cols, out_tok, out_row)


def make_engine(base: BaseLike, cfg: ServingSettings) -> Engine | FastEngine:
    """The engine PERSONA_SERVE_ENGINE asks for; ``auto`` takes the fast one on CUDA unless the base rules it out."""
    choice = cfg.engine
    if choice == "auto":
        choice = "fast" if torch.device(cfg.device).type == "cuda" else "reference"
    if choice == "fast":
        try:
            return FastEngine(
                base, cfg.slots, cfg.max_rank, cfg.targets, cfg.device, cfg.max_batch, max_seq=cfg.max_seq,
                kv_tokens=cfg.kv_cache_tokens or None, step_tokens=cfg.step_tokens or None,
            )  # fmt: skip
        except EngineError as e:
            if cfg.engine == "fast":
                raise
            log.warning("the fast engine cannot serve this base (%s); using the reference engine", e)
    return Engine(base, cfg.slots, cfg.max_rank, cfg.targets, cfg.device, cfg.max_batch)
