"""Batched training: many users' LoRA adapters in one forward/backward pass on the one frozen base.

`train_adapters` trains K users at once and gives each the adapter `pipeline.training.lora.train_adapter` would
have given it alone (the same within float rounding; tests/unit/test_training_multi.py checks it against stock
peft). What makes that hold, per user:

- the same start: each user's LoRA is created by peft exactly as the single-user path does (fresh from the
  user's seed, or the parent revision's directory), then copied into one slot of stacked parameters;
- the same data: the user's own ``random.Random(seed)`` splits validation off and draws the batches, in the same
  order (`split_examples`, `next_batch`);
- the same loss: the sum of the user's token NLL divided by the user's own token count; the step's batch of all
  users is cut into micro-batches (by padded tokens, to bound memory) whose gradients add up, so a user's
  gradient is the one of its own batch;
- the same update: per-user gradient-norm clipping, and AdamW with per-user moments and step count (the
  arithmetic of ``torch.optim.AdamW``), applied only to the users still training;
- the same stopping: validation on the user's own slice every ``eval_every`` steps; a user that stops early (or
  fails) drops out of the batch, the others go on, and the loop ends when none is left.

A forward runs the base once for all rows; every target ``nn.Linear`` is replaced, for the run only, by
`StackedLoraLinear`: ``base(x) + (x @ A[u]^T @ B[u]^T) * s[u]`` where ``u`` is the row's user, gathered per row from
the stacked ``A [K, r, in]``, ``B [K, out, r]`` with two batched matmuls (autograd sums each row's gradient into
its user's slot). Logits are computed only at positions that carry a label.

A user's failure (no usable example, a parent that does not load, a non-finite loss, a callback that raises)
fails that user alone: its result is the exception. Users whose LoRA the stacked layer cannot express (dropout,
DoRA, LoRA bias, ``modules_to_save``, non-Linear targets) are trained one by one by `train_adapter`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from pipeline.config import TrainingSettings
from pipeline.domain.examples import Example
from pipeline.models.attach import base_lock, borrowed
from pipeline.models.base import LoadedBase
from pipeline.training.lora import (
    _DTYPES,
    ADAPTER_NAME,
    IGNORE,
    EncodedExample,
    TrainingError,
    TrainResult,
    _pad_id,
    next_batch,
    save_adapter_config,
    split_examples,
    train_adapter,
    training_config,
    user_lora,
)

log = logging.getLogger(__name__)

_PREFIX = "base_model.model."
# torch.optim.AdamW's defaults, which the single-user path uses.
_BETAS, _EPS, _WEIGHT_DECAY = (0.9, 0.999), 1e-8, 1e-2


@dataclass(frozen=True)
class UserJob:
    """One user's training in a batch: like the arguments of `train_adapter`."""

    examples: list[Example]
    out_dir: Path
    parent_dir: Path | None
    seed: int


#: After each of a user's steps: ``progress(user_index, step, loss)``; raising fails that user only.
Progress = Callable[[int, int, float], None]
#: Between micro-batches: returns the indices of users to stop now (e.g. whose lease was lost) with the reason.
Heartbeat = Callable[[], dict[int, BaseException]]


class _Rows:
    """The user (stacked slot) of each row of the current micro-batch, shared by every stacked layer."""

    index: torch.Tensor | None = None


class StackedLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus one trainable LoRA per user, chosen per batch row (module docstring)."""

    def __init__(
        self, base: nn.Linear, lora_A: nn.Parameter, lora_B: nn.Parameter, scaling: torch.Tensor, rows: _Rows
    ) -> None:
        super().__init__()
        self.base = base
        self.lora_A = lora_A  # [K, r, in]
        self.lora_B = lora_B  # [K, out, r]
        self.register_buffer("scaling", scaling)  # [K]
        self._rows = rows

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        index = self._rows.index
        if index is None:
            return result
        a, b, s = self.lora_A[index], self.lora_B[index], self.scaling[index]
        flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)  # peft casts the input to the LoRA dtype too
        delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2)) * s[:, None, None]
        # As peft: add in the LoRA dtype, then back to the base's.
        return (result + delta.reshape(*x.shape[:-1], -1)).to(result.dtype)


@dataclass
class _Start:
    """A user's LoRA as peft created it: config, per-module weights and scaling, and the saved key names."""

    config: LoraConfig
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]  # path -> (A [r, in], B [out, r], scaling)
    keys: dict[str, tuple[str, str]]  # state-dict key -> (path, "A" | "B")

    @property
    def signature(self) -> tuple:
        return tuple((p, tuple(a.shape), tuple(b.shape), a.dtype) for p, (a, b, _) in sorted(self.modules.items()))


