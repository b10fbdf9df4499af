"""The arithmetic of batched training (`pipeline.training.multi`): micro-batches, per-user losses, per-user AdamW.

Rows of many users share one forward; each row carries its user's stack row (`pipeline.models.multilora`).

- `nll_sums` (and `queue_sums`, which does not wait for the device): per user, over a step's rows, what its loss
  is made of: the sum of its examples' target-token NLL and their target-token count, and the sum of its pairs'
  SimPO losses and their number (`pipeline.training.lora`'s loss: NLL / tokens + preference_weight * SimPO sum /
  pairs). A pair is two rows (chosen, rejected) tagged as
  such; their token NLLs are reduced per row to the mean log-probability per target token that SimPO compares.
  The rows are cut into micro-batches by padded tokens (`micro_batches`, to bound memory), a pair's two rows always
  in the same one, so each micro-batch's loss is a sum of whole terms of the users' losses: its example tokens
  weighted by one over their user's token count, its pairs' SimPO losses by ``preference_weight`` over their
  user's pair count. The micro-batches' gradients add up, so a user's gradient is the one of its own step's loss.
- `token_nll`: the NLL of the labelled next tokens only (the vocabulary projection runs on those positions).
- `StackedWeights`: every user's LoRA tensors in one table, and its `step`: per-user gradient-norm clipping (as
  ``clip_grad_norm_``), then the arithmetic of ``torch.optim.AdamW`` with per-user moments and step counts, applied
  to the users given only.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import queue
import threading
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import TrainingSettings
from pipeline.models import encoding, shared_prefix
from pipeline.models import packed as packed_rows
from pipeline.models.encoding import IGNORE, EncodedExample
from pipeline.models.multilora import LoraWrap
from pipeline.training.fused import Fused, linear_nll
from pipeline.training.lora import preference_loss

#: torch.optim.AdamW's defaults, which the single-user path uses.
ADAMW_BETAS, ADAMW_EPS, ADAMW_WEIGHT_DECAY = (0.9, 0.999), 1e-8, 1e-2

#: An example row of a step: (the user's stack row, the encoded example).
Row = tuple[int, EncodedExample]
#: A pair of a step: (the user's stack row, the encoded chosen answer, the encoded rejected answer).
PairRows = tuple[int, EncodedExample, EncodedExample]


@dataclass(frozen=True)
class StepSums:
    """Per user (indexed by stack row), over a step's rows: ``nll`` the sum of the examples' target-token NLL
    (float64), ``tokens`` their number of target tokens, ``preference`` the sum of the pairs' SimPO losses (float64)
    and ``pairs`` their number. On the CPU."""

    nll: torch.Tensor
    tokens: torch.Tensor
    preference: torch.Tensor
    pairs: torch.Tensor

    def loss(self, slot: int, settings: TrainingSettings) -> float:
        """The user's loss: mean NLL per target token + ``preference_weight`` * mean SimPO loss per pair."""
        value = float(self.nll[slot]) / max(int(self.tokens[slot]), 1)
        if int(self.pairs[slot]):
            value += settings.preference_weight * float(self.preference[slot]) / int(self.pairs[slot])
        return value


@dataclass(frozen=True)
class _Unit:
    """Rows that go into one micro-batch together: one example, or one pair (chosen, rejected)."""

    slot: int
    rows: tuple[EncodedExample, ...]
    pair: bool

    @property
    def width(self) -> int:
        return max(len(e.input_ids) for e in self.rows)


def micro_batches(units: list[_Unit], budget: int, shared: int = 0, packed: bool = False) -> Iterable[list[_Unit]]:
    """Units sorted by length (little padding), cut where the padded size would pass ``budget`` tokens (a unit
    larger than the budget is a micro-batch of its own); ``shared``: the rows' common first tokens, run once per
    user (`pipeline.models.shared_prefix`) and not counted; ``packed``: the rows are packed (no padding), so their
    own tokens are counted (without the shared ones: a micro-batch of packed rows runs each user's prefix once)."""
    chunk: list[_Unit] = []
    rows = tokens = 0
    for unit in sorted(units, key=lambda u: u.width):
        size = sum(len(e.input_ids) - shared for e in unit.rows)
        over = tokens + size > budget if packed else (rows + len(unit.rows)) * (unit.width - shared) > budget
        if chunk and over:
            yield chunk
            chunk, rows, tokens = [], 0, 0
        chunk.append(unit)
        rows += len(unit.rows)
        tokens += size
    if chunk:
        yield chunk


