"""Metrics of a revision on its user's holdout split, and of its drift from the base: the inputs of the gate.

Numbers per model (the candidate revision, the revision serving now, the base), all on the same evidence:

- ``holdout_nll``: mean negative log-likelihood per target token of the holdout events that give a target
  (`pipeline.domain.examples.example_of`), encoded exactly as in training (`pipeline.models.encoding`, the chat
  form they are served in, prompt masked): lower means the model writes more like the user;
- ``holdout_nll_prior`` / ``holdout_nll_new``: the same over the holdout events the parent revision had seen
  (``seq <= parent_last_seq``: what the user wrote before this round) and over this round's holdout events. A
  candidate trained on a round of foreign or random text gets better on the new ones and worse on the prior ones;
- ``preference_accuracy``: share of the holdout preference pairs (preferences, and edits: edited over original)
  where the model gives the chosen answer a higher mean log-probability per token than the rejected one;
- ``general_nll``: mean NLL per token of fixed general answers to general requests (``general:`` in the probe
  file, `load_general`): what a personal model must keep, answering ordinary requests well;
- ``drift_kl``: mean KL(p_base || p_model) of the next-token distributions over every position of fixed probe
  prompts unrelated to any user (`load_probes`): how far an adapter moves the base's general behaviour (reported;
  a personal style moves it by design, so the default rules judge ``general_nll`` instead).

And, for the candidate only, two properties of the round's new training events:

- ``new_shift``: how much less likely the new train events' targets are than the prior holdout's under the revision
  serving now (ratio of mean NLLs, minus 1): ~0 for more of the same user, large for a sudden change of writer;
  over at most `SHIFT_EVENTS` of the new events (`shift_examples`: a sample of a larger round, so that a round's
  size does not set the gate's cost; the default rule's bound, 1.0, lies far from both sides' measured values);
- ``new_repeat_share``: the share of the new train events' targets taken by the most repeated text (case and spacing
  ignored): one message sent again and again gives 1.0, a user who writes from a few templates well under half.

``paired`` compares the candidate with each reference (``current``, ``base``) event by event: the relative gain of
``holdout_nll`` (and of its prior/new parts) with a one-sided 95% bootstrap interval over the holdout events
(`paired_gain`), so that a rule can ask for a gain that is not noise (``paired: true`` in the rules).

Everything runs in eval mode under ``torch.no_grad()``, in a fixed order and batching, so the same inputs give the
same numbers. Adapters are attached to the shared base one at a time (`pipeline.models.attach.attached`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from transformers import PreTrainedTokenizerBase

from pipeline import config
from pipeline.domain.errors import PersonaError
from pipeline.domain.examples import Example, TrainingEvent, example_of, preference_pairs
from pipeline.models import encoding, fused_layers, packed, shared_prefix
from pipeline.models.attach import attached, base_lock, borrowed
from pipeline.models.base import LoadedBase, gc_paused, varied_shape_attention
from pipeline.models.encoding import IGNORE, EncodedExample, encode_examples

log = logging.getLogger(__name__)

#: The metric keys of one model in `evaluate`'s result (and in the gating rules).
METRIC_KEYS: tuple[str, ...] = (
    "holdout_nll",
    "holdout_nll_prior",
    "holdout_nll_new",
    "preference_accuracy",
    "general_nll",
    "drift_kl",
)
#: The holdout metrics compared event by event in ``paired`` (and the subset of the holdout each one covers).
PAIRED: dict[str, str] = {"holdout_nll": "all", "holdout_nll_prior": "prior", "holdout_nll_new": "new"}
#: Bootstrap resamples and one-sided confidence of the paired intervals.
BOOTSTRAP_SAMPLES, CONFIDENCE = 2000, 0.95
#: At most this many of a round's new train events are scored under the serving revision for ``new_shift``
#: (`shift_examples`): a larger round is sampled, the same events on every path and every retry. 0: all of them.
SHIFT_EVENTS = 32


class MetricsError(PersonaError):
    """Metrics cannot be computed: unreadable probe file, events that are not holdout evidence."""


@dataclass(frozen=True)
class ModelScores:
    """What `score_model` measured for one model; None where there was nothing to measure."""

    holdout_nll: float | None
    holdout_examples: int
    holdout_tokens: int
    preference_accuracy: float | None
    preference_pairs: int
    drift_kl: float | None
    probe_tokens: int
    holdout_nll_prior: float | None = None
    holdout_nll_new: float | None = None
    general_nll: float | None = None
    general_tokens: int = 0
    #: Per holdout example with a target, in event order: (sum of target log-probs, target tokens, prior?).
    per_example: tuple[tuple[float, int, bool], ...] = ()

    def metrics(self) -> dict[str, float | None]:
        """The gate's view: ``METRIC_KEYS`` as plain floats or None."""
        return {k: getattr(self, k) for k in METRIC_KEYS}


def default_probes_path() -> Path:
    """``infra/gating/probes.yaml`` of this checkout."""
    return config.ROOT / "infra" / "gating" / "probes.yaml"


def load_general(path: Path | None = None) -> list[Example]:
    """The general requests and answers of ``path`` (default `default_probes_path`): its ``general:`` list of
    ``{prompt, answer}`` mappings, as examples (event ids ``general-<i>``). An empty list when the file has none.

    Raises MetricsError naming the file when it is unreadable or an entry is not two non-empty strings.
    """
    path = Path(path) if path is not None else default_probes_path()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise MetricsError(f"cannot read the general answers in {str(path)!r}: {e}") from e
    items = data.get("general") if isinstance(data, dict) else None
    if items is None:
        return []
    ok = isinstance(items, list) and all(
        isinstance(i, dict)
        and set(i) == {"prompt", "answer"}
        and all(isinstance(v, str) and v.strip() for v in i.values())
        for i in items
    )
    if not ok:
        raise MetricsError(f"{str(path)!r}: `general:` must be a list of mappings with a non-empty prompt and answer")
    return [Example(i["prompt"], i["answer"], f"general-{n}") for n, i in enumerate(items)]


def load_probes(path: Path | None = None) -> list[str]:
    """The probe prompts of ``path`` (default `default_probes_path`): a YAML mapping with a list ``probes:``.

    Raises MetricsError naming the file when it is missing, not YAML, or not a non-empty list of non-empty strings.
    """
    path = Path(path) if path is not None else default_probes_path()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise MetricsError(f"cannot read the probe prompts in {str(path)!r}: {e}") from e
    probes = data.get("probes") if isinstance(data, dict) else None
    if not isinstance(probes, list) or not probes or not all(isinstance(p, str) and p.strip() for p in probes):
        raise MetricsError(f"{str(path)!r} must hold a mapping with `probes:`, a non-empty list of non-empty strings")
    return list(probes)


# ---- scoring ----------------------------------------------------------------------------------------------------


