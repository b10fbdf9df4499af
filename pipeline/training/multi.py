"""Batched training: many users' LoRA adapters in one forward/backward pass on the one frozen base.

`train_adapters` trains K users at once and gives each the adapter `pipeline.training.lora.train_adapter` would
have given it alone (the same within float rounding; tests/unit/training/test_multi.py checks it against stock
peft). What makes that hold, per user:

- the same start: each user's LoRA is what peft creates for the single-user path (fresh from the user's seed, or
  the parent revision's directory), bit for bit, but built without a peft model (`_start`: the parent's files
  read directly, or peft's random draws replayed in its order; 24-34 ms a user instead of 0.8 s on a 2-core CPU
  for the SmolLM2-135M shape), then copied into one slot of stacked parameters;
- the same data: the user's own ``random.Random(seed)`` splits validation off and draws the example batches, and
  its own pair stream (`pipeline.training.lora.pairs_rng`) draws the pair batches, in the same order
  (`split_examples`, `encode_pairs`, `next_batch`);
- the same loss: the sum of the user's token NLL divided by the user's own token count, plus ``preference_weight``
  times the mean SimPO loss of the user's pairs of the step (`pipeline.training.lora`'s module docstring). A
  pair's chosen and rejected answers are two more rows of the user in the step's batch, reduced per row to their
  mean log-probability per target token. The step's rows of all users are cut into micro-batches (by padded
  tokens, to bound memory; a pair's two rows stay together) whose gradients add up, so a user's gradient is the
  one of its own loss (`pipeline.training.batching.nll_sums`);
- the same update: per-user gradient-norm clipping, and AdamW with per-user moments and step count (the
  arithmetic of ``torch.optim.AdamW``), applied only to the users still training (`batching.StackedWeights`: every
  user's LoRA tensors in one table, updated by a dozen kernels a step);
- the same stopping: validation (the NLL of the user's own validation examples; pairs are not held out) every
  ``eval_every`` steps; a user that stops early (or fails) drops out of the batch, the others go on, and the loop
  ends when none is left.

``progress`` reports each user's total loss of the step (NLL + weighted preference loss), as `train_adapter` does.

A forward runs the base once for all rows; every target ``nn.Linear`` is replaced, for the run only, by the
per-row LoRA layer the reference serving engine uses too, `pipeline.models.multilora.MultiLoraLinear`
(`multilora.wrap_linears`): ``base(x) + (x @ A[u]^T @ B[u]^T) * s[u]`` where ``u`` is the row's user, gathered per
row from the trainable stacked ``A [K, r, in]``, ``B [K, out, r]`` and per-user scaling ``s [K]`` with two batched
matmuls, as peft computes one LoRA (autograd sums each row's gradient into its user's slot). Logits are computed
only at positions that carry a label.

A user's failure (no usable example, a parent that does not load, a non-finite loss, a callback that raises)
fails that user alone: its result is the exception. Users whose LoRA the stacked layer cannot express (dropout,
DoRA, LoRA bias, ``modules_to_save``, non-Linear targets) are trained one by one by `train_adapter`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import random
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from torch import nn

from pipeline.config import TrainingSettings
from pipeline.domain.examples import Example, PreferencePair
from pipeline.models import encoding, fp8, multilora
from pipeline.models.attach import base_lock, borrowed
from pipeline.models.base import LoadedBase, gc_paused, varied_shape_attention
from pipeline.models.encoding import EncodedExample
from pipeline.models.multilora import LoraStack
from pipeline.training.batching import (
    ADAMW_WEIGHT_DECAY,
    PairRows,
    PendingSums,
    Row,
    StackedWeights,
    nll_sums,
    queue_sums,
    to_device,
)
from pipeline.training.fused import Fused, fused_layers
from pipeline.training.lora import (
    ADAPTER_NAME,
    SAVE_DTYPES,
    TrainingError,
    TrainResult,
    encode_pairs,
    lora_config_of,
    next_batch,
    pairs_rng,
    save_adapter_config,
    split_examples,
    train_adapter,
    training_config,
    user_lora,
)

log = logging.getLogger(__name__)

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class UserJob:
    """One user's training in a batch: like the arguments of `train_adapter`."""

    examples: list[Example]
    out_dir: Path
    parent_dir: Path | None
    seed: int
    pairs: Sequence[PreferencePair] = ()