@dataclass(eq=False)
class _User:
    index: int
    job: UserJob
    train: list[EncodedExample]
    val: list[EncodedExample]
    rng: random.Random
    start: _Start
    batch_size: int = 0
    queue: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    step: int = 0
    best_step: int = 0
    best_val: float = math.inf
    checks_without_gain: int = 0
    stopped_early: bool = False
    done: bool = False
    error: BaseException | None = None


def train_adapters(
    base: LoadedBase,
    jobs: Sequence[UserJob],
    settings: TrainingSettings,
    *,
    progress: Progress | None = None,
    heartbeat: Heartbeat | None = None,
) -> list[TrainResult | BaseException]:
    """Train every job's adapter as `train_adapter` would alone, in batches of users; save each to its
    ``out_dir`` (a standard PEFT directory). Returns, per job in order, its TrainResult or the exception that
    failed it (TrainingError for bad data, a bad parent or a non-finite loss; whatever a callback raised).
    ``base.model`` is unchanged afterwards."""
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    results: list[TrainResult | BaseException | None] = [None] * len(jobs)
    users: list[_User] = []
    alone: list[int] = []
    for i, job in enumerate(jobs):
        try:
            rng = random.Random(job.seed)
            train, val = split_examples(base.tokenizer, job.examples, settings, rng)
            start = _start(base, settings, job.parent_dir, job.seed)
        except _Unsupported as e:
            log.info("user %d: %s; trained on its own", i, e)
            alone.append(i)
            continue
        except Exception as e:  # one user's failure is that user's result
            results[i] = e
            continue
        users.append(_User(i, job, train, val, rng, start, batch_size=min(settings.batch_size, len(train))))

    groups: dict[tuple, list[_User]] = {}
    for user in users:
        groups.setdefault(user.start.signature, []).append(user)
    for group in groups.values():
        try:
            trained = _train_group(base, group, settings, progress, heartbeat)
        except Exception as e:  # e.g. out of memory: the group's users fail, other groups still train
            log.exception("batched training of %d users failed", len(group))
            trained = [e] * len(group)
        for user, result in zip(group, trained, strict=True):
            results[user.index] = result

    for i in alone:
        job = jobs[i]

        def one(step: int, loss: float, i: int = i) -> None:
            if progress is not None:
                progress(i, step, loss)

        try:
            results[i] = train_adapter(
                base, job.examples, job.out_dir, settings, parent_dir=job.parent_dir, seed=job.seed, progress=one
            )
        except Exception as e:
            results[i] = e
    return [r if r is not None else TrainingError("not trained") for r in results]


class _Unsupported(Exception):
    """The user's LoRA has a feature the stacked layer does not implement."""


def _start(base: LoadedBase, settings: TrainingSettings, parent_dir: Path | None, seed: int) -> _Start:
    """The user's initial LoRA, created by peft on the shared base exactly as `train_adapter` creates it."""
    model = base.model
    device = next(model.parameters()).device
    with base_lock(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with user_lora(base, parent_dir, settings) as peft_model:
            config = copy.deepcopy(peft_model.peft_config[ADAPTER_NAME])
            if config.lora_dropout or config.use_dora or getattr(config, "lora_bias", False) or config.modules_to_save:
                raise _Unsupported("LoRA with dropout, DoRA, bias or modules_to_save")
            modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
            for name, module in peft_model.named_modules():
                if not isinstance(module, LoraLayer) or ADAPTER_NAME not in getattr(module, "lora_A", {}):
                    continue
                if not isinstance(module.get_base_layer(), nn.Linear) or getattr(module, "fan_in_fan_out", False):
                    raise _Unsupported(f"{name} is not a plain Linear")
                modules[name.removeprefix(_PREFIX)] = (
                    module.lora_A[ADAPTER_NAME].weight.detach().clone(),
                    module.lora_B[ADAPTER_NAME].weight.detach().clone(),
                    float(module.scaling[ADAPTER_NAME]),
                )
            keys: dict[str, tuple[str, str]] = {}
            for key in get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME):
                for kind in ("A", "B"):
                    path = key.removeprefix(_PREFIX).removesuffix(f".lora_{kind}.weight")
                    if path != key.removeprefix(_PREFIX) and path in modules:
                        keys[key] = (path, kind)
                        break
                else:
                    raise _Unsupported(f"adapter tensor {key} is not a LoRA A/B weight")
    return _Start(config, modules, keys)