def _batches(
    seqs: Sequence[list[int]], pad_id: int, batch_size: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(start index, input ids, attention mask) of right-padded batches, in order."""
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        yield start, ids.to(device), mask.to(device)


def _forward(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


def _target_logprobs(
    model: torch.nn.Module, encoded: Sequence[EncodedExample], pad_id: int, batch_size: int
) -> list[tuple[float, int]]:
    """(sum of log-probs, number) of each example's target tokens: the labels that are not IGNORE, as in training."""
    device = next(model.parameters()).device
    # Batched by length (little padding), answered in the given order.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    ranked = [encoded[i] for i in order]
    out: list[tuple[float, int]] = [(0.0, 0)] * len(encoded)
    for start, ids, mask in _batches([e.input_ids for e in ranked], pad_id, batch_size, device):
        logprobs = F.log_softmax(_forward(model, ids, mask)[:, :-1], dim=-1)
        for row, example in enumerate(ranked[start : start + len(ids)]):
            labels = torch.tensor(example.labels[1:], dtype=torch.long, device=device)
            keep = labels != IGNORE
            picked = logprobs[row, : len(labels)].gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out[order[start + row]] = (float(picked[keep].double().sum()), int(keep.sum()))
    return out


def probe_ids(tokenizer: PreTrainedTokenizerBase, probes: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each probe as a model sees it before answering: a user turn and the generation prompt.

    Without a chat template, the probe is plain text. A probe longer than ``max_length`` keeps its end (the
    generation prompt).
    """
    out = []
    for probe in probes:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": probe}], tokenize=False, add_generation_prompt=True
            )
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
        out.append(ids[-max_length:])
    return out


@torch.no_grad()
def probe_logits(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    probes: Sequence[str],
    *,
    max_length: int = 128,
    batch_size: int = 8,
) -> list[torch.Tensor]:
    """Per probe, the log-probabilities ``[positions, vocab]`` (float32, CPU) of the next token at every position.

    Computed once for the base and passed to `score_model` as ``base_logits``. The model is put in eval mode for
    the call and its modes are restored.
    """
    with _eval_mode(model):
        device = next(model.parameters()).device
        seqs = probe_ids(tokenizer, probes, max_length)
        out: list[torch.Tensor] = []
        for _, ids, mask in _batches(seqs, encoding.pad_id(tokenizer), batch_size, device):
            logprobs = F.log_softmax(_forward(model, ids, mask), dim=-1).cpu()
            out.extend(logprobs[row, : int(mask[row].sum())].clone() for row in range(len(ids)))
        return out


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for a while; every module's train/eval flag comes back as it was."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@torch.no_grad()
def score_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    holdout_events: Sequence[TrainingEvent],
    probes: Sequence[str],
    base_logits: Sequence[torch.Tensor] | None = None,
    max_length: int = 128,
    batch_size: int = 8,
    parent_last_seq: int | None = None,
    general: Sequence[Example] = (),
) -> ModelScores:
    """Score ``model`` (the base, or the base with an adapter attached) on a user's holdout events and the probes.

    - ``holdout_nll``: total NLL of the target tokens of the events with a target (`example_of`), divided by their
      number (``holdout_tokens``); the prompt is masked exactly as in training; None when no event has a target.
      Equal, up to float rounding, to `pipeline.training.lora.mean_nll` on the same examples.
      ``holdout_nll_prior`` and ``holdout_nll_new`` are the same over the events with ``seq <= parent_last_seq``
      and the others (prior is None without ``parent_last_seq``); ``per_example`` keeps each example's numbers.
    - ``preference_accuracy``: over ``preference_pairs(holdout_events)``, the share of pairs where the chosen
      answer's mean log-probability per token (its tokens and end of turn, given the prompt, as in training) is
      strictly above the rejected one's; the per-token mean keeps a longer answer from losing by its length alone.
      None when there is no pair.
    - ``general_nll``: mean NLL per target token of the ``general`` examples (None without any).
    - ``drift_kl``: mean over every position of every probe of KL(p_base || p_model) in nats, ``base_logits`` being
      `probe_logits` of the base (raw logits are accepted too); None when ``base_logits`` is None or there are no
      probes. 0.0 for the base itself.

    The model is scored in eval mode (its modes are restored afterwards), without gradients, in a fixed order.
    """
    pad_id = encoding.pad_id(tokenizer)
    with _eval_mode(model):
        scored_events = [(e, x) for e, x in ((e, example_of(e)) for e in holdout_events) if x is not None]
        encoded = encode_examples(tokenizer, [x for _, x in scored_events], max_length)
        scored = _target_logprobs(model, encoded, pad_id, batch_size) if encoded else []
        prior = [parent_last_seq is not None and e.seq <= parent_last_seq for e, _ in scored_events]

        pairs = preference_pairs(holdout_events)
        answers: list[tuple[float, int]] = []
        if pairs:
            sides = [Example(p.prompt, answer, p.event_id) for p in pairs for answer in (p.chosen, p.rejected)]
            answers = _target_logprobs(model, encode_examples(tokenizer, sides, max_length), pad_id, batch_size)

        general_rows: list[tuple[float, int]] = []
        if general:
            general_rows = _target_logprobs(model, encode_examples(tokenizer, general, max_length), pad_id, batch_size)

        drift_kl, probe_tokens = None, 0
        if base_logits is not None and probes:
            if len(base_logits) != len(probes):
                raise MetricsError(f"base_logits has {len(base_logits)} entries for {len(probes)} probes")
            mine = probe_logits(model, tokenizer, probes, max_length=max_length, batch_size=batch_size)
            total = 0.0
            for ref, got_lp in zip(base_logits, mine, strict=True):
                ref_lp = F.log_softmax(ref.float(), dim=-1)
                total += float(F.kl_div(got_lp, ref_lp, log_target=True, reduction="sum").double())
                probe_tokens += got_lp.shape[0]
            drift_kl = max(total / probe_tokens, 0.0) if probe_tokens else None

    return _scores(
        scored, prior, parent_last_seq is not None, answers, _nll_of(general_rows), (drift_kl, probe_tokens)
    )


def _scores(
    holdout: Sequence[tuple[float, int]],
    prior: Sequence[bool],
    with_prior: bool,
    answers: Sequence[tuple[float, int]],
    general: tuple[float | None, int],
    drift: tuple[float | None, int],
) -> ModelScores:
    """One model's scores from its rows, as `score_model` and the stacked gate both end: each holdout example's (sum
    of target log-probs, target tokens) and whether it is prior to the parent, the preference answers' rows in
    (chosen, rejected) order, the general NLL and tokens, the drift and probe tokens."""
    per_example = tuple((lp, n, p) for (lp, n), p in zip(holdout, prior, strict=True))
    n_pairs = len(answers) // 2
    accuracy = None
    if n_pairs:
        per_token = [lp / n if n else -math.inf for lp, n in answers]
        accuracy = sum(per_token[2 * k] > per_token[2 * k + 1] for k in range(n_pairs)) / n_pairs
    return ModelScores(
        holdout_nll=_mean_nll_of(per_example),
        holdout_examples=len(holdout),
        holdout_tokens=sum(n for _, n in holdout),
        preference_accuracy=accuracy,
        preference_pairs=n_pairs,
        drift_kl=drift[0],
        probe_tokens=drift[1],
        holdout_nll_prior=_mean_nll_of([x for x in per_example if x[2]]) if with_prior else None,
        holdout_nll_new=_mean_nll_of([x for x in per_example if not x[2]]),
        general_nll=general[0],
        general_tokens=general[1],
        per_example=per_example,
    )


def _nll_of(rows: Sequence[tuple[float, int]]) -> tuple[float | None, int]:
    """(mean NLL per target token or None without tokens, target tokens) of (sum of log-probs, tokens) rows."""
    tokens = sum(n for _, n in rows)
    return (-sum(lp for lp, _ in rows) / tokens if tokens else None), tokens


def _mean_nll_of(rows: Sequence[tuple[float, int, bool]]) -> float | None:
    tokens = sum(n for _, n, _ in rows)
    return -sum(s for s, _, _ in rows) / tokens if tokens else None


def paired_gain(
    candidate: Sequence[tuple[float, int]],
    reference: Sequence[tuple[float, int]],
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> dict[str, float | int] | None:
    """The candidate's relative gain in NLL per token over the reference on the same examples, with a bootstrap
    interval over examples: ``{"gain", "low", "high", "events"}`` (None without examples or target tokens).

    ``candidate`` and ``reference`` are each example's (sum of target log-probs, target tokens), in the same order.
    gain = (NLL_ref - NLL_cand) / NLL_ref over the pooled tokens (0.05: 5% better). ``low`` and ``high`` are the
    (1 - confidence) and confidence quantiles of the gain over ``samples`` resamples of the examples with
    replacement (each a one-sided bound at ``confidence``). The resampling is seeded: the same inputs give the same
    interval everywhere.
    """
    if len(candidate) != len(reference):
        raise MetricsError(f"paired scores of different lengths: {len(candidate)} and {len(reference)}")
    if not candidate:
        return None
    both = np.array([[-c for c, _ in candidate], [-r for r, _ in reference]], dtype=np.float64)  # [2, n]
    cand_total, ref_total = float(both[0].sum()), float(both[1].sum())
    if ref_total <= 0:
        return None
    gain = (ref_total - cand_total) / ref_total
    # Each resample's sums: how often it drew each example, times the values (the counts are kept per size and
    # seed; the gate asks this ~6 times per candidate, mostly of a few sizes).
    n = len(candidate)
    counts = _resample_counts(n, samples, seed) if n * samples <= 2**20 else _draw_counts(n, samples, seed)
    sums = counts @ both.T  # [samples, 2]: candidate, reference
    ref_s = sums[:, 1]
    gains = np.sort((ref_s - sums[:, 0]) / np.maximum(ref_s, 1e-12))
    lo = float(gains[math.floor((1 - confidence) * (samples - 1))])
    hi = float(gains[math.ceil(confidence * (samples - 1))])
    return {"gain": gain, "low": lo, "high": hi, "events": len(candidate)}


@functools.lru_cache(maxsize=64)
def _resample_counts(n: int, samples: int, seed: int) -> np.ndarray:
    """`_draw_counts`, kept (up to 8 MiB each). Read only."""
    counts = _draw_counts(n, samples, seed)
    counts.setflags(write=False)
    return counts


def _draw_counts(n: int, samples: int, seed: int) -> np.ndarray:
    """``[samples, n]`` float64: how many times each of ``n`` examples is drawn in each bootstrap resample (with
    replacement, seeded: the draws are torch's ``randint`` from ``seed``, the same everywhere)."""
    idx = torch.randint(n, (samples, n), generator=torch.Generator().manual_seed(seed)).numpy()
    counts = np.zeros((samples, n), dtype=np.float64)
    np.add.at(counts, (np.arange(samples)[:, None], idx), 1.0)
    return counts


def _paired(cand: ModelScores, ref: ModelScores) -> dict[str, dict[str, float | int] | None]:
    """`paired_gain` of the candidate over one reference for each holdout metric of ``PAIRED``."""
    out: dict[str, dict[str, float | int] | None] = {}
    for metric, subset in PAIRED.items():
        keep = [
            i for i, (_, _, prior) in enumerate(cand.per_example) if subset == "all" or prior == (subset == "prior")
        ]
        c = [cand.per_example[i][:2] for i in keep]
        r = [ref.per_example[i][:2] for i in keep]
        out[metric] = paired_gain(c, r)
    return out


def _repeat_share(events: Sequence[TrainingEvent]) -> float | None:
    """The share of the events' targets taken by the most frequent one (case and spacing ignored)."""
    texts = [" ".join(x.target.split()).casefold() for x in (example_of(e) for e in events) if x is not None]
    return max(Counter(texts).values()) / len(texts) if texts else None


# ---- the gate's input -------------------------------------------------------------------------------------------


def evaluate(
    base: LoadedBase,
    *,
    candidate_dir: Path,
    current_dir: Path | None,
    holdout_events: Sequence[TrainingEvent],
    train_events_count: int,
    new_events_count: int,
    probes: list[str],
    max_length: int = 128,
    min_preference_pairs: int = 1,
    parent_last_seq: int | None = None,
    new_events: Sequence[TrainingEvent] = (),
    general: Sequence[Example] | None = None,
    shift_events: int = SHIFT_EVENTS,
) -> dict[str, Any]:
    """Metrics of the candidate adapter, the current production adapter (if any) and the base: the gate's input.

    With fewer than ``min_preference_pairs`` holdout pairs, preference_accuracy is reported as missing (None) for
    all three: an accuracy over a handful of pairs moves in steps of 1/n and would decide on noise.

    ``candidate_dir`` and ``current_dir`` are PEFT directories; each is attached to the shared ``base`` in turn
    (the base comes back unchanged). ``holdout_events`` must all be of the user's ``holdout`` split: the gate never
    judges on training data. ``parent_last_seq`` (the candidate's parent's last event position; None for a first
    revision) splits them into prior and new; ``new_events`` are the round's new train-split events (for
    ``new_shift``, over at most ``shift_events`` of them: `shift_examples`, and ``new_repeat_share``); ``general``
    the general examples (None: `load_general`'s default file). Raises MetricsError on other events or on a metric
    that is not finite. Returns plain JSON-serialisable values::

        {"candidate": {METRIC_KEYS..., "new_shift", "new_repeat_share"},
         "current":   {METRIC_KEYS...}, or None without current_dir,
         "base":      {METRIC_KEYS...}, with drift_kl 0.0,
         "paired":    {"current": {metric: {"gain", "low", "high", "events"} | None} | None, "base": {...}},
         "evidence":  {"holdout_events", "holdout_events_prior", "holdout_events_new", "holdout_tokens",
                       "preference_pairs", "train_events", "new_events"}}
    """
    wrong = sorted({e.split for e in holdout_events if e.split != "holdout"})
    if wrong:
        raise MetricsError(f"evaluation takes holdout-split events only, got events of split {wrong}")
    events = list(holdout_events)
    general_examples = list(general) if general is not None else load_general()

    def scores_of(model: torch.nn.Module, base_logits: list[torch.Tensor] | None) -> ModelScores:
        return score_model(
            model,
            base.tokenizer,
            holdout_events=events,
            probes=probes,
            base_logits=base_logits,
            max_length=max_length,
            parent_last_seq=parent_last_seq,
            general=general_examples,
        )

    base_logits, general_nll, general_tokens = _base_reference(base, probes, general_examples, max_length)
    with attached(base, None) as model:  # the user's holdout under the base; the rest does not depend on the user
        own = score_model(
            model,
            base.tokenizer,
            holdout_events=events,
            probes=[],
            max_length=max_length,
            parent_last_seq=parent_last_seq,
        )
    base_scores = dataclasses.replace(own, general_nll=general_nll, general_tokens=general_tokens)

    def adapter_scores(adapter_dir: Path) -> ModelScores:
        with attached(base, adapter_dir) as model:
            return scores_of(model, base_logits)

    candidate = adapter_scores(Path(candidate_dir))
    current = adapter_scores(Path(current_dir)) if current_dir is not None else None
    shift = (
        _new_shift(base, current_dir, new_events, current, max_length, shift_events) if current is not None else None
    )
    log.info(
        "holdout NLL: candidate %s, current %s, base %s (%d tokens); general NLL: candidate %s, base %s",
        _fmt(candidate.holdout_nll),
        _fmt(current.holdout_nll) if current else "-",
        _fmt(base_scores.holdout_nll),
        base_scores.holdout_tokens,
        _fmt(candidate.general_nll),
        _fmt(base_scores.general_nll),
    )
    return _assemble(
        candidate,
        current,
        base_scores,
        shift,
        events=events,
        new_events=new_events,
        train_events_count=train_events_count,
        new_events_count=new_events_count,
        min_preference_pairs=min_preference_pairs,
    )


def _assemble(
    candidate: ModelScores,
    current: ModelScores | None,
    base_scores: ModelScores,
    shift: float | None,
    *,
    events: Sequence[TrainingEvent],
    new_events: Sequence[TrainingEvent],
    train_events_count: int,
    new_events_count: int,
    min_preference_pairs: int,
) -> dict[str, Any]:
    """`evaluate`'s result from the three models' scores (shared by `evaluate_many`)."""
    for name, scores in (("candidate", candidate), ("current", current), ("base", base_scores)):
        bad = {k: v for k, v in (scores.metrics() if scores else {}).items() if v is not None and not math.isfinite(v)}
        if bad:
            # JSON (and PostgreSQL's jsonb) has no NaN or infinity: refuse rather than store a decision on them.
            raise MetricsError(f"the {name} model's metrics are not finite: {bad}")
    few_pairs = base_scores.preference_pairs < min_preference_pairs

    def shown(scores: ModelScores) -> dict[str, float | None]:
        m = scores.metrics()
        return {**m, "preference_accuracy": None} if few_pairs else m

    prior_events = sum(1 for _, _, p in base_scores.per_example if p)
    return {
        "candidate": {**shown(candidate), "new_shift": shift, "new_repeat_share": _repeat_share(new_events)},
        "current": shown(current) if current is not None else None,
        # The base's drift from itself is zero by definition, probes or not.
        "base": {**shown(base_scores), "drift_kl": 0.0},
        "paired": {
            "current": _paired(candidate, current) if current is not None else None,
            "base": _paired(candidate, base_scores),
        },
        "evidence": {
            "holdout_events": len(events),
            "holdout_events_prior": prior_events,
            "holdout_events_new": len(base_scores.per_example) - prior_events,
            "holdout_tokens": base_scores.holdout_tokens,
            "preference_pairs": base_scores.preference_pairs,
            "train_events": int(train_events_count),
            "new_events": int(new_events_count),
        },
    }


#: The base's probe log-probabilities and general NLL, per (base weights, probes, general answers, max_length): the
#: same for every user, so a worker computes them once (one entry: they hold the probes' full distributions).
_BASE_REFERENCE: dict[tuple[Any, ...], tuple[list[torch.Tensor], float | None, int]] = {}
_BASE_REFERENCE_LOCK = threading.Lock()


def _base_reference(
    base: LoadedBase, probes: Sequence[str], general: Sequence[Example], max_length: int
) -> tuple[list[torch.Tensor], float | None, int]:
    """(`probe_logits` of the base, its general NLL, the general answers' tokens), computed once per base."""
    key = (base.ref.sha256, tuple(probes), tuple((g.prompt, g.target) for g in general), max_length)
    with _BASE_REFERENCE_LOCK:
        hit = _BASE_REFERENCE.get(key)
        if hit is None:
            with attached(base, None) as model:
                logits = probe_logits(model, base.tokenizer, probes, max_length=max_length)
                scores = score_model(
                    model, base.tokenizer, holdout_events=[], probes=[], max_length=max_length, general=general
                )
            hit = (logits, scores.general_nll, scores.general_tokens)
            _BASE_REFERENCE.clear()
            _BASE_REFERENCE[key] = hit
        return hit


def shift_examples(new_events: Sequence[TrainingEvent], limit: int = SHIFT_EVENTS) -> list[Example]:
    """The examples of the new events that ``new_shift`` scores: all that give a target, or, past ``limit`` (> 0),
    the ``limit`` of them whose event ids hash lowest (sha256), in event order: a sample that does not depend on the
    path (`evaluate`, `evaluate_many`), the batch or a retry."""
    scored = [(e.event_id, x) for e, x in ((e, example_of(e)) for e in new_events) if x is not None]
    if 0 < limit < len(scored):
        rank = sorted(range(len(scored)), key=lambda i: hashlib.sha256(scored[i][0].encode()).digest())
        scored = [scored[i] for i in sorted(rank[:limit])]
    return [x for _, x in scored]


def _new_shift(
    base: LoadedBase,
    current_dir: Path | None,
    new_events: Sequence[TrainingEvent],
    current: ModelScores,
    max_length: int,
    limit: int = SHIFT_EVENTS,
) -> float | None:
    """NLL of the new train events' targets over the prior holdout's, both under the revision serving now, minus 1.

    The prior holdout was never trained on, so both are text the serving revision has not seen: more of the same
    user gives about 0, another writer or random text gives much more. None without new events or prior holdout.
    Over `shift_examples` (at most ``limit`` of the new events; 0: all).
    """
    prior = current.holdout_nll_prior
    examples = shift_examples(new_events, limit)
    if prior is None or prior <= 0 or not examples or current_dir is None:
        return None
    with attached(base, Path(current_dir)) as model, _eval_mode(model):
        encoded = encode_examples(base.tokenizer, examples, max_length)
        got = _target_logprobs(model, encoded, encoding.pad_id(base.tokenizer), 8)
    tokens = sum(n for _, n in got)
    if not tokens:
        return None
    value = (-sum(s for s, _ in got) / tokens) / prior - 1.0
    if not math.isfinite(value):
        raise MetricsError(f"the new events' shift is not finite: {value}")
    return value


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


@dataclass(frozen=True)
class EvalRequest:
    """One candidate to judge: `evaluate`'s per-user arguments."""

    candidate_dir: Path
    current_dir: Path | None
    holdout_events: Sequence[TrainingEvent]
    train_events_count: int
    new_events_count: int
    parent_last_seq: int | None = None
    new_events: Sequence[TrainingEvent] = ()
    #: The ``scores`` of the serving revision's own gate (its result's ``scores`` when it was the candidate): under
    #: an equal fingerprint its candidate rows are this request's current rows and its base rows the base's, and
    #: rows found there are not run again (`evaluate_many`).
    known: Mapping[str, Any] | None = None


#: The parts of a request's rows that the base runs (its general and probe numbers come from `_base_reference`).
_BASE_PARTS = ("holdout", "pair")
#: Version of the per-row scores a stacked gate leaves in each result (``scores``) for the next round to reuse.
SCORES_VERSION = 1


def scores_fingerprint(
    base: LoadedBase, probes: Sequence[str], general: Sequence[Example], max_length: int, native: bool
) -> str:
    """What a row's score depends on besides its adapter and its text: the base's weights, dtype and device type,
    its tokenizer's vocabulary size and chat template, the probe prompts and general answers, the encoding's length
    limit, the LoRA branch's dtype path and the gate's kernels. Scores are reused only under an equal fingerprint."""
    param = next(base.model.parameters())
    blob = json.dumps(
        [
            SCORES_VERSION,
            base.ref.sha256,
            len(base.tokenizer),
            getattr(base.tokenizer, "chat_template", None),
            str(param.dtype),
            param.device.type,
            list(probes),
            [[g.prompt, g.target] for g in general],
            max_length,
            bool(native),
            bool(FUSED_LAYERS and fused_layers.available(param.device)),
        ]
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _known_rows(known: Mapping[str, Any] | None, fingerprint: str) -> dict[str, dict[str, tuple[float, int]]]:
    """``known``'s rows by model of this request (its candidate's are this request's current's), or nothing when
    there are none, they are of another version or fingerprint, or they do not read as rows."""
    if not known:
        return {}
    if known.get("version") != SCORES_VERSION or known.get("fingerprint") != fingerprint:
        log.info("gate: the serving revision's scores are of another base, probe set or setting; not reused")
        return {}
    rows: dict[str, dict[str, tuple[float, int]]] = {}
    try:
        for theirs, ours in (("candidate", "current"), ("base", "base")):
            rows[ours] = {str(k): (float(v[0]), int(v[1])) for k, v in dict(known.get(theirs) or {}).items()}
    except (TypeError, ValueError, IndexError, KeyError) as e:
        log.warning("gate: the serving revision's scores do not read as rows (%s); not reused", e)
        return {}
    return rows


@gc_paused()  # the batch's host work without full garbage collections in the middle (`gc_paused`)
def evaluate_many(
    base: LoadedBase,
    requests: Sequence[EvalRequest],
    *,
    probes: list[str],
    max_length: int = 128,
    min_preference_pairs: int = 1,
    general: Sequence[Example] | None = None,
    batch_size: int | None = None,
    native: bool = True,
    labelled_batch: int | None = None,
    shift_events: int = SHIFT_EVENTS,
) -> list[dict[str, Any] | BaseException]:
    """`evaluate` for many candidates at once: per request its result (equal to `evaluate`'s within float rounding,
    see tests/unit/evaluation) or the exception that failed it alone.

    Every adapter of the requests (candidates, and the revisions serving now) goes into one stack of per-row LoRA
    layers on the shared base (`pipeline.models.multilora.wrap_linears`, the layer batched training uses; slot 0 is
    the base itself, a zero adapter), and every row any of them must score (holdout examples, preference answers,
    general answers, probes, the new events under the serving revision) runs in one pass over the base, each row
    with its own adapter: labelled rows batched by length, the LM head applied to their target positions only (in
    chunks, when the model's logits are the plain head of its decoder: `_split_head`; else the full logits), probe
    rows in batches of one probe, their KL from the base taken per batch. The base's probe distributions and general
    NLL come from the per-base cache (`_base_reference`). Adapters whose rank or modules differ from the first
    request's, or that do not read as plain LoRA, and a lone request, are evaluated one request at a time by
    `evaluate`. ``batch_size``: rows per forward (None: `STACKED_BATCH` of the base's device type); a batch's numbers
    reach the host in one copy. ``labelled_batch``: labelled rows per forward when the head is applied to their
    target positions only (None: ``batch_size`` when given, else `SPLIT_BATCH` of the device type).
    ``shift_events``: new events scored for ``new_shift`` (`shift_examples`). ``native``: on a bf16 base, the LoRA
    branch in bf16 (`multilora.wrap_linears`; candidate, current and base
    rows all measured so, within bf16 rounding of peft's fp32 branch); on an fp32 base it changes nothing.
    """
    results: list[dict[str, Any] | BaseException | None] = [None] * len(requests)
    started = time.perf_counter()
    general_examples = list(general) if general is not None else load_general()
    loaded: list[tuple[int, _Lora, _Lora | None]] = []
    signature: tuple[Any, ...] | None = None
    alone: list[int] = []
    for i, req in enumerate(requests):
        wrong = sorted({e.split for e in req.holdout_events if e.split != "holdout"})
        if wrong:
            results[i] = MetricsError(f"evaluation takes holdout-split events only, got events of split {wrong}")
            continue
        try:
            cand = _read_lora(Path(req.candidate_dir))
            cur = _read_lora(Path(req.current_dir)) if req.current_dir is not None else None
        except _NotStackable as e:
            log.debug("request %d evaluated alone: %s", i, e)
            alone.append(i)
            continue
        except Exception as e:
            results[i] = e
            continue
        sig = cand.signature
        if signature is None:
            signature = sig
        if sig != signature or (cur is not None and cur.signature != signature):
            alone.append(i)
            continue
        loaded.append((i, cand, cur))

    if len(loaded) == 1:  # one candidate: peft's own path, as the single-user gate always measured it
        alone.append(loaded.pop()[0])
    if loaded:
        log.info("gate: %d adapter pairs read in %.2f s", len(loaded), time.perf_counter() - started)
        try:
            _evaluate_stacked(
                base,
                requests,
                loaded,
                results,
                probes,
                general_examples,
                max_length,
                min_preference_pairs,
                batch_size,
                native,
                labelled_batch,
                shift_events,
            )
        except Exception as e:  # e.g. out of memory: those requests fail, the others still get their results
            log.exception("batched evaluation of %d candidates failed", len(loaded))
            for i, _, _ in loaded:
                results[i] = e
    for i in alone:
        req = requests[i]
        try:
            results[i] = evaluate(
                base,
                candidate_dir=req.candidate_dir,
                current_dir=req.current_dir,
                holdout_events=req.holdout_events,
                train_events_count=req.train_events_count,
                new_events_count=req.new_events_count,
                probes=probes,
                max_length=max_length,
                min_preference_pairs=min_preference_pairs,
                parent_last_seq=req.parent_last_seq,
                new_events=req.new_events,
                general=general_examples,
                shift_events=shift_events,
            )
        except Exception as e:
            results[i] = e
    return [r if r is not None else MetricsError("not evaluated") for r in results]


#: Rows per forward of the stacked gate by device type (``evaluate_many``'s ``batch_size=None``): few on the CPU,
#: enough on a GPU to keep it busy (a batch of 256 probe rows of ~100 tokens has ~5 GiB of fp32 logits over a 49k
#: vocabulary; labelled rows only take the logits of `HEAD_CHUNK` target tokens at a time).
STACKED_BATCH = {"cpu": 32, "cuda": 256}
#: Labelled rows per forward when the head is applied to their target positions only (`_split_head`): their memory
#: is the decoder's activations (1024 rows of ~100 tokens: ~0.4 GiB a hidden-state tensor at width 2048, bf16).
SPLIT_BATCH = {"cpu": 32, "cuda": 1024}
#: The stacked gate's forwards through liger's RMSNorm and SwiGLU kernels where they are available (CUDA, the ``gpu``
#: extra; `pipeline.models.fused_layers`), and rotary through liger's: one kernel each instead of HF's ~7, 2 and ~8
#: (on an H200, a K=256 gate took 11.8-13.0 s instead of 16.5 s; bench/results/retrain_throughput.md). Candidate,
#: current and base rows are all measured so (within bf16 rounding of HF's modules); False: HF's own modules.
FUSED_LAYERS = True
#: By device type: the stacked gate's labelled rows run the first tokens all rows of a forward have in common (the
#: chat template's head) once per adapter, not once per row (`pipeline.models.shared_prefix`): the same scores within
#: rounding. On with packed rows (`PACKED_ROWS`, below): on an H200 a Llama-1B K=64 gate took 3.2-3.4 s against
#: 4.0-4.5 s (padded rows, no prefix); over padded rows the prefix saved nothing (a K=256 SmolLM2-135M gate: 10.1 s
#: against 10.2 s; bench/results/retrain_throughput.md).
SHARED_PREFIX = {"cuda": True}
#: By device type: the stacked gate's labelled rows as one packed sequence per forward, without padding
#: (`pipeline.models.packed`: variable-length flash attention on CUDA); with `SHARED_PREFIX` too, the rows' common
#: first tokens run once per adapter as a prefix row the adapter's rows attend to (as batched training's packed
#: rows). The same scores within rounding (tests/unit/evaluation). Where the model cannot (`packed.available`),
#: padded rows. Off on the CPU (per-token LoRA there: slower than padded rows).
PACKED_ROWS = {"cuda": True}
#: Target tokens per LM-head GEMM of the stacked gate's labelled rows (their fp32 logits exist one chunk at a time).
HEAD_CHUNK = 8192
#: Model types whose causal LM's logits are ``lm_head(decoder(...).last_hidden_state)`` and nothing more: the stacked
#: gate runs their decoder and applies the head to the labelled positions only (`_split_head`).
_PLAIN_HEAD = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3"})
#: Config attributes of a final processing of the logits (soft-capping, scaling): present, the full forward is used.
_LOGIT_PROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """(decoder, LM head) of a causal LM (plain or PEFT-wrapped) whose logits are exactly the head applied to the
    decoder's last hidden state, so that a caller can apply the head to chosen positions only; None otherwise (an
    unknown model type, final logit processing, a head that is not a plain Linear, e.g. one with LoRA on it)."""
    unwrap = getattr(model, "get_base_model", None)  # a PeftModel: the causal LM inside
    inner: torch.nn.Module = unwrap() if callable(unwrap) else model
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "model_type", None) not in _PLAIN_HEAD:
        return None
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in _LOGIT_PROCESSING):
        return None
    get_decoder, get_head = getattr(inner, "get_decoder", None), getattr(inner, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    body, head = get_decoder(), get_head()
    if body is inner or not isinstance(body, torch.nn.Module) or type(head) is not torch.nn.Linear:
        return None
    return body, head


def _packed_label_sums(
    chunk: Sequence[tuple[int, list[int], list[int] | None, Any]],
    split: tuple[torch.nn.Module, torch.nn.Linear],
    lora: Any,
    share: bool,
    to_device: Any,
) -> tuple[torch.Tensor, list[int], int]:
    """One forward of the stacked gate over labelled rows ``chunk`` (slot, ids, labels, key) packed as one sequence
    (`packed.rows_of`; with ``share``, their common first tokens once per slot): per row the sum of its target
    tokens' log-probs (on the device, as `_label_sums_split` gives it), its target-token count, and the prefix's
    length (0: none)."""
    ids = [r[1] for r in chunk]
    labels = [r[2] or [] for r in chunk]
    common = shared_prefix.common_length(ids, labels) if share else 0
    # Each row's own tokens (after the prefix) in order; own token k predicts label common + k + 1 of its row
    # (common_length leaves every label up to the prefix's end IGNORE, so none is lost).
    following = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(lab[common + 1 :], (IGNORE,)) for lab in labels),
        dtype=np.int64,
        count=sum(len(r) - common for r in ids),
    )
    rows = packed.rows_of(ids, [r[0] for r in chunk], common)
    keep = np.flatnonzero(following != IGNORE)
    owner = rows.own[keep]
    row_tokens = np.bincount(owner, minlength=len(chunk)).tolist()
    device = split[1].weight.device
    if not len(keep):  # nothing to score: no forward
        return torch.zeros(len(chunk), dtype=torch.float64, device=device), row_tokens, common
    cuda = device.type == "cuda"
    packing = rows.packing.pin_memory().to(device, non_blocking=True) if cuda else rows.packing.to(device)
    body, head = split
    hidden = packed.decoder_states(body, to_device(rows.ids), packing, lora, to_device(rows.slots))
    lora.set_rows(None)
    sums = _label_sums_split(
        head,
        hidden.index_select(0, to_device(torch.from_numpy(keep + rows.head_tokens))),
        to_device(torch.from_numpy(following[keep])),
        to_device(torch.from_numpy(owner)),
        len(chunk),
    )
    return sums, row_tokens, common


def _label_sums_full(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the float64 sum of the log-probs of its labels ``[B, T-1]`` (IGNORE: not counted) under the full
    logits ``[B, T, V]`` (position t predicts label t)."""
    keep = labels != IGNORE
    lp = F.log_softmax(logits[:, :-1], dim=-1)
    picked = lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, 0.0).double().sum(1)


def _label_sums_split(
    head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, owner: torch.Tensor, rows: int
) -> torch.Tensor:
    """Per row, the float64 sum of the log-probs of its target tokens: ``hidden [N, H]`` the hidden states that
    predict ``targets [N]``, ``owner [N]`` their rows (of ``rows``). Each token's log-prob through ``head`` in fp32,
    `HEAD_CHUNK` tokens at a time (the logits of one chunk only); ``cross_entropy`` is one fused log-softmax pass
    (``logit - logsumexp`` in separate ops reads and writes the chunk several times)."""
    lp = torch.empty(len(targets), dtype=torch.float32, device=hidden.device)
    for start in range(0, len(targets), HEAD_CHUNK):
        logits = head(hidden[start : start + HEAD_CHUNK]).float()
        lp[start : start + HEAD_CHUNK] = F.cross_entropy(logits, targets[start : start + HEAD_CHUNK], reduction="none")
        del logits
    lp.neg_()
    return torch.zeros(rows, dtype=torch.float64, device=hidden.device).index_add_(0, owner, lp.double())


def _kl_rows(logits: torch.Tensor, ref_lp: torch.Tensor, ref_p: torch.Tensor) -> torch.Tensor:
    """Per row of ``logits [n, L, V]`` (fp32), KL(p_ref || p_row) summed over the L positions, as float64 (what
    ``F.kl_div(log_softmax(row), ref_lp, log_target=True, reduction="sum")`` gives each row): ``ref_lp [L, V]`` the
    reference's log-probs, ``ref_p`` their exp, broadcast over the rows; one [n, L, V] buffer besides the logits."""
    terms = F.log_softmax(logits, dim=-1)
    torch.sub(ref_lp, terms, out=terms)
    terms *= ref_p
    return terms.sum(dim=(1, 2)).double()


class _NotStackable(Exception):
    """An adapter the per-row layer does not express: evaluated alone, through peft."""


@dataclass(frozen=True)
class _Lora:
    """An adapter read for the stacked gate: its weights as one vector (`multilora.AdapterTable`), its scaling,
    and its signature (module paths and rank: adapters stack when theirs are equal)."""

    table: Any  # multilora.AdapterTable
    scaling: float
    signature: tuple[Any, ...]

    @property
    def plan(self) -> tuple[tuple[str, int, tuple[int, ...], int, tuple[int, ...]], ...]:
        return _lora_plan(self.table.layout)[2]


@functools.lru_cache(maxsize=64)
def _lora_plan(
    layout: tuple[tuple[str, int, tuple[int, ...]], ...],
) -> tuple[tuple[str, ...], int, tuple[tuple[str, int, tuple[int, ...], int, tuple[int, ...]], ...]]:
    """(module paths, rank, per path (path, A's first value, A's shape, B's first value, B's shape)) of a
    layout, checked once per layout: every module has A and B, one rank. Raises _NotStackable."""
    where = {key: (at, shape) for key, at, shape in layout}
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in where})
    plan = []
    for path in paths:
        a, b = where.get(f"{path}.lora_A.weight"), where.get(f"{path}.lora_B.weight")
        if a is None or b is None:
            raise _NotStackable(f"{path} lacks lora_A or lora_B")
        if len(a[1]) != 2 or len(b[1]) != 2:
            raise _NotStackable(f"{path}: LoRA weights are not matrices")
        plan.append((path, a[0], a[1], b[0], b[1]))
    ranks = {a_shape[0] for _, _, a_shape, _, _ in plan}
    if len(ranks) > 1:
        raise _NotStackable("modules of different ranks")
    rank = next(iter(ranks), 0)
    return tuple(paths), rank, tuple(plan)


