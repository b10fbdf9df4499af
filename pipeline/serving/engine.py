"""The serving engine: continuous batching of generation requests over one base with many LoRA adapters.

One `Engine` owns the serving process's base model for its lifetime: it injects multi-LoRA layers into it
(`pipeline.models.multilora`), so rows of one batch run different adapters in a single forward. The engine is
driven by one thread (the serving loop); it is not thread-safe.

Scheduling. `submit` queues a request; every `step` first decodes one token for every running request in one
batched forward, then admits waiting requests (up to ``max_batch``): each is prefilled on its own, which yields its
first token, and joins the batch. Requests leave as soon as they finish (max_tokens, EOS, stop token or string).

KV cache. The running batch keeps one left-padded ``DynamicCache``: all rows end at the same column, so a decode
step appends one column for all rows, and an attention mask hides each row's padding (positions are per row). A
joining request's cache is left-padded (or the batch's is) to the common length and concatenated along the batch;
a leaving row is dropped by index, and all-padding leading columns are trimmed. Cost: a join or leave copies the
batch cache once (O(batch x length x layers)); decode steps copy nothing beyond the cache's own append. Prefill is
not batched across joiners: each runs alone without padding, which keeps prefill exact and avoids fully-masked
query rows. Not done yet: paged/static cache, CUDA graphs, chunked prefill, prefix sharing.

Sampling. Greedy when ``temperature == 0``; else temperature then nucleus (top_p) sampling from the row's
float32 logits on the CPU with a per-request ``torch.Generator`` seeded from the request's seed, so a request's
tokens depend on its seed and logits only, not on the batch it shared or the device.
"""

from __future__ import annotations

import inspect
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from transformers import DynamicCache

from pipeline.domain.errors import InvalidInput
from pipeline.models import multilora
from pipeline.models.multilora import ALL_TARGETS, BASE_SLOT, MultiLoraHandle

log = logging.getLogger(__name__)


class EngineError(InvalidInput):
    """A request or engine operation is invalid; the message names the bad value and what is allowed."""


class BaseLike(Protocol):
    """What the engine needs of a loaded base (`pipeline.models.base.LoadedBase` fits)."""

    @property
    def model(self) -> Any: ...

    @property
    def tokenizer(self) -> Any: ...


@dataclass(frozen=True)
class Request:
    """One generation request: prompt token ids, the adapter slot (-1 = base) and sampling parameters."""

    prompt_ids: Sequence[int]
    slot: int = BASE_SLOT
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: Sequence[int] = ()
    stop: Sequence[str] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass
class Generation:
    """The state and result of a submitted request: generated token ids, text, and why it finished."""

    id: int
    request: Request
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    #: The output cut before a matched stop string (set when finished); else None and `text` decodes on demand.
    cut_text: str | None = None
    _generator: torch.Generator | None = None
    cancelled: bool = False  # asked to stop (its client went away): it finishes at its next token
    _decode: Callable[[list[int]], str] | None = None  # the engine's decode_text, set when finished

    @property
    def done(self) -> bool:
        """Whether the request has finished."""
        return self.finish_reason is not None

    @property
    def text(self) -> str | None:
        """The decoded output, cut before a matched stop string; None until finished (or where no decoder is known:
        an HTTP process's copy of a generation). Decoded when first asked for, not by the engine thread."""
        if self.cut_text is None and self._decode is not None:
            self.cut_text = self._decode(self.output_ids)
        return self.cut_text

    @text.setter
    def text(self, value: str | None) -> None:
        self.cut_text = value


_new_output = tuple.__new__


class StepOutput(NamedTuple):
    """One token produced by a step for one request (for streaming; a tuple: one is made per token)."""

    generation: Generation
    token_id: int
    finished: bool


class _Batch:
    """The running rows and their left-padded cache; row i of every tensor is ``gens[i]``."""

    def __init__(self) -> None:
        self.gens: list[Generation] = []
        self.cache = DynamicCache()  # per layer keys, values [B, H, L, D], left-padded
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [B, L] 1 = real token
        self.positions: list[int] = []  # next position id per row (= real tokens in its cache)

    def __len__(self) -> int:
        return len(self.gens)


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - t.shape[-2]
    if pad == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], pad, t.shape[-1]), t], dim=-2)


