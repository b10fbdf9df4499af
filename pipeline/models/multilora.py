"""Multi-LoRA layers: many adapters in one batch on one frozen base, each row with its own adapter.

`MultiLoraLinear` is the one per-row LoRA layer of the project: a frozen ``nn.Linear`` plus stacked LoRA weights
``A [n, r, in]``, ``B [n, out, r]``, ``scaling [n]`` (a `LoraStack`), of which each batch row uses the row its
index names. It computes ``base(x) + (x @ A[s]^T @ B[s]^T) * scaling[s]`` as peft's ``lora.Linear`` computes one
LoRA: the input cast to the LoRA dtype, A, then B, then the scaling, added to the base output, then cast back to
the base output's dtype. The row of every batch row is set once per forward (a ``LongTensor [batch]`` shared by
all layers of one wrap); each layer then gathers its rows' A/B and applies them with two batched matmuls. There is
no Python loop over adapters or rows, so the cost of a batch does not depend on how many different adapters it
mixes, and autograd sums each row's gradient into its own stack row.

`wrap_linears` puts such layers, over given stacks, in place of a model's Linear modules and `LoraWrap.remove`
takes them out again. Two users:

- serving (`pipeline.serving.engine`): `inject` wraps the target Linears of a Llama-like model with zeroed buffers
  for a fixed number of *slots*, ``A [slots + 1, max_rank, in]``, ``B [slots + 1, out, max_rank]``,
  ``scaling [slots + 1]``; the extra last slot is always zero and serves rows that use the base alone (slot
  ``-1``, mapped to it once per forward by `set_rows`). An adapter of rank ``r < max_rank`` fills the first ``r``
  rows of A and columns of B and leaves the rest at zero, so the padded rank contributes exactly nothing. An
  adapter that does not target a module leaves that module's slot at zero. `read_adapter_dir` reads a standard
  PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) and `load_slot` copies it into a
  slot after checking it against the limits fixed at injection (rank, targets, shapes): a bad adapter raises
  `AdapterLimitError` and changes nothing. Not supported (refused with AdapterLimitError): DoRA, LoRA bias,
  ``modules_to_save``, per-module ``rank_pattern``/``alpha_pattern``; non-Linear targets (embeddings).
  `load_slot` is two steps that the serving cache takes apart: `pack_adapter` (check and lay out once, in host
  memory, touching no slot) and `write_slot` (copy a packed adapter into a slot; safe beside a forward whose rows
  use other slots).
- batched training (`pipeline.training.multi`): one stack row per user, the stacks trainable ``nn.Parameter``s.

The fast serving engine lays the same adapters out differently for its kernels (`pipeline.models.lora_ops`); its
LoRA path is tested against `MultiLoraLinear`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from pipeline.domain.errors import AdapterNotServable, PersonaError
from pipeline.models import fp8, lora_kernels

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
    """The stack row of every batch row, shared by every layer of one wrap (set once per forward), and whether the
    layers compute the LoRA branch in the input's dtype (`wrap_linears`' ``native``)."""

    def __init__(self, native: bool = False, fp8: bool = False) -> None:
        self.index: torch.Tensor | None = None
        self.native = native
        self.fp8 = fp8  # the frozen projections' GEMMs in FP8 where they can be (`pipeline.models.fp8`)
        # Packed rows (`LoraWrap.set_packed`): one sequence [1, T] whose row i is tokens offsets[i] .. offsets[i+1];
        # token_index: each token's stack row (the torch path treats every token as a row of its own).
        self.offsets: torch.Tensor | None = None
        self.longest = 0
        self.token_index: torch.Tensor | None = None


@dataclass(frozen=True)
class LoraStack:
    """The LoRA weights of one Linear for ``n`` adapters: ``lora_A [n, r, in]``, ``lora_B [n, out, r]``,
    ``scaling [n]``. An ``nn.Parameter`` becomes a parameter of the layer (trainable), any other tensor a buffer."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: torch.Tensor

    @classmethod
    def zeros(cls, base: nn.Linear, n: int, rank: int) -> LoraStack:
        """``n`` empty adapters of rank ``rank`` for ``base``, in its dtype and on its device."""
        w = base.weight

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=w.dtype, device=w.device)

        return cls(zeros(n, rank, base.in_features), zeros(n, base.out_features, rank), zeros(n))


class MultiLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus per-row LoRA: ``base(x) + (x @ A[s]^T @ B[s]^T) * scaling[s]`` where s is the
    batch row's stack row, computed as peft computes one LoRA (module docstring).

    ``x`` is ``[batch, ..., in]``; the stack row of each batch row comes from the row index shared by the layers of
    one wrap (torch indexing: ``-1`` is the last row, which `inject` keeps zero for the base). With no row index set
    the layer is the base layer.

    ``MultiLoraLinear(base, slots, max_rank, rows)`` makes the serving form: zeroed buffers for ``slots`` adapters
    and the base slot (the last); `over` takes given stacks (trainable parameters for batched training).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: torch.Tensor

    def __init__(self, base: nn.Linear, slots: int, max_rank: int, rows: _Rows) -> None:
        super().__init__()
        self._set_up(base, LoraStack.zeros(base, slots + 1, max_rank), rows)

    @classmethod
    def over(cls, base: nn.Linear, stack: LoraStack, rows: _Rows) -> MultiLoraLinear:
        """The layer over ``base`` with the given stacked weights (used as they are, not copied)."""
        layer = cls.__new__(cls)  # not __init__: that allocates the serving form's zeroed stacks
        nn.Module.__init__(layer)
        layer._set_up(base, stack, rows)
        return layer

    def _set_up(self, base: nn.Linear, stack: LoraStack, rows: _Rows) -> None:
        a, b, s = stack.lora_A, stack.lora_B, stack.scaling
        n, rank = (a.shape[0], a.shape[1]) if a.dim() == 3 else (-1, -1)
        if a.shape != (n, rank, base.in_features) or b.shape != (n, base.out_features, rank) or s.shape != (n,):
            raise MultiLoraError(
                f"LoRA stacks of shapes A {tuple(a.shape)}, B {tuple(b.shape)}, scaling {tuple(s.shape)} do not fit "
                f"Linear({base.in_features}, {base.out_features}): need A (n, r, {base.in_features}), "
                f"B (n, {base.out_features}, r), scaling (n,)"
            )
        self.base = base
        self._rows = rows
        self._group: _Group | None = None  # siblings that read the same input (`wrap_linears`, `SHARED_INPUT`)
        for name, tensor in (("lora_A", a), ("lora_B", b), ("scaling", s)):
            if isinstance(tensor, nn.Parameter):
                self.register_parameter(name, tensor)
            else:
                # A buffer follows the module across .to(device) and is never trained.
                self.register_buffer(name, tensor)

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
        index = self._rows.index
        if index is None:
            return self.base(x)
        offsets = self._rows.offsets
        if offsets is not None:  # packed rows
            if x.shape[0] != 1:
                raise AdapterLimitError(f"packed rows come as one sequence, got a batch of {x.shape[0]}")
            if self._dense(x):
                out: torch.Tensor = _DenseBranch.apply(
                    x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling,
                    self._rows.token_index,
                )  # fmt: skip
                return out
            if not self._packed_kernels(x):
                # The torch path, every token a row of its own with its row's adapter.
                flat = x.reshape(-1, 1, x.shape[-1])
                out = self._rows_forward(flat, self._rows.token_index, None)
                return out.reshape(*x.shape[:-1], out.shape[-1])
        elif index.shape[0] != x.shape[0]:
            raise AdapterLimitError(f"row index has {index.shape[0]} rows but the batch has {x.shape[0]}")
        return self._rows_forward(x, index, offsets)

    def _dense_fits(self, x: torch.Tensor) -> bool:
        """`DENSE_BRANCH` on, a half-dtype input (native), and the stacks' columns (rows x rank) at most
        `DENSE_MAX_SHARE` of the projection's narrower width (the dense form's extra GEMM work is that share of the
        base's, at most)."""
        if not (DENSE_BRANCH and self._rows.native and x.dtype in _HALF):
            return False
        columns = self.lora_A.shape[0] * self.lora_A.shape[1]
        return columns <= DENSE_MAX_SHARE * min(self.base.in_features, self.base.out_features)

    def _dense(self, x: torch.Tensor) -> bool:
        """Whether packed rows train through `_DenseBranch` (`_dense_fits`, over a frozen base, the stacks
        trainable, gradients on)."""
        if not (torch.is_grad_enabled() and self._dense_fits(x)):
            return False
        frozen = not any(t is not None and t.requires_grad for t in (self.base.weight, self.base.bias, self.scaling))
        return frozen and bool(self.lora_A.requires_grad)

    def _packed_kernels(self, x: torch.Tensor) -> bool:
        """Whether `_rows_forward` takes a Triton path for ``x`` (the only ones that read packed rows' offsets): the
        training node over a frozen base, or the no-grad forward; native, half, CUDA, rank <= 64 either way."""
        if not (TRITON_BRANCH and self._rows.native and lora_kernels.available(x, self.lora_A.shape[1])):
            return False
        if not torch.is_grad_enabled():
            return True
        frozen = not any(t is not None and t.requires_grad for t in (self.base.weight, self.base.bias, self.scaling))
        return TRAIN_BRANCH and self.lora_A.requires_grad and x.dtype in _HALF and frozen

    def _fp8(self, x: torch.Tensor) -> bool:
        """Whether the frozen projection's GEMMs run in FP8 for ``x`` (the wrap asked for it, `fp8.pays` for its
        weight, `fp8.supported`)."""
        return self._rows.fp8 and fp8.pays(self.base.weight) and fp8.supported(x, self.base.weight)

    def _trains_natively(self, x: torch.Tensor) -> bool:
        """Whether ``x`` takes training's one-node path (`_TrainBranch`): `TRAIN_BRANCH`, trainable stacks over a
        frozen base, ``native``, a half-dtype input."""
        frozen = not any(t is not None and t.requires_grad for t in (self.base.weight, self.base.bias, self.scaling))
        return TRAIN_BRANCH and bool(self.lora_A.requires_grad) and self._rows.native and x.dtype in _HALF and frozen

    def _rows_forward(self, x: torch.Tensor, index: Any, offsets: torch.Tensor | None) -> torch.Tensor:
        """`forward` of rows ``x`` with stack rows ``index`` (with ``offsets``: packed rows, on the Triton path)."""
        longest = self._rows.longest
        if self._trains_natively(x):
            if self._group is not None and GROUP_BRANCH:
                # q|k|v, gate|up: one node for the projections that read this input (`_TrainGroup`)
                grouped = self._group.output(self, x, index, offsets, longest)
                if grouped is not None:
                    return grouped
            # Training on a GPU: the base and the branch in one autograd node (`_TrainBranch`).
            out: torch.Tensor = _TrainBranch.apply(
                x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling, index, offsets, longest,
                self._fp8(x),
            )  # fmt: skip
            return out
        tokens = self._rows.token_index if offsets is not None else None
        if not torch.is_grad_enabled() and self._dense_fits(x) and (offsets is None or tokens is not None):
            # No gradients (the stacked gate) with narrow stacks: the branch as dense GEMMs (`_dense_forward`).
            flat = x.reshape(-1, x.shape[-1])
            if tokens is None:  # rows of equal length: each row's index for each of its tokens
                tokens = index.repeat_interleave(x[0].numel() // x.shape[-1])
            y, *_ = _dense_forward(
                flat, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling, tokens
            )
            return y.view(*x.shape[:-1], y.shape[-1])
        if (
            TRITON_BRANCH
            and self._rows.native
            and not torch.is_grad_enabled()
            and lora_kernels.available(x, self.lora_A.shape[1])
        ):
            # No gradients (the stacked gate), on a GPU: the base, then each row's branch added in place by one
            # Triton kernel (`pipeline.models.lora_kernels`).
            flat = x.reshape(x.shape[0], -1, x.shape[-1]).contiguous()
            y = _base_linear(flat, self.base.weight, self.base.bias, x if self._fp8(x) else None)
            lora_kernels.forward(
                flat, y, self.lora_A, self.lora_B, self.scaling, index, keep_h=False, offsets=offsets, longest=longest
            )
            return y.view(*x.shape[:-1], y.shape[-1])
        if offsets is not None:
            raise AdapterLimitError("packed rows need the Triton branch here (native, half, CUDA)")
        emulated = self._rows.fp8 and fp8.EMULATE and fp8.pays(self.base.weight)
        if emulated and not self.base.weight.requires_grad:  # the GPU's rounding, emulated
            result = fp8.Emulated.apply(x, self.base.weight, self.base.bias)
        else:
            result = self.base(x)
        if self.lora_A.requires_grad:
            # Training (rows are never negative there): index_select, whose backward is one index_add into the
            # stack, where advanced indexing's is a sorted index_put (several kernels a stack, every layer).
            a = self.lora_A.index_select(0, index)  # [B, R, in]
            b = self.lora_B.index_select(0, index)  # [B, out, R]
            s = self.scaling.index_select(0, index)  # [B]
        else:
            a, b, s = self.lora_A[index], self.lora_B[index], self.scaling[index]
        if self._rows.native and (x.dtype != a.dtype or x.dtype in _HALF):
            # The branch in the input's dtype (bf16 on a GPU): x A^T scaled, then B and the add to the base output
            # in one batched GEMM (fp32 accumulation, one rounding), no fp32 copy of x or of the output. The stacks
            # stay as they are (fp32 master weights: their gradients come back through the casts).
            dt = x.dtype
            flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, N, in]
            h = torch.bmm(flat, a.to(dt).transpose(1, 2)) * s.to(dt)[:, None, None]
            out = torch.baddbmm(result.reshape(x.shape[0], -1, result.shape[-1]), h, b.to(dt).transpose(1, 2))
            return out.reshape(result.shape)
        # As peft's lora.Linear: the input in the LoRA dtype; A, then B, then scaling; add, then the base's dtype.
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)  # [B, N, in]
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2)) * s[:, None, None]
        return (result + delta.reshape(*x.shape[:-1], -1)).to(result.dtype)