def _train_group(
    base: LoadedBase,
    users: list[_User],
    settings: TrainingSettings,
    progress: Progress | None,
    heartbeat: Heartbeat | None,
) -> list[TrainResult | BaseException]:
    """Train users of one LoRA shape together (module docstring); results in the order of ``users``."""
    model = base.model
    device = next(model.parameters()).device
    pad_id = _pad_id(base.tokenizer)
    rows = _Rows()
    paths = sorted(users[0].start.modules)
    stacked: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}
    for path in paths:
        a = torch.stack([u.start.modules[path][0] for u in users]).to(device)
        b = torch.stack([u.start.modules[path][1] for u in users]).to(device)
        stacked[path] = (nn.Parameter(a), nn.Parameter(b))
    params = [p for pair in stacked.values() for p in pair]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    steps = torch.zeros(len(users), dtype=torch.float64)

    def fail(user: _User, error: BaseException) -> None:
        if user.error is None and not user.done:
            user.error, user.done = error, True
            log.warning("user %d failed at step %d: %s", user.index, user.step, error)

    def beat() -> None:
        if heartbeat is None:
            return
        for i, error in heartbeat().items():
            for user in users:
                if user.index == i:
                    fail(user, error)

    with base_lock(model), borrowed(model):
        for path in paths:
            parent, name = _parent(model, path)
            original = getattr(parent, name)
            scaling = torch.tensor([u.start.modules[path][2] for u in users], dtype=stacked[path][0].dtype)
            setattr(parent, name, StackedLoraLinear(original, *stacked[path], scaling.to(device), rows))
        best = [p.detach().clone() for p in params]

        def snapshot(slots: list[int]) -> None:
            index = torch.tensor(slots, device=device)
            for p, kept in zip(params, best, strict=True):
                kept.index_copy_(0, index, p.detach().index_select(0, index))

        def validate(group: list[_User]) -> dict[int, float]:
            items = [(slot, e) for slot, u in enumerate(users) if u in group for e in u.val]
            model.eval()
            with torch.no_grad():
                sums, counts = _nll_sums(model, rows, items, len(users), pad_id, device, settings, None, beat)
            model.train()
            return {slot: float(sums[slot]) / max(int(counts[slot]), 1) for slot, u in enumerate(users) if u in group}

        with_val = [u for u in users if u.val]
        if with_val:
            for slot, value in validate(with_val).items():
                users[slot].best_val = value
        started = time.perf_counter()
        model.train()
        for step in range(1, settings.max_steps + 1):
            active = [slot for slot, u in enumerate(users) if not u.done]
            if not active:
                break
            items = []
            for slot in active:
                u = users[slot]
                u.step = step
                items.extend((slot, u.train[i]) for i in next_batch(u.queue, len(u.train), u.batch_size, u.rng))
            sums, counts = _nll_sums(model, rows, items, len(users), pad_id, device, settings, params, beat)
            ok = []
            for slot in active:
                u = users[slot]
                value = float(sums[slot]) / max(int(counts[slot]), 1)
                if u.done:  # stopped by the heartbeat during the step
                    continue
                if not math.isfinite(value):
                    lr = settings.learning_rate
                    fail(u, TrainingError(f"training loss is {value} at step {step} (learning rate {lr}): not finite"))
                    continue
                u.losses.append(value)
                u.tokens += int(counts[slot])
                ok.append(slot)
            _adamw_step(params, moments, steps, ok, settings)
            for p in params:
                p.grad = None
            for slot in ok:
                u = users[slot]
                if progress is not None:
                    try:
                        progress(u.index, step, u.losses[-1])
                    except Exception as e:  # stops this user only
                        fail(u, e)
            due = step % settings.eval_every == 0 or step == settings.max_steps
            checking = [users[s] for s in ok if due and users[s].val and not users[s].done]
            if checking:
                improved = []
                for slot, value in validate(checking).items():
                    u = users[slot]
                    if not math.isfinite(value):
                        fail(u, TrainingError(f"validation loss is {value} at step {step}: not finite"))
                        continue
                    if value < u.best_val:
                        u.best_step, u.best_val, u.checks_without_gain = step, value, 0
                        improved.append(slot)
                    else:
                        u.checks_without_gain += 1
                    if u.checks_without_gain >= settings.patience and step < settings.max_steps:
                        u.stopped_early, u.done = True, True
                if improved:
                    snapshot(improved)
        seconds = time.perf_counter() - started
        # Each user keeps its best state (step 0 included) when it validated, else its last.
        out: list[TrainResult | BaseException] = []
        total_tokens = sum(u.tokens for u in users)
        for slot, u in enumerate(users):
            if u.error is not None:
                out.append(u.error)
                continue
            try:
                source = best if u.val else [p.detach() for p in params]
                if not u.val:
                    u.best_step = u.step
                tensors = {}
                dtype = _DTYPES[settings.save_dtype]
                for key, (path, kind) in u.start.keys.items():
                    a_or_b = source[paths.index(path) * 2 + (0 if kind == "A" else 1)]
                    tensors[key] = a_or_b[slot].detach().to("cpu", dtype).contiguous()
                out_dir = Path(u.job.out_dir)
                out_dir.mkdir(parents=True, exist_ok=True)
                save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
                save_adapter_config(u.start.config, out_dir)
                tail = u.losses[-min(len(u.losses), settings.eval_every) :]
                config = training_config(
                    settings,
                    u.start.config,
                    seed=u.job.seed,
                    weight_decay=_WEIGHT_DECAY,
                    batch_size=u.batch_size,
                    train_examples=len(u.train),
                    val_examples=len(u.val),
                    continued=u.job.parent_dir is not None,
                )
                config["batched_users"] = len(users)
                out.append(
                    TrainResult(
                        steps=u.step,
                        best_step=u.best_step,
                        train_loss=sum(tail) / len(tail),
                        val_loss=u.best_val if u.val else None,
                        tokens=u.tokens,
                        seconds=seconds,
                        tokens_per_s=u.tokens / seconds if seconds > 0 else 0.0,
                        examples=len(u.train) + len(u.val),
                        stopped_early=u.stopped_early,
                        config=config,
                    )
                )
            except Exception as e:
                out.append(e)
    log.info(
        "batched training of %d users: %d trained, %.1f s, %.0f tokens/s",
        len(users),
        sum(isinstance(r, TrainResult) for r in out),
        seconds,
        total_tokens / seconds if seconds > 0 else 0.0,
    )
    return out


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    head, _, name = path.rpartition(".")
    return (model.get_submodule(head) if head else model), name


