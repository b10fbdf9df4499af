"""Packed rows: a batch's rows as one sequence of all their tokens, without padding.

A batched-training micro-batch is a rectangle of right-padded rows: with the bench's users (rows of ~30-110 tokens)
one micro-batch per step held 221k token positions for 150k real tokens (bench/results/retrain_throughput.md), and
every projection, norm and LoRA branch ran on the padding too. Packed, the rows are one sequence ``[1, T]``: row
``i`` is tokens ``offsets[i] .. offsets[i + 1]``, its rotary positions start at 0 (``position_ids``), and attention
stays within a row (causal, variable-length flash attention on CUDA; a block-diagonal mask elsewhere). The LoRA
branch takes each row's adapter through the wrapper's packed mode (`pipeline.models.multilora.LoraWrap.set_packed`).

Hugging Face's decoder would see the position resets as packed sequences and build a ``[T, T]`` mask for them, so
its ``create_causal_mask`` is replaced once in the model's module by a dispatcher that returns no mask in a thread
inside `decoder_states` (every other thread gets the original); attention goes through
`pipeline.models.shared_prefix`'s dispatcher. `available` is `shared_prefix.available` (the same model types).
The hidden states equal those of the padded rows (tests/unit/models/test_packed.py).
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models import shared_prefix

available = shared_prefix.available


@dataclass(frozen=True)
class Packing:
    """Where the rows of a packed sequence are: ``offsets`` (int32 ``[rows + 1]``), each token's position in its row
    (``positions``, long ``[T]``) and row (``token_rows``, long ``[T]``), and the longest row.

    With a shared prefix (`packing_of`'s ``prefix``), the first rows are prefix rows and each later row's attention
    reads its prefix row's tokens before its own: ``keys`` (long ``[K]``) lists, sequence by sequence, the tokens
    whose keys and values each row attends to, at ``key_offsets`` (int32 ``[rows + 1]``; ``longest_key``), and
    ``sees`` (long ``[T]``) is for each token the prefix row it sees (-1: none)."""

    offsets: torch.Tensor
    positions: torch.Tensor
    token_rows: torch.Tensor
    longest: int
    keys: torch.Tensor | None = None
    key_offsets: torch.Tensor | None = None
    longest_key: int = 0
    sees: torch.Tensor | None = None

    def _map(self, fn: Any) -> Packing:
        def opt(t: torch.Tensor | None) -> torch.Tensor | None:
            return fn(t) if t is not None else None

        return Packing(
            fn(self.offsets),
            fn(self.positions),
            fn(self.token_rows),
            self.longest,
            opt(self.keys),
            opt(self.key_offsets),
            self.longest_key,
            opt(self.sees),
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> Packing:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Packing:
        return self._map(lambda t: t.pin_memory())


def packing_of(lengths: Sequence[int], prefix: tuple[int, Sequence[int]] | None = None) -> Packing:
    """The `Packing` of rows of these lengths, in order (on the host). ``prefix``: (``P``, ``owner``): the first
    ``len(lengths) - len(owner)`` rows are prefix rows of ``P`` tokens, and each later row ``i`` continues prefix
    row ``owner[i]`` (its positions start at ``P``, and it attends to that row's tokens first)."""
    n = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    rows = np.repeat(np.arange(len(n)), n)
    positions = np.arange(int(offsets[-1])) - offsets[:-1][rows]
    packing = Packing(
        torch.from_numpy(offsets.astype(np.int32)),
        torch.from_numpy(positions),
        torch.from_numpy(rows),
        int(n.max()) if len(n) else 0,
    )
    if prefix is None:
        return packing
    p, owner = prefix
    own = np.asarray(owner, dtype=np.int64)
    heads = len(n) - len(own)
    if heads < 0 or (heads and (n[:heads] != p).any()) or (len(own) and (own.min() < 0 or own.max() >= heads)):
        raise ValueError(f"{heads} prefix rows of {p} tokens do not fit the rows and owners given")
    positions[offsets[heads] :] += p
    # per sequence, the tokens its keys come from: a prefix row's own; a later row's prefix row's, then its own
    key_lengths = n.copy()
    key_lengths[heads:] += p
    key_offsets = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(key_lengths, out=key_offsets[1:])
    # key k of sequence s, at j = k - key_offsets[s]: a prefix row's token j; a later row's prefix row's token j
    # (j < P), else its own token j - P
    seq = np.repeat(np.arange(len(n)), key_lengths)
    j = np.arange(int(key_offsets[-1])) - key_offsets[:-1][seq]
    seen = np.concatenate([np.arange(heads), own])[seq]  # the prefix row each sequence reads first (itself: heads)
    later_seq = seq >= heads
    keys = np.where(later_seq & (j < p), offsets[:-1][seen] + j, offsets[:-1][seq] + j - np.where(later_seq, p, 0))
    sees = np.full(int(offsets[-1]), -1, dtype=np.int64)
    sees[offsets[heads] :] = np.repeat(own, n[heads:])
    return Packing(
        packing.offsets,
        torch.from_numpy(positions),
        packing.token_rows,
        packing.longest,
        torch.from_numpy(keys),
        torch.from_numpy(key_offsets.astype(np.int32)),
        int(key_lengths.max()) if len(n) else 0,
        torch.from_numpy(sees),
    )


@dataclass(frozen=True)
class Rows:
    """Rows of token ids packed as one sequence for a forward (`rows_of`): ``ids`` (long ``[T]``), ``slots`` (long,
    each packed sequence's LoRA stack row: with a shared prefix, one prefix row per distinct slot first, then the
    rows), their `Packing`, and ``own`` (long ``[T - H]``): for each token after the ``H`` prefix-row tokens, the
    row it belongs to. Those tokens are the rows' own (their ids after the prefix), row after row."""

    ids: torch.Tensor
    slots: torch.Tensor
    packing: Packing
    own: np.ndarray

    @property
    def head_tokens(self) -> int:
        """Tokens of the prefix rows, which come first (0 without a prefix)."""
        return int(self.ids.shape[0]) - len(self.own)


def rows_of(ids: Sequence[Sequence[int]], slots: Sequence[int], shared: int = 0) -> Rows:
    """Rows ``ids`` (each row's stack row in ``slots``) as one packed sequence, on the host. With ``shared`` > 0,
    the rows' first ``shared`` tokens (equal in every row: `shared_prefix.common_length`) run once per distinct
    slot, as a prefix row that the slot's rows attend to (`packing_of`)."""
    if len(ids) != len(slots) or not ids:
        raise ValueError(
            f"rows_of takes one slot per row and at least one row, got {len(ids)} rows, {len(slots)} slots"
        )
    heads = sorted(set(slots)) if shared else []
    where = {s: i for i, s in enumerate(heads)}
    own_lengths = np.fromiter((len(r) - shared for r in ids), dtype=np.int64, count=len(ids))
    if shared and (own_lengths < 1).any():
        raise ValueError(f"a shared prefix of {shared} tokens leaves a row without tokens of its own")
    lengths = [shared] * len(heads) + own_lengths.tolist()
    packing = packing_of(lengths, (shared, [where[s] for s in slots]) if shared else None)
    head_ids = list(ids[0][:shared]) * len(heads)
    flat = np.fromiter(
        itertools.chain(head_ids, itertools.chain.from_iterable(r[shared:] for r in ids)),
        dtype=np.int64,
        count=len(head_ids) + int(own_lengths.sum()),
    )
    return Rows(
        torch.from_numpy(flat),
        torch.tensor(heads + list(slots), dtype=torch.long),
        packing,
        np.repeat(np.arange(len(ids)), own_lengths),
    )


@dataclass
class _Packed(shared_prefix.AttentionState):
    packing: Packing
    layers: int = 0

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
        """Causal attention within each row of ``[1, heads, T, dim]`` tensors."""
        self.layers += 1
        p = self.packing
        if query.is_cuda:
            # Variable-length flash attention ([T, heads, dim], rows at the offsets; grouped key/value heads as they
            # are; causal aligned to each sequence's last key); its backward is torch's (FlashAttentionBackward).
            k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
            key_offsets, longest_key = p.offsets, p.longest
            if p.keys is not None and p.key_offsets is not None:  # each row's prefix row's keys, then its own
                k, v = k.index_select(0, p.keys), v.index_select(0, p.keys)
                key_offsets, longest_key = p.key_offsets, p.longest_key
            out = torch.ops.aten._flash_attention_forward(
                query[0].transpose(0, 1),
                k,
                v,
                p.offsets,
                key_offsets,
                p.longest,
                longest_key,
                0.0,
                True,
                False,
                scale=scale,
            )[0]
            return out.transpose(0, 1)[None]
        rows = p.token_rows
        mask = (rows[:, None] == rows[None, :]).tril()
        if p.sees is not None:
            mask |= p.sees[:, None] == rows[None, :]
        gqa = query.shape[1] != key.shape[1]
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)


def decoder_states(decoder: nn.Module, ids: torch.Tensor, packing: Packing, lora: Any, row_slots: torch.Tensor) -> Any:
    """The decoder's last hidden states ``[T, hidden]`` of the packed rows ``ids`` (``[T]``), ``packing`` on the
    device; ``lora`` (a `pipeline.models.multilora.LoraWrap`) gives row ``i`` stack row ``row_slots[i]`` and is left
    in packed mode (its caller's ``set_rows`` ends it)."""
    if not _mask_dispatch(sys.modules[type(decoder).__module__]):
        raise RuntimeError(f"{type(decoder).__module__} builds no causal mask of its own: packed rows cannot run")
    offsets = packing.offsets.to(torch.int64)  # the LoRA kernels' (flash attention takes the int32 ones)
    lora.set_packed(row_slots, offsets, packing.longest, row_slots.index_select(0, packing.token_rows))
    state = _Packed(packing)
    with shared_prefix.attention_state(state), _no_mask():
        out = decoder(
            input_ids=ids[None], position_ids=packing.positions[None], attention_mask=None, use_cache=False
        ).last_hidden_state
    if not state.layers:
        raise RuntimeError("the packed rows' attention was not dispatched")
    return out[0]


_NO_MASK = threading.local()
_LOCK = threading.Lock()


class _no_mask:
    def __enter__(self) -> None:
        _NO_MASK.depth = getattr(_NO_MASK, "depth", 0) + 1

    def __exit__(self, *exc: object) -> None:
        _NO_MASK.depth -= 1


@contextlib.contextmanager
def causal_only(model: nn.Module) -> Iterator[bool]:
    """In this thread, forwards of right-padded (or unpadded) rows without an attention mask skip transformers'
    ``create_causal_mask``: SDPA attention is causal by itself (``is_causal``), and a real token never sees a pad.
    ``create_causal_mask`` asks the device whether the position ids are packed sequences (``.all()``): a device
    sync per forward, so the host could not queue the gate's next forward while the device ran this one. Yields
    whether it applies (`available`: SDPA attention of a supported model; otherwise the model builds its masks)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder: nn.Module = get_decoder() if callable(get_decoder) else model
    if not (available(model) and _mask_dispatch(sys.modules[type(decoder).__module__])):
        yield False
        return
    with _no_mask():
        yield True


def _mask_dispatch(modeling: Any) -> bool:
    """Put a dispatcher in place of ``modeling.create_causal_mask`` (once per module, kept for the process): in a
    thread inside `decoder_states`, no mask (attention is dispatched and keeps to each row); elsewhere the original.
    False when the module has no such function."""
    with _LOCK:
        original = getattr(modeling, "create_causal_mask", None)
        if original is None:
            return False
        if getattr(original, "persona_packed", False):
            return True

        def create_causal_mask(*args: Any, **kwargs: Any) -> Any:
            if getattr(_NO_MASK, "depth", 0) > 0:
                return None
            return original(*args, **kwargs)

        create_causal_mask.persona_packed = True  # type: ignore[attr-defined]
        create_causal_mask.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(modeling, "create_causal_mask", create_causal_mask)  # noqa: B010 (a module, not an object)
        return True