class _TrainBranch(torch.autograd.Function):
    """`MultiLoraLinear`'s training forward in the input's dtype over a frozen base, as one autograd node.

    The same arithmetic as the native branch (``y = x W^T + b``, then ``y += ((x A[s]^T) * scaling[s]) B[s]^T`` in one
    batched GEMM with fp32 accumulation), but the backward adds the branch's input gradient into the base's in
    place (``dx = dy W``, then ``dx += dh A[s]`` as one ``baddbmm_``) where autograd computed the two apart and summed
    them: one pass over ``[tokens, in]`` less per projection, three for the 1536-wide ``down_proj`` input. Each row's
    A and B gradients are summed into its stack row with ``index_add_`` (what ``index_select``'s backward does).
    Equal to the autograd path within bf16 rounding (tests/unit/models/test_multilora.py, on the CPU in bf16)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: torch.Tensor,
        index: torch.Tensor,
        offsets: torch.Tensor | None = None,
        longest: int = 0,
        in_fp8: bool = False,
    ) -> torch.Tensor:
        dt = x.dtype
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [B, N, in]
        ctx.x_shape = x.shape
        ctx.stack_dtypes = (lora_a.shape, lora_a.dtype, lora_b.shape, lora_b.dtype)
        ctx.triton = offsets is not None or (TRITON_BRANCH and lora_kernels.available(x, lora_a.shape[1]))
        ctx.longest = longest
        ctx.fp8 = in_fp8 and ctx.triton
        if ctx.triton:  # the branch in Triton kernels: each row's tokens read once (`pipeline.models.lora_kernels`)
            flat = flat.contiguous()
            y = _base_linear(flat, weight, bias, x if ctx.fp8 else None)
            h = lora_kernels.forward(flat, y, lora_a, lora_b, scaling, index, offsets=offsets, longest=longest)
            ctx.save_for_backward(flat, weight, lora_a, lora_b, scaling, h, index, offsets)
            return y.view(*x.shape[:-1], y.shape[-1])
        a = lora_a.index_select(0, index).to(dt)  # [B, R, in]
        b = lora_b.index_select(0, index).to(dt)  # [B, out, R]
        s = scaling.index_select(0, index).to(dt)[:, None, None]  # [B, 1, 1]
        y = torch.nn.functional.linear(flat, weight, bias)  # [B, N, out], a new tensor: the add goes in place
        h = torch.bmm(flat, a.transpose(1, 2)) * s  # [B, N, R]
        y.baddbmm_(h, b.transpose(1, 2))
        ctx.save_for_backward(flat, weight, a, b, s, h, index)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        a_shape, a_dtype, b_shape, b_dtype = ctx.stack_dtypes
        if ctx.triton:
            flat, weight, lora_a, lora_b, scaling, h, index, offsets = ctx.saved_tensors
            dy = dy.reshape(flat.shape[0], -1, dy.shape[-1]).contiguous()
            dx = None
            if ctx.needs_input_grad[0]:
                if ctx.fp8:
                    dx = fp8.input_grad(dy.view(-1, dy.shape[-1]), weight).view(*dy.shape[:-1], weight.shape[1])
                else:
                    dx = torch.matmul(dy, weight)
            grad_a, grad_b = lora_kernels.backward(
                dy, dx, flat, lora_a, lora_b, scaling, index, h, offsets=offsets, longest=ctx.longest
            )
            return (
                dx.view(ctx.x_shape) if dx is not None else None,
                None,
                None,
                grad_a.to(a_dtype) if ctx.needs_input_grad[3] else None,
                grad_b.to(b_dtype) if ctx.needs_input_grad[4] else None,
                None,
                None,
                None,
                None,
                None,
            )
        flat, weight, a, b, s, h, index = ctx.saved_tensors
        dy = dy.reshape(flat.shape[0], -1, dy.shape[-1])  # [B, N, out]
        dh = torch.bmm(dy, b) * s  # [B, N, R]: the gradient of x A^T
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.matmul(dy, weight)  # [B, N, in]
            dx.baddbmm_(dh, a)
            dx = dx.view(ctx.x_shape)
        da = db = None
        if ctx.needs_input_grad[3]:
            da = torch.zeros(a_shape, dtype=a_dtype, device=a.device)
            da.index_add_(0, index, torch.bmm(dh.transpose(1, 2), flat).to(a_dtype))
        if ctx.needs_input_grad[4]:
            db = torch.zeros(b_shape, dtype=b_dtype, device=b.device)
            db.index_add_(0, index, torch.bmm(dy.transpose(1, 2), h).to(b_dtype))
        return dx, None, None, da, db, None, None, None, None, None


def _base_linear(
    flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fp8_source: torch.Tensor | None
) -> torch.Tensor:
    """The frozen projection of ``flat`` ``[B, N, in]`` (contiguous): in FP8 when ``fp8_source`` (the module input
    ``flat`` is a view of: q/k/v and gate/up share its quantized values) is given, else in ``flat``'s dtype."""
    if fp8_source is None:
        return torch.nn.functional.linear(flat, weight, bias)
    y = fp8.linear(flat.view(-1, flat.shape[-1]), weight, bias, source=fp8_source)
    return y.view(*flat.shape[:-1], weight.shape[0])


class _Group:
    """Sibling layers of one module that read the same input (`SHARED_INPUT`: q|k|v, gate|up), trained as one
    autograd node (`_TrainGroup`).

    The model calls them one after the other on the same tensor (``q_proj(x)``, ``k_proj(x)``, ...). The first
    call runs the node for all of them and keeps the others' outputs; a sibling called next on that same tensor
    (same object, unchanged, same rows) takes its output from there. Any other call (another input, rows set anew,
    an output already taken) runs the group again for its input, so a model that calls the siblings differently
    still gets each layer's own function, only without the saving. `LoraWrap.set_rows` / `set_packed` / `remove`
    drop what is kept."""

    def __init__(self, layers: list[MultiLoraLinear]) -> None:
        self.layers = layers
        self.rank = sum(m.lora_A.shape[1] for m in layers)  # the columns of the group's h
        self._key: tuple[Any, ...] | None = None
        self._pending: dict[int, torch.Tensor] = {}

    def clear(self) -> None:
        """Forget the outputs kept for siblings."""
        self._key, self._pending = None, {}

    def output(
        self, layer: MultiLoraLinear, x: torch.Tensor, index: Any, offsets: torch.Tensor | None, longest: int
    ) -> torch.Tensor | None:
        """``layer``'s output for ``x``: kept from the group's node for this input, or the node run now. None when
        a sibling does not train natively on ``x`` (the caller then runs its own node)."""
        key = (x, x._version, index, offsets, longest, torch.is_grad_enabled())
        if self._key is not None and all(a is b for a, b in zip(key, self._key, strict=True)):
            kept = self._pending.pop(id(layer), None)
            if kept is not None:
                if not self._pending:  # every sibling served: hold nothing past this forward
                    self.clear()
                return kept
        if not all(m._trains_natively(x) for m in self.layers) or self.rank > lora_kernels.MAX_RANK:
            return None  # (the kernels take the group's ranks together: past their limit, a node a projection)
        tensors: list[torch.Tensor | None] = []
        for m in self.layers:
            tensors += [m.base.weight, m.base.bias, m.lora_A, m.lora_B, m.scaling]
        fp8s = tuple(m._fp8(x) for m in self.layers)
        outs = _TrainGroup.apply(x, index, offsets, longest, fp8s, *tensors)
        self._key = key
        self._pending = {id(m): o for m, o in zip(self.layers, outs, strict=True) if m is not layer}
        return outs[self.layers.index(layer)]


