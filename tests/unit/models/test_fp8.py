"""FP8 GEMMs of the frozen base's projections in batched training (pipeline/models/fp8.py): the quantization's
arithmetic and its bound on the CPU; on a GPU with FP8 tensor cores, the Triton quantization equal to torch's,
``_scaled_mm`` equal to the fp32 reference of the same quantized values, and the training node within FP8's rounding
of its bf16 self. Where FP8 cannot run, nothing changes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models import fp8, lora_kernels, multilora


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def test_rows_are_scaled_to_e4m3s_largest_and_rounded_to_three_mantissa_bits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 200, generator=g) * torch.logspace(-3, 3, 33)[:, None]  # rows of very different scales
    x[5] = 0.0  # an all-zero row
    x = x.to(torch.bfloat16)
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == fp8.E4M3 and q.shape == x.shape and scale.shape == (33, 1) and scale.dtype == torch.float32
    back = q.float() * scale
    xf = x.float()
    nonzero = [i for i in range(33) if i != 5]
    # each row's largest magnitude is e4m3's largest value, exactly
    assert torch.equal(q[nonzero].float().abs().amax(1), torch.full((32,), fp8.E4M3_MAX))
    # normal values within half a step of 3 mantissa bits; below e4m3's smallest normal, half a subnormal step
    bound = torch.maximum(xf.abs() * 2.0**-4, scale * 2.0**-10)
    assert bool(((back - xf).abs() <= bound * 1.0001).all())
    assert not bool(q[5].float().any()) and float(scale[5]) == pytest.approx(fp8.MIN_SCALE)
    with pytest.raises(ValueError, match="rows, width"):
        fp8.quantize_rows(x[None])


def test_the_reference_gemms_stay_within_fp8s_rounding_of_bf16():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g).to(torch.bfloat16)
    w = (torch.randn(128, 256, generator=g) / 16).to(torch.bfloat16)
    dy = torch.randn(64, 128, generator=g).to(torch.bfloat16)
    y, want = fp8.reference_linear(x, w), torch.nn.functional.linear(x.float(), w.float())
    dx, want_dx = fp8.reference_input_grad(dy, w), dy.float() @ w.float()
    # about 2^-5 relative per factor, averaged over the 256 (128) products of a dot
    assert 1e-3 < _rel(y, want) < 4e-2 and 1e-3 < _rel(dx, want_dx) < 4e-2


def test_an_activation_shared_by_projections_is_quantized_once_while_unchanged():
    cache = fp8._LastInput()
    source = torch.randn(1, 6, 32)
    flat = source.view(-1, 32)
    first = cache.get(flat, source)
    assert cache.get(source.reshape(-1, 32), source) is first  # another view of the same input
    source.mul_(2)  # changed in place: quantized again
    second = cache.get(flat, source)
    assert second is not first and torch.equal(second[1], first[1] * 2)
    assert cache.get(flat, torch.randn(1, 6, 32)) is not second  # another input


def test_a_weights_e4m3_copies_are_made_once_and_dropped_with_it():
    w = torch.randn(48, 32)
    fp8.release()
    q = fp8.quantized(w)
    assert fp8.quantized(w) is q and len(fp8._weights) == 1
    assert q.forward.shape == (48, 32) and q.forward_scale.shape == (1, 48)
    assert q.backward.shape == (32, 48) and q.backward_scale.shape == (1, 32)
    w.add_(1)  # changed in place: new copies
    assert fp8.quantized(w) is not q
    del w, q
    assert len(fp8._weights) == 0


def test_without_fp8_gemms_nothing_changes():
    """On the CPU (no FP8 tensor cores) a wrap asked for FP8 computes exactly as one that was not."""
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    assert not fp8.supported(x, torch.zeros(16, 32)) and not fp8.device_supported(torch.device("cpu"))
    base = nn.Linear(32, 16, dtype=torch.bfloat16).requires_grad_(False)
    a = nn.Parameter(torch.randn(3, 2, 32) / 6)
    b = nn.Parameter(torch.randn(3, 16, 2) / 6)
    got = []
    for on in (False, True):
        rows = multilora._Rows(native=True, fp8=on)
        rows.index = torch.tensor([2, 0])
        layer = multilora.MultiLoraLinear.over(base, multilora.LoraStack(a, b, torch.ones(3)), rows)
        a.grad = b.grad = None
        y = layer(x)
        y.float().square().sum().backward()
        got.append((y, a.grad.clone(), b.grad.clone()))
    for left, right in zip(*got, strict=True):
        assert torch.equal(left, right)


needs_fp8 = pytest.mark.skipif(
    not (
        torch.cuda.is_available()
        and fp8.device_supported(torch.device("cuda"))
        and lora_kernels.available(torch.zeros(1, device="cuda", dtype=torch.bfloat16), 1)
    ),
    reason="needs a CUDA GPU with FP8 tensor cores and Triton",
)


@needs_fp8
@pytest.mark.parametrize(("tokens", "d_in", "d_out"), [(1, 64, 32), (777, 2048, 512), (300, 8192, 2048)])
def test_cuda_quantization_and_gemms_equal_the_reference(tokens, d_in, d_out):
    g = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, d_in, device="cuda", generator=g).to(torch.bfloat16)
    w = (torch.randn(d_out, d_in, device="cuda", generator=g) / d_in**0.5).to(torch.bfloat16)
    dy = torch.randn(tokens, d_out, device="cuda", generator=g).to(torch.bfloat16)
    q, s = fp8.quantize_rows(x)  # Triton
    xf = x.float()
    s_torch = (xf.abs().amax(1, keepdim=True) / fp8.E4M3_MAX).clamp(min=fp8.MIN_SCALE)
    q_torch = (xf / s_torch).clamp(-fp8.E4M3_MAX, fp8.E4M3_MAX).to(fp8.E4M3)
    torch.testing.assert_close(s, s_torch, rtol=0, atol=0)
    assert float((q.float() - q_torch.float()).abs().max()) == 0.0
    fp8.release()
    y = fp8.linear(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, d_out)
    assert _rel(y, fp8.reference_linear(x, w)) < 1e-2
    assert _rel(fp8.input_grad(dy, w), fp8.reference_input_grad(dy, w)) < 5e-3
    assert _rel(y, x.float() @ w.float().t()) < 4e-2


@needs_fp8
def test_cuda_training_node_in_fp8_stays_within_its_rounding_of_bf16(monkeypatch):
    """The training node over packed rows (the Triton branch) with the base's GEMMs in FP8 against the same node
    in bf16: output and input gradient (and the no-grad forward) within FP8's rounding and not equal (FP8 ran); the
    stacks' gradients do not go through the base's GEMMs (``dA = dh^T x``, ``dB = dy^T h``): equal."""
    monkeypatch.setattr(fp8, "MIN_WEIGHTS", 0)  # FP8 for a projection this small too
    g = torch.Generator(device="cuda").manual_seed(3)
    users, d_in, d_out = 4, 256, 512
    base = nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    a = nn.Parameter(torch.randn(users, 1, d_in, device="cuda", generator=g) / d_in**0.5)
    b = nn.Parameter(torch.randn(users, d_out, 1, device="cuda", generator=g) * 0.1)
    lengths = [37, 5, 70, 12]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda")
    x = torch.randn(1, sum(lengths), d_in, device="cuda", dtype=torch.bfloat16, generator=g)
    dy = torch.randn(1, sum(lengths), d_out, device="cuda", dtype=torch.bfloat16, generator=g)
    got = []
    for on in (False, True):
        rows = multilora._Rows(native=True, fp8=on)
        layer = multilora.MultiLoraLinear.over(base, multilora.LoraStack(a, b, torch.ones(users, device="cuda")), rows)
        rows.index = torch.tensor([2, 0, 3, 1], device="cuda")
        rows.offsets, rows.longest = offsets, max(lengths)
        rows.token_index = rows.index.repeat_interleave(torch.tensor(lengths, device="cuda"))
        xi = x.clone().requires_grad_(True)
        a.grad = b.grad = None
        y = layer(xi)
        y.backward(dy)
        got.append((y, xi.grad, a.grad.clone(), b.grad.clone()))
        with torch.no_grad():  # the no-grad forward (training's validations) too
            got[-1] += (layer(x),)
    for name, bf16, in_fp8 in zip(("y", "dx", "dA", "dB", "y no-grad"), *got, strict=True):
        if name in ("dA", "dB"):
            assert _rel(in_fp8, bf16) < 1e-5, name
        else:
            assert 1e-4 < _rel(in_fp8, bf16) < 6e-2, name
    fp8.forget_input()


def test_emulated_fp8_rounds_the_base_as_the_gpu_path_and_leaves_the_branch(monkeypatch):
    """`fp8.EMULATE` (bench/fp8_error.py ``--train`` on the CPU): the layer's base output and input gradient are the
    reference FP8 functions', the branch and its gradients are unchanged."""
    monkeypatch.setattr(fp8, "EMULATE", True)
    monkeypatch.setattr(fp8, "MIN_WEIGHTS", 0)
    g = torch.Generator().manual_seed(5)
    base = nn.Linear(64, 32).requires_grad_(False)
    a = nn.Parameter(torch.randn(3, 2, 64, generator=g) / 8)
    b = nn.Parameter(torch.randn(3, 32, 2, generator=g) / 8)
    x = torch.randn(2, 7, 64, generator=g)
    dy = torch.randn(2, 7, 32, generator=g)
    got = []
    for on in (False, True):
        rows = multilora._Rows(native=True, fp8=on)
        rows.index = torch.tensor([2, 0])
        layer = multilora.MultiLoraLinear.over(base, multilora.LoraStack(a, b, torch.ones(3)), rows)
        xi = x.clone().requires_grad_(True)
        a.grad = b.grad = None
        y = layer(xi)
        y.backward(dy)
        got.append((y.detach(), xi.grad, a.grad.clone(), b.grad.clone()))
    (y0, dx0, da0, db0), (y1, dx1, da1, db1) = got
    flat = x.reshape(-1, 64)
    want_y = fp8.reference_linear(flat, base.weight, base.bias) - torch.nn.functional.linear(
        flat, base.weight, base.bias
    )
    torch.testing.assert_close((y1 - y0).reshape(-1, 32), want_y, rtol=1e-4, atol=1e-5)
    flat_dy = dy.reshape(-1, 32)
    want_dx = fp8.reference_input_grad(flat_dy, base.weight) - flat_dy @ base.weight
    torch.testing.assert_close((dx1 - dx0).reshape(-1, 64), want_dx, rtol=1e-4, atol=1e-5)
    assert _rel(y1, y0) > 1e-3 and _rel(dx1, dx0) > 1e-3  # the rounding happened
    torch.testing.assert_close(da1, da0)
    torch.testing.assert_close(db1, db0)


