"""LoRA training of one user's adapter on the shared base model. Reads top to bottom; no DB, no Kafka.

``train_adapter`` wraps the base in peft (a fresh LoRA, or the parent revision's adapter to continue from), trains
with AdamW on the LoRA tensors only, stops early on a validation slice, writes a standard PEFT directory and
returns what happened (``TrainResult``; its ``config`` is the manifest's ``training`` field).

The loss of a step is the next-token loss of the user's examples plus a preference loss on the user's pairs
(`pipeline.domain.examples.training_pairs`: chosen over rejected, edited over original)::

    loss = NLL + preference_weight * mean over the pairs of -logsigmoid(beta * (m(chosen) - m(rejected)) - gamma)

- NLL: the summed negative log-likelihood of the target tokens of the step's ``batch_size`` examples divided by
  their number (the mean per target token);
- m(answer): the mean log-probability per target token of an answer given the pair's prompt (its tokens and end of
  turn, prompt masked, encoded by `encode_example` exactly as the gate's preference accuracy scores it,
  `pipeline.evaluation.metrics.score_model`): SimPO (Meng et al. 2024), reference-free and length-normalised;
- beta, gamma: ``preference_beta`` and ``preference_margin``; ``pair_batch_size`` pairs per step, drawn from their
  own seeded stream (``random.Random(f"{seed}:pairs")``), so pairs never change which examples a step draws. With
  no pair, or ``preference_weight`` 0, the loss is the NLL alone, as before pairs existed.

Gradient clipping and AdamW act on the total. Validation and early stopping look at the NLL of the validation
examples only (pairs are not held out).

The base model is shared by everything in the process and must come back exactly as it was: peft injects its
layers into the base in place, so a training borrows the base through `pipeline.models.attach` (the base's
process-wide lock, held for the whole training, and an exact restore afterwards, whatever happened). While a
training runs, ``base.model`` holds LoRA layers: everything else in the process that attaches an adapter waits.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from pipeline.config import TrainingSettings
from pipeline.domain.errors import PersonaError
from pipeline.domain.examples import Example, PreferencePair
from pipeline.models import encoding
from pipeline.models.attach import AttachError, attached, base_lock, borrowed
from pipeline.models.base import LoadedBase
from pipeline.models.encoding import IGNORE, EncodedExample, encode_examples

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
#: The dtypes an adapter may be saved in (``TrainingSettings.save_dtype``).
SAVE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class TrainingError(PersonaError):
    """A training could not produce an adapter (no examples, a non-finite loss, a bad parent)."""


@dataclass(frozen=True)
class TrainResult:
    """What one training did. ``config`` is the manifest's ``training`` field (seed, LoRA shape, optimiser, the
    preference settings and ``pairs``, ...). ``train_loss`` is the mean total loss (NLL + weighted preference loss)
    of the last ``eval_every`` steps, ``preference_loss`` the mean SimPO loss per pair over those steps (None when
    no pair was trained on); ``tokens`` counts the examples' target tokens."""

    steps: int
    best_step: int
    train_loss: float
    val_loss: float | None
    tokens: int
    seconds: float
    tokens_per_s: float
    examples: int
    stopped_early: bool
    config: dict[str, Any] = field(default_factory=dict)
    preference_loss: float | None = None
    pairs: int = 0


def _nll_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((labels != IGNORE).sum())


def _row_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of its target-token NLL and its number of target tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    )
    return nll.view(labels.shape).sum(1), (labels != IGNORE).sum(1)


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, settings: TrainingSettings) -> torch.Tensor:
    """SimPO's loss of each pair, from the mean log-probability per target token of its chosen and rejected answers:
    ``-log sigmoid(preference_beta * (chosen - rejected) - preference_margin)``."""
    return -F.logsigmoid(settings.preference_beta * (chosen - rejected) - settings.preference_margin)


@torch.no_grad()
def mean_nll(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_length: int,
    batch_size: int = 8,
) -> float:
    """Mean negative log-likelihood per target token of ``examples`` under ``model`` (eval mode, no gradients)."""
    encoded = encode_examples(tokenizer, examples, max_length)
    return _mean_nll(model, encoded, encoding.pad_id(tokenizer), batch_size)


@torch.no_grad()
def _mean_nll(model: torch.nn.Module, encoded: Sequence[EncodedExample], pad_id: int, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(encoded), batch_size):
        loss, n = _nll_sum(model, encoding.collate(encoded[i : i + batch_size], pad_id, device))
        total, count = total + float(loss), count + n
    model.train(was_training)
    return total / max(count, 1)


