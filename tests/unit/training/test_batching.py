"""The host side of a batched training step (pipeline/training/batching.py): micro-batch tensors."""

from __future__ import annotations

import random

import torch

from pipeline.models.encoding import IGNORE, EncodedExample, padded
from pipeline.training.batching import _prepare, _Unit, micro_batches


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


def test_stacked_weights_step_is_per_user_adamw_with_clipping_and_leaves_the_others_alone():
    """`StackedWeights.step` for some users equals, per user, clip_grad_norm_ then torch.optim.AdamW over that
    user's own tensors; the users not stepped keep their weights, moments and step counts; the stacks stay views
    of the table."""
    from pipeline.config import TrainingSettings
    from pipeline.training.batching import ADAMW_BETAS, ADAMW_EPS, ADAMW_WEIGHT_DECAY, StackedWeights

    torch.manual_seed(0)
    users, shapes = 4, [(2, 5), (7, 2), (3,)]
    stacks = [torch.randn(users, *s) for s in shapes]
    weights = StackedWeights(stacks)
    settings = TrainingSettings(learning_rate=0.05, max_grad_norm=0.5)
    # per user, the same tensors trained alone by torch's optimizer and clipping
    alone = [[torch.nn.Parameter(t[u].clone()) for t in stacks] for u in range(users)]
    optims = [
        torch.optim.AdamW(ps, lr=0.05, betas=ADAMW_BETAS, eps=ADAMW_EPS, weight_decay=ADAMW_WEIGHT_DECAY)
        for ps in alone
    ]
    stepped = {0: 0, 1: 0, 2: 0, 3: 0}
    for slots in ([0, 1, 2, 3], [1, 3], [0, 1, 2, 3], [2]):
        grads = [torch.randn(users, *s) * 3 for s in shapes]
        for p, g in zip(weights.params, grads, strict=True):
            p.grad = g.clone()
        before = weights.table.clone(), weights.moments[0].clone(), weights.steps.clone()
        weights.step(slots, settings)
        weights.zero_grad()
        for u in slots:
            for p, g in zip(alone[u], grads, strict=True):
                p.grad = g[u].clone()
            torch.nn.utils.clip_grad_norm_(alone[u], 0.5)
            optims[u].step()
            stepped[u] += 1
        others = [u for u in range(users) if u not in slots]
        for u in others:
            assert torch.equal(weights.table[u], before[0][u])
            assert torch.equal(weights.moments[0][u], before[1][u])
            assert weights.steps[u] == before[2][u]
        for u in range(users):
            for p, mine in zip(alone[u], weights.params, strict=True):
                torch.testing.assert_close(mine[u].detach(), p.detach(), rtol=1e-5, atol=1e-6)
    assert [int(s) for s in weights.steps] == [stepped[u] for u in range(users)]
    for p, view in zip(weights.params, weights.views(weights.table), strict=True):
        assert p.data_ptr() == view.data_ptr() and torch.equal(p.detach(), view)


def test_packed_micro_batches_count_the_tokens_they_run():
    """Packed rows: a micro-batch's budget counts each row's own tokens, without the shared prefix (run once per
    user, not per row); padded rows count the padded rectangle. Every unit comes out once, shortest first."""
    rows = [EncodedExample(list(range(n)), [IGNORE] * n) for n in (30, 40, 50, 60)]
    units = [_Unit(0, (e,), False) for e in rows]

    def cut(budget: int, shared: int, packed: bool) -> list[list[int]]:
        return [[len(u.rows[0].input_ids) for u in c] for c in micro_batches(units, budget, shared, packed)]

    assert cut(100, 0, True) == [[30, 40], [50], [60]]
    assert cut(100, 20, True) == [[30, 40, 50, 60]]  # 10 + 20 + 30 + 40 = 100
    assert cut(90, 20, True) == [[30, 40, 50], [60]]
    assert cut(100, 0, False) == [[30, 40], [50], [60]]  # 2 x 40 = 80, 3 x 50 > 100
    assert cut(100, 20, False) == [[30, 40, 50], [60]]  # 3 x (50 - 20) = 90; 4 x 40 > 100
    assert sorted(x for c in cut(1, 20, True) for x in c) == [30, 40, 50, 60]