def test_projections_below_the_size_rule_keep_the_bases_dtype(monkeypatch):
    """`fp8.pays`: under `fp8.MIN_WEIGHTS` values a projection is not rounded (emulated here, as on the GPU), at or
    above it it is."""
    monkeypatch.setattr(fp8, "EMULATE", True)
    g = torch.Generator().manual_seed(6)
    base = nn.Linear(64, 32, bias=False).requires_grad_(False)
    a = nn.Parameter(torch.randn(2, 1, 64, generator=g) / 8)
    b = nn.Parameter(torch.randn(2, 32, 1, generator=g) / 8)
    x = torch.randn(1, 5, 64, generator=g)

    def output(fp8_on: bool) -> torch.Tensor:
        rows = multilora._Rows(native=True, fp8=fp8_on)
        rows.index = torch.tensor([1])
        layer = multilora.MultiLoraLinear.over(base, multilora.LoraStack(a, b, torch.ones(2)), rows)
        return layer(x).detach()

    plain = output(False)
    monkeypatch.setattr(fp8, "MIN_WEIGHTS", 64 * 32 + 1)
    assert not fp8.pays(base.weight)
    assert torch.equal(output(True), plain)
    monkeypatch.setattr(fp8, "MIN_WEIGHTS", 64 * 32)
    assert fp8.pays(base.weight)
    assert _rel(output(True), plain) > 1e-3