def split_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], settings: TrainingSettings, rng: random.Random
) -> tuple[list[EncodedExample], list[EncodedExample]]:
    """(train, validation) encoded examples: a share drawn with ``rng`` is held out for validation when there are
    enough examples to spare some; train examples without a target token are dropped. ``rng`` then goes on to
    draw the batches (the batched trainer uses the same stream, so both trainers see the same batches)."""
    if not examples:
        raise TrainingError("no training examples: at least one train-split message, edit or liked feedback needed")
    order = list(range(len(examples)))
    rng.shuffle(order)
    n_val = 0
    if len(examples) >= 10 and settings.val_fraction > 0:
        n_val = max(1, round(settings.val_fraction * len(examples)))
    encoded = encode_examples(tokenizer, [examples[i] for i in order], settings.max_length)
    val, train = encoded[:n_val], encoded[n_val:]
    train = [e for e in train if any(label != IGNORE for label in e.labels[1:])]
    if not train:
        raise TrainingError(f"none of the {len(examples)} examples has a target token to train on")
    return train, val


def encode_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PreferencePair], settings: TrainingSettings
) -> list[tuple[EncodedExample, EncodedExample]]:
    """(chosen, rejected) of each pair, encoded as the gate scores them (``encode_example`` of ``Example(prompt,
    answer, event_id)``), in order. A pair is dropped when a side has no target token or both sides encode alike
    (e.g. truncated to the same tokens): it carries no preference. None at all when ``preference_weight`` is 0."""
    if settings.preference_weight == 0:
        return []
    sides = [Example(p.prompt, answer, p.event_id) for p in pairs for answer in (p.chosen, p.rejected)]
    encoded = encode_examples(tokenizer, sides, settings.max_length)
    out = []
    for chosen, rejected in zip(encoded[0::2], encoded[1::2], strict=True):
        if chosen != rejected and all(any(t != IGNORE for t in e.labels[1:]) for e in (chosen, rejected)):
            out.append((chosen, rejected))
    return out


def pairs_rng(seed: int) -> random.Random:
    """The stream that draws a user's pairs, apart from the examples' ``random.Random(seed)``."""
    return random.Random(f"{seed}:pairs")


def next_batch(queue: list[int], n_train: int, batch_size: int, rng: random.Random) -> list[int]:
    """The next ``batch_size`` indices of a walk through shuffled epochs (``queue`` is the epoch's remainder)."""
    batch_idx: list[int] = []
    while len(batch_idx) < batch_size:
        if not queue:
            queue.extend(range(n_train))
            rng.shuffle(queue)
        batch_idx.append(queue.pop())
    return batch_idx


@contextlib.contextmanager
def user_lora(base: LoadedBase, parent_dir: Path | None, settings: TrainingSettings) -> Iterator[PeftModel]:
    """The shared base with one user's trainable LoRA on it: the parent's weights (sha256-verified directory) or a
    fresh adapter from ``settings``. The base comes back unchanged on exit. Call under `base_lock`, seeded."""
    with contextlib.ExitStack() as borrow:
        if parent_dir is not None:
            try:
                peft_model = borrow.enter_context(attached(base, parent_dir, trainable=True))
            except AttachError as e:
                raise TrainingError(f"cannot load the parent adapter from {parent_dir}: {e}") from e
        else:
            borrow.enter_context(borrowed(base.model))
            # peft annotates lora_alpha as int, yet takes a float (PERSONA_TRAIN_ALPHA is one).
            options: dict[str, Any] = {"r": settings.rank, "lora_alpha": settings.alpha}
            lora = LoraConfig(
                **options, target_modules=settings.targets, lora_dropout=settings.dropout, task_type="CAUSAL_LM"
            )
            try:
                peft_model = get_peft_model(base.model, lora)
            except ValueError as e:
                raise TrainingError(f"cannot apply LoRA to targets {settings.targets}: {e}") from e
        if not isinstance(peft_model, PeftModel):  # pragma: no cover - attached() yields one for a directory
            raise TrainingError(f"the parent in {parent_dir} did not load as a peft model")
        yield peft_model


def lora_config_of(peft_model: PeftModel) -> LoraConfig:
    """The user's LoRA configuration; TrainingError when the adapter (e.g. a parent) is another kind of PEFT."""
    config = peft_model.peft_config[ADAPTER_NAME]
    if not isinstance(config, LoraConfig):
        raise TrainingError(f"the adapter is {type(config).__name__}, not LoRA: only LoRA adapters are trained")
    return config