@dataclass(frozen=True)
class PendingSums:
    """A step's `StepSums` on their way to the host (`queue_sums`): on a GPU the copy is queued right behind the
    step's work, so `wait` blocks until that work is done, not until whatever was queued after it."""

    sums: StepSums
    arrived: torch.cuda.Event | None = None

    def wait(self) -> StepSums:
        if self.arrived is not None:
            self.arrived.synchronize()
        return self.sums


def nll_sums(
    model: nn.Module,
    lora: LoraWrap,
    items: list[Row],
    n_users: int,
    pad_id: int,
    device: torch.device,
    settings: TrainingSettings,
    params: list[nn.Parameter] | None,
    beat: Callable[[], None],
    pairs: Sequence[PairRows] = (),
    fused: Fused | None = None,
) -> StepSums:
    """`queue_sums`, waited for."""
    return queue_sums(model, lora, items, n_users, pad_id, device, settings, params, beat, pairs, fused).wait()


def queue_sums(
    model: nn.Module,
    lora: LoraWrap,
    items: list[Row],
    n_users: int,
    pad_id: int,
    device: torch.device,
    settings: TrainingSettings,
    params: list[nn.Parameter] | None,
    beat: Callable[[], None],
    pairs: Sequence[PairRows] = (),
    fused: Fused | None = None,
) -> PendingSums:
    """Per user: the parts of its loss over its example rows in ``items`` and its ``pairs`` (`StepSums`, once
    `PendingSums.wait` has them: the work is queued, not waited for). With
    ``params``, also accumulates into them the gradient of the sum over users of their losses (`StepSums.loss`).
    ``beat`` is called after each micro-batch. ``fused``: the loss's kernels (default: as ``settings`` resolve on
    ``device``, `pipeline.training.fused.Fused`). The micro-batches are built on the host by a background thread
    (`built_ahead`), in the order `micro_batches` gives, while the device runs the ones before."""
    units = [_Unit(slot, (e,), False) for slot, e in items]
    units += [_Unit(slot, (chosen, rejected), True) for slot, chosen, rejected in pairs]
    counts = torch.zeros(n_users, dtype=torch.long)
    if items:
        counts.index_add_(0, torch.tensor([slot for slot, _ in items]), torch.tensor([_targets(e) for _, e in items]))
    n_pairs = torch.zeros(n_users, dtype=torch.long)
    if pairs:
        n_pairs.index_add_(0, torch.tensor([slot for slot, _, _ in pairs]), torch.ones(len(pairs), dtype=torch.long))
    weights = to_device((1.0 / counts.clamp(min=1).double()).float(), device)
    pair_weights = to_device((settings.preference_weight / n_pairs.clamp(min=1).double()).float(), device)
    sums = torch.zeros(n_users, dtype=torch.float64, device=device)
    pair_sums = torch.zeros(n_users, dtype=torch.float64, device=device)
    cuda = device.type == "cuda"
    mode = (fused or Fused.resolve(settings.fused_kernels, device)).loss
    # Packed rows (no padding), or the rows' common first tokens (the chat template's head) run once per user per
    # micro-batch.
    pack = settings.packs_rows(device.type) and packed_rows.available(model)
    shared = 0
    if settings.shares_prefix(device.type) and len(units) > 1 and shared_prefix.available(model):
        every = [e for u in units for e in u.rows]
        shared = shared_prefix.common_length([e.input_ids for e in every], [e.labels for e in every])
    chunks = micro_batches(units, settings.micro_batch_budget(device.type), shared, pack)
    build = functools.partial(_prepare_packed if pack else _prepare, pad_id=pad_id, pin=cuda, shared=shared)
    with contextlib.closing(built_ahead(build, chunks)) as ready:
        for batch in ready:
            _forward_backward(
                batch, lora, model, device, mode, settings, params, weights, pair_weights, sums, pair_sums
            )
            beat()
    if not cuda:
        return PendingSums(StepSums(sums.cpu(), counts, pair_sums.cpu(), n_pairs))
    host = torch.empty((2, n_users), dtype=torch.float64, pin_memory=True)
    host.copy_(torch.stack([sums, pair_sums]), non_blocking=True)
    arrived = torch.cuda.Event()
    arrived.record()
    return PendingSums(StepSums(host[0], counts, host[1], n_pairs), arrived)


