"""Text to token ids for a base model: one example's ids and labels, the chat rendering, padding and batching.

Training (`pipeline.training`) and evaluation (`pipeline.evaluation.metrics`) both encode examples here, so the
prompt is masked in exactly the same way when a model is trained and when it is scored.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from pipeline.domain.examples import Example

#: The label of a position that carries no loss (torch's ``cross_entropy`` default ``ignore_index``).
IGNORE = -100
#: The user turn of an example without a prompt: empty, so the answer's style is not tied to any request.
NEUTRAL_PROMPT = ""


@dataclass(frozen=True)
class EncodedExample:
    """Token ids of one example and its labels (the ids, or IGNORE where no loss is taken)."""

    input_ids: list[int]
    labels: list[int]


def encode_example(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> EncodedExample:
    """Token ids and labels of one example: loss on the target tokens (and the end of turn) only.

    Examples are trained in the form they are served in (`/v1/chat/completions`): the chat template renders a user
    turn and the target as the assistant's answer; the prompt part (the template with ``add_generation_prompt``) is
    masked. Without a prompt (a message the user wrote on their own), the user turn is empty (`NEUTRAL_PROMPT`), so
    the style is learnt as "how this user answers", whatever they are asked. Both parts are tokenized separately so
    the mask is exact and the target tokens are those the model produces after the prompt at serving time. A
    tokenizer without a chat template gets plain text (the prompt, if any, on its own line). EOS is appended unless
    the rendering already ends the turn with it. When too long, the prompt loses its beginning first, and the
    target keeps at least half of ``max_length``.
    """
    chat = bool(getattr(tokenizer, "chat_template", None))
    if example.prompt is None and not chat:
        prompt_ids: list[int] = []
        target_ids = list(tokenizer(example.target, add_special_tokens=True)["input_ids"])
    else:
        prompt = example.prompt if example.prompt is not None else NEUTRAL_PROMPT
        prompt_text, target_text = render_chat(tokenizer, prompt, example.target)
        prompt_ids = list(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        target_ids = list(tokenizer(target_text, add_special_tokens=False)["input_ids"])
    return _assemble(tokenizer, prompt_ids, target_ids, max_length)


def encode_examples(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
) -> list[EncodedExample]:
    """``[encode_example(tokenizer, x, max_length) for x in examples]``, the same ids and labels, in a fraction of
    the time: the chat template renders each distinct prompt's user turn once (most examples share the empty one),
    and the tokenizer is called once for all prompt texts and once for all target texts (its batch path, in Rust).
    A retrain encodes a few hundred examples per user for training and the gate; one by one that was most of a
    batched retrain's per-user host time. Examples encoded before (by this tokenizer, at this ``max_length``: the
    last `_ENCODED_MAX`) are not encoded again: the gate scores the new events training has just encoded, and
    the next retrain replays older ones."""
    if not examples:
        return []
    chat = bool(getattr(tokenizer, "chat_template", None))
    cache = _renderings(tokenizer)
    out: list[EncodedExample | None] = [None] * len(examples)
    todo: list[int] = []
    for i, x in enumerate(examples):
        hit = cache.encoded.get((max_length, x.prompt, x.target))
        if hit is None:
            todo.append(i)
        else:
            kept, n_kept = hit
            values = kept.tolist()
            out[i] = EncodedExample(values, [IGNORE] * n_kept + values[n_kept:])
    prompt_texts: list[str] = []
    target_texts: list[str] = []
    plain: list[int] = []  # examples without a prompt on a base without a chat template: special tokens added
    for n, i in enumerate(todo):
        x = examples[i]
        if x.prompt is None and not chat:
            plain.append(n)
            prompt_texts.append("")
            target_texts.append(x.target)
            continue
        prompt = x.prompt if x.prompt is not None else NEUTRAL_PROMPT
        p, t = render_chat(tokenizer, prompt, x.target, cache.heads, cache.splices)
        prompt_texts.append(p)
        target_texts.append(t)
    if todo:
        # Most prompt texts are the same few user turns (every message without a prompt renders the same one):
        # each distinct text is tokenized once.
        distinct = list(dict.fromkeys(prompt_texts))
        by_text = dict(zip(distinct, _token_ids(tokenizer, distinct, False), strict=True))
        prompt_ids = [by_text[text] for text in prompt_texts]
        target_ids = _token_ids(tokenizer, target_texts, False)
        if plain:
            with_special = _token_ids(tokenizer, [target_texts[n] for n in plain], True)
            for n, ids in zip(plain, with_special, strict=True):
                prompt_ids[n], target_ids[n] = [], ids
        eos = tokenizer.eos_token_id  # a property that looks the token up: once, not per example
        made: list[tuple[tuple[int, str | None, str], int, list[int]]] = []
        for i, p_ids, t_ids in zip(todo, prompt_ids, target_ids, strict=True):
            encoded = _assemble(tokenizer, list(p_ids), list(t_ids), max_length, eos)
            out[i] = encoded
            made.append(
                ((max_length, examples[i].prompt, examples[i].target), _prompt_length(encoded), encoded.input_ids)
            )
        cache.keep(made)
    return [e for e in out if e is not None]


def _prompt_length(encoded: EncodedExample) -> int:
    """How many first positions carry no label (the prompt's, as `_assemble` masks them)."""
    n = 0
    for label in encoded.labels:
        if label != IGNORE:
            break
        n += 1
    return n


#: Examples a tokenizer's cache keeps encoded (`encode_examples`; ~0.5 KB each).
_ENCODED_MAX = 65_536


class _Renderings:
    """One tokenizer's caches, for one chat template and set of special tokens: the user turns rendered and the
    answers' splices by prompt (`render_chat`'s), and examples encoded by (max_length, prompt, target), their ids
    as int32 and how many first ones are the prompt's (oldest dropped first)."""

    def __init__(self, key: Any) -> None:
        self.key = key
        self.heads: dict[str, str] = {}
        self.splices: dict[str, tuple[str, str] | None] = {}
        self.encoded: dict[tuple[int, str | None, str], tuple[np.ndarray, int]] = {}
        self.lock = threading.Lock()  # writes only: batches are prepared by several threads

    def keep(self, made: list[tuple[tuple[int, str | None, str], int, list[int]]]) -> None:
        entries = [(key, (np.asarray(ids, dtype=np.int32), n)) for key, n, ids in made]
        with self.lock:
            self.encoded.update(entries)
            over = len(self.encoded) - _ENCODED_MAX
            if over > 0:
                for key in list(itertools.islice(self.encoded, over)):
                    del self.encoded[key]


#: Per tokenizer (weakly), its `_Renderings` for its current chat template and special tokens, kept across calls:
#: a batch of 256 users encodes 512 times, and the same few prompts (mostly the empty one) were rendered again
#: each time.
_RENDERINGS: weakref.WeakKeyDictionary[Any, _Renderings] = weakref.WeakKeyDictionary()
_RENDERINGS_MAX = 4096


def _renderings(tokenizer: PreTrainedTokenizerBase) -> _Renderings:
    """``tokenizer``'s caches (new ones when its template or special tokens changed, or when `_RENDERINGS_MAX`
    prompts were rendered)."""
    key = (getattr(tokenizer, "chat_template", None), str(getattr(tokenizer, "special_tokens_map", None)))
    try:
        known = _RENDERINGS.get(tokenizer)
    except TypeError:  # not weakly referable: caches for this call only
        return _Renderings(key)
    if known is None or known.key != key or len(known.heads) + len(known.splices) > _RENDERINGS_MAX:
        known = _Renderings(key)
        _RENDERINGS[tokenizer] = known
    return known


def _token_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], special: bool) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=special)["input_ids"]``. For a Rust tokenizer with no truncation or
    padding set, its ``encode_batch`` directly: the same ids without transformers' conversion of every encoding
    into Python dicts (2 x 20,548 texts with SmolLM2's tokenizer on a 2-core CPU: 1.10 s instead of 1.43 s)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and callable(getattr(backend, "encode_batch", None)):
        if getattr(backend, "truncation", True) is None and getattr(backend, "padding", True) is None:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=special)]
    return list(tokenizer(texts, add_special_tokens=special)["input_ids"])