def save_adapter_config(config: LoraConfig, out_dir: Path) -> None:
    """``out_dir/adapter_config.json`` as peft writes it (inference mode), with ``target_modules`` sorted: peft keeps
    them in a set, whose order follows the process's string-hash seed, so the same training would otherwise write
    files of different bytes (and sha256) in different processes."""
    saved = copy.deepcopy(config)
    saved.inference_mode = True
    saved.save_pretrained(str(out_dir))
    path = Path(out_dir) / "adapter_config.json"
    data = json.loads(path.read_text())
    if isinstance(data.get("target_modules"), list):
        data["target_modules"] = sorted(data["target_modules"])
        path.write_text(json.dumps(data, indent=2, sort_keys=True))


def train_adapter(
    base: LoadedBase,
    examples: list[Example],
    out_dir: Path,
    settings: TrainingSettings,
    *,
    parent_dir: Path | None,
    seed: int,
    pairs: Sequence[PreferencePair] = (),
    progress: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter on ``examples`` (and ``pairs``) and save it to ``out_dir`` as a standard PEFT directory.

    The loss is the examples' NLL plus the weighted SimPO loss of ``pairs`` (module docstring); pairs alone are not
    enough: at least one example is needed. With ``parent_dir`` (the user's serving revision), training continues
    from that adapter and its LoRA config (rank, alpha, targets) wins over ``settings``; without, a fresh LoRA is
    initialised from ``seed``. The same inputs give the same adapter bytes on CPU. ``base.model`` is unchanged
    afterwards. ``progress(step, loss)`` is called after each optimiser step with the step's total loss. Raises
    TrainingError when there is no example to train on or the loss stops being finite.
    """
    if not examples:
        raise TrainingError("no training examples: at least one train-split message, edit or liked feedback needed")
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    out_dir = Path(out_dir)
    model = base.model
    device = next(model.parameters()).device
    tokenizer = base.tokenizer
    pad_id = encoding.pad_id(tokenizer)

    rng = random.Random(seed)
    train, val = split_examples(tokenizer, examples, settings, rng)
    batch_size = min(settings.batch_size, len(train))
    pair_rows = encode_pairs(tokenizer, pairs, settings)
    pair_rng = pairs_rng(seed)
    pair_batch_size = min(settings.pair_batch_size, len(pair_rows))

    # The lock is taken before seeding: another borrower's peft initialisation would draw from the same RNG.
    with base_lock(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with user_lora(base, parent_dir, settings) as peft_model:
            lora_config = lora_config_of(peft_model)
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=settings.learning_rate)
            named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
            start = [p.detach().clone() for p in params] if settings.anchor > 0 else []

            def snapshot() -> dict[str, torch.Tensor]:
                return {n: p.detach().clone() for n, p in named}

            # Step 0 is a check too: if training never beats the starting point, the starting point is kept.
            best_state, best_step, best_val, checks_without_gain = snapshot(), 0, math.inf, 0
            if val:
                best_val = _mean_nll(peft_model, val, pad_id, batch_size)
                log.info("step 0: validation loss %.4f (%d examples)", best_val, len(val))

            # Batches walk through shuffled epochs; a new epoch reshuffles. Pairs walk their own epochs.
            queue: list[int] = []
            pair_queue: list[int] = []
            losses: list[float] = []
            pair_losses: list[float] = []
            tokens = 0
            stopped_early = False
            step = 0
            peft_model.train()
            started = time.perf_counter()
            for step in range(1, settings.max_steps + 1):
                batch_idx = next_batch(queue, len(train), batch_size, rng)
                batch = encoding.collate([train[i] for i in batch_idx], pad_id, device)
                loss_sum, n_tokens = _nll_sum(peft_model, batch)
                loss = loss_sum / max(n_tokens, 1)
                if pair_rows:
                    drawn = next_batch(pair_queue, len(pair_rows), pair_batch_size, pair_rng)
                    rows = [side for i in drawn for side in pair_rows[i]]  # chosen, rejected, chosen, ...
                    sums, counts = _row_nll(peft_model, encoding.collate(rows, pad_id, device))
                    mean_logp = -sums / counts
                    pair_loss = preference_loss(mean_logp[0::2], mean_logp[1::2], settings).mean()
                    pair_losses.append(float(pair_loss.detach()))
                    loss = loss + settings.preference_weight * pair_loss
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(
                        f"training loss is {value} at step {step} (learning rate {settings.learning_rate}): not finite"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                if settings.anchor > 0:  # decoupled, like AdamW's weight decay, but towards the start
                    with torch.no_grad():
                        for p, p0 in zip(params, start, strict=True):
                            p.sub_(p - p0, alpha=settings.learning_rate * settings.anchor)
                tokens += n_tokens
                losses.append(value)
                elapsed = time.perf_counter() - started
                log.info(
                    "step %d/%d: loss %.4f, %.0f tokens/s", step, settings.max_steps, losses[-1], tokens / elapsed
                )
                if progress is not None:
                    progress(step, losses[-1])

                if val and (step % settings.eval_every == 0 or step == settings.max_steps):
                    val_loss = _mean_nll(peft_model, val, pad_id, batch_size)
                    if not math.isfinite(val_loss):
                        raise TrainingError(f"validation loss is {val_loss} at step {step}: not finite")
                    if val_loss < best_val:
                        best_state, best_step, best_val, checks_without_gain = snapshot(), step, val_loss, 0
                    else:
                        checks_without_gain += 1
                    log.info(
                        "step %d: validation loss %.4f (best %.4f at step %d)", step, val_loss, best_val, best_step
                    )
                    if checks_without_gain >= settings.patience and step < settings.max_steps:
                        stopped_early = True
                        break
            seconds = time.perf_counter() - started
            if val:
                with torch.no_grad():
                    for n, p in named:
                        p.copy_(best_state[n])
            else:
                best_step = step

            # Save copies of the LoRA tensors in the storage dtype; the model itself stays in its own dtype.
            dtype = SAVE_DTYPES[settings.save_dtype]
            state = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME)
            tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}
            out_dir.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
            save_adapter_config(lora_config, out_dir)

    tail = losses[-min(len(losses), settings.eval_every) :]
    pair_tail = pair_losses[-min(len(pair_losses), settings.eval_every) :]
    result = TrainResult(
        steps=step,
        best_step=best_step,
        train_loss=sum(tail) / len(tail),
        val_loss=best_val if val else None,
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds > 0 else 0.0,
        examples=len(train) + len(val),
        stopped_early=stopped_early,
        config=training_config(
            settings,
            lora_config,
            seed=seed,
            weight_decay=optimizer.defaults["weight_decay"],
            batch_size=batch_size,
            train_examples=len(train),
            val_examples=len(val),
            continued=parent_dir is not None,
            pairs=len(pair_rows),
            pair_batch_size=pair_batch_size,
        ),
        preference_loss=sum(pair_tail) / len(pair_tail) if pair_tail else None,
        pairs=len(pair_rows),
    )
    log.info(
        "trained %d steps (best %d) on %d examples and %d pairs: train loss %.4f, validation loss %s, %.1f s, "
        "%.0f tokens/s",
        result.steps,
        result.best_step,
        result.examples,
        result.pairs,
        result.train_loss,
        f"{best_val:.4f}" if val else "-",
        seconds,
        result.tokens_per_s,
    )
    return result


def training_config(
    settings: TrainingSettings,
    lora_config: LoraConfig,
    *,
    seed: int,
    weight_decay: float,
    batch_size: int,
    train_examples: int,
    val_examples: int,
    continued: bool,
    pairs: int,
    pair_batch_size: int,
    base_fp8: bool = False,
) -> dict[str, Any]:
    """The manifest's ``training`` field of one adapter (both trainers report the same keys). ``pairs``: the pairs
    trained on (0 without any, or with ``preference_weight`` 0); ``pair_batch_size``: pairs per step; ``base_fp8``:
    whether the base's projections ran in FP8 (`pipeline.models.fp8`)."""
    targets = lora_config.target_modules
    return {
        "seed": seed,
        "rank": int(lora_config.r),
        "alpha": float(lora_config.lora_alpha),
        "targets": sorted(targets or []) if not isinstance(targets, str) else [targets],
        "dropout": float(lora_config.lora_dropout),
        "lr": settings.learning_rate,
        "optimizer": "adamw",
        "weight_decay": weight_decay,
        "max_grad_norm": settings.max_grad_norm,
        "anchor": settings.anchor,
        "batch_size": batch_size,
        "max_length": settings.max_length,
        "max_steps": settings.max_steps,
        "eval_every": settings.eval_every,
        "patience": settings.patience,
        "val_fraction": settings.val_fraction,
        "train_examples": train_examples,
        "val_examples": val_examples,
        "continued_from_parent": continued,
        "preference_objective": "simpo",
        "preference_weight": settings.preference_weight,
        "preference_beta": settings.preference_beta,
        "preference_margin": settings.preference_margin,
        "pair_batch_size": pair_batch_size,
        "base_fp8": base_fp8,
        "pairs": pairs,
        "save_dtype": settings.save_dtype,
        "dtype": settings.save_dtype,
        "peft_version": peft.__version__,
        "torch_version": torch.__version__,
    }
