"""The host side of a batched training step (pipeline/training/batching.py): micro-batch tensors."""

from __future__ import annotations

import random

import torch

from pipeline.models.encoding import IGNORE, EncodedExample, padded
from pipeline.training.batching import _prepare, _Unit


def _example(rng: random.Random) -> EncodedExample:
    n = rng.randrange(2, 40)
    ids = [rng.randrange(3, 500) for _ in range(n)]
    prompt = rng.randrange(0, n)
    labels = [IGNORE] * prompt + ids[prompt:]
    if rng.random() < 0.1:
        labels = [IGNORE] * n  # nothing to learn in this row
    return EncodedExample(ids, labels)


def _reference(chunk: list[_Unit], pad_id: int) -> tuple[list, list, list]:
    """The micro-batch as a per-token Python loop builds it (the layout `_prepare` documents)."""
    rows = [(u.slot, e.input_ids) for u in chunk for e in u.rows]
    width = max(len(ids) for _, ids in rows)
    packed = [[slot, width - len(ids), *ids, *[pad_id] * (width - len(ids))] for slot, ids in rows]
    picked, paired, r = [], [], 0
    for unit in chunk:
        for e in unit.rows:
            picked += [
                [r * (width - 1) + t, label, unit.slot, r, 0 if unit.pair else 1]
                for t, label in enumerate(e.labels[1:])
                if label != IGNORE
            ]
            r += 1
        if unit.pair:
            counts = [sum(1 for x in e.labels[1:] if x != IGNORE) for e in unit.rows]
            paired.append([unit.slot, r - 2, r - 1, *counts])
    return packed, picked, paired


def test_micro_batch_tensors_equal_the_per_token_layout():
    rng = random.Random(3)
    for _ in range(20):
        chunk = []
        for _ in range(rng.randrange(1, 12)):
            slot = rng.randrange(0, 9)
            if rng.random() < 0.3:
                chunk.append(_Unit(slot, (_example(rng), _example(rng)), True))
            else:
                chunk.append(_Unit(slot, (_example(rng),), False))
        batch = _prepare(chunk, pad_id=0, pin=False)
        packed, picked, paired = _reference(chunk, 0)
        assert batch.packed.tolist() == packed
        assert batch.picked.reshape(-1, 5).tolist() == picked
        assert batch.paired.reshape(-1, 5).tolist() == paired
        assert batch.packed.dtype == batch.picked.dtype == batch.paired.dtype == torch.long


def test_padded_fills_each_row_to_the_width():
    assert padded([[1, 2, 3], [4], []], 4, 0).tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [0, 0, 0, 0]]
    assert padded([[5, 6]], 2, IGNORE).tolist() == [[5, 6]]
    assert padded([], 3, 0).shape == (0, 3)