def _left_pad_mask(mask: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - mask.shape[-1]
    return mask if pad == 0 else torch.cat([mask.new_zeros(mask.shape[0], pad), mask], dim=-1)


def _cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers: list[Any] = list(cache.layers)  # full-attention layers: keys and values are tensors once filled
    return [(layer.keys, layer.values) for layer in layers]


def _make_cache(tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for layer_idx, (k, v) in enumerate(tensors):
        cache.update(k, v, layer_idx)
    return cache


class GenerationLoop:
    """What every engine shares: request checks and queueing, sampling, stop rules, text decoding.

    A subclass sets ``tokenizer``, ``slots``, ``max_positions``, ``eos_token_id``, ``_ids`` and ``_waiting`` and
    implements ``step``, ``has_work``, ``active`` and ``abort_all``.
    """

    tokenizer: Any
    slots: int
    max_positions: int
    eos_token_id: int | None
    _ids: Iterator[int]
    _waiting: deque[Generation]

    def submit(self, request: Request) -> Generation:
        """Queue ``request``; it joins the running batch at the next `step` with room. Returns its live state."""
        if not request.prompt_ids:
            raise EngineError("prompt_ids is empty: a request needs at least one prompt token")
        if request.max_tokens < 1:
            raise EngineError(f"max_tokens must be >= 1, got {request.max_tokens}")
        if request.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {request.temperature}")
        if not 0 < request.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {request.top_p}")
        if not BASE_SLOT <= request.slot < self.slots:
            raise EngineError(f"slot {request.slot} is out of range: allowed -1..{self.slots - 1}")
        if len(request.prompt_ids) >= self.max_positions:
            raise EngineError(
                f"prompt has {len(request.prompt_ids)} tokens; the model allows fewer than {self.max_positions}"
            )
        gen = Generation(next(self._ids), request)
        if request.temperature > 0:
            gen._generator = torch.Generator()
            if request.seed is not None:
                gen._generator.manual_seed(request.seed)
            else:
                gen._generator.seed()
        self._waiting.append(gen)
        return gen

    @property
    def pending(self) -> int:
        """Number of queued requests not yet admitted."""
        return len(self._waiting)

    def cancel(self, gen: Generation) -> None:
        """Stop ``gen`` (its client went away): it finishes with reason ``cancelled`` at its next token, its row and
        cache freed as for any finished request (a queued one may be dropped before it runs). Only sets a flag:
        safe from any thread without the engine's lock."""
        gen.cancelled = True

    def step(self) -> list[StepOutput]:  # pragma: no cover - abstract
        raise NotImplementedError

    def has_work(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def load_adapter_state(self, slot: int, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def load_adapter(self, slot: int, adapter_dir: Path | str) -> None:
        """Load a PEFT adapter directory into ``slot``; refused while a queued or running request uses the slot."""
        state, config = multilora.read_adapter_dir(adapter_dir)
        self.load_adapter_state(slot, state, config)

    def run_until_done(self, max_steps: int | None = None) -> None:
        """Step until no request is queued or running (or ``max_steps`` steps were made)."""
        steps = 0
        while self.has_work() and (max_steps is None or steps < max_steps):
            self.step()
            steps += 1

    def generate(self, requests: Sequence[Request]) -> list[Generation]:
        """Submit ``requests`` together and run them to completion (convenience for tests and batch jobs)."""
        gens = [self.submit(r) for r in requests]
        self.run_until_done()
        return gens

    def _sample(self, gen: Generation, logits: torch.Tensor) -> int:
        req = gen.request
        if req.temperature == 0:
            return int(logits.argmax())
        logits = logits.float().cpu() / req.temperature
        probs = torch.softmax(logits, dim=-1)
        if req.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            cumulative = sorted_probs.cumsum(-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = cumulative - sorted_probs >= req.top_p
            sorted_probs[drop] = 0
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=gen._generator))

    def decode_text(self, ids: list[int]) -> str:
        # A model's vocabulary may be larger than its tokenizer's (padded embeddings, the tiny test model): ids
        # without a token have no text.
        known = self.__dict__.get("_vocab")
        if known is None:  # a tokenizer's len() builds its whole vocabulary: once
            known = self.__dict__["_vocab"] = len(self.tokenizer)
        return self.tokenizer.decode([i for i in ids if 0 <= i < known], skip_special_tokens=True)

    def _emit(self, gen: Generation, token: int, length: int) -> StepOutput:
        """Record ``token`` for ``gen`` and decide whether it finished (``length`` = tokens in its cache)."""
        req = gen.request
        gen.output_ids.append(token)
        reason = None
        stop_at: int | None = None
        if gen.cancelled:
            reason = "cancelled"
        elif (not req.ignore_eos and token == self.eos_token_id) or token in req.stop_token_ids:
            reason = "stop"
        elif req.stop:
            text = self.decode_text(gen.output_ids)
            hits = [i for i in (text.find(s) for s in req.stop if s) if i >= 0]
            if hits:
                reason, stop_at = "stop", min(hits)
        if reason is None and (len(gen.output_ids) >= req.max_tokens or length + 1 >= self.max_positions):
            reason = "length"
        if reason is None:
            return _new_output(StepOutput, (gen, token, False))  # (no NamedTuple __new__ frame: once a token)
        gen.finish_reason = reason
        if stop_at is not None:
            gen.cut_text = self.decode_text(gen.output_ids)[:stop_at]
        else:
            gen._decode = self.decode_text  # decoded by whoever asks for gen.text, off the engine thread
        return _new_output(StepOutput, (gen, token, True))


class Engine(GenerationLoop):
    """Batched multi-LoRA forward and continuous-batching generation on one base model.

    ``base`` is the serving process's own base (model + tokenizer); the engine injects multi-LoRA layers into it
    in place (``close()`` takes them out again, leaving the weights untouched). ``slots`` adapters of rank up to
    ``max_rank`` on ``targets`` can be resident at once. The model is moved to ``device``.
    """

    def __init__(
        self,
        base: BaseLike,
        slots: int,
        max_rank: int,
        targets: Sequence[str] = ALL_TARGETS,
        device: str | torch.device = "cpu",
        max_batch: int = 32,
    ) -> None:
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.model.to(self.device)
        self.handle: MultiLoraHandle = multilora.inject(self.model, tuple(targets), slots, max_rank)
        self.slots = slots
        self.eos_token_id: int | None = getattr(self.model.config, "eos_token_id", None)
        if isinstance(self.eos_token_id, list):
            self.eos_token_id = self.eos_token_id[0] if self.eos_token_id else None
        self.max_positions: int = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        # transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept both so the engine runs on either.
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._ids = itertools.count()
        self._waiting: deque[Generation] = deque()
        self._batch = _Batch()

    # -- adapters ---------------------------------------------------------------------------------------------

    def _slot_in_use(self, slot: int) -> bool:
        return any(g.request.slot == slot for g in itertools.chain(self._batch.gens, self._waiting))

    def load_adapter_state(self, slot: int, state: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
        """Load adapter tensors + config (see `multilora.load_slot`) into ``slot``."""
        if self._slot_in_use(slot):
            raise EngineError(f"slot {slot} is used by a queued or running request; wait until they finish")
        multilora.load_slot(self.handle, slot, state, config)

    def pack_adapter(self, state: dict[str, torch.Tensor], config: dict[str, Any]) -> multilora.PackedLora:
        """Check adapter tensors + config against the slots' limits and lay them out for the slots, in host memory
        (`multilora.pack_adapter`). Raises AdapterLimitError when it does not fit; touches no slot. Pure: safe from
        any thread, without the engine's lock."""
        return multilora.pack_adapter(self.handle, state, config)

    def load_packed(self, slot: int, packed: multilora.PackedLora) -> None:
        """Copy a packed adapter (`pack_adapter`) into ``slot``.

        Unlike the rest of the engine, safe from another thread while `step` runs, provided no queued or running
        request uses ``slot`` (the adapter cache guarantees it): it writes only that slot's rows of the LoRA stacks,
        in place, and a forward reads only the rows of the slots its requests use. Refused (EngineError) when it
        sees a queued or running request on ``slot``.
        """
        if self._slot_used_now(slot):
            raise EngineError(f"slot {slot} is used by a queued or running request; wait until they finish")
        multilora.write_slot(self.handle, slot, packed)

    def _slot_used_now(self, slot: int) -> bool:
        """`_slot_in_use` from a thread other than the engine's: snapshots of the queues (a copy of a list or a
        deque is one step under the GIL), never an iteration that a concurrent `step` could mutate."""
        gens = list(self._batch.gens) + list(self._waiting)
        return any(g.request.slot == slot for g in gens)

    def clear_adapter(self, slot: int) -> None:
        """Empty ``slot`` (refused while a queued or running request uses it)."""
        if self._slot_in_use(slot):
            raise EngineError(f"slot {slot} is used by a queued or running request; wait until they finish")
        multilora.clear_slot(self.handle, slot)

    def close(self) -> None:
        """Take the multi-LoRA layers out of the base: it is then exactly the model it was before."""
        self.handle.remove()

    # -- scoring ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, slot_per_row: torch.Tensor | Sequence[int]
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` of a batch whose row i runs the adapter in ``slot_per_row[i]`` (-1 = base).

        Padding may be on either side (mask 0); positions are counted over real tokens only, so a row's logits at
        its real tokens equal those of the row alone. Logits at padded positions are meaningless.
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device)
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        multilora.set_rows(self.handle, torch.as_tensor(slot_per_row, dtype=torch.long))
        try:
            out = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        finally:
            multilora.set_rows(self.handle, None)
        return out.logits

    # -- generation -------------------------------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Number of running requests."""
        return len(self._batch)

    def has_work(self) -> bool:
        """Whether a `step` would do anything."""
        return bool(self._batch.gens or self._waiting)

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """Advance every running request by one token, then admit waiting requests (each gets its first token)."""
        outputs: list[StepOutput] = []
        if self._batch.gens:
            outputs += self._decode()
        while self._waiting and len(self._batch) < self.max_batch:
            outputs.append(self._prefill(self._waiting.popleft()))
        return outputs

    def abort_all(self) -> list[Generation]:
        """Drop every queued and running request (after a step failed) and return them, marked ``error``."""
        gens = [*self._batch.gens, *self._waiting]
        self._batch = _Batch()
        self._waiting.clear()
        for g in gens:
            g.finish_reason = g.finish_reason or "error"
        return gens

    # -- internals --------------------------------------------------------------------------------------------

    def _forward(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        slots: list[int],
    ) -> torch.Tensor:
        multilora.set_rows(self.handle, torch.tensor(slots, dtype=torch.long))
        try:
            out = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,  # only the last position is sampled: skip the vocab projection of the rest
                **{self._cache_kwarg: cache},
            )
        finally:
            multilora.set_rows(self.handle, None)
        return out.logits[:, -1, :]

    def _prefill(self, gen: Generation) -> StepOutput:
        ids = torch.tensor([list(gen.request.prompt_ids)], dtype=torch.long, device=self.device)
        n = ids.shape[1]
        cache = DynamicCache()
        mask = torch.ones(1, n, dtype=torch.long, device=self.device)
        positions = torch.arange(n, device=self.device)[None]
        last = self._forward(ids, mask, positions, cache, [gen.request.slot])
        token = self._sample(gen, last[0])
        out = self._emit(gen, token, n)
        if not out.finished:
            self._join(gen, cache, mask, n)
        return out

    def _decode(self) -> list[StepOutput]:
        b = self._batch
        ids = torch.tensor([[g.output_ids[-1]] for g in b.gens], dtype=torch.long, device=self.device)
        mask = torch.cat([b.mask, b.mask.new_ones(len(b), 1)], dim=-1)
        positions = torch.tensor(b.positions, dtype=torch.long, device=self.device)[:, None]
        # The cache object persists across decode steps (appended in place); only joins and leaves rebuild it.
        last = self._forward(ids, mask, positions, b.cache, [g.request.slot for g in b.gens])
        b.mask = mask
        b.positions = [p + 1 for p in b.positions]
        outputs = []
        keep = []
        for i, gen in enumerate(b.gens):
            out = self._emit(gen, self._sample(gen, last[i]), b.positions[i])
            outputs.append(out)
            if not out.finished:
                keep.append(i)
        if len(keep) < len(b):
            self._keep_rows(keep)
        return outputs

    def _join(self, gen: Generation, cache: DynamicCache, mask: torch.Tensor, position: int) -> None:
        b = self._batch
        if not b.gens:
            b.gens, b.cache, b.mask, b.positions = [gen], cache, mask, [position]
            return
        length = max(b.mask.shape[1], mask.shape[1])
        b.cache = _make_cache(
            [
                (
                    torch.cat([_left_pad(k0, length), _left_pad(k1, length)]),
                    torch.cat([_left_pad(v0, length), _left_pad(v1, length)]),
                )
                for (k0, v0), (k1, v1) in zip(_cache_tensors(b.cache), _cache_tensors(cache), strict=True)
            ]
        )
        b.mask = torch.cat([_left_pad_mask(b.mask, length), _left_pad_mask(mask, length)])
        b.gens.append(gen)
        b.positions.append(position)

    def _keep_rows(self, keep: list[int]) -> None:
        b = self._batch
        if not keep:
            self._batch = _Batch()
            return
        rows = torch.tensor(keep, dtype=torch.long, device=self.device)
        mask = b.mask.index_select(0, rows)
        # Columns that are padding for every remaining row carry nothing: drop them.
        start = int(mask.any(dim=0).nonzero()[0])
        b.mask = mask[:, start:]
        b.cache = _make_cache(
            [
                (k.index_select(0, rows)[:, :, start:], v.index_select(0, rows)[:, :, start:])
                for k, v in _cache_tensors(b.cache)
            ]
        )
        b.gens = [b.gens[i] for i in keep]
        b.positions = [b.positions[i] for i in keep]
