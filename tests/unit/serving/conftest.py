from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from pipeline.models.base import tiny_random
from tests.unit.serving import USERS


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory) -> list[Path]:
    """One PEFT directory per entry of `USERS` over the tiny random model, random LoRA weights (seeded)."""
    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for i, (r, alpha, targets, dtype) in enumerate(USERS):
        torch.manual_seed(100 + i)
        model = get_peft_model(
            tiny_random(), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
        )
        path = root / f"user{i}"
        model.save_pretrained(path)
        if dtype != torch.float32:
            f = path / "adapter_model.safetensors"
            save_file({k: v.to(dtype) for k, v in load_file(f).items()}, f)
        dirs.append(path)
    return dirs


@pytest.fixture(scope="module")
def stock(adapter_dirs: list[Path]) -> list[PeftModel]:
    """Stock peft over the tiny random model, one per directory of ``adapter_dirs``: what the engines must equal."""
    return [PeftModel.from_pretrained(tiny_random(), path).eval() for path in adapter_dirs]