class _TrainGroup(torch.autograd.Function):
    """`_TrainBranch` for projections that read the same input (`_Group`): their A stacks side by side, so the
    shrink reads the input once for all of them (``h`` ``[tokens, r_1 + r_2 + ...]``, a scale per column) and the
    shrink's backward reads the input and the input gradient once (``dx = sum_j dy_j W_j + dh [A_1; A_2; ...]``):
    q|k|v and gate|up make one pass over their input where they made three and two, and the siblings' input
    gradients are summed in their GEMMs (``addmm``) instead of by autograd afterwards. Each projection keeps its own
    base GEMM, expand and B gradient. The outputs and the stacks' gradients are `_TrainBranch`'s arithmetic
    (``bf16(x A^T) * s`` per column); ``dx`` is summed in another order (into one bf16 tensor, sibling after sibling,
    the branches' share in one pass), so it differs by bf16 rounding (tests/unit/models/test_multilora.py on the
    CPU, test_lora_kernels.py on a GPU).

    Arguments: ``x``, ``index``, ``offsets``, ``longest``, each sibling's FP8 flag, then ``(weight, bias, lora_A,
    lora_B, scaling)`` for each sibling; returns each sibling's output."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        index: torch.Tensor,
        offsets: torch.Tensor | None,
        longest: int,
        fp8s: tuple[bool, ...],
        *tensors: Any,  # (weight, bias or None, lora_A, lora_B, scaling) a sibling
    ) -> tuple[torch.Tensor, ...]:
        parts = [tensors[i : i + 5] for i in range(0, len(tensors), 5)]
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        ctx.x_shape = x.shape
        rank = sum(p[2].shape[1] for p in parts)
        ctx.triton = offsets is not None or (TRITON_BRANCH and lora_kernels.available(x, rank))
        ctx.fp8s = tuple(f and ctx.triton for f in fp8s)
        ctx.stacks = [(p[2].shape, p[2].dtype, p[3].shape, p[3].dtype) for p in parts]
        ctx.set_materialize_grads(True)
        ys: list[torch.Tensor] = []
        if ctx.triton:
            flat = flat.contiguous()
            index, offsets, longest_ = lora_kernels.prepared(flat, index, offsets, longest or None)
            ctx.longest = longest_
            a_all = torch.cat([p[2] for p in parts], dim=1)  # [n, r_1 + r_2 + ..., in]
            s_cols = torch.cat([p[4][:, None].expand(-1, p[2].shape[1]) for p in parts], dim=1)
            h = lora_kernels.shrink(flat, a_all, s_cols, index, offsets, longest_)
            col = 0
            for (weight, bias, _, lora_b, _), f8 in zip(parts, ctx.fp8s, strict=True):
                y = _base_linear(flat, weight, bias, x if f8 else None)
                lora_kernels.expand(y, lora_b, index, h[:, col : col + lora_b.shape[2]], offsets, longest_)
                col += lora_b.shape[2]
                ys.append(y)
            ctx.save_for_backward(flat, a_all, s_cols, h, index, offsets, *[t for p in parts for t in (p[0], p[3])])
        else:  # the torch path (`_TrainBranch`'s), sibling by sibling
            dt = x.dtype
            saved = []
            for weight, bias, lora_a, lora_b, scaling in parts:
                a = lora_a.index_select(0, index).to(dt)
                b = lora_b.index_select(0, index).to(dt)
                sc = scaling.index_select(0, index).to(dt)[:, None, None]
                y = torch.nn.functional.linear(flat, weight, bias)
                hj = torch.bmm(flat, a.transpose(1, 2)) * sc
                y.baddbmm_(hj, b.transpose(1, 2))
                ys.append(y)
                saved += [weight, a, b, sc, hj]
            ctx.save_for_backward(flat, index, *saved)
        return tuple(y.view(*x.shape[:-1], y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        n = len(grads)
        stack_grads: list[torch.Tensor | None] = []
        if ctx.triton:
            flat, a_all, s_cols, h, index, offsets, *rest = ctx.saved_tensors
            dys = [g.reshape(flat.shape[0], -1, g.shape[-1]).contiguous() for g in grads]
            dx: torch.Tensor | None = None
            if ctx.needs_input_grad[0]:
                for j, dy in enumerate(dys):
                    weight = rest[2 * j]
                    if ctx.fp8s[j]:
                        part = fp8.input_grad(dy.view(-1, dy.shape[-1]), weight).view(*dy.shape[:-1], weight.shape[1])
                        dx = part if dx is None else dx.add_(part)
                    elif dx is None:
                        dx = torch.matmul(dy, weight)
                    else:
                        dx.view(-1, dx.shape[-1]).addmm_(dy.view(-1, dy.shape[-1]), weight)
            dh = torch.zeros_like(h)
            col = 0
            dbs = []
            for j, dy in enumerate(dys):
                lora_b = rest[2 * j + 1]
                r = lora_b.shape[2]
                cols = slice(col, col + r)
                dbs.append(lora_kernels.dshrink(dy, lora_b, index, h[:, cols], dh[:, cols], offsets, ctx.longest))
                col += r
            da_all = lora_kernels.dexpand(dx, flat, a_all, s_cols, index, dh, offsets, ctx.longest)
            col = 0
            for j, (a_shape, a_dtype, _, b_dtype) in enumerate(ctx.stacks):
                r = a_shape[1]
                grad_a = da_all[:, col : col + r].to(a_dtype) if ctx.needs_input_grad[5 + 5 * j + 2] else None
                grad_b = dbs[j].to(b_dtype) if ctx.needs_input_grad[5 + 5 * j + 3] else None
                stack_grads += [None, None, grad_a, grad_b, None]
                col += r
            return (dx.view(ctx.x_shape) if dx is not None else None, None, None, None, None, *stack_grads)
        flat, index, *saved = ctx.saved_tensors
        dx = None
        for j in range(n):
            weight, a, b, sc, hj = saved[5 * j : 5 * j + 5]
            a_shape, a_dtype, b_shape, b_dtype = ctx.stacks[j]
            dy = grads[j].reshape(flat.shape[0], -1, grads[j].shape[-1])
            dh = torch.bmm(dy, b) * sc
            if ctx.needs_input_grad[0]:
                part = torch.matmul(dy, weight)
                part.baddbmm_(dh, a)
                dx = part if dx is None else dx.add_(part)
            grad_a = grad_b = None
            if ctx.needs_input_grad[5 + 5 * j + 2]:
                grad_a = torch.zeros(a_shape, dtype=a_dtype, device=flat.device)
                grad_a.index_add_(0, index, torch.bmm(dh.transpose(1, 2), flat).to(a_dtype))
            if ctx.needs_input_grad[5 + 5 * j + 3]:
                grad_b = torch.zeros(b_shape, dtype=b_dtype, device=flat.device)
                grad_b.index_add_(0, index, torch.bmm(dy.transpose(1, 2), hj).to(b_dtype))
            stack_grads += [None, None, grad_a, grad_b, None]
        return (dx.view(ctx.x_shape) if dx is not None else None, None, None, None, None, *stack_grads)


def _dense_forward(
    flat: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    token_index: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """``y = x W^T + b + ((x A[s]^T) * scaling[s]) B[s]^T`` for tokens ``flat`` (``[T, in]``, half) of stack rows
    ``token_index`` (``[T]``) through dense GEMMs over every stack row's columns (`_DenseBranch`). Returns ``(y, h,
    cols, a_all, b_all, s)``: each token's ``h`` (``[T, r]``), its columns among the stacks' ``n r``, the stacks
    as ``[n r, in]`` and ``[out, n r]`` in the input's dtype, each token's scaling ``[T, 1]``."""
    dt = flat.dtype
    n, r, d_in = lora_a.shape
    d_out = lora_b.shape[1]
    a_all = lora_a.reshape(n * r, d_in).to(dt)  # row u r + j is A[u][j]
    b_all = lora_b.permute(1, 0, 2).reshape(d_out, n * r).to(dt)  # column u r + j is B[u][:, j]
    cols = token_index[:, None] * r + torch.arange(r, device=flat.device)  # [T, r]: each token's own block
    s = scaling.to(dt).index_select(0, token_index)[:, None]  # [T, 1]
    h = torch.mm(flat, a_all.t()).gather(1, cols) * s  # [T, r]
    hs = torch.zeros(flat.shape[0], n * r, dtype=dt, device=flat.device).scatter_(1, cols, h)
    y = torch.nn.functional.linear(flat, weight, bias)
    y.addmm_(hs, b_all.t())
    return y, h, cols, a_all, b_all, s


_MM32: list[bool] = []  # whether torch.mm takes out_dtype on this build's CUDA (found at the first call)


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of half tensors with an fp32 result (fp32 accumulation either way): on CUDA straight into fp32
    where torch has it (``out_dtype``), else through fp32 copies."""
    if a.is_cuda and _MM32 != [False]:
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM32[:] = [False]
        else:
            _MM32[:] = [True]
            return out
    return torch.mm(a.float(), b.float())


