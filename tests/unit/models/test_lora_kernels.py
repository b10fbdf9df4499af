"""The Triton LoRA-branch kernels (pipeline/models/lora_kernels.py) against the torch path of MultiLoraLinear, on
a GPU: training's forward and its gradients (input, A and B), and the gate's no-grad forward over stacks that are
views of one table; both forms of the kernels (a program walks the whole width, or blocks of it: `SPLIT`), and
training's dense form of the branch (`multilora._DenseBranch`) on packed rows. On a
machine without CUDA and Triton the kernels are not used (`available` is False)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models import lora_kernels, multilora


@pytest.fixture(params=[False, True], ids=["whole-width", "split"], autouse=True)
def split(request, monkeypatch):
    """Every test with both forms of the kernels (`lora_kernels.SPLIT`)."""
    monkeypatch.setattr(lora_kernels, "SPLIT", request.param)
    return request.param


def test_not_available_without_cuda():
    assert not lora_kernels.available(torch.zeros(2, 3, 4, dtype=torch.bfloat16), 1)


needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and lora_kernels.available(torch.zeros(1, device="cuda", dtype=torch.bfloat16), 1)),
    reason="needs CUDA and Triton",
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


@needs_gpu
@pytest.mark.parametrize(("rank", "tokens", "d_in", "d_out"), [(1, 37, 96, 80), (3, 70, 64, 200), (20, 9, 130, 64)])
def test_training_branch_equals_the_torch_path(monkeypatch, rank, tokens, d_in, d_out):
    gen = torch.Generator(device="cuda").manual_seed(rank)
    users, rows = 5, 11
    base = nn.Linear(d_in, d_out, bias=True, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    a = nn.Parameter(torch.randn(users, rank, d_in, device="cuda", generator=gen) / d_in**0.5)
    b = nn.Parameter(torch.randn(users, d_out, rank, device="cuda", generator=gen) * 0.1)
    s = torch.rand(users, device="cuda", generator=gen) + 0.5
    # the row index as training passes it: a column of the batch's packed rows (not contiguous)
    packed = torch.tensor([[u, 7, 9] for u in [0, 3, 3, 1, 4, 0, 2, 2, 3, 1, 0]], device="cuda")
    index = packed[:, 0]
    assert not index.is_contiguous()
    x = torch.randn(rows, tokens, d_in, device="cuda", dtype=torch.bfloat16, generator=gen)
    dy = torch.randn(rows, tokens, d_out, device="cuda", dtype=torch.bfloat16, generator=gen)
    rows_index = multilora._Rows(native=True)
    rows_index.index = index
    layer = multilora.MultiLoraLinear.over(base, multilora.LoraStack(a, b, s), rows_index)
    got = {}
    for triton in (False, True):
        monkeypatch.setattr(multilora, "TRITON_BRANCH", triton)
        xi = x.clone().requires_grad_(True)
        a.grad = b.grad = None
        y = layer(xi)
        y.backward(dy)
        got[triton] = (y.detach(), xi.grad, a.grad.clone(), b.grad.clone())
    for name, g, r in zip(("y", "dx", "dA", "dB"), got[True], got[False], strict=True):
        assert g.shape == r.shape and g.dtype == r.dtype, name
        assert _rel(g, r) < 2e-2, (name, _rel(g, r))
    # users without rows get no gradient
    assert float(got[True][2][[u for u in range(users) if u not in index.tolist()]].abs().sum()) == 0.0


@needs_gpu
def test_gate_forward_over_table_views_equals_the_torch_path(monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(7)
    n, rank, d_in, d_out = 6, 2, 72, 100
    # the gate's stacks: bf16 views of one table's columns (row stride = the table's width)
    table = torch.randn(n, rank * d_in + d_out * rank + 5, device="cuda", generator=gen).to(torch.bfloat16) * 0.2
    a = table[:, : rank * d_in].view(n, rank, d_in)
    b = table[:, rank * d_in : rank * d_in + d_out * rank].view(n, d_out, rank)
    s = torch.full((n,), 2.0, device="cuda", dtype=torch.bfloat16)
    base = nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    rows_index = multilora._Rows(native=True)
    rows_index.index = torch.tensor([5, 0, 2, 2], device="cuda")
    layer = multilora.MultiLoraLinear.over(base, multilora.LoraStack(a, b, s), rows_index)
    x = torch.randn(4, 33, d_in, device="cuda", dtype=torch.bfloat16, generator=gen)
    with torch.no_grad():
        monkeypatch.setattr(multilora, "TRITON_BRANCH", False)
        want = layer(x)
        monkeypatch.setattr(multilora, "TRITON_BRANCH", True)
        got = layer(x)
    assert _rel(got, want) < 1e-2


@needs_gpu
def test_packed_rows_equal_padded_rows(monkeypatch):
    """Rows of different lengths packed into one sequence (`LoraWrap.set_packed`, the kernels over row offsets):
    the output and the gradients of the padded rows through the torch path."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    users, d_in, d_out, rank = 4, 96, 80, 1
    lengths = [37, 5, 70, 12, 64]
    slots = torch.tensor([3, 0, 3, 1, 2], device="cuda")
    base = nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    a = nn.Parameter(torch.randn(users, rank, d_in, device="cuda", generator=gen) / d_in**0.5)
    b = nn.Parameter(torch.randn(users, d_out, rank, device="cuda", generator=gen) * 0.1)
    s = torch.full((users,), 2.0, device="cuda")
    rows = [torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16, generator=gen) for n in lengths]
    grads = [torch.randn(n, d_out, device="cuda", dtype=torch.bfloat16, generator=gen) for n in lengths]
    wrap = multilora._Rows(native=True)
    layer = multilora.MultiLoraLinear.over(base, multilora.LoraStack(a, b, s), wrap)
    width = max(lengths)

    def pad(ts: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.cat([t, t.new_zeros(width - len(t), t.shape[1])]) for t in ts])

    monkeypatch.setattr(multilora, "TRITON_BRANCH", False)
    x = pad(rows).requires_grad_(True)
    wrap.index, wrap.offsets, wrap.token_index = slots, None, None
    y = layer(x)
    y.backward(pad(grads))
    want_y = torch.cat([y[i, :n] for i, n in enumerate(lengths)])
    want_dx = torch.cat([x.grad[i, :n] for i, n in enumerate(lengths)])
    want_ab = (a.grad.clone(), b.grad.clone())
    a.grad = b.grad = None
    monkeypatch.setattr(multilora, "TRITON_BRANCH", True)
    flat = torch.cat(rows)[None].requires_grad_(True)
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda", dtype=torch.int32)
    token_rows = torch.repeat_interleave(
        torch.arange(len(lengths), device="cuda"), torch.tensor(lengths, device="cuda")
    )
    wrap.index, wrap.offsets, wrap.longest, wrap.token_index = slots, offsets, width, slots[token_rows]
    got_y = layer(flat)
    got_y.backward(torch.cat(grads)[None])
    assert _rel(got_y[0], want_y) < 1e-2 and _rel(flat.grad[0], want_dx) < 2e-2
    assert _rel(a.grad, want_ab[0]) < 2e-2 and _rel(b.grad, want_ab[1]) < 2e-2
    # the dense form of the branch (`multilora._DenseBranch`, cuBLAS GEMMs with fp32 stack gradients) on the GPU
    monkeypatch.setattr(multilora, "DENSE_BRANCH", True)
    monkeypatch.setattr(multilora, "DENSE_MAX_SHARE", 1.0)
    assert layer._dense(flat)
    a.grad = b.grad = flat.grad = None
    got_y = layer(flat)
    got_y.backward(torch.cat(grads)[None])
    assert _rel(got_y[0], want_y) < 1e-2 and _rel(flat.grad[0], want_dx) < 2e-2
    assert _rel(a.grad, want_ab[0]) < 2e-2 and _rel(b.grad, want_ab[1]) < 2e-2


