"""Rows that begin with the same tokens, run with those tokens computed once per adapter.

Every example a chat model trains or is scored on is rendered by its chat template, so the rows of a batch begin
with the same tokens: the template's head (SmolLM2's: its default system prompt and the user turn's opening, ~24
tokens), and for messages without a prompt the whole user turn (~30 of a ~70-token row). Under causal attention
those positions' hidden states depend only on those tokens and the adapter, so a batch of rows from K adapters
needs them once per adapter, not once per row. `decoder_states` runs, in one forward, one "prefix row" per adapter
(the common first ``P`` tokens) and the rows without those tokens: in each layer each row's attention reads its
adapter's prefix keys and values before its own, with the causal mask aligned to the lower right, and its rotary
positions start at ``P``. The hidden states of the rows' own positions are those of the full rows (the same
arithmetic, up to floating-point rounding: tests/unit/models/test_shared_prefix.py), and gradients flow back
through the prefix keys and values into the prefix rows. One forward, not two: a batched-training step is about as
much host work (kernel launches) as device work, and a second forward per micro-batch made it slower on an H200
although it ran ~40% fewer tokens (bench/shared_prefix_kernels.py).

Hugging Face's attention modules look their attention function up by name at every call
(``ALL_ATTENTION_FUNCTIONS``), so the ``sdpa`` entry is replaced once by a dispatcher that does the above only in
a thread inside `decoder_states` (every other thread, a serving engine included, gets the original function).

`common_length` chooses ``P`` for a batch from its rows' ids and labels; `available` says whether a model can run
this way (a Llama-like decoder on SDPA attention, without sliding windows).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: Model types whose decoder takes ``position_ids``, whose attention modules carry ``layer_idx`` and
#: ``num_key_value_groups`` and call ``ALL_ATTENTION_FUNCTIONS``: the ones this is tested with.
MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3"})

#: Below this many common tokens, a batch runs its rows whole (the prefix forward's launches would cost more than
#: the tokens they save).
MIN_PREFIX = 4

IGNORE = -100


@dataclass(frozen=True)
class Prefix:
    """The common first tokens of a batch's rows (``ids``: ``[P]``), the adapter rows (``slots``: ``[U]``, as
    the LoRA wrapper's ``set_rows`` takes them) that run them, and per batch row the index of its adapter among
    ``slots`` (``owner``: ``[rows]``)."""

    ids: torch.Tensor
    slots: torch.Tensor
    owner: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device, non_blocking: bool = False) -> Prefix:
        return Prefix(
            self.ids.to(device, non_blocking=non_blocking),
            self.slots.to(device, non_blocking=non_blocking),
            self.owner.to(device, non_blocking=non_blocking),
        )

    def pin_memory(self) -> Prefix:
        return Prefix(self.ids.pin_memory(), self.slots.pin_memory(), self.owner.pin_memory())


def common_length(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int] | None]) -> int:
    """How many first tokens the rows ``ids`` (lists) can share: their longest common prefix, short of every row's
    last token and of the position that predicts its first labelled token (``labels[r][i] != IGNORE`` is predicted
    by position ``i - 1``, and a prefix position's prediction is not computed); a row without labels (a probe,
    scored at every position) shares nothing. 0 when fewer than `MIN_PREFIX` tokens are common."""
    if not ids:
        return 0
    limit = min(len(r) for r in ids) - 1
    first = list(ids[0])
    ignored = [IGNORE] * (limit + 1)
    for row, row_labels in zip(ids, labels, strict=True):
        if limit < MIN_PREFIX or row_labels is None:
            return 0
        # Slices compare in C; a row is walked token by token only where it ends the common part.
        if list(row_labels[: limit + 1]) != ignored[: limit + 1]:
            limit = min(limit, next(i for i, label in enumerate(row_labels) if label != IGNORE) - 1)
        if list(row[:limit]) != first[:limit]:
            limit = next(i for i in range(limit) if row[i] != first[i])
    return limit if limit >= MIN_PREFIX else 0


def prefix_of(row_ids: Sequence[int], length: int, slots: Sequence[int]) -> Prefix:
    """The `Prefix` of a batch whose rows (their LoRA rows: ``slots``) share ``row_ids[:length]``."""
    distinct = sorted(set(slots))
    where = {s: i for i, s in enumerate(distinct)}
    return Prefix(
        torch.tensor(list(row_ids[:length]), dtype=torch.long),
        torch.tensor(distinct, dtype=torch.long),
        torch.tensor([where[s] for s in slots], dtype=torch.long),
    )


def available(model: nn.Module) -> bool:
    """Whether ``model`` can run `decoder_states` with a prefix: a decoder of `MODEL_TYPES` on SDPA attention
    without a sliding window, and a transformers that looks attention functions up by name."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in MODEL_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return _install()