class _DenseBranch(torch.autograd.Function):
    """Packed training rows' layer over a frozen base with the branch as dense GEMMs over every stack row's columns.

    With ``n`` stack rows of rank ``r``, each token's ``x A[s]^T`` is one column block of ``x A_all^T`` (``A_all``:
    the stacks' ``[n r, in]``): one GEMM gives every block, the token's own is kept (scaled) and the others are zeros
    (``hs``, ``[tokens, n r]``), and ``y = x W^T + b`` then takes ``hs B_all^T`` in one ``addmm_`` (``B_all``: the
    stacks' ``[out, n r]``). The backward is the same shape: ``dy B_all`` gives every block of ``dh``, ``dx = dy W``
    takes ``dhs A_all``, and the stacks' gradients are ``dhs^T x`` and ``dy^T hs`` summed over all tokens in fp32.
    Everything is cuBLAS GEMMs, ``n r / min(in, out)`` more work than the base's (`MultiLoraLinear._dense`), where
    the Triton kernels (`pipeline.models.lora_kernels`) move the activations at a fraction of the bandwidth. Each
    token's values are the `_TrainBranch` torch path's (``bf16(bf16(x A^T) * s)``, ``bf16(bf16(dy B) * s)``) up to
    the GEMMs' order of summation (tests/unit/models/test_multilora.py, on the CPU in bf16)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: torch.Tensor,
        token_index: torch.Tensor,
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [T, in]
        y, h, cols, a_all, b_all, s = _dense_forward(flat, weight, bias, lora_a, lora_b, scaling, token_index)
        ctx.save_for_backward(flat, weight, a_all, b_all, s, h, cols)
        ctx.shapes = (x.shape, lora_a.shape, lora_a.dtype, lora_b.shape, lora_b.dtype)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, weight, a_all, b_all, s, h, cols = ctx.saved_tensors
        x_shape, a_shape, a_dtype, b_shape, b_dtype = ctx.shapes
        n, r = a_shape[0], a_shape[1]
        d_out = b_shape[1]
        dy = dy.reshape(-1, d_out)
        dh = torch.mm(dy, b_all).gather(1, cols) * s  # [T, r]: the gradient of each token's x A^T
        dhs = torch.zeros(h.shape[0], n * r, dtype=h.dtype, device=h.device).scatter_(1, cols, dh)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.mm(dy, weight)  # [T, in]
            dx.addmm_(dhs, a_all)
            dx = dx.view(x_shape)
        da = db = None
        if ctx.needs_input_grad[3]:
            da = _mm32(dhs.t(), flat).view(a_shape).to(a_dtype)
        if ctx.needs_input_grad[4]:
            hs = torch.zeros_like(dhs).scatter_(1, cols, h)
            db = _mm32(dy.t(), hs).view(d_out, n, r).permute(1, 0, 2).contiguous().to(b_dtype)
        return dx, None, None, da, db, None, None


@dataclass(eq=False)
class LoraWrap:
    """The per-row layers `wrap_linears` put into a model: by module path, their shared row index, and the Linear
    modules they replaced. As a context manager, leaving the block takes the layers out (`remove`)."""

    model: nn.Module
    layers: dict[str, MultiLoraLinear]
    _rows: _Rows
    _originals: dict[str, nn.Linear]
    removed: bool = False
    groups: tuple[_Group, ...] = ()  # layers that read the same input (`SHARED_INPUT`)

    def set_rows(self, index: torch.Tensor | None) -> None:
        """Use stack row ``index[i]`` for batch row i in the next forwards (None: the base alone for every row).

        Not checked, so no device sync: ``index`` is a ``LongTensor [batch]`` on the layers' device whose values
        are rows of the stacks (serving checks slot numbers in `set_rows`).
        """
        self._rows.index = index
        self._rows.offsets, self._rows.token_index = None, None
        for group in self.groups:
            group.clear()

    def set_packed(self, index: torch.Tensor, offsets: torch.Tensor, longest: int, token_index: torch.Tensor) -> None:
        """The next forwards take packed rows: one sequence ``[1, T]`` whose row ``i`` (stack row ``index[i]``) is
        tokens ``offsets[i] .. offsets[i + 1]`` (``longest``: the longest row; ``token_index``: each token's stack
        row). All on the layers' device; `set_rows` goes back to rows of a batch."""
        self._rows.index, self._rows.offsets, self._rows.longest = index, offsets, longest
        self._rows.token_index = token_index
        for group in self.groups:
            group.clear()

    def remove(self) -> None:
        """Put the original Linear modules back; the model is then exactly as before (its weights untouched)."""
        if self.removed:
            return
        for path, original in self._originals.items():
            parent, name = _parent(self.model, path)
            setattr(parent, name, original)
        self._rows.index = None
        for group in self.groups:
            group.clear()
        self.removed = True

    def __enter__(self) -> LoraWrap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