def _assemble(
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    target_ids: list[int],
    max_length: int,
    eos: int | bool | None = False,
) -> EncodedExample:
    """EOS appended unless the rendering ends the turn with it; the prompt's beginning cut first when too long.
    ``eos``: the tokenizer's EOS id when the caller has it (False: looked up here)."""
    if eos is False:
        eos = tokenizer.eos_token_id
    if eos is not None and eos not in target_ids[-2:]:
        target_ids.append(eos)
    if len(prompt_ids) + len(target_ids) > max_length:
        keep_prompt = min(len(prompt_ids), max(max_length - len(target_ids), max_length // 2))
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt :]
        target_ids = target_ids[: max_length - keep_prompt]
    return EncodedExample(prompt_ids + target_ids, [IGNORE] * len(prompt_ids) + target_ids)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target: str,
    heads: dict[str, str] | None = None,
    splices: dict[str, tuple[str, str] | None] | None = None,
) -> tuple[str, str]:
    """(prompt text, target text) of one exchange: the prompt as a user turn up to the generation prompt, the
    target as the assistant's answer (what the model writes after it); plain text when there is no chat template.
    ``heads``: the user turns rendered so far, by prompt (filled here), for a caller rendering many. ``splices``:
    likewise, per prompt, where the template puts the answer (`_splice`): a plain answer is then put there, not
    rendered (the Jinja template took ~70% of encoding a user's examples, one render per example)."""
    if not getattr(tokenizer, "chat_template", None):
        # A base without a chat template (a plain local model): the prompt is context on its own line.
        return prompt + "\n", target
    user = [{"role": "user", "content": prompt}]
    # tokenize=False: the templates return text.
    head = heads.get(prompt) if heads is not None else None
    if head is None:
        head = str(tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True))
        if heads is not None:
            heads[prompt] = head
    if splices is not None and _plain_answer(target):
        if prompt not in splices:
            splices[prompt] = _splice(tokenizer, user, head)
        where = splices[prompt]
        if where is not None:
            return head, where[0] + target + where[1]
    full = str(tokenizer.apply_chat_template([*user, {"role": "assistant", "content": target}], tokenize=False))
    if full.startswith(head):
        return head, full[len(head) :]
    # A template that renders the last assistant turn differently from a generation prompt: mask what they share.
    shared = 0
    while shared < min(len(head), len(full)) and head[shared] == full[shared]:
        shared += 1
    return full[:shared], full[shared:]


