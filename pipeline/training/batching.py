"""The arithmetic of batched training (`pipeline.training.multi`): micro-batches, per-user losses, per-user AdamW.

Rows of many users share one forward; each row carries its user's stack row (`pipeline.models.multilora`).

- `nll_sums`: per user, the sum of its target-token NLL and its target-token count over a step's rows. The rows
  are cut into micro-batches by padded tokens (`micro_batches`, to bound memory) whose gradients add up, each
  weighted by one over its user's token count, so a user's gradient is the one of its own batch's mean loss.
- `token_nll`: the NLL of the labelled next tokens only (the vocabulary projection runs on those positions).
- `adamw_step`: per-user gradient-norm clipping (as ``clip_grad_norm_``), then the arithmetic of
  ``torch.optim.AdamW`` with per-user moments and step counts, applied to the users given only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainingSettings
from pipeline.models.encoding import IGNORE, EncodedExample
from pipeline.models.multilora import LoraWrap

#: torch.optim.AdamW's defaults, which the single-user path uses.
ADAMW_BETAS, ADAMW_EPS, ADAMW_WEIGHT_DECAY = (0.9, 0.999), 1e-8, 1e-2


def micro_batches(items: list[tuple[int, EncodedExample]], budget: int) -> Iterable[list[tuple[int, EncodedExample]]]:
    """Rows sorted by length (little padding), cut where the padded size would pass ``budget`` tokens."""
    ordered = sorted(items, key=lambda it: len(it[1].input_ids))
    chunk: list[tuple[int, EncodedExample]] = []
    for item in ordered:
        if chunk and (len(chunk) + 1) * len(item[1].input_ids) > budget:
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def nll_sums(
    model: nn.Module,
    lora: LoraWrap,
    items: list[tuple[int, EncodedExample]],
    n_users: int,
    pad_id: int,
    device: torch.device,
    settings: TrainingSettings,
    params: list[nn.Parameter] | None,
    beat: Callable[[], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per user: the sum of target-token NLL over its rows in ``items`` (``(user's stack row, example)`` pairs) and
    its target-token count. With ``params``, also accumulates the gradient of sum over users of (NLL sum / token
    count) into them. ``beat`` is called after each micro-batch."""
    counts = torch.zeros(n_users, dtype=torch.long)
    counts.index_add_(0, torch.tensor([slot for slot, _ in items]), torch.tensor([_targets(e) for _, e in items]))
    weights = (1.0 / counts.clamp(min=1).double()).float().to(device)
    sums = torch.zeros(n_users, dtype=torch.float64, device=device)
    cuda = device.type == "cuda"
    for chunk in micro_batches(items, settings.micro_batch_tokens):
        width = max(len(e.input_ids) for _, e in chunk)
        host = torch.tensor([_packed_row(slot, e, width, pad_id) for slot, e in chunk])
        # The labelled positions (flat in [rows, width - 1]), their targets and users, found here on the host: a
        # boolean mask on the GPU would make the host wait for the forward before it could queue anything else.
        flat = [
            (r * (width - 1) + t, label, slot)
            for r, (slot, e) in enumerate(chunk)
            for t, label in enumerate(e.labels[1:])
            if label != IGNORE
        ]
        picked = torch.tensor(flat, dtype=torch.long).reshape(-1, 3)
        padded = any(len(e.input_ids) < width for _, e in chunk)
        if cuda:  # pinned: the copy does not wait for the GPU work queued before it
            host, picked = host.pin_memory(), picked.pin_memory()
        packed = host.to(device, non_blocking=cuda)
        picked = picked.to(device, non_blocking=cuda)
        slots, ids = packed[:, 0], packed[:, 2 : width + 2]
        mask = (torch.arange(width, device=device)[None, :] < (width - packed[:, 1:2])).long() if padded else None
        positions, targets, token_slots = picked[:, 0], picked[:, 1], picked[:, 2]
        lora.set_rows(slots)
        try:
            with torch.enable_grad() if params is not None else contextlib.nullcontext():
                nll = token_nll(model, ids, mask, positions, targets)
                if params is not None:
                    # where, not a product: a user whose loss is NaN must not spread it into the sum's gradient.
                    w = weights[token_slots]
                    loss = torch.where(torch.isfinite(nll), nll * w, torch.zeros_like(nll)).sum()
                    if loss.requires_grad:
                        loss.backward()
        finally:
            lora.set_rows(None)
        sums.index_add_(0, token_slots, nll.detach().double())
        beat()
    return sums.cpu(), counts


def _packed_row(slot: int, e: EncodedExample, width: int, pad_id: int) -> list[int]:
    """One row of a micro-batch as one list (one host-to-device copy): slot, padding, ids."""
    n = width - len(e.input_ids)
    return [slot, n, *e.input_ids, *[pad_id] * n]


def _targets(e: EncodedExample) -> int:
    """Target tokens of an example (labels after the first position that carry a loss)."""
    return sum(1 for label in e.labels[1:] if label != IGNORE)


def token_nll(
    model: Any,  # a transformers causal LM (decoder, output embeddings, config)
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    """NLL of each labelled next token (``positions`` flat in ``[rows, width - 1]``, ``targets`` their ids). The
    vocabulary projection runs only on those positions (the logits of every position of a large batch would not fit
    in memory)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = model.config
    plain = getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) is None
    if decoder is not None and head is not None and plain:
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions))
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits = logits[:, :-1].reshape(-1, logits.shape[-1]).index_select(0, positions)
    return F.cross_entropy(logits.float(), targets, reduction="none")


@torch.no_grad()
def adamw_step(
    params: list[nn.Parameter],
    moments: list[tuple[torch.Tensor, torch.Tensor]],
    steps: torch.Tensor,
    slots: list[int],
    settings: TrainingSettings,
) -> None:
    """Per-user gradient clipping, then torch.optim.AdamW's update, for the users in ``slots`` only.

    ``params`` are stacked over users (dim 0); ``moments`` their (first, second) moments, ``steps`` each user's step
    count (float64, updated here)."""
    if not slots:
        return
    device = params[0].device
    index = torch.tensor(slots, device=device)
    grads = [p.grad.index_select(0, index) if p.grad is not None else torch.zeros_like(p[index]) for p in params]
    if settings.max_grad_norm > 0:
        # As clip_grad_norm_: the norm over all of a user's LoRA tensors, a factor of max / (norm + 1e-6) if < 1.
        norms = torch.stack([g.flatten(1).float().pow(2).sum(1) for g in grads]).sum(0).sqrt()
        factor = (settings.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        grads = [g * factor.to(g.dtype).view(-1, *([1] * (g.dim() - 1))) for g in grads]
    steps[slots] += 1
    step = steps[slots]
    beta1, beta2 = ADAMW_BETAS
    lr = settings.learning_rate
    step_size = (lr / (1 - beta1**step)).to(device)
    correction2_sqrt = ((1 - beta2**step) ** 0.5).to(device)
    for p, g, (m_all, v_all) in zip(params, grads, moments, strict=True):
        shape = (-1, *([1] * (g.dim() - 1)))
        w = p.data.index_select(0, index)
        m = m_all.index_select(0, index)
        v = v_all.index_select(0, index)
        w.mul_(1 - lr * ADAMW_WEIGHT_DECAY)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / correction2_sqrt.to(v.dtype).view(shape)).add_(ADAMW_EPS)
        w.addcdiv_(m * step_size.to(m.dtype).view(shape), denom, value=-1.0)
        p.data.index_copy_(0, index, w)
        m_all.index_copy_(0, index, m)
        v_all.index_copy_(0, index, v)