@needs_gpu
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_grouped_kernels_equal_a_node_a_projection(monkeypatch, packed):
    """q|k|v through `multilora._TrainGroup` on the kernels (one shrink over the siblings' A stacks side by side,
    a scale per column; each sibling's expand and dshrink on its block of ``h`` / ``dh``; one dexpand) give the
    outputs and the input and stack gradients of one `_TrainBranch` a projection, rows padded or packed; and a tiny
    Llama's logits and stack gradients with q|k|v and gate|up grouped."""
    from tests.unit.models.test_multilora import _grouped_model_grads, grouped_siblings_compared

    diffs = grouped_siblings_compared("cuda", monkeypatch, packed=packed)
    assert all(d < 1e-2 for d in diffs.values()), diffs
    want, want_grads, names = _grouped_model_grads("cuda", False, monkeypatch, packed=packed)
    assert "_TrainGroupBackward" not in names
    got, got_grads, names = _grouped_model_grads("cuda", True, monkeypatch, packed=packed)
    assert names.count("_TrainGroupBackward") == 4
    assert _rel(got, want) < 1e-2
    for path, (da, db) in want_grads.items():  # bf16 sums in another order, carried down (test_multilora)
        ga, gb = got_grads[path]
        assert _rel(ga, da) < 5e-2 and _rel(gb, db) < 5e-2, (path, _rel(ga, da), _rel(gb, db))