#: After each of a user's steps: ``progress(user_index, step, loss)``; raising fails that user only.
Progress = Callable[[int, int, float], None]
#: Between micro-batches: returns the indices of users to stop now (e.g. whose lease was lost) with the reason.
Heartbeat = Callable[[], dict[int, BaseException]]


#: Per module path: where its A and B lie in a parent's table (first element, shape), for `_Start.where`.
Where = dict[str, tuple[int, tuple[int, ...], int, tuple[int, ...]]]


@dataclass(eq=False)
class _Start:
    """A user's LoRA as peft created it: config, per-module weights and scaling, and the saved key names.

    A parent read from its files is kept as its table (``table``: every value in fp32, ``where`` each module's A and
    B in it, ``scaling`` for all); ``modules`` then gives views of it. `_train_group` stacks the tables of a group
    whole (one copy) when they share one layout, instead of 420 tensors a user."""

    config: LoraConfig
    keys: dict[str, tuple[str, str]]  # state-dict key -> (path, "A" | "B")
    given: dict[str, tuple[torch.Tensor, torch.Tensor, float]] | None = None
    table: torch.Tensor | None = None
    where: Where | None = None
    scaling: float = 0.0
    known_signature: tuple | None = None

    @functools.cached_property
    def modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """path -> (A [r, in], B [out, r], scaling), on the host."""
        if self.given is not None:
            return self.given
        assert self.table is not None and self.where is not None
        t = self.table
        return {
            path: (t[a : a + math.prod(sa)].view(sa), t[b : b + math.prod(sb)].view(sb), self.scaling)
            for path, (a, sa, b, sb) in self.where.items()
        }

    @property
    def signature(self) -> tuple:
        if self.known_signature is not None:
            return self.known_signature
        return tuple((p, tuple(a.shape), tuple(b.shape), a.dtype) for p, (a, b, _) in sorted(self.modules.items()))


@dataclass(eq=False)
class _User:
    index: int
    job: UserJob
    train: list[EncodedExample]
    val: list[EncodedExample]
    rng: random.Random
    start: _Start
    pairs: list[tuple[EncodedExample, EncodedExample]]
    pair_rng: random.Random
    batch_size: int = 0
    pair_batch_size: int = 0
    queue: list[int] = field(default_factory=list)
    pair_queue: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    pair_losses: list[float] = field(default_factory=list)
    tokens: int = 0
    step: int = 0
    best_step: int = 0
    best_val: float = math.inf
    checks_without_gain: int = 0
    stopped_early: bool = False
    done: bool = False
    error: BaseException | None = None


@gc_paused()  # the batch's host work without full garbage collections in the middle (`gc_paused`)
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
    began = time.perf_counter()

    def prepare(job: UserJob) -> tuple[Any, ...] | BaseException:
        try:
            rng = random.Random(job.seed)
            train, val = split_examples(base.tokenizer, job.examples, settings, rng)
            pairs = encode_pairs(base.tokenizer, job.pairs, settings)
            return rng, train, val, pairs, _start(base, settings, job.parent_dir, job.seed)
        except Exception as e:
            return e

    # Users are prepared by a few threads: most of it is the tokenizer's batch encoding and reading the parents'
    # files, which release the GIL (each user's result depends on its job only).
    threads = _prepare_threads(len(jobs))
    lock: Any = base_lock(base.model)
    if threads == 1 or lock._is_owned():  # a caller holding the base's lock: threads would wait for it forever
        prepared = [prepare(job) for job in jobs]
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="train-prepare") as pool:
            prepared = list(pool.map(prepare, jobs))
    for i, (job, ready) in enumerate(zip(jobs, prepared, strict=True)):
        if isinstance(ready, _Unsupported):
            log.info("user %d: %s; trained on its own", i, ready)
            alone.append(i)
            continue
        if isinstance(ready, BaseException):  # one user's failure is that user's result
            results[i] = ready
            continue
        rng, train, val, pairs, start = ready
        batch_size, pair_batch_size = min(settings.batch_size, len(train)), min(settings.pair_batch_size, len(pairs))
        user = _User(i, job, train, val, rng, start, pairs, pairs_rng(job.seed), batch_size, pair_batch_size)
        users.append(user)

    log.info(
        "%d users prepared in %.2f s (examples encoded, starting LoRAs read)", len(users), time.perf_counter() - began
    )
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
                base,
                job.examples,
                job.out_dir,
                settings,
                parent_dir=job.parent_dir,
                seed=job.seed,
                pairs=job.pairs,
                progress=one,
            )
        except Exception as e:
            results[i] = e
    return [r if r is not None else TrainingError("not trained") for r in results]