def _read_lora(adapter_dir: Path) -> _Lora:
    """A PEFT LoRA directory for the stacked gate (float32 values; `_Lora`)."""
    from pipeline.models import multilora

    table = multilora.read_adapter_table(adapter_dir, torch.float32)
    config = table.config
    try:
        multilora.check_lora_config(config)
    except multilora.AdapterLimitError as e:
        raise _NotStackable(str(e)) from e
    if config.get("fan_in_fan_out") or config.get("lora_dropout") or config.get("use_dora"):
        raise _NotStackable("fan_in_fan_out, dropout or DoRA")
    paths, rank, _ = _lora_plan(table.layout)
    return _Lora(table, multilora.lora_scaling(config, rank), (paths, rank))


def _evaluate_stacked(
    base: LoadedBase,
    requests: Sequence[EvalRequest],
    loaded: list[tuple[int, Any, Any]],
    results: list[dict[str, Any] | BaseException | None],
    probes: list[str],
    general: list[Example],
    max_length: int,
    min_preference_pairs: int,
    batch_size: int | None,
    native: bool = True,
    labelled_batch: int | None = None,
    shift_events: int = SHIFT_EVENTS,
) -> None:
    from pipeline.models import multilora

    tok = base.tokenizer
    model = base.model
    device = next(model.parameters()).device
    started = time.perf_counter()
    base_logits, general_nll, general_tokens = _base_reference(base, probes, general, max_length)
    probe_seqs = probe_ids(tok, probes, max_length) if probes else []
    general_encoded = encode_examples(tok, general, max_length)
    # slots: 0 = the base (a zero adapter), then each request's candidate and (when it has one) current
    adapters: list[_Lora] = []
    slots: list[tuple[int, int | None]] = []
    for _, cand, cur in loaded:
        adapters.append(cand)
        c = len(adapters)
        if cur is not None:
            adapters.append(cur)
        slots.append((c, len(adapters) if cur is not None else None))
    # On a half-precision base with the native branch, the stacks are kept in the base's dtype: the branch casts
    # every gathered row to it anyway (cast then gather = gather then cast), and three casts a layer per forward go.
    base_dtype = next(model.parameters()).dtype
    dtype = base_dtype if native and base_dtype in (torch.bfloat16, torch.float16) else torch.float32
    scaling = torch.tensor([0.0] + [ad.scaling for ad in adapters], dtype=torch.float32).to(device, dtype)
    stacks = {}
    layout = adapters[0].table.layout
    if all(ad.table.layout == layout for ad in adapters):
        # One layout (what one trainer writes): every adapter's vector is a row of one table (row 0: the base, zero),
        # copied to the device once; each module's stacked A and B are views of its columns.
        table = torch.stack([torch.zeros_like(adapters[0].table.values)] + [ad.table.values for ad in adapters])
        table = table.to(device, dtype)
        for path, a_at, a_shape, b_at, b_shape in adapters[0].plan:
            stacks[path] = multilora.LoraStack(
                table[:, a_at : a_at + math.prod(a_shape)].view(-1, *a_shape),
                table[:, b_at : b_at + math.prod(b_shape)].view(-1, *b_shape),
                scaling,
            )
    else:  # layouts differ (same modules and rank): per module, each adapter's A and B from its own layout
        where = [{p: (a, sa, b, sb) for p, a, sa, b, sb in ad.plan} for ad in adapters]
        for path, _, a_shape, _, b_shape in adapters[0].plan:
            a_rows = [torch.zeros(a_shape)] + [
                ad.table.values[w[path][0] : w[path][0] + math.prod(a_shape)].view(a_shape)
                for ad, w in zip(adapters, where, strict=True)
            ]
            b_rows = [torch.zeros(b_shape)] + [
                ad.table.values[w[path][2] : w[path][2] + math.prod(b_shape)].view(b_shape)
                for ad, w in zip(adapters, where, strict=True)
            ]
            stacks[path] = multilora.LoraStack(
                torch.stack(a_rows).to(device, dtype), torch.stack(b_rows).to(device, dtype), scaling
            )
    # Rows: (slot, input ids, labels or None for a probe, key); key = (request, model, part, index). A row's score
    # (log-prob sum or KL sum, tokens) goes to ``out`` under its key: run here, or taken from ``known``.
    rows: list[tuple[int, list[int], list[int] | None, tuple[Any, ...]]] = []
    out: dict[tuple[Any, ...], tuple[float, int]] = {}
    plans = []
    fingerprint = scores_fingerprint(base, probes, general, max_length, native)
    reused: Counter[int] = Counter()  # rows taken from earlier gates, by request
    for (i, _, _), (c_slot, cur_slot) in zip(loaded, slots, strict=True):
        req = requests[i]
        known = _known_rows(req.known, fingerprint) if cur_slot is not None else {}
        scored = [(e, x) for e, x in ((e, example_of(e)) for e in req.holdout_events) if x is not None]
        pairs = preference_pairs(req.holdout_events)
        new_examples = shift_examples(req.new_events, shift_events) if cur_slot is not None else []
        # One encoding call for the request's three parts (shared user turns, batched tokenizer calls).
        parts = [x for _, x in scored]
        parts += [Example(p.prompt, answer, p.event_id) for p in pairs for answer in (p.chosen, p.rejected)]
        encoded = encode_examples(tok, parts + new_examples, max_length)
        holdout = encoded[: len(scored)]
        answers = encoded[len(scored) : len(parts)]
        shifted = encoded[len(parts) :]
        names = _row_ids(scored, pairs, len(general_encoded), len(probe_seqs))
        models = [("base", 0), ("candidate", c_slot)] + ([("current", cur_slot)] if cur_slot is not None else [])
        for name, slot in models:
            have = known.get(name, {})
            kinds: list[tuple[str, Sequence[Any], bool]] = [("holdout", holdout, True), ("pair", answers, True)]
            if name != "base":
                kinds += [("general", general_encoded, True), ("probe", probe_seqs, False)]
            for part, items, has_labels in kinds:
                for j, item in enumerate(items):
                    key = (i, name, part, j)
                    hit = have.get(names[(part, j)])
                    if hit is not None:
                        out[key] = hit
                        reused[i] += 1
                    elif has_labels:
                        rows.append((slot, item.input_ids, item.labels, key))
                    else:
                        rows.append((slot, item, None, key))
        for j, e in enumerate(shifted):
            rows.append((cur_slot or 0, e.input_ids, e.labels, (i, "current", "shift", j)))
        plans.append((i, scored, len(holdout), len(pairs), len(shifted), names))

    prepared = time.perf_counter()
    pad_id = encoding.pad_id(tok)
    explicit = batch_size is not None
    if batch_size is None:
        batch_size = STACKED_BATCH.get(device.type, 32)
    # Labelled rows batched by length (little padding); probe rows in batches of one probe each (the same ids).
    labelled = sorted((r for r in range(len(rows)) if rows[r][2] is not None), key=lambda r: len(rows[r][1]))
    by_probe: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        if row[2] is None:
            by_probe.setdefault(row[3][3], []).append(r)

    def plan_batches(labelled_size: int) -> list[tuple[list[int], int | None]]:
        batches: list[tuple[list[int], int | None]] = [
            (labelled[s : s + labelled_size], None) for s in range(0, len(labelled), labelled_size)
        ]
        for j, members in sorted(by_probe.items()):
            batches += [(members[s : s + batch_size], j) for s in range(0, len(members), batch_size)]
        return batches

    # The base's probe log-probs (and probabilities), normalised once per call on the device.
    references: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    cuda = device.type == "cuda"

    def to_device(t: torch.Tensor) -> torch.Tensor:
        # Pinned and non-blocking: a plain copy from pageable memory would wait for all the work queued before it.
        return t.pin_memory().to(device, non_blocking=True) if cuda else t.to(device)

    # Per batch, its rows' keys, their numbers (left on the device until every batch is queued: the host builds the
    # next batch while the device runs this one, and waits once at the end) and their token counts (known here).
    pending: list[tuple[list[tuple[Any, ...]], torch.Tensor, list[int]]] = []
    # Under the base's lock, borrowed: other users of the shared base wait, and it comes back exactly as it was.
    with base_lock(model), borrowed(model), torch.no_grad(), varied_shape_attention():
        fused = FUSED_LAYERS and fused_layers.available(device)
        with (
            multilora.wrap_linears(model, stacks, native=native) as lora,
            _eval_mode(model),
            fused_layers.patched(model, fused),
            packed.causal_only(model),  # no padding mask is built (above): nor asked for, with a sync per forward
        ):
            split = _split_head(model)  # after the wrap: a head with LoRA on it is no plain Linear any more
            # Labelled rows through the split head hold no full logits: more of them per forward (fewer launches).
            if split is None:  # full logits per labelled row: as many rows as a probe batch
                labelled_size = batch_size
            elif labelled_batch:
                labelled_size = labelled_batch
            else:
                labelled_size = batch_size if explicit else SPLIT_BATCH.get(device.type, batch_size)
            batches = plan_batches(labelled_size)
            share = SHARED_PREFIX.get(device.type, False) and split is not None and shared_prefix.available(model)
            pack = PACKED_ROWS.get(device.type, False) and split is not None and packed.available(model)
            prefixed = 0  # forwards run with a shared prefix
            for members, probe_j in batches:
                chunk = [rows[r] for r in members]
                keys = [r[3] for r in chunk]
                if pack and probe_j is None:
                    assert split is not None  # (pack needs it)
                    sums, row_tokens, common = _packed_label_sums(chunk, split, lora, share, to_device)
                    prefixed += bool(common)
                    pending.append((keys, sums, row_tokens))
                    continue
                prefix = None
                if share and probe_j is None:
                    # The rows' common first tokens, run once per adapter; the rows without them.
                    common = shared_prefix.common_length([r[1] for r in chunk], [r[2] for r in chunk])
                    if common:
                        prefix = shared_prefix.prefix_of(chunk[0][1], common, [r[0] for r in chunk])
                        chunk = [(r[0], r[1][common:], (r[2] or [])[common:], r[3]) for r in chunk]
                        prefixed += 1
                width = max(len(r[1]) for r in chunk)
                if probe_j is None:
                    # Labelled rows: the sum of their target tokens' log-probs (as `_target_logprobs`).
                    host_labels = encoding.padded([(r[2] or [])[1:] for r in chunk], width - 1, IGNORE)
                    keep = host_labels != IGNORE
                    row_tokens = keep.sum(1).tolist()
                    if not any(row_tokens):  # nothing to score: no forward
                        pending.append((keys, torch.zeros(len(chunk), dtype=torch.float64, device=device), row_tokens))
                        continue
                ids = to_device(encoding.padded([r[1] for r in chunk], width, pad_id))
                # No attention mask: rows are right-padded and attention is causal, so a real token never sees a pad
                # and only real positions are read. (A padding mask costs a device sync per forward: transformers
                # asks `mask.all()` to choose its SDPA path, and the host could not queue the next batch meanwhile.)
                mask = None
                row_slots = to_device(torch.tensor([r[0] for r in chunk], dtype=torch.long))
                lora.set_rows(row_slots)
                if probe_j is not None:
                    # One probe's rows (same ids, no padding): their KL from the base, summed over positions.
                    if probe_j not in references:
                        # From pinned memory: a copy from pageable memory made the host wait until the device had
                        # run every forward queued so far, once per probe.
                        ref_lp = to_device(F.log_softmax(base_logits[probe_j].float(), dim=-1))
                        references[probe_j] = (ref_lp, ref_lp.exp())
                    ref_lp, ref_p = references[probe_j]
                    logits = _forward(model, ids, mask)
                    lora.set_rows(None)
                    pending.append((keys, _kl_rows(logits, ref_lp, ref_p), [width] * len(chunk)))
                    del logits
                    continue
                if split is None:
                    logits = _forward(model, ids, mask)
                    lora.set_rows(None)
                    sums = _label_sums_full(logits, to_device(host_labels))
                    del logits
                else:
                    body, head = split
                    on_device = None
                    if prefix is not None:
                        on_device = shared_prefix.Prefix(
                            to_device(prefix.ids), to_device(prefix.slots), to_device(prefix.owner)
                        )
                    hidden = shared_prefix.decoder_states(body, ids, on_device, lora.set_rows, row_slots)
                    lora.set_rows(None)
                    # The labelled positions, found on the host (no device sync): flat position t of row b in
                    # [B, T-1] predicts label t + 1, from hidden state b * T + t.
                    flat = keep.flatten().nonzero().squeeze(1)
                    owner = flat // (width - 1)
                    picked = to_device(owner * width + flat % (width - 1))
                    sums = _label_sums_split(
                        head,
                        hidden.reshape(-1, hidden.shape[-1]).index_select(0, picked),
                        to_device(host_labels.flatten()[flat]),
                        to_device(owner),
                        len(chunk),
                    )
                    del hidden
                pending.append((keys, sums, row_tokens))
            queued = time.perf_counter()
            for keys, values, tokens_of in pending:
                for key, value, n in zip(keys, values.cpu().tolist(), tokens_of, strict=True):
                    out[key] = (value, n)
    log.info(
        "gate: %d candidates, %d rows in %d forwards (%d with a shared prefix; %d more rows reused from earlier "
        "gates): stacks and rows built in %.2f s, forwards queued in %.2f s, then waited %.2f s for the device",
        len(loaded),
        len(rows),
        len(batches),
        prefixed,
        sum(reused.values()),
        prepared - started,
        queued - prepared,
        time.perf_counter() - queued,
    )

    for (i, scored, n_holdout, n_pairs, n_shift, names), (_, _, cur) in zip(plans, loaded, strict=True):
        req = requests[i]
        counts = (n_holdout, n_pairs, len(general_encoded), len(probe_seqs))
        try:
            reference = (general_nll, general_tokens)
            candidate = _stacked_scores(out, i, "candidate", req, scored, counts, reference)
            current = _stacked_scores(out, i, "current", req, scored, counts, reference) if cur is not None else None
            new_shift = None
            if current is not None:
                prior = current.holdout_nll_prior
                shift_rows = [out[(i, "current", "shift", j)] for j in range(n_shift)]
                tokens = sum(n for _, n in shift_rows)
                if prior is not None and prior > 0 and tokens:
                    new_shift = (-sum(lp for lp, _ in shift_rows) / tokens) / prior - 1.0
                    if not math.isfinite(new_shift):
                        raise MetricsError(f"the new events' shift is not finite: {new_shift}")
            result = _assemble(
                candidate,
                current,
                _stacked_scores(out, i, "base", req, scored, counts, reference),
                new_shift,
                events=list(req.holdout_events),
                new_events=req.new_events,
                train_events_count=req.train_events_count,
                new_events_count=req.new_events_count,
                min_preference_pairs=min_preference_pairs,
            )
            # What a later gate may reuse when this candidate serves (`EvalRequest.known`), and how many of this
            # request's rows came from an earlier gate.
            result["scores"] = {
                "version": SCORES_VERSION,
                "fingerprint": fingerprint,
                "candidate": {rid: list(out[(i, "candidate", *at)]) for at, rid in names.items()},
                "base": {
                    rid: list(out[(i, "base", *at)]) for at, rid in names.items() if at[0] in ("holdout", "pair")
                },
                "reused": reused.get(i, 0),
            }
            results[i] = result
        except Exception as e:
            results[i] = e


