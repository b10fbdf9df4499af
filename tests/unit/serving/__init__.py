"""Tests of the serving worker's parts on the CPU (the engines' CUDA tests run on a GPU only)."""

from __future__ import annotations

import torch

#: The engines' tests' adapters (rank, alpha, targets, saved dtype): heterogeneous ranks and target sets, one adapter
#: stored in bf16 (the conftest's ``adapter_dirs`` writes them).
USERS = [
    (1, 2, ["q_proj", "v_proj"], torch.float32),
    (4, 8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], torch.float32),
    (8, 4, ["k_proj", "o_proj", "down_proj"], torch.bfloat16),
    (2, 16, ["gate_proj", "up_proj"], torch.float32),
]
#: Token prompts of unequal lengths.
PROMPTS = [[10, 20, 30, 40, 50], [7, 8, 9], [100, 101, 102, 103, 104, 105, 106, 107], [200, 3]]


def padded(prompts: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``prompts`` as one batch padded with 0 on the ``side`` ("left" or "right"): ids, attention mask, width."""
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, sl] = torch.tensor(p)
        mask[i, sl] = 1
    return ids, mask, width