def _prepare_threads(users: int) -> int:
    """Threads preparing a batch's users: up to 8, one per CPU core of this process, at most one per user."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores, users))


class _Unsupported(Exception):
    """The user's LoRA has a feature the stacked layer does not implement."""


def _start(base: LoadedBase, settings: TrainingSettings, parent_dir: Path | None, seed: int) -> _Start:
    """The user's initial LoRA, equal (bit for bit, config included) to what peft creates for `train_adapter`, without
    a peft model: the parent's files read directly, or a fresh LoRA drawn from the user's seed in peft's order.

    Wrapping the base in a ``PeftModel`` and unwrapping it cost 0.1-0.16 s of CPU per user (issue 18), under the
    base's lock, for every user of a batch. Whatever this path does not know how to mirror (non-Linear targets,
    LoRA options beyond r / alpha / rsLoRA / targets) goes to `_start_peft`, which is the reference
    (tests/unit/training/test_multi.py compares the two).
    """
    try:
        return _start_direct(base, settings, parent_dir, seed)
    except _NotDirect as e:
        log.debug("user LoRA through peft: %s", e)
        return _start_peft(base, settings, parent_dir, seed)


class _NotDirect(Exception):
    """`_start_direct` does not mirror this LoRA: `_start_peft` builds it."""