def _row_ids(
    scored: Sequence[tuple[TrainingEvent, Example]], pairs: Sequence[Any], n_general: int, n_probes: int
) -> dict[tuple[str, int], str]:
    """The name under which a request's row is kept for later gates, by (part, index): ``h:EVENT`` (a holdout
    event), ``p:EVENT:0|1`` (a pair's chosen or rejected answer), ``g:J`` and ``q:J`` (the J-th general answer and
    probe of the fingerprinted sets)."""
    ids = {("holdout", j): f"h:{e.event_id}" for j, (e, _) in enumerate(scored)}
    ids.update({("pair", 2 * j + k): f"p:{p.event_id}:{k}" for j, p in enumerate(pairs) for k in (0, 1)})
    ids.update({("general", j): f"g:{j}" for j in range(n_general)})
    ids.update({("probe", j): f"q:{j}" for j in range(n_probes)})
    return ids


def _stacked_scores(
    out: dict[tuple[Any, ...], tuple[float, int]],
    i: int,
    name: str,
    req: EvalRequest,
    scored: list[tuple[TrainingEvent, Example]],
    counts: tuple[int, int, int, int],
    reference: tuple[float | None, int],
) -> ModelScores:
    """`score_model`'s numbers for one model of request ``i`` from the rows `_evaluate_stacked` scored, summed in
    `score_model`'s order. ``reference``: the base's general NLL and tokens (the base's rows have no general or
    probe part)."""
    n_holdout, n_pairs, n_general, n_probes = counts
    got = [out[(i, name, "holdout", j)] for j in range(n_holdout)]
    prior = [req.parent_last_seq is not None and e.seq <= req.parent_last_seq for e, _ in scored]
    answers = [out[(i, name, "pair", j)] for j in range(2 * n_pairs)]
    general = reference
    drift: tuple[float | None, int] = (None, 0)
    if name != "base":
        general = _nll_of([out[(i, name, "general", j)] for j in range(n_general)])
        if n_probes:
            kls = [out[(i, name, "probe", j)] for j in range(n_probes)]
            probe_tokens = sum(n for _, n in kls)
            total = 0.0
            for kl, _ in kls:
                total += kl
            drift = (max(total / probe_tokens, 0.0) if probe_tokens else None, probe_tokens)
    return _scores(got, prior, req.parent_last_seq is not None, answers, general, drift)