@dataclass(frozen=True)
class _Batch:
    """A micro-batch built on the host (`_prepare`): ``packed`` rows (slot, padding, ids), ``picked`` labelled
    positions (flat position, target, slot, row, is-example), ``paired`` pairs (slot, chosen row, rejected row,
    their target counts); pinned when bound for a GPU. With a ``prefix``, the rows' ids leave out its tokens
    (positions count from the first token after it); with a ``packing`` (`_prepare_packed`), ``packed`` is the rows'
    slots and then all their tokens as one sequence, and ``width`` the number of those tokens."""

    rows: int
    width: int
    packed: torch.Tensor
    picked: torch.Tensor
    paired: torch.Tensor
    prefix: shared_prefix.Prefix | None = None
    packing: packed_rows.Packing | None = None


def _prepare(chunk: list[_Unit], *, pad_id: int, pin: bool, shared: int = 0) -> _Batch:
    """A micro-batch's tensors, built on the host (by `built_ahead`'s thread, while the GPU runs the one before),
    with numpy over all of its values at once (a Python tuple per labelled token held the GIL that the thread
    queueing the GPU work needs). ``shared``: how many first tokens every row has in common (`nll_sums`), left
    out of the rows and run once per user."""
    rows = [(u.slot, e) for u in chunk for e in u.rows]
    prefix = None
    if shared:
        first = rows[0][1].input_ids
        prefix = shared_prefix.prefix_of(first, shared, [slot for slot, _ in rows])
        rows = [(slot, encoding.EncodedExample(e.input_ids[shared:], e.labels[shared:])) for slot, e in rows]
    width = max(len(e.input_ids) for _, e in rows)
    slots = np.fromiter((slot for slot, _ in rows), dtype=np.int64, count=len(rows))
    ids = encoding.padded([e.input_ids for _, e in rows], width, pad_id).numpy()
    lengths = np.fromiter((len(e.input_ids) for _, e in rows), dtype=np.int64, count=len(rows))
    host = torch.from_numpy(np.concatenate([slots[:, None], (width - lengths)[:, None], ids], axis=1))
    # The labelled positions (flat in [rows, width - 1], row by row), their targets, users, rows and whether they
    # are an example's (1, else a pair's), found here on the host: a boolean mask on the GPU would make the host
    # wait for the forward before it could queue anything else. Per pair: user, chosen row, rejected row, and
    # their target-token counts.
    labels = encoding.padded([e.labels[1:] for _, e in rows], width - 1, IGNORE).numpy().reshape(-1)
    flat = np.flatnonzero(labels != IGNORE)
    row = flat // (width - 1)
    picked, paired = _picked(chunk, flat, labels[flat], slots, row)
    if pin:  # pinned: the copy does not wait for the GPU work queued before it
        host, picked, paired = host.pin_memory(), picked.pin_memory(), paired.pin_memory()
        prefix = prefix.pin_memory() if prefix is not None else None
    return _Batch(len(rows), width, host, picked, paired, prefix)


_T = TypeVar("_T")
_U = TypeVar("_U")
_END = object()