_DIRECT_KEYS = frozenset(
    {"r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "init_lora_weights", "bias", "use_dora",
     "peft_version", "auto_mapping",
     "modules_to_save", "fan_in_fan_out", "peft_type", "task_type", "inference_mode", "base_model_name_or_path",
     "revision", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern"}
)  # fmt: skip


@functools.cache
def _default_lora() -> dict[str, Any]:
    return LoraConfig().to_dict()


#: Per base model, its module names in order and its nn.Linear modules by name (`_modules_of`).
_MODULES: weakref.WeakKeyDictionary[nn.Module, tuple[list[str], dict[str, nn.Linear]]] = weakref.WeakKeyDictionary()


def _modules_of(model: nn.Module) -> tuple[list[str], dict[str, nn.Linear]]:
    """The model's module names in order and its nn.Linear modules by name, listed once per model (a base is never
    modified: two walks over its ~800 modules per user were a quarter of a 256-user batch's preparation)."""
    known = _MODULES.get(model)
    if known is None:
        with base_lock(model):  # not while another thread has wrapped its layers (they do so under this lock)
            named = list(model.named_modules())
        known = [name for name, _ in named], {name: m for name, m in named if isinstance(m, nn.Linear)}
        _MODULES[model] = known
    return known


def _start_direct(base: LoadedBase, settings: TrainingSettings, parent_dir: Path | None, seed: int) -> _Start:
    model = base.model
    names, linears = _modules_of(model)
    if parent_dir is not None:
        try:
            config = LoraConfig.from_pretrained(str(parent_dir))
            # One vector of fp32 values, its layout parsed once per header (a batch's parents share one).
            table = multilora.read_adapter_table(parent_dir, torch.float32)
        except (OSError, ValueError, TypeError, multilora.AdapterFormatError) as e:
            raise TrainingError(f"cannot load the parent adapter from {parent_dir}: {e}") from e
        config.inference_mode = False
    else:
        options: dict[str, Any] = {"r": settings.rank, "lora_alpha": settings.alpha}
        config = LoraConfig(
            **options, target_modules=settings.targets, lora_dropout=settings.dropout, task_type="CAUSAL_LM"
        )
        config.base_model_name_or_path = model.__dict__.get("name_or_path", None) or None  # as get_peft_model sets it
        table = None
    if config.lora_dropout or config.use_dora or getattr(config, "lora_bias", False) or config.modules_to_save:
        raise _Unsupported("LoRA with dropout, DoRA, bias or modules_to_save")
    default = _default_lora()
    odd = sorted(k for k, v in config.to_dict().items() if k not in _DIRECT_KEYS and v != default.get(k))
    if (
        odd
        or config.init_lora_weights is not True
        or config.layers_to_transform is not None
        or config.rank_pattern
        or config.alpha_pattern
        or config.fan_in_fan_out
        or not isinstance(config.target_modules, (set, list))
    ):
        raise _NotDirect(f"LoRA options beyond r, alpha, rsLoRA and a list of targets ({odd})")
    targets = set(config.target_modules)
    matched = [name for name in names if name.rsplit(".", 1)[-1] in targets]
    paths = [name for name in matched if name in linears]
    if len(paths) != len(matched):
        raise _NotDirect("a target module is not an nn.Linear")
    if not paths:
        raise TrainingError(f"cannot apply LoRA to targets {sorted(targets)}: no module of the base matches")
    r = int(config.r)
    scaling = float(config.lora_alpha / math.sqrt(r) if config.use_rslora else config.lora_alpha / r)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    device = next(model.parameters()).device
    if table is not None:
        try:
            where, keys, signature = _parent_plan(model, linears, tuple(paths), table.layout, r)
        except TrainingError as e:
            raise TrainingError(f"the parent adapter in {parent_dir} {e}") from e
        return _Start(config, keys, table=table.values, where=where, scaling=scaling, known_signature=signature)
    # peft's order and draws (LoraLayer.update_layer): per target in module order, nn.Linear(in, r) and
    # nn.Linear(r, out) are built (each draws its default kaiming init), then A is drawn again and B zeroed. From
    # torch's global generator, seeded and restored: one user at a time under the base's lock, as `_start_peft`
    # (users are prepared by several threads).
    with base_lock(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for path in paths:
            lin = linears[path]
            a = torch.empty(r, lin.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.kaiming_uniform_(torch.empty(lin.out_features, r), a=math.sqrt(5))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            b = torch.zeros(lin.out_features, r)
            modules[path] = (a, b, scaling)
    return _Start(config, _keys_of(tuple(paths)), given=modules)


@functools.lru_cache(maxsize=64)
def _keys_of(paths: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """The saved state-dict keys of LoRA on ``paths``: key -> (path, "A" | "B"). Shared: read only."""
    keys: dict[str, tuple[str, str]] = {}
    for path in paths:
        keys[f"{_PREFIX}{path}.lora_A.weight"] = (path, "A")
        keys[f"{_PREFIX}{path}.lora_B.weight"] = (path, "B")
    return keys


_Plan = tuple[Where, dict[str, tuple[str, str]], tuple]
#: `_parent_plan`'s results per base model, by (paths, layout, rank): a batch's parents share one layout.
_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[tuple[str, ...], tuple, int], _Plan]] = (
    weakref.WeakKeyDictionary()
)
_PLANS_LOCK = threading.Lock()


def _parent_plan(
    model: nn.Module, linears: dict[str, nn.Linear], paths: tuple[str, ...], layout: tuple, r: int
) -> _Plan:
    """(where each path's A and B lie in a parent's table of ``layout``, the saved keys, the group signature),
    checked once per layout: every path has its A [r, in] and B [out, r], and no other tensor is there. Raises
    TrainingError (the message continues "the parent adapter in DIR ...")."""
    key = (paths, layout, r)
    with _PLANS_LOCK:  # users are prepared by several threads
        known = _PLANS.setdefault(model, {})
        hit = known.get(key)
    if hit is not None:
        return hit
    at = {name: (first, tuple(shape)) for name, first, shape in layout}
    where: Where = {}
    for path in paths:
        lin = linears[path]
        try:
            (a, sa), (b, sb) = at[f"{path}.lora_A.weight"], at[f"{path}.lora_B.weight"]
        except KeyError:
            raise TrainingError(f"has no LoRA for {path}") from None
        if sa != (r, lin.in_features) or sb != (lin.out_features, r):
            raise TrainingError(
                f"does not fit the base at {path}: A {sa}, B {sb} for a Linear {lin.in_features} -> "
                f"{lin.out_features} at rank {r}"
            )
        where[path] = (a, sa, b, sb)
    extra = set(at) - {f"{p}.lora_{k}.weight" for p in paths for k in "AB"}
    if extra:
        raise TrainingError(f"has tensors the base has no place for: {sorted(extra)[:3]}")
    signature = tuple((p, where[p][1], where[p][3], torch.float32) for p in sorted(where))
    plan = (where, _keys_of(paths), signature)
    with _PLANS_LOCK:
        if len(known) >= 64:
            known.pop(next(iter(known)))
        known[key] = plan
    return plan


def _start_peft(base: LoadedBase, settings: TrainingSettings, parent_dir: Path | None, seed: int) -> _Start:
    """The user's initial LoRA, created by peft on the shared base exactly as `train_adapter` creates it."""
    model = base.model
    device = next(model.parameters()).device
    with base_lock(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with user_lora(base, parent_dir, settings) as peft_model:
            config = copy.deepcopy(lora_config_of(peft_model))
            if config.lora_dropout or config.use_dora or getattr(config, "lora_bias", False) or config.modules_to_save:
                raise _Unsupported("LoRA with dropout, DoRA, bias or modules_to_save")
            modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
            for name, module in peft_model.named_modules():
                if not isinstance(module, LoraLayer) or ADAPTER_NAME not in getattr(module, "lora_A", {}):
                    continue
                if not isinstance(module.get_base_layer(), nn.Linear) or getattr(module, "fan_in_fan_out", False):
                    raise _Unsupported(f"{name} is not a plain Linear")
                a: Any = module.lora_A[ADAPTER_NAME]  # nn.Linear in peft's ModuleDict
                b: Any = module.lora_B[ADAPTER_NAME]
                modules[name.removeprefix(_PREFIX)] = (
                    a.weight.detach().to("cpu", copy=True),
                    b.weight.detach().to("cpu", copy=True),
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
    return _Start(config, keys, given=modules)


class _Files:
    """The users' ``adapter_model.safetensors`` files of one training group, from the stacked parameters: each
    parameter comes to the host once, in the saved dtype, and every user's tensors are one contiguous row of one
    table, laid out in the order of a header that is the same for every user of the group (same keys, shapes and
    dtype). A user's file is that header and its row: what ``safetensors.torch.save_file`` writes (stock
    safetensors and peft read it; tests/unit/training/test_multi.py), without its per-tensor Python work (420
    tensors a user at r=1 on the seven projections: ~15 ms a user, the largest share of writing a 256-user wave).
    """

    def __init__(
        self,
        stacks: Sequence[torch.Tensor],
        keys: dict[str, tuple[str, str]],
        position: dict[str, int],
        dtype: torch.dtype,
    ) -> None:
        names = sorted(keys)  # the data in name order, as the header lists it
        parts = []
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        tag = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}[dtype]
        for name in names:
            path, kind = keys[name]
            stack = stacks[position[path] * 2 + (0 if kind == "A" else 1)]
            nbytes = stack[0].numel() * dtype.itemsize
            header[name] = {"dtype": tag, "shape": list(stack.shape[1:]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            parts.append(stack.detach().flatten(1))
        # the table [users, all of a user's values], built where the stacks are and copied to the host once
        self.table = torch.cat(parts, dim=1).to(dtype).cpu()
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # safetensors pads its header to 8 bytes
        self.head = len(encoded).to_bytes(8, "little") + encoded

    def write(self, slot: int, path: Path) -> None:
        """User ``slot``'s file at ``path``."""
        row = self.table[slot].view(torch.uint8).numpy()
        with open(path, "wb") as f:
            f.write(self.head)
            f.write(row.data)


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
    pad_id = encoding.pad_id(base.tokenizer)
    tensors: list[torch.Tensor] = []  # per module (sorted paths): A, then B, each [users, ...] on the device
    scalings: list[torch.Tensor] = []
    where = users[0].start.where
    if where is not None and all(u.start.where is where and u.start.table is not None for u in users):
        # Parents of one layout (a batch's usual case): their tables stacked and copied to the device whole, each
        # module's A and B taken from its columns (not 420 tensors a user stacked one module at a time).
        paths = sorted(where)
        table = torch.stack([u.start.table for u in users if u.start.table is not None]).to(device)
        scaling_of = torch.tensor([u.start.scaling for u in users], dtype=table.dtype).to(device)
        for path in paths:
            at_a, shape_a, at_b, shape_b = where[path]
            tensors.append(table[:, at_a : at_a + math.prod(shape_a)].reshape(len(users), *shape_a))
            tensors.append(table[:, at_b : at_b + math.prod(shape_b)].reshape(len(users), *shape_b))
            scalings.append(scaling_of)
        del table  # (its views in ``tensors`` go once the one table below is built)
    else:
        paths = sorted(users[0].start.modules)
        for path in paths:
            tensors.append(torch.stack([u.start.modules[path][0] for u in users]).to(device))
            tensors.append(torch.stack([u.start.modules[path][1] for u in users]).to(device))
            scaling = torch.tensor([u.start.modules[path][2] for u in users], dtype=tensors[-1].dtype)
            scalings.append(scaling.to(device))
    # One table of every user's LoRA values; the stacks the layers train are views of its columns.
    weights = StackedWeights(tensors)
    del tensors
    params = weights.params
    stacks = {path: LoraStack(params[2 * i], params[2 * i + 1], scalings[i]) for i, path in enumerate(paths)}

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

    fused = Fused.resolve(settings.fused_kernels, device)
    in_fp8 = settings.base_fp8 and settings.lora_branch == "base" and (fp8.device_supported(device) or fp8.EMULATE)
    if settings.base_fp8 and not in_fp8:
        log.warning("base_fp8 is set but %s has no FP8 GEMMs (or lora_branch is fp32): the base's dtype", device)
    # borrowed is the safety net: whatever happens, the base comes back exactly as it was.
    with (
        base_lock(model),
        borrowed(model),
        multilora.wrap_linears(model, stacks, native=settings.lora_branch == "base", fp8=in_fp8) as lora,
        fused_layers(model, fused) as patched,
        varied_shape_attention(),
    ):
        log.info(
            "batched training of %d users: %s (%d modules patched), LoRA branch in %s, base GEMMs in %s",
            len(users),
            fused.describe(),
            patched,
            settings.lora_branch,
            "fp8" if in_fp8 else "the base's dtype",
        )
        best = weights.table.clone()
        start = weights.table.clone() if settings.anchor > 0 else None

        def snapshot(slots: list[int]) -> None:
            index = to_device(torch.tensor(slots), device)
            best.index_copy_(0, index, weights.table.index_select(0, index))

        def validate(group: list[_User]) -> dict[int, float]:
            items = [(slot, e) for slot, u in enumerate(users) if u in group for e in u.val]
            model.eval()
            with torch.no_grad():
                sums = nll_sums(model, lora, items, len(users), pad_id, device, settings, None, beat, fused=fused)
            model.train()
            return {slot: sums.loss(slot, settings) for slot, u in enumerate(users) if u in group}

        with_val = [u for u in users if u.val]
        first_check = time.perf_counter()
        if with_val:
            for slot, value in validate(with_val).items():
                users[slot].best_val = value
        started = time.perf_counter()
        model.train()
        # A step's sums reach the host while the next step runs: its update is queued for every active user at
        # once, and its losses are read (`settle`) after the next step's work is queued, so the device does not idle
        # while the host reads them and builds the next micro-batches. A user whose loss proves not finite fails
        # then (its own rows took that update, and one more step: every operation is per user, so no other user
        # sees them; a failed user writes nothing). Steps with a validation wait for their sums first.
        pending: tuple[int, list[int], PendingSums] | None = None

        def settle() -> list[int]:
            """The pending step's losses, per user (waiting for them): a failure when not finite, progress; the
            users that stepped and did not fail."""
            nonlocal pending
            if pending is None:
                return []
            step, active, handle = pending
            pending = None
            sums = handle.wait()
            ok = []
            for slot in active:
                u = users[slot]
                value = sums.loss(slot, settings)
                if u.done:  # stopped by the heartbeat, or failed, since
                    continue
                if not math.isfinite(value):
                    lr = settings.learning_rate
                    fail(u, TrainingError(f"training loss is {value} at step {step} (learning rate {lr}): not finite"))
                    continue
                u.losses.append(value)
                if int(sums.pairs[slot]):
                    u.pair_losses.append(float(sums.preference[slot]) / int(sums.pairs[slot]))
                u.tokens += int(sums.tokens[slot])
                ok.append(slot)
            for slot in ok:
                u = users[slot]
                if progress is not None:
                    try:
                        progress(u.index, step, u.losses[-1])
                    except Exception as e:  # stops this user only
                        fail(u, e)
            return [slot for slot in ok if not users[slot].done]

        for step in range(1, settings.max_steps + 1):
            active = [slot for slot, u in enumerate(users) if not u.done]
            if not active:
                break
            items: list[Row] = []
            pairs: list[PairRows] = []
            for slot in active:
                u = users[slot]
                u.step = step
                items.extend((slot, u.train[i]) for i in next_batch(u.queue, len(u.train), u.batch_size, u.rng))
                if u.pairs:
                    drawn = next_batch(u.pair_queue, len(u.pairs), u.pair_batch_size, u.pair_rng)
                    pairs.extend((slot, *u.pairs[i]) for i in drawn)
            handle = queue_sums(model, lora, items, len(users), pad_id, device, settings, params, beat, pairs, fused)
            weights.step(active, settings, start)
            weights.zero_grad()
            settle()  # the step before this one
            pending = (step, active, handle)
            due = step % settings.eval_every == 0 or step == settings.max_steps
            if not due:
                continue
            checking = [users[s] for s in settle() if users[s].val]
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
        settle()
        seconds = time.perf_counter() - started
        fp8.forget_input()
        writing = time.perf_counter()
        # Each user keeps its best state (step 0 included) when it validated, else its last. Every stacked parameter
        # comes to the host once, in the saved dtype (not one small copy per user and tensor, each a wait).
        dtype = SAVE_DTYPES[settings.save_dtype]
        position = {path: i for i, path in enumerate(paths)}
        keys = users[0].start.keys  # one LoRA shape in a group: the same keys for every user
        stacked = {
            "best": _Files(weights.views(best), keys, position, dtype) if any(u.val for u in users) else None,
            "last": _Files(params, keys, position, dtype) if any(not u.val for u in users) else None,
        }
        out: list[TrainResult | BaseException] = []
        total_tokens = sum(u.tokens for u in users)
        # adapter_config.json's bytes, rendered once per distinct config (peft's save_pretrained with a deep copy
        # took ~3.5 ms a user; a group's users almost always share one config).
        config_files: list[tuple[LoraConfig, bytes]] = []

        def config_file(config: LoraConfig) -> bytes:
            for known, data in config_files:
                if known == config:
                    return data
            with tempfile.TemporaryDirectory() as scratch:
                save_adapter_config(config, Path(scratch))
                data = (Path(scratch) / "adapter_config.json").read_bytes()
            config_files.append((config, data))
            return data

        for slot, u in enumerate(users):
            if u.error is not None:
                out.append(u.error)
                continue
            try:
                files = stacked["best"] if u.val else stacked["last"]
                if files is None or u.start.keys != keys:
                    raise TrainingError(f"user {u.index}: its adapter's tensors are not those of its training group")
                if not u.val:
                    u.best_step = u.step
                out_dir = Path(u.job.out_dir)
                out_dir.mkdir(parents=True, exist_ok=True)
                files.write(slot, out_dir / "adapter_model.safetensors")
                (out_dir / "adapter_config.json").write_bytes(config_file(u.start.config))
                tail = u.losses[-min(len(u.losses), settings.eval_every) :]
                pair_tail = u.pair_losses[-min(len(u.pair_losses), settings.eval_every) :]
                config = training_config(
                    settings,
                    u.start.config,
                    seed=u.job.seed,
                    weight_decay=ADAMW_WEIGHT_DECAY,
                    batch_size=u.batch_size,
                    train_examples=len(u.train),
                    val_examples=len(u.val),
                    continued=u.job.parent_dir is not None,
                    pairs=len(u.pairs),
                    pair_batch_size=u.pair_batch_size,
                    base_fp8=in_fp8,
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
                        preference_loss=sum(pair_tail) / len(pair_tail) if pair_tail else None,
                        pairs=len(u.pairs),
                    )
                )
            except Exception as e:
                out.append(e)
    log.info(
        "batched training of %d users (%s): %d trained, %.1f s, %.0f tokens/s (the first validation %.2f s before; "
        "written in %.2f s)",
        len(users),
        fused.describe(),
        sum(isinstance(r, TrainResult) for r in out),
        seconds,
        total_tokens / seconds if seconds > 0 else 0.0,
        started - first_check,
        time.perf_counter() - writing,
    )
    return out
