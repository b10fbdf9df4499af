"""Multi-LoRA layers: many adapters in one batch on one frozen base, each row with its own adapter.

`inject` replaces the target ``nn.Linear`` modules of a Llama-like model in place by `MultiLoraLinear` layers.
Each holds, for a fixed number of *slots*, stacked LoRA weights ``A [slots + 1, max_rank, in]``,
``B [slots + 1, out, max_rank]`` and a per-slot ``scaling [slots + 1]``; the extra last slot is always zero and
serves rows that use the base alone (slot ``-1``). An adapter of rank ``r < max_rank`` fills the first ``r`` rows
of A and columns of B and leaves the rest at zero, so the padded rank contributes exactly nothing. An adapter that
does not target a module leaves that module's slot at zero.

The slot of every batch row is set once per forward with `set_rows` (a ``LongTensor [batch]`` shared by all
layers); each layer then gathers its rows' A/B and applies them with two batched matmuls. There is no Python loop
over adapters or rows, so the cost of a batch does not depend on how many different adapters it mixes.

`read_adapter_dir` reads a standard PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``)
and `load_slot` copies it into a slot after checking it against the limits fixed at injection (rank, targets,
shapes): a bad adapter raises `AdapterLimitError` and changes nothing.

Not supported (refused with AdapterLimitError): DoRA, LoRA bias, ``modules_to_save``, per-module
``rank_pattern``/``alpha_pattern``; non-Linear targets (embeddings).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from pipeline.domain.errors import AdapterNotServable, PersonaError

log = logging.getLogger(__name__)

#: Every projection of a Llama block that LoRA may target.
ALL_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: The slot index that means "base model only".
BASE_SLOT = -1

_PEFT_PREFIX = "base_model.model."
_CONFIG_FILE = "adapter_config.json"
_WEIGHTS_FILE = "adapter_model.safetensors"


class MultiLoraError(PersonaError):
    """Base error of the multi-LoRA layers."""


class AdapterLimitError(MultiLoraError, AdapterNotServable):
    """An adapter does not fit the slots (rank, targets, shapes, unsupported feature) or a slot index is bad."""


class AdapterFormatError(MultiLoraError):
    """An adapter directory is not a readable PEFT LoRA directory."""


class _Rows:
    """The per-row slot index shared by every layer of one injection (set once per forward)."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus per-row LoRA: ``base(x) + (x @ A[s]^T @ B[s]^T) * scaling[s]`` for row slot s.

    ``x`` is ``[batch, ..., in]``; the slot of each batch row comes from the shared row index set by `set_rows`
    (``-1`` = base only). With no row index set the layer is the base layer.
    """

    def __init__(self, base: nn.Linear, slots: int, max_rank: int, rows: _Rows) -> None:
        super().__init__()
        self.base = base
        self.slots = slots
        self.max_rank = max_rank
        self._rows = rows
        w = base.weight
        # Buffers, not parameters: serving never trains them, and they follow the module across .to(device).
        self.register_buffer(
            "lora_A", torch.zeros(slots + 1, max_rank, base.in_features, dtype=w.dtype, device=w.device)
        )
        self.register_buffer(
            "lora_B", torch.zeros(slots + 1, base.out_features, max_rank, dtype=w.dtype, device=w.device)
        )
        self.register_buffer("scaling", torch.zeros(slots + 1, dtype=w.dtype, device=w.device))

    @property
    def in_features(self) -> int:
        """Input width of the wrapped layer."""
        return self.base.in_features

    @property
    def out_features(self) -> int:
        """Output width of the wrapped layer."""
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight (code that inspects ``.weight`` of projections keeps working)."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Base output plus each row's adapter delta."""
        result = self.base(x)
        index = self._rows.index
        if index is None:
            return result
        if index.shape[0] != x.shape[0]:
            raise AdapterLimitError(f"row index has {index.shape[0]} rows but the batch has {x.shape[0]}")
        # -1 (base only) maps to the last slot, which always stays zero.
        idx = torch.where(index < 0, self.slots, index)
        a = self.lora_A[idx]  # [B, R, in]
        b = self.lora_B[idx]  # [B, out, R]
        s = self.scaling[idx]  # [B]
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)  # [B, N, in]
        # Same order of operations as peft (A, then B, then scaling, then add) so fp32 results agree closely.
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2)) * s[:, None, None]
        return result + delta.reshape(*x.shape[:-1], -1).to(result.dtype)