def built_ahead(build: Callable[[_T], _U], items: Iterable[_T], depth: int = 2) -> Generator[_U, None, None]:
    """``build(item)`` for each of ``items``, in order, computed by a background thread up to ``depth`` items ahead
    of the consumer (the same values in the same order as ``map(build, items)``). An exception of ``build`` is raised
    to the consumer at its place in the sequence; closing the iterator early stops the thread."""
    out: queue.Queue[tuple[bool, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[bool, Any]) -> bool:
        while not stop.is_set():
            try:
                out.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if not put((True, build(item))):
                    return
        except BaseException as e:  # handed to the consumer
            put((False, e))
            return
        put((True, _END))

    thread = threading.Thread(target=work, name="persona-micro-batches", daemon=True)
    thread.start()
    try:
        while True:
            ok, value = out.get()
            if not ok:
                raise value
            if value is _END:
                return
            yield value
    finally:
        stop.set()
        thread.join()


def _forward_backward(
    batch: _Batch,
    lora: LoraWrap,
    model: nn.Module,
    device: torch.device,
    mode: str,
    settings: TrainingSettings,
    params: list[nn.Parameter] | None,
    weights: torch.Tensor,
    pair_weights: torch.Tensor,
    sums: torch.Tensor,
    pair_sums: torch.Tensor,
) -> None:
    """One micro-batch: forward, the loss's backward (with ``params``), and its per-user sums added up."""
    cuda = device.type == "cuda"
    width = batch.width
    packed = batch.packed.to(device, non_blocking=cuda)
    picked = batch.picked.to(device, non_blocking=cuda)
    paired = batch.paired.to(device, non_blocking=cuda)
    prefix = batch.prefix.to(device, non_blocking=cuda) if batch.prefix is not None else None
    packing = batch.packing.to(device, non_blocking=cuda) if batch.packing is not None else None
    if packing is not None:
        n_packed = packing.offsets.shape[0] - 1  # the rows, and the prefix rows before them when shared
        slots, ids = packed[:n_packed], packed[n_packed:]
    else:
        slots, ids = packed[:, 0], packed[:, 2 : width + 2]
    # No attention mask: rows are right-padded and attention is causal, so a real token never attends to a pad, and
    # only labelled (real) positions carry a loss. A padding mask would cost a device sync per micro-batch
    # (transformers asks `mask.all()` to choose its SDPA path) and the flash kernel.
    mask = None
    positions, targets, token_slots = picked[:, 0], picked[:, 1], picked[:, 2]
    example = picked[:, 4].bool()
    has_pairs = batch.paired.shape[0] > 0
    lora.set_rows(slots)
    try:
        with torch.enable_grad() if params is not None else contextlib.nullcontext():
            shared = (prefix, lora.set_rows, slots) if prefix is not None else None
            rows = (packing, lora, slots) if packing is not None else None
            nll = token_nll(model, ids, mask, positions, targets, mode, shared, rows)
            example_nll = torch.where(example, nll, torch.zeros_like(nll))
            pair_loss = None
            if has_pairs:
                # Per row, the sum of its token NLL; a pair compares its rows' mean log-probs per target token.
                row_nll = torch.zeros(batch.rows, dtype=nll.dtype, device=device).index_add(0, picked[:, 3], nll)
                chosen = -row_nll[paired[:, 1]] / paired[:, 3]
                rejected = -row_nll[paired[:, 2]] / paired[:, 4]
                pair_loss = preference_loss(chosen, rejected, settings)
            if params is not None:
                # where, not a product: a user whose loss is NaN must not spread it into the sum's gradient.
                w = weights[token_slots]
                loss = torch.where(torch.isfinite(nll) & example, nll * w, torch.zeros_like(nll)).sum()
                if pair_loss is not None:
                    pw = pair_weights[paired[:, 0]]
                    loss = loss + torch.where(torch.isfinite(pair_loss), pair_loss * pw, 0.0).sum()
                if loss.requires_grad:
                    loss.backward()
    finally:
        lora.set_rows(None)
    sums.index_add_(0, token_slots, example_nll.detach().double())
    if pair_loss is not None:
        pair_sums.index_add_(0, paired[:, 0], pair_loss.detach().double())


def _prepare_packed(chunk: list[_Unit], *, pad_id: int, pin: bool, shared: int = 0) -> _Batch:
    """`_prepare` for packed rows (`pipeline.models.packed`): ``packed`` holds the packed rows' slots, then all their
    tokens (one sequence, no padding); ``picked``'s positions are token indices of that sequence (the token that
    predicts the label); ``width`` is the number of tokens. With ``shared`` common first tokens, one prefix row of
    them per user comes first and the rows leave them out (each attends to its user's prefix row)."""
    del pad_id  # no padding
    rows = [(u.slot, e) for u in chunk for e in u.rows]
    heads: list[tuple[int, EncodedExample]] = []
    prefix = None
    if shared:
        prefix = shared_prefix.prefix_of(rows[0][1].input_ids, shared, [slot for slot, _ in rows])
        head = EncodedExample(list(rows[0][1].input_ids[:shared]), [IGNORE] * shared)
        heads = [(int(slot), head) for slot in prefix.slots.tolist()]
        rows = [(slot, EncodedExample(e.input_ids[shared:], e.labels[shared:])) for slot, e in rows]
    lengths = [len(e.input_ids) for _, e in heads + rows]
    owner = prefix.owner.tolist() if prefix is not None else None
    packing = packed_rows.packing_of(lengths, (shared, owner) if owner is not None else None)
    total = int(packing.offsets[-1])
    every = heads + rows
    slots = np.fromiter((slot for slot, _ in every), dtype=np.int64, count=len(every))
    ids = np.fromiter(itertools.chain.from_iterable(e.input_ids for _, e in every), dtype=np.int64, count=total)
    labels = np.fromiter(itertools.chain.from_iterable(e.labels for _, e in every), dtype=np.int64, count=total)
    # The label each token predicts: the next token's, within its row.
    following = np.full(total, IGNORE, dtype=np.int64)
    following[:-1] = labels[1:]
    following[packing.offsets[1:].numpy().astype(np.int64) - 1] = IGNORE
    flat = np.flatnonzero(following != IGNORE)  # none in the prefix rows: their labels are IGNORE
    row = packing.token_rows.numpy()[flat] - len(heads)
    picked, paired = _picked(chunk, flat, following[flat], slots[len(heads) :], row)
    host = torch.from_numpy(np.concatenate([slots, ids]))
    if pin:
        host, picked, paired, packing = (
            host.pin_memory(),
            picked.pin_memory(),
            paired.pin_memory(),
            packing.pin_memory(),
        )
    return _Batch(len(rows), total, host, picked, paired, None, packing)


def _picked(
    chunk: list[_Unit], flat: np.ndarray, targets: np.ndarray, slots: np.ndarray, row: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's ``picked`` (per labelled position: its flat position, target, user, row and whether the row
    is an example's) and ``paired`` (per pair: user, chosen row, rejected row, their target-token counts)."""
    n_rows = len(slots)
    example = np.fromiter((0 if u.pair else 1 for u in chunk for _ in u.rows), dtype=np.int64, count=n_rows)
    picked = torch.from_numpy(np.stack([flat, targets, slots[row], row, example[row]], axis=1))
    counts = np.bincount(row, minlength=n_rows)
    pair_rows: list[tuple[int, int, int, int, int]] = []
    r = 0
    for unit in chunk:
        r += len(unit.rows)
        if unit.pair:
            pair_rows.append((unit.slot, r - 2, r - 1, int(counts[r - 2]), int(counts[r - 1])))
    return picked, torch.tensor(pair_rows, dtype=torch.long).reshape(-1, 5)


def _targets(e: EncodedExample) -> int:
    """Target tokens of an example (labels after the first position that carry a loss)."""
    return sum(1 for label in e.labels[1:] if label != IGNORE)


def token_nll(
    model: Any,  # a transformers causal LM (decoder, output embeddings, config)
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    positions: torch.Tensor,
    targets: torch.Tensor,
    mode: str = "off",
    shared: tuple[shared_prefix.Prefix, Callable[[torch.Tensor | None], None], torch.Tensor] | None = None,
    rows: tuple[packed_rows.Packing, LoraWrap, torch.Tensor] | None = None,
) -> torch.Tensor:
    """NLL of each labelled next token (``positions`` flat in ``[rows, width - 1]``, ``targets`` their ids). The
    vocabulary projection runs only on those positions (the logits of every position of a large batch would not fit
    in memory); with ``mode`` ``liger`` or ``chunked`` and a bias-free Linear head, projection and loss are one
    fused step that never holds those positions' fp32 logits at once (`pipeline.training.fused.linear_nll`).
    ``shared``: (the prefix the rows of ``ids`` begin with and leave out, the LoRA wrapper's ``set_rows``, the
    rows' LoRA rows), run by `pipeline.models.shared_prefix.decoder_states`. ``rows``: packed rows (the packing, the
    LoRA wrapper, the rows' LoRA rows): ``ids`` is ``[T]`` and ``positions`` index its tokens
    (`pipeline.models.packed.decoder_states`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = model.config
    plain = getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) is None
    if (shared is not None or rows is not None) and (decoder is None or head is None or not plain or mask is not None):
        raise ValueError("a shared prefix or packed rows need a plain decoder and head, and no attention mask")
    if rows is not None:
        assert decoder is not None and head is not None  # (checked above)
        hidden = packed_rows.decoder_states(decoder, ids, *rows)
        picked = hidden.index_select(0, positions)
        if type(head) is nn.Linear and head.bias is None:
            return linear_nll(picked, head.weight, targets, mode)
        return F.cross_entropy(head(picked).float(), targets, reduction="none")
    if decoder is not None and head is not None and plain:
        if shared is not None:
            hidden = shared_prefix.decoder_states(decoder, ids, *shared)
        else:
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        picked = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, positions)
        if type(head) is nn.Linear and head.bias is None:
            return linear_nll(picked, head.weight, targets, mode)
        logits = head(picked)
    else:
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logits = logits[:, :-1].reshape(-1, logits.shape[-1]).index_select(0, positions)
    return F.cross_entropy(logits.float(), targets, reduction="none")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (on the host) on ``device``: on a GPU through pinned memory, without waiting (a copy from pageable memory
    would wait for all the work queued before it, and the device would then idle while the host queues the next)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class StackedWeights:
    """Every user's LoRA tensors of a batched training as one table ``[users, values]`` (the master weights, e.g.
    fp32) with the AdamW state of the same shape, so that a step's update is a dozen kernels over the table rather
    than a dozen per tensor (Llama-1B's seven projections in 16 layers are 224 stacks: ~4,500 tiny launches a step,
    during which the device idled).

    ``params`` are the stacks (``[users, *shape]`` each, in the order given), views of ``table``'s columns: the LoRA
    layers read them, autograd gives each its gradient, `step` updates ``table`` in place. ``best`` and ``views``
    keep other tables of the same layout (a snapshot of the best state, the start)."""

    def __init__(self, stacks: Sequence[torch.Tensor]) -> None:
        self.shapes = [tuple(t.shape[1:]) for t in stacks]
        self.table = torch.cat([t.detach().reshape(t.shape[0], -1) for t in stacks], dim=1)
        self.params = [nn.Parameter(view) for view in self.views(self.table)]
        self.moments = (torch.zeros_like(self.table), torch.zeros_like(self.table))
        self.steps = torch.zeros(self.table.shape[0], dtype=torch.float64)  # per user, on the host

    def views(self, table: torch.Tensor) -> list[torch.Tensor]:
        """``table``'s columns (a table of this layout) as the stacks' shapes."""
        out, at = [], 0
        users = table.shape[0]
        for shape in self.shapes:
            n = int(np.prod(shape)) if shape else 1
            out.append(table[:, at : at + n].view(users, *shape))
            at += n
        return out

    def grads(self) -> torch.Tensor:
        """The stacks' gradients as one table (zeros where a stack has none)."""
        return torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(p.shape[0], -1) for p in self.params],
            dim=1,
        )

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self, slots: list[int], settings: TrainingSettings, start: torch.Tensor | None = None) -> None:
        """Per-user gradient clipping, then torch.optim.AdamW's update, for the users in ``slots`` only (the others'
        weights, moments and step counts stay as they are); then, with ``settings.anchor``, the pull towards
        ``start`` (the table training started from) that the single-user path applies after its optimizer step."""
        if not slots:
            return
        table, (m_all, v_all) = self.table, self.moments
        device = table.device
        every = len(slots) == table.shape[0] and slots == list(range(table.shape[0]))
        index = None if every else to_device(torch.tensor(slots), device)
        g = self.grads()
        if index is not None:
            g = g.index_select(0, index)
        if settings.max_grad_norm > 0:
            # As clip_grad_norm_: the norm over all of a user's LoRA tensors, a factor of max / (norm + 1e-6) if < 1.
            norms = g.float().pow(2).sum(1).sqrt()
            factor = (settings.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            g = g * factor.to(g.dtype)[:, None]
        self.steps[slots] += 1
        step = self.steps[slots]
        beta1, beta2 = ADAMW_BETAS
        lr = settings.learning_rate
        # per user, computed on the host in float64 as torch.optim.AdamW does, then in the table's dtype
        step_size = to_device((lr / (1 - beta1**step)).to(table.dtype), device)[:, None]
        correction2_sqrt = to_device(((1 - beta2**step) ** 0.5).to(table.dtype), device)[:, None]
        if index is None:
            w, m, v = table, m_all, v_all
        else:
            w, m, v = table.index_select(0, index), m_all.index_select(0, index), v_all.index_select(0, index)
        w.mul_(1 - lr * ADAMW_WEIGHT_DECAY)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / correction2_sqrt).add_(ADAMW_EPS)
        w.addcdiv_(m * step_size, denom, value=-1.0)
        if start is not None and settings.anchor > 0:
            w.sub_(w - (start if index is None else start.index_select(0, index)), alpha=lr * settings.anchor)
        if index is not None:
            table.index_copy_(0, index, w)
            m_all.index_copy_(0, index, m)
            v_all.index_copy_(0, index, v)