#: Input dtypes of the ``native`` branch even when the stacks have the same dtype.
_HALF = (torch.bfloat16, torch.float16)
#: Batched training's layers in the input's half dtype run as one autograd node (`_TrainBranch`); False: the plain
#: autograd ops (the benchmark and the tests compare the two).
TRAIN_BRANCH = True
#: On CUDA, at rank <= `lora_kernels.MAX_RANK`, the half-dtype branch (training's one node, the gate's no-grad
#: forward) runs in `pipeline.models.lora_kernels`' Triton kernels; False: torch's batched GEMMs.
TRITON_BRANCH = True
#: Packed training rows through `_DenseBranch`, and the no-grad forward (the stacked gate) through `_dense_forward`:
#: the branch as dense GEMMs over every stack row's columns, where the stacks' columns are at most `DENSE_MAX_SHARE`
#: of the projection's narrower width: Llama-1B's 2,048-wide layers at K=64, r=1 (3%), not SmolLM2's 576 at K=256
#: (44%). Off until measured on a GPU against the Triton kernels (`bench/retrain_kernels.py --packed-only`,
#: `bench/retrain_throughput.py --lora-kernels dense`).
DENSE_BRANCH = False
DENSE_MAX_SHARE = 0.125
#: Projections of one module that read the same input (Llama-style attention and gated MLP): `wrap_linears` groups
#: the ones it wraps, and with `GROUP_BRANCH` training runs each group as one autograd node (`_TrainGroup`: one pass
#: over the input for all of their shrinks and shrink backwards). False: a node a projection.
SHARED_INPUT: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
GROUP_BRANCH = True


def wrap_linears(
    model: nn.Module, stacks: Mapping[str, LoraStack], *, native: bool = False, fp8: bool = False
) -> LoraWrap:
    """Replace the ``nn.Linear`` at each module path of ``stacks`` by a `MultiLoraLinear` over its stack, in place.

    All layers share one row index (`LoraWrap.set_rows`). ``native``: when the input's dtype is not the stacks'
    (a bf16 base, fp32 LoRA weights), compute the LoRA branch in the input's dtype, its add to the base output fused
    into the second GEMM, instead of peft's way (the input cast to the LoRA dtype, the sum in it, then cast back):
    the same function within the input dtype's rounding, far less memory traffic; stacks already in the input's
    half dtype (the gate's, which need no fp32 masters) take that path with no cast per forward. Without it, or when
    input and stacks are both fp32, the layer computes exactly as peft does. Raises MultiLoraError, changing
    nothing, when a path is not an ``nn.Linear`` of ``model`` or a stack does not fit its Linear. ``remove()`` (or
    leaving the ``with`` block) puts the Linear modules back. ``fp8``: the frozen projections' GEMMs of the Triton
    paths (training's node and the no-grad forward) in FP8 where `pipeline.models.fp8.supported` (batched
    training's ``base_fp8``; never the gate's).
    """
    rows = _Rows(native, fp8)
    layers: dict[str, MultiLoraLinear] = {}
    originals: dict[str, nn.Linear] = {}
    for path, stack in stacks.items():
        try:
            linear = model.get_submodule(path)
        except AttributeError as e:
            raise MultiLoraError(f"the model has no module {path!r}: {e}") from e
        if not isinstance(linear, nn.Linear):
            raise MultiLoraError(f"module {path!r} is a {type(linear).__name__}; only nn.Linear modules are wrapped")
        layers[path] = MultiLoraLinear.over(linear, stack, rows)
        originals[path] = linear
    # Everything checked: now replace (a refused wrap leaves the model as it was).
    for path, layer in layers.items():
        parent, name = _parent(model, path)
        setattr(parent, name, layer)
    return LoraWrap(model, layers, rows, originals, groups=_groups(layers))


def _groups(layers: Mapping[str, MultiLoraLinear]) -> tuple[_Group, ...]:
    """The `SHARED_INPUT` groups among ``layers`` (by module path): two or more siblings of one parent with the same
    input width and stacks of the same rows and dtypes. Each layer learns its group."""
    groups = []
    parents = dict.fromkeys(path.rpartition(".")[0] for path in layers)
    for parent in parents:
        for names in SHARED_INPUT:
            members = [layers[p] for p in (f"{parent}.{n}" if parent else n for n in names) if p in layers]
            if len(members) < 2:
                continue
            first = members[0]
            fits = all(
                m.in_features == first.in_features
                and m.lora_A.shape[0] == first.lora_A.shape[0]
                and m.lora_A.dtype == first.lora_A.dtype
                and m.lora_B.dtype == first.lora_B.dtype
                and m.scaling.dtype == first.scaling.dtype
                for m in members
            )
            if fits:
                group = _Group(members)
                for m in members:
                    m._group = group
                groups.append(group)
    return tuple(groups)


@dataclass(eq=False)
class MultiLoraHandle:
    """What `inject` did to a model: the slots' limits and the per-row layers, and how to undo it."""

    targets: tuple[str, ...]
    slots: int
    max_rank: int
    wrap: LoraWrap

    @property
    def model(self) -> nn.Module:
        """The model the layers were injected into."""
        return self.wrap.model

    @property
    def layers(self) -> dict[str, MultiLoraLinear]:
        """The injected layers by module path."""
        return self.wrap.layers

    @property
    def removed(self) -> bool:
        """Whether ``remove()`` has run."""
        return self.wrap.removed

    def remove(self) -> None:
        """Put the original Linear modules back; the base is then exactly as before `inject` (weights untouched)."""
        self.wrap.remove()