def decoder_states(
    decoder: nn.Module,
    ids: torch.Tensor,
    prefix: Prefix | None,
    set_rows: Callable[[torch.Tensor | None], None],
    row_slots: torch.Tensor,
) -> torch.Tensor:
    """The decoder's last hidden states of ``ids`` (``[rows, W]``, right-padded, no attention mask), rows that
    all begin with ``prefix.ids`` (left out of ``ids``) when ``prefix`` is given: positions ``P .. P + W - 1`` of
    the full rows. ``set_rows`` points the LoRA wrapper at the adapters of the forward (``row_slots`` for the rows).

    With a prefix, one forward runs ``U`` prefix rows (``prefix.ids``, one per adapter of ``prefix.slots``) and then
    the rows, all padded to ``L = max(W, P)``; the prefix rows' positions are ``0 ..``, the rows' ``P ..``. In each
    layer's attention the prefix rows attend causally among themselves, and each row attends to its adapter's
    prefix keys and values (the first ``P`` of its prefix row) and then its own (`_install`)."""
    if prefix is None:
        set_rows(row_slots)
        out: torch.Tensor = decoder(input_ids=ids, attention_mask=None, use_cache=False).last_hidden_state
        return out
    if not _install():
        raise RuntimeError("this transformers has no attention registry: a shared prefix cannot run")
    n_prefix, p = prefix.slots.shape[0], prefix.length
    rows, width = ids.shape
    length = max(width, p)
    head = prefix.ids[None].expand(n_prefix, p)
    if length > p:  # the prefix rows' extra positions: any token (causal: the first P never see them)
        head = torch.cat([head, head[:, -1:].expand(n_prefix, length - p)], dim=1)
    if length > width:
        ids = torch.cat([ids, ids[:, -1:].expand(rows, length - width)], dim=1)
    steps = torch.arange(length, device=ids.device)
    positions = torch.cat([steps.expand(n_prefix, length), (steps + p).expand(rows, length)])
    set_rows(torch.cat([prefix.slots, row_slots]))
    state = _Shared(n_prefix, p, prefix.owner)
    with _state(state):
        out = decoder(
            input_ids=torch.cat([head, ids]), position_ids=positions, attention_mask=None, use_cache=False
        ).last_hidden_state
    set_rows(row_slots)
    if not state.layers:
        raise RuntimeError("the shared prefix was not attended to: the model's attention was not dispatched")
    return out[n_prefix:, :width]


class AttentionState:
    """What a thread's attention calls do inside `attention_state` (`_install`'s dispatcher): ``attend(query, key,
    value, scale)`` with HF's ``[batch, heads, tokens, dim]`` tensors (keys and values not repeated), returning the
    output in that layout; ``layers`` counts the calls."""

    layers: int = 0

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class _Shared(AttentionState):
    """A forward whose first ``n_prefix`` rows are prefix rows (their first ``length`` keys shared); ``owner``: per
    later row, its prefix row; ``layers``: how many attention calls took this path."""

    n_prefix: int
    length: int
    owner: torch.Tensor
    layers: int = 0

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None) -> torch.Tensor:
        n, p = self.n_prefix, self.length
        gqa = query.shape[1] != key.shape[1]
        head_k, head_v = key[:n], value[:n]
        heads = F.scaled_dot_product_attention(query[:n], head_k, head_v, is_causal=True, scale=scale, enable_gqa=gqa)
        own_k = torch.cat([head_k[:, :, :p].index_select(0, self.owner), key[n:]], dim=2)
        own_v = torch.cat([head_v[:, :, :p].index_select(0, self.owner), value[n:]], dim=2)
        rows = _lower_right_attention(query[n:], own_k, own_v, scale)
        self.layers += 1
        return torch.cat([heads, rows])


_STATE = threading.local()
_INSTALL = threading.Lock()


@contextlib.contextmanager
def attention_state(state: AttentionState) -> Iterator[None]:
    """Inside the block, this thread's SDPA attention calls go to ``state.attend`` (`AttentionState`)."""
    if not _install():
        raise RuntimeError("this transformers has no attention registry: attention cannot be dispatched")
    with _state(state):
        yield


@contextlib.contextmanager
def _state(state: AttentionState) -> Iterator[None]:
    before = getattr(_STATE, "value", None)
    _STATE.value = state
    try:
        yield
    finally:
        _STATE.value = before


def _install() -> bool:
    """The ``sdpa`` dispatcher in transformers' attention functions (once, kept for the process); False where
    this transformers has no such registry."""
    try:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except Exception:
        return False
    with _INSTALL:
        original = ALL_ATTENTION_FUNCTIONS.get("sdpa")
        if original is None:
            return False
        if getattr(original, "persona_prefix", False):
            return True

        def sdpa_with_prefix(
            module: nn.Module,
            query: torch.Tensor,
            key: torch.Tensor,
            value: torch.Tensor,
            attention_mask: torch.Tensor | None,
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            state = getattr(_STATE, "value", None)
            if state is None:
                return original(module, query, key, value, attention_mask, *args, **kwargs)
            if attention_mask is not None:
                raise RuntimeError("dispatched attention needs rows without an attention mask (right-padded, causal)")
            out = state.attend(query, key, value, kwargs.get("scaling"))
            return out.transpose(1, 2).contiguous(), None

        sdpa_with_prefix.persona_prefix = True  # type: ignore[attr-defined]
        sdpa_with_prefix.__wrapped__ = original  # type: ignore[attr-defined]
        ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa_with_prefix
        return True


def _lower_right_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """Causal attention of ``query`` (the last ``L`` of ``S`` positions) over ``key``/``value`` (all ``S``):
    query ``i`` sees keys ``0 .. S - L + i``. On CUDA through torch's lower-right causal bias (flash attention,
    grouped heads without copies); elsewhere with the mask materialised."""
    q_len, kv_len = query.shape[2], key.shape[2]
    gqa = query.shape[1] != key.shape[1]
    if query.is_cuda:
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=causal_lower_right(q_len, kv_len), scale=scale, enable_gqa=gqa
        )
    mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)