def _micro_batches(items: list[tuple[int, EncodedExample]], budget: int) -> Iterable[list[tuple[int, EncodedExample]]]:
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


def _nll_sums(
    model: nn.Module,
    rows: _Rows,
    items: list[tuple[int, EncodedExample]],
    n_users: int,
    pad_id: int,
    device: torch.device,
    settings: TrainingSettings,
    params: list[nn.Parameter] | None,
    beat: Callable[[], None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per user: the sum of target-token NLL over its rows in ``items`` and its target-token count. With
    ``params``, also accumulates the gradient of sum over users of (NLL sum / token count) into them."""
    counts = torch.zeros(n_users, dtype=torch.long)
    counts.index_add_(0, torch.tensor([slot for slot, _ in items]), torch.tensor([_targets(e) for _, e in items]))
    weights = (1.0 / counts.clamp(min=1).double()).float().to(device)
    sums = torch.zeros(n_users, dtype=torch.float64, device=device)
    cuda = device.type == "cuda"
    for chunk in _micro_batches(items, settings.micro_batch_tokens):
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
        rows.index = slots
        try:
            with torch.enable_grad() if params is not None else contextlib.nullcontext():
                nll = _token_nll(model, ids, mask, positions, targets)
                if params is not None:
                    # where, not a product: a user whose loss is NaN must not spread it into the sum's gradient.
                    w = weights[token_slots]
                    loss = torch.where(torch.isfinite(nll), nll * w, torch.zeros_like(nll)).sum()
                    if loss.requires_grad:
                        loss.backward()
        finally:
            rows.index = None
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


def _token_nll(
    model: nn.Module,
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
def _adamw_step(
    params: list[nn.Parameter],
    moments: list[tuple[torch.Tensor, torch.Tensor]],
    steps: torch.Tensor,
    slots: list[int],
    settings: TrainingSettings,
) -> None:
    """Per-user gradient clipping, then torch.optim.AdamW's update, for the users in ``slots`` only."""
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
    beta1, beta2 = _BETAS
    lr = settings.learning_rate
    step_size = (lr / (1 - beta1**step)).to(device)
    correction2_sqrt = ((1 - beta2**step) ** 0.5).to(device)
    for p, g, (m_all, v_all) in zip(params, grads, moments, strict=True):
        shape = (-1, *([1] * (g.dim() - 1)))
        w = p.data.index_select(0, index)
        m = m_all.index_select(0, index)
        v = v_all.index_select(0, index)
        w.mul_(1 - lr * _WEIGHT_DECAY)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (v.sqrt() / correction2_sqrt.to(v.dtype).view(shape)).add_(_EPS)
        w.addcdiv_(m * step_size.to(m.dtype).view(shape), denom, value=-1.0)
        p.data.index_copy_(0, index, w)
        m_all.index_copy_(0, index, m)
        v_all.index_copy_(0, index, v)