def inject(model: nn.Module, targets: tuple[str, ...] | list[str], slots: int, max_rank: int) -> MultiLoraHandle:
    """Replace every ``nn.Linear`` of ``model`` whose name is in ``targets`` by a `MultiLoraLinear`, in place.

    ``slots`` adapters of rank up to ``max_rank`` can then be resident at once. The lm_head is never a target.
    Returns the handle for `load_slot` (or `pack_adapter` + `write_slot`), `clear_slot`, `set_rows` and ``remove()``.
    """
    targets = tuple(targets)
    unknown = sorted(set(targets) - set(ALL_TARGETS))
    if unknown:
        raise AdapterLimitError(f"unknown targets {unknown}; allowed: {list(ALL_TARGETS)}")
    if slots < 1 or max_rank < 1:
        raise AdapterLimitError(f"slots ({slots}) and max_rank ({max_rank}) must be >= 1")
    found = [
        (path, m)
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and path.rpartition(".")[2] in targets
    ]
    if not found:
        raise AdapterLimitError(f"the model has no Linear module named any of {list(targets)}")
    # One zeroed stack row per slot, plus the last one for the base: it stays zero.
    wrap = wrap_linears(model, {path: LoraStack.zeros(linear, slots + 1, max_rank) for path, linear in found})
    log.info("multi-LoRA: %d layers, %d slots, max rank %d, targets %s", len(found), slots, max_rank, targets)
    return MultiLoraHandle(targets, slots, max_rank, wrap)


def set_rows(handle: MultiLoraHandle, slot_per_row: torch.Tensor | None) -> None:
    """Set the slot of each batch row for the next forwards (``-1`` = base only; None = base for all rows)."""
    if slot_per_row is None:
        handle.wrap.set_rows(None)
        return
    if slot_per_row.dim() != 1:
        raise AdapterLimitError(f"slot_per_row must be 1-D [batch], got shape {tuple(slot_per_row.shape)}")
    if slot_per_row.numel() and (int(slot_per_row.max()) >= handle.slots or int(slot_per_row.min()) < BASE_SLOT):
        raise AdapterLimitError(f"slot indices must be in [-1, {handle.slots - 1}], got {slot_per_row.tolist()}")
    # The base slot (-1) is the last stack row, which stays zero: mapped here once, not in every layer.
    index = torch.where(slot_per_row < 0, handle.slots, slot_per_row)
    device = next(iter(handle.layers.values())).lora_A.device
    handle.wrap.set_rows(index.to(device=device, dtype=torch.long))


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


def parse_lora_key(key: str) -> tuple[str, str]:
    """(module path, "A"|"B") of a PEFT LoRA tensor key, without the peft prefix and adapter name."""
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX) :]
    for part, which in ((".lora_A.", "A"), (".lora_B.", "B")):
        if part in key:
            return key.split(part)[0], which
    raise AdapterLimitError(f"tensor {key!r} is not a LoRA A/B weight (only plain LoRA on Linear layers is served)")


def lora_scaling(config: dict[str, Any], rank: int) -> float:
    alpha = float(config.get("lora_alpha", rank))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def check_lora_config(config: dict[str, Any]) -> None:
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