@dataclass
class MultiLoraHandle:
    """What `inject` did to a model: its layers by module path, the limits, and how to undo it."""

    model: nn.Module
    targets: tuple[str, ...]
    slots: int
    max_rank: int
    layers: dict[str, MultiLoraLinear]
    _rows: _Rows
    _originals: dict[str, nn.Linear] = field(default_factory=dict)
    removed: bool = False

    def remove(self) -> None:
        """Put the original Linear modules back; the base is then exactly as before `inject` (weights untouched)."""
        if self.removed:
            return
        for path, original in self._originals.items():
            parent, name = _parent(self.model, path)
            setattr(parent, name, original)
        self._rows.index = None
        self.removed = True


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def inject(model: nn.Module, targets: tuple[str, ...] | list[str], slots: int, max_rank: int) -> MultiLoraHandle:
    """Replace every ``nn.Linear`` of ``model`` whose name is in ``targets`` by a `MultiLoraLinear`, in place.

    ``slots`` adapters of rank up to ``max_rank`` can then be resident at once. The lm_head is never a target.
    Returns the handle for `load_slot`, `clear_slot`, `set_rows` and ``remove()``.
    """
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown:
        raise AdapterLimitError(f"unknown targets {unknown}; allowed: {list(ALL_TARGETS)}")
    if slots < 1 or max_rank < 1:
        raise AdapterLimitError(f"slots ({slots}) and max_rank ({max_rank}) must be >= 1")
    rows = _Rows()
    found = [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and path.rpartition(".")[2] in targets
    ]
    if not found:
        raise AdapterLimitError(f"the model has no Linear module named any of {list(targets)}")
    handle = MultiLoraHandle(model, targets, slots, max_rank, {}, rows)
    for path, linear in found:
        layer = MultiLoraLinear(linear, slots, max_rank, rows)
        parent, name = _parent(model, path)
        setattr(parent, name, layer)
        handle.layers[path] = layer
        handle._originals[path] = linear
    log.info("multi-LoRA: %d layers, %d slots, max rank %d, targets %s", len(found), slots, max_rank, targets)
    return handle


def set_rows(handle: MultiLoraHandle, slot_per_row: torch.Tensor | None) -> None:
    """Set the slot of each batch row for the next forwards (``-1`` = base only; None = base for all rows)."""
    if slot_per_row is None:
        handle._rows.index = None
        return
    if slot_per_row.dim() != 1:
        raise AdapterLimitError(f"slot_per_row must be 1-D [batch], got shape {tuple(slot_per_row.shape)}")
    if slot_per_row.numel() and (int(slot_per_row.max()) >= handle.slots or int(slot_per_row.min()) < BASE_SLOT):
        raise AdapterLimitError(f"slot indices must be in [-1, {handle.slots - 1}], got {slot_per_row.tolist()}")
    device = next(iter(handle.layers.values())).lora_A.device
    handle._rows.index = slot_per_row.to(device=device, dtype=torch.long)


def _check_slot(handle: MultiLoraHandle, slot: int) -> None:
    if handle.removed:
        raise AdapterLimitError("the multi-LoRA layers were removed from this model")
    if not 0 <= slot < handle.slots:
        raise AdapterLimitError(f"slot {slot} is out of range: allowed 0..{handle.slots - 1}")


def clear_slot(handle: MultiLoraHandle, slot: int) -> None:
    """Zero a slot: rows on it then get the base output."""
    _check_slot(handle, slot)
    with torch.no_grad():
        for layer in handle.layers.values():
            layer.lora_A[slot].zero_()
            layer.lora_B[slot].zero_()
            layer.scaling[slot] = 0.0


