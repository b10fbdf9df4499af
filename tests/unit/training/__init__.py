"""Tests of the trainers, on the tiny random model on the CPU."""

from __future__ import annotations

from pipeline.config import TrainingSettings

#: The trainers' tests' settings: a small LoRA on q_proj and v_proj that the tiny model learns in a few steps.
TINY: dict[str, object] = {
    "rank": 4,
    "alpha": 8.0,
    "target_modules": "q_proj,v_proj",
    "learning_rate": 1e-2,
    "batch_size": 8,
    "max_length": 64,
    "max_steps": 10,
    "eval_every": 5,
    "patience": 2,
    "val_fraction": 0.1,
    "save_dtype": "bfloat16",
    "threads": 1,
}


def tiny_settings(**overrides: object) -> TrainingSettings:
    """`TINY` with ``overrides``."""
    return TrainingSettings(**{**TINY, **overrides})  # type: ignore[arg-type]