@dataclass(frozen=True, eq=False)
class PackedLora:
    """A PEFT LoRA adapter checked against the slots of one `MultiLoraHandle` and laid out for them, in host
    memory: per injected module path, ``A [r, in]`` and ``B [out, r]`` in the stacks' dtype (pinned when the stacks
    are on CUDA) and the scaling. `pack_adapter` makes it; `write_slot` copies it into a slot."""

    modules: tuple[tuple[str, torch.Tensor, torch.Tensor, float], ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed A and B tensors (what it occupies in host memory)."""
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for _, a, b, _ in self.modules)


def pack_adapter(
    handle: MultiLoraHandle, adapter_state: dict[str, torch.Tensor], config: dict[str, Any]
) -> PackedLora:
    """Check a PEFT LoRA adapter against the slots' limits and lay it out for them, touching no slot.

    ``adapter_state`` holds the tensors of ``adapter_model.safetensors`` (keys with or without the
    ``base_model.model.`` prefix; any float dtype), ``config`` the parsed ``adapter_config.json``. Raises
    AdapterLimitError when a rank exceeds ``max_rank``, a module is not an injected target, shapes do not match the
    base, or the adapter uses an unsupported option. Pure (reads only the layers' fixed shapes): safe from any thread.
    """
    check_lora_config(config)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter_state.items():
        path, which = parse_lora_key(key)
        pairs.setdefault(path, {})[which] = tensor
    if not pairs:
        raise AdapterLimitError("the adapter has no LoRA tensors")
    plan: list[tuple[str, MultiLoraLinear, torch.Tensor, torch.Tensor, float]] = []
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
        plan.append((path, layer, a, b, lora_scaling(config, rank)))
    modules = []
    for path, layer, a, b, scale in plan:
        stack = layer.lora_A
        a = a.detach().to(device="cpu", dtype=stack.dtype).contiguous()
        b = b.detach().to(device="cpu", dtype=stack.dtype).contiguous()
        if stack.device.type == "cuda":
            a, b = a.pin_memory(), b.pin_memory()
        modules.append((path, a, b, scale))
    return PackedLora(tuple(modules))


def write_slot(handle: MultiLoraHandle, slot: int, packed: PackedLora) -> None:
    """Copy a packed adapter (`pack_adapter`) into ``slot``, replacing what was there.

    Writes only that slot's rows of the stacks (in place, never reallocated), so a forward whose rows use other
    slots may run meanwhile in another thread. Raises AdapterLimitError, leaving the slot unchanged, for a bad slot
    or an adapter packed for other layers.
    """
    _check_slot(handle, slot)
    for path, a, b, _ in packed.modules:
        layer = handle.layers.get(path)
        rank = a.shape[0]
        if (
            layer is None
            or rank > handle.max_rank
            or a.shape != (rank, layer.in_features)
            or b.shape != (layer.out_features, rank)
        ):
            raise AdapterLimitError(f"the packed adapter does not fit these slots at {path!r}")
    clear_slot(handle, slot)
    with torch.no_grad():
        for path, a, b, scale in packed.modules:
            layer = handle.layers[path]
            rank = a.shape[0]
            layer.lora_A[slot, :rank].copy_(a)
            layer.lora_B[slot, :, :rank].copy_(b)
            layer.scaling[slot] = scale


def load_slot(
    handle: MultiLoraHandle, slot: int, adapter_state: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    """Copy a PEFT LoRA adapter into ``slot`` (replacing what was there), after checking it fits: `pack_adapter`
    then `write_slot`. A refused adapter (AdapterLimitError) leaves the slot unchanged."""
    _check_slot(handle, slot)
    write_slot(handle, slot, pack_adapter(handle, adapter_state, config))


def _read_config(path: Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT directory, as a dict (AdapterFormatError otherwise)."""
    try:
        config = json.loads((path / _CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise AdapterFormatError(f"cannot read {str(path / _CONFIG_FILE)!r}: {e}") from e
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{str(path / _CONFIG_FILE)!r} is not a JSON object")
    return config


def read_adapter_dir(
    path: Path | str, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors keyed by module path + ``.lora_A.weight``/``.lora_B.weight``, config dict) of a PEFT directory;
    with ``dtype``, the floating-point tensors converted to it (`read_safetensors`)."""
    path = Path(path)
    config = _read_config(path)
    try:
        raw = read_safetensors(path / _WEIGHTS_FILE, dtype)
    except (OSError, SafetensorError) as e:
        raise AdapterFormatError(f"cannot read {str(path / _WEIGHTS_FILE)!r}: {e}") from e
    state = {(k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k): v for k, v in raw.items()}
    return state, config


#: safetensors dtype names `read_safetensors` reads itself (anything else goes through the library).
_SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
}  # fmt: skip


def read_safetensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, equal to ``safetensors.torch.load_file(path)`` (on the CPU); with
    ``dtype``, each floating-point tensor converted to it (as ``.to(dtype)`` would).

    The file is read in one call and the tensors are views of that one buffer (or of its one conversion to
    ``dtype``): the library's ``load_file`` spends several microseconds of Python per tensor, and an adapter at
    r=1 on the seven projections of a 30-layer base has 420 (with a conversion per tensor after it, 16-19 ms an
    adapter on an H200 host: 8-10 s of a 256-candidate gate, issue 18). A file this reader does not take apart
    cleanly (a header that does not parse, tensors that do not tile the data exactly, an unusual dtype or
    alignment) is read by ``load_file``, which then gives the library's own answer or error.
    """
    with open(path, "rb") as f:
        data = bytearray(f.read())
    parsed = _parse_safetensors(data, dtype)
    if parsed is not None:
        return parsed
    tensors = load_file(str(path))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors


_Entry = tuple[int, int, str, torch.dtype, list[int]]  # (start, end, name, dtype, shape), bytes in the data section


def _safetensors_layout(data: bytearray) -> tuple[list[_Entry], int] | None:
    """(the tensors in data order, where the data starts) of a safetensors file whose tensors tile its data
    exactly, with known dtypes, each aligned to its dtype; None for anything else."""
    if len(data) < 8:
        return None
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        return None
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except ValueError:
        return None
    if not isinstance(header, dict):
        return None
    size = len(data) - 8 - n
    entries: list[_Entry] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            kind = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return None
        if (end - start) != math.prod(shape) * kind.itemsize or start % kind.itemsize:
            return None
        entries.append((start, end, name, kind, shape))
    entries.sort()
    position = 0
    for start, end, *_ in entries:
        if start != position:  # a gap or an overlap: the library decides
            return None
        position = end
    if position != size:
        return None
    return entries, 8 + n


def _parse_safetensors(data: bytearray, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor] | None:
    layout = _safetensors_layout(data)
    if layout is None:
        return None
    entries, offset = layout
    size = len(data) - offset
    body = torch.frombuffer(data, dtype=torch.uint8, offset=offset) if size else torch.empty(0, dtype=torch.uint8)
    kinds = {kind for *_, kind, _ in entries}
    if len(kinds) == 1:  # one dtype (an adapter's usual case): one typed view, or one conversion, of the whole body
        (kind,) = kinds
        typed = body.view(kind)
        if dtype is not None and kind.is_floating_point and dtype != kind:
            typed = typed.to(dtype)
        pieces = typed.split([(end - start) // kind.itemsize for start, end, *_ in entries])
        return {name: piece.view(shape) for (_, _, name, _, shape), piece in zip(entries, pieces, strict=True)}
    tensors = {}
    for start, end, name, kind, shape in entries:
        tensor = body[start:end].view(kind).view(shape)
        tensors[name] = tensor.to(dtype) if dtype is not None and kind.is_floating_point else tensor
    return tensors


@dataclass(frozen=True)
class AdapterTable:
    """A PEFT LoRA directory read as one vector: ``values`` (1-D, in ``dtype``) holds every tensor of
    ``adapter_model.safetensors`` in the file's data order; ``layout`` says where: (key without peft's prefix, first
    element, shape) per tensor. Many adapters of one layout stack into one ``[n, values]`` table, from which each
    module's stacked A or B is a view (`read_adapter_table`)."""

    config: dict[str, Any]
    layout: tuple[tuple[str, int, tuple[int, ...]], ...]
    values: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors by key, as `read_adapter_dir` gives them (views of ``values``)."""
        return {k: self.values[at : at + math.prod(shape)].view(shape) for k, at, shape in self.layout}


def read_adapter_table(path: Path | str, dtype: torch.dtype = torch.float32) -> AdapterTable:
    """A PEFT LoRA directory as an `AdapterTable` of ``dtype`` values: one read and one conversion of the weights,
    no Python work per tensor beyond its header entry (the same layout's headers are parsed once: a 256-user gate
    reads 512 adapters of one layout). Raises AdapterFormatError as `read_adapter_dir` does; a file whose tensors
    do not share one floating dtype, or that `read_safetensors` would hand to the library, is read by
    `read_adapter_dir` and flattened."""
    path = Path(path)
    config = _read_config(path)
    try:
        with open(path / _WEIGHTS_FILE, "rb") as f:
            data = bytearray(f.read())
    except OSError as e:
        raise AdapterFormatError(f"cannot read {str(path / _WEIGHTS_FILE)!r}: {e}") from e
    head = bytes(data[: 8 + int.from_bytes(data[:8], "little")]) if len(data) >= 8 else b""
    with _TABLE_LAYOUTS_LOCK:
        known = _TABLE_LAYOUTS.get(head)
    if known is None:
        parsed = _safetensors_layout(data)
        kinds = {e[3] for e in parsed[0]} if parsed is not None else set()
        if parsed is not None and len(kinds) == 1 and next(iter(kinds)).is_floating_point:
            entries, offset = parsed
            kind = next(iter(kinds))
            layout = tuple(
                (name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name, start // kind.itemsize,
                 tuple(shape))
                for start, _, name, _, shape in entries
            )  # fmt: skip
            known = (layout, kind, offset, len(data) - offset)
            with _TABLE_LAYOUTS_LOCK:
                _TABLE_LAYOUTS[head] = known
                while len(_TABLE_LAYOUTS) > 64:
                    _TABLE_LAYOUTS.pop(next(iter(_TABLE_LAYOUTS)))
    if known is not None and len(data) - known[2] != known[3]:  # a known header on a file of another size
        known = None
    if known is None:  # mixed dtypes, or what the library must judge
        state, _ = read_adapter_dir(path, dtype)
        keys = sorted(state)
        values = torch.cat([state[k].reshape(-1).to(dtype) for k in keys]) if keys else torch.empty(0, dtype=dtype)
        flat: list[tuple[str, int, tuple[int, ...]]] = []
        at = 0
        for k in keys:
            flat.append((k, at, tuple(state[k].shape)))
            at += state[k].numel()
        return AdapterTable(config, tuple(flat), values)
    layout, kind, offset, _ = known
    raw = torch.frombuffer(data, dtype=torch.uint8, offset=offset) if len(data) > offset else None
    values = raw.view(kind).to(dtype) if raw is not None else torch.empty(0, dtype=dtype)
    return AdapterTable(config, layout, values)


_TABLE_LAYOUTS: dict[bytes, tuple[tuple[tuple[str, int, tuple[int, ...]], ...], torch.dtype, int, int]] = {}
_TABLE_LAYOUTS_LOCK = threading.Lock()