def _module_path(key: str) -> tuple[str, str]:
    """(module path, "A"|"B") of a PEFT LoRA tensor key, without the peft prefix and adapter name."""
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX) :]
    for part, which in ((".lora_A.", "A"), (".lora_B.", "B")):
        if part in key:
            return key.split(part)[0], which
    raise AdapterLimitError(f"tensor {key!r} is not a LoRA A/B weight (only plain LoRA on Linear layers is served)")


def _scaling(config: dict[str, Any], rank: int) -> float:
    alpha = float(config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _check_config(config: dict[str, Any]) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLimitError(f"adapter type {config.get('peft_type')!r} is not served: only LORA")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") not in (None, "none"),
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
    }
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise AdapterLimitError(f"adapter uses unsupported LoRA options {bad}; only plain LoRA is served")


def load_slot(
    handle: MultiLoraHandle, slot: int, adapter_state: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    """Copy a PEFT LoRA adapter into ``slot`` (replacing what was there), after checking it fits.

    ``adapter_state`` holds the tensors of ``adapter_model.safetensors`` (keys with or without the
    ``base_model.model.`` prefix; any float dtype), ``config`` the parsed ``adapter_config.json``. Raises
    AdapterLimitError, leaving the slot unchanged, when a rank exceeds ``max_rank``, a module is not an injected
    target, shapes do not match the base, or the adapter uses an unsupported option.
    """
    _check_slot(handle, slot)
    _check_config(config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter_state.items():
        path, which = _module_path(key)
        pairs.setdefault(path, {})[which] = tensor
    if not pairs:
        raise AdapterLimitError("the adapter has no LoRA tensors")
    plan: list[tuple[MultiLoraLinear, torch.Tensor, torch.Tensor, float]] = []
    for path, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterLimitError(f"module {path!r} has lora_{'A' if 'A' in ab else 'B'} but not the other half")
        layer = handle.layers.get(path)
        if layer is None:
            target = path.rpartition(".")[2]
            raise AdapterLimitError(
                f"adapter targets {path!r} ({target!r}), which is not an injected target; "
                f"allowed: {list(handle.targets)}"
            )
        a, b = ab["A"], ab["B"]
        rank = a.shape[0]
        if rank > handle.max_rank:
            raise AdapterLimitError(f"adapter rank {rank} at {path!r} exceeds the maximum rank {handle.max_rank}")
        if a.shape != (rank, layer.in_features) or b.shape != (layer.out_features, rank):
            raise AdapterLimitError(
                f"adapter shapes at {path!r} are A {tuple(a.shape)}, B {tuple(b.shape)}; the base layer needs "
                f"A (r, {layer.in_features}), B ({layer.out_features}, r)"
            )
        plan.append((layer, a, b, _scaling(config, rank)))
    # Everything checked: now write (a refused adapter leaves the slot as it was).
    clear_slot(handle, slot)
    with torch.no_grad():
        for layer, a, b, scale in plan:
            rank = a.shape[0]
            layer.lora_A[slot, :rank].copy_(a)
            layer.lora_B[slot, :, :rank].copy_(b)
            layer.scaling[slot] = scale


def read_adapter_dir(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors keyed by module path + ``.lora_A.weight``/``.lora_B.weight``, config dict) of a PEFT directory."""
    path = Path(path)
    try:
        config = json.loads((path / _CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise AdapterFormatError(f"cannot read {str(path / _CONFIG_FILE)!r}: {e}") from e
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{str(path / _CONFIG_FILE)!r} is not a JSON object")
    try:
        raw = load_file(str(path / _WEIGHTS_FILE))
    except (OSError, SafetensorError) as e:
        raise AdapterFormatError(f"cannot read {str(path / _WEIGHTS_FILE)!r}: {e}") from e
    state = {(k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k): v for k, v in raw.items()}
    return state, config
