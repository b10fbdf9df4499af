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

import sys
import threading
from collections.abc import Sequence
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
    (``positions``, long ``[T]``) and row (``token_rows``, long ``[T]``), and the longest row."""

    offsets: torch.Tensor
    positions: torch.Tensor
    token_rows: torch.Tensor
    longest: int

    def to(self, device: torch.device, non_blocking: bool = False) -> Packing:
        return Packing(
            self.offsets.to(device, non_blocking=non_blocking),
            self.positions.to(device, non_blocking=non_blocking),
            self.token_rows.to(device, non_blocking=non_blocking),
            self.longest,
        )

    def pin_memory(self) -> Packing:
        return Packing(
            self.offsets.pin_memory(), self.positions.pin_memory(), self.token_rows.pin_memory(), self.longest
        )


def packing_of(lengths: Sequence[int]) -> Packing:
    """The `Packing` of rows of these lengths, in order (on the host)."""
    n = np.asarray(lengths, dtype=np.int64)
    offsets = np.zeros(len(n) + 1, dtype=np.int64)
    np.cumsum(n, out=offsets[1:])
    rows = np.repeat(np.arange(len(n)), n)
    positions = np.arange(int(offsets[-1])) - offsets[:-1][rows]
    return Packing(
        torch.from_numpy(offsets.astype(np.int32)),
        torch.from_numpy(positions),
        torch.from_numpy(rows),
        int(n.max()) if len(n) else 0,
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
            # are); its backward is torch's (FlashAttentionBackward).
            out = torch.ops.aten._flash_attention_forward(
                query[0].transpose(0, 1),
                key[0].transpose(0, 1),
                value[0].transpose(0, 1),
                p.offsets,
                p.offsets,
                p.longest,
                p.longest,
                0.0,
                True,
                False,
                scale=scale,
            )[0]
            return out.transpose(0, 1)[None]
        rows = p.token_rows
        mask = (rows[:, None] == rows[None, :]).tril()
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