#: Answers the template is probed with (`_splice`): plain words, and one with the characters a template might trim,
#: escape or quote.
_PROBES = ("persona splice probe", " \n\t\"'&\\ persona\tsplice  probe \n")


def _plain_answer(target: str) -> bool:
    """Whether ``target`` may be spliced: not blank (a template may test whether an answer is empty) and without
    ``<`` or ``{`` (a template may look for markup in it, e.g. Qwen3's ``</think>``)."""
    return bool(target.strip()) and "<" not in target and "{" not in target


def _splice(tokenizer: PreTrainedTokenizerBase, user: list[dict[str, str]], head: str) -> tuple[str, str] | None:
    """(the text before, the text after the answer) when the template renders ``user`` and an assistant answer as
    ``head + before' + answer + after`` for both probe answers (``before`` includes ``before'``): it inserts a
    plain answer verbatim, untrimmed and unescaped, so rendering is concatenation. None otherwise (the template is
    rendered for each answer)."""
    parts = []
    for probe in _PROBES:
        full = str(tokenizer.apply_chat_template([*user, {"role": "assistant", "content": probe}], tokenize=False))
        at = full.find(probe)
        if at < len(head) or full.find(probe, at + 1) >= 0 or not full.startswith(head):
            return None
        parts.append((full[len(head) : at], full[at + len(probe) :]))
    return parts[0] if parts[0] == parts[1] else None


def collate(batch: Sequence[EncodedExample], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` ``[len(batch), longest]`` on ``device``, right-padded with
    ``pad_id`` (mask 0, label IGNORE)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token id that fills padded positions: the tokenizer's pad token, else its EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0  # padding is masked out of attention and loss, so any id will do


def padded(seqs: Sequence[Sequence[int]], width: int, fill: int) -> torch.Tensor:
    """``LongTensor [len(seqs), width]``: each sequence, then ``fill`` to the width. Built with numpy from one flat
    pass over the values, ~4x faster than ``torch.tensor`` of padded nested lists (4,096 rows of 30-160 tokens:
    17 ms instead of 72 ms on a 2-core CPU), which the host did before every forward of the gate."""
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    out = np.full((len(seqs), width), fill, dtype=np.int64)
    out[np.arange(width) < lengths[:, None]] = flat
    return torch.from_numpy(out)
