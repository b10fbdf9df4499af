"""General requests answered by the base itself: what a retrain mixes in so a personal model keeps answering them.

A user's events are mostly "write a message about ..." requests answered in the user's style. Trained on those alone,
an adapter learns that every request is answered with one of the user's messages: measured on SmolLM2 with r=1 on
all seven projections, the NLL of plain general answers grew from 1.7 to 5.9 nats per token. So each retrain also
trains on general requests (infra/training/general_prompts.yaml) answered by the base itself (greedy): a sequence-
level self-distillation that keeps the base's general behaviour where the user's data says nothing about it.

`base_answers` computes them once per (base weights, prompts file, answer length): memoized in the process and
cached as JSON beside the prepared bases (``<cache_dir>/general/``), written atomically. No download: the answers
are the base's own. `pipeline.domain.examples.general_mix` picks the share of them a retrain adds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedTokenizerBase

from pipeline.domain.errors import PersonaError
from pipeline.domain.examples import Example
from pipeline.models import encoding
from pipeline.models.attach import attached
from pipeline.models.base import LoadedBase

log = logging.getLogger(__name__)

#: Event ids of general examples start with this (they are no user's events).
GENERAL_ID = "general:"

_memo: dict[tuple[str, str, int], list[Example]] = {}
_lock = threading.Lock()


class GeneralPromptsError(PersonaError):
    """The general prompts file cannot be read or is not a non-empty list of prompts."""


def load_prompts(path: Path) -> list[str]:
    """The ``prompts:`` list of ``path``; GeneralPromptsError naming the file when it is not a list of strings."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise GeneralPromptsError(f"cannot read the general prompts in {str(path)!r}: {e}") from e
    prompts = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise GeneralPromptsError(f"{str(path)!r} must hold `prompts:`, a non-empty list of non-empty strings")
    return list(prompts)


def base_answers(
    base: LoadedBase, prompts_path: Path, *, max_new_tokens: int, cache_dir: Path | None
) -> list[Example]:
    """The general prompts of ``prompts_path``, each answered by ``base`` (greedy, at most ``max_new_tokens``), as
    examples with event ids ``general:<i>``; prompts whose answer is empty are left out.

    Memoized per (base sha256, prompts digest, max_new_tokens); with ``cache_dir``, also cached on disk there.
    """
    prompts = load_prompts(prompts_path)
    digest = hashlib.sha256(json.dumps(prompts).encode()).hexdigest()
    key = (base.ref.sha256, digest, max_new_tokens)
    with _lock:
        if key in _memo:
            return list(_memo[key])
        cached = _read(cache_dir, key) if cache_dir is not None else None
        if cached is None:
            log.info("answering %d general prompts with the base (once per base and prompts file)", len(prompts))
            cached = _generate(base, prompts, max_new_tokens)
            if cache_dir is not None:
                _write(cache_dir, key, cached)
        _memo[key] = cached
        return list(cached)


def _cache_file(cache_dir: Path, key: tuple[str, str, int]) -> Path:
    sha, digest, tokens = key
    return Path(cache_dir).expanduser() / "general" / f"{sha[:16]}-{digest[:16]}-{tokens}.json"


def _read(cache_dir: Path, key: tuple[str, str, int]) -> list[Example] | None:
    path = _cache_file(cache_dir, key)
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return [Example(r["prompt"], r["target"], r["event_id"]) for r in rows]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring the unreadable general answers cache %s: %s", path, e)
        return None


def _write(cache_dir: Path, key: tuple[str, str, int], examples: list[Example]) -> None:
    path = _cache_file(cache_dir, key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"prompt": e.prompt, "target": e.target, "event_id": e.event_id} for e in examples]
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf-8") as f:
            json.dump(rows, f, ensure_ascii=False, indent=1)
        os.replace(f.name, path)
    except OSError as e:  # a cache: answering again next time is the only cost
        log.warning("cannot cache the general answers in %s: %s", path, e)


@torch.no_grad()
def _generate(base: LoadedBase, prompts: list[str], max_new_tokens: int, batch_size: int = 16) -> list[Example]:
    tok = base.tokenizer
    pad = encoding.pad_id(tok)
    eos = tok.eos_token_id
    out: list[Example] = []
    with attached(base, None) as model:
        device = next(model.parameters()).device
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            seqs = [_prompt_ids(tok, p) for p in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):  # left-padded: every row's answer starts at the same column
                ids[i, width - len(s) :] = torch.tensor(s)
                mask[i, width - len(s) :] = 1
            generator: Any = model  # a transformers causal LM
            generated = generator.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=eos,
            )
            for i, prompt in enumerate(chunk):
                new = generated[i, width:].tolist()
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                known = len(tok)  # a model may have more rows than its tokenizer has tokens (the tiny test base)
                text = str(tok.decode([t for t in new if t < known], skip_special_tokens=True)).strip()
                if text:
                    out.append(Example(prompt, text, f"{GENERAL_ID}{start + i}"))
    return out


def _prompt_ids(tok: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt as the model sees it before answering (the chat template's generation prompt, or plain text)."""
    head, _ = encoding.render_chat(tok, prompt, "")
    return list(tok(head, add_special_tokens=not getattr(tok, "chat_template", None))["input_ids"])
