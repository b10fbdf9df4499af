"""Local model files, below both loading (`pipeline.models.base`) and preparing (`pipeline.models.prepare`): the ids
of prepared bases, loading a transformers directory offline, and identifying weights by their sha256."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.domain.errors import PersonaError

SMOLLM2_ID = "smollm2-135m"
#: Bases that exist only once `persona model prepare` has built them in the cache directory.
PREPARED_IDS: tuple[str, ...] = (SMOLLM2_ID,)
#: Provenance file written last into a prepared directory: its presence means the directory is complete.
RECORD_FILE = "persona-base.json"


class ModelError(PersonaError):
    """A base model cannot be found, prepared, loaded or verified; the message says what to do."""


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the model's tensors (names in order, dtype, shape, bytes): identifies the exact weights."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def parameter_count(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Eval mode and no gradients: a base is shared and never trained."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Silence transformers' tqdm bars (loading, saving) for a while: processes log lines, not bars on stderr."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_dir(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (float32, frozen) and tokenizer of a transformers model directory, without any network access."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():
        raise ModelError(f"{str(path)!r} is not a transformers model directory (it has no config.json)")
    try:
        with quiet_progress_bars():
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the model directory {str(path)!r}: {e}") from e
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # Batched training and serving pad; the padded positions are masked, so eos is a safe stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return freeze(model), tokenizer
