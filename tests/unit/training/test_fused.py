"""The fused/chunked loss of batched training (pipeline/training/fused.py) and the background micro-batch builder
(pipeline/training/batching.py `built_ahead`) against their plain references, on the CPU."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pipeline.models.base import load_base
from pipeline.models.encoding import IGNORE
from pipeline.training import fused
from pipeline.training.batching import built_ahead
from pipeline.training.fused import ChunkedLinearNLL, Fused, linear_nll
from pipeline.training.lora import TrainResult
from pipeline.training.multi import UserJob, train_adapters
from tests.unit.training.test_multi import PAIRS, assert_same_adapter, settings, user_examples, user_pairs


def reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The unfused loss the batched trainer computed before: the logits in the weight's dtype, then fp32."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=IGNORE, reduction="none")


def loss_and_grads(fn, hidden, weight, targets, upstream):  # type: ignore[no-untyped-def]
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    out = fn(h, w, targets)
    (out * upstream).sum().backward()
    return out.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_loss_and_gradients_equal_the_unfused_ones(chunk: int, dtype: torch.dtype) -> None:
    """Fresh random inputs each run; per-token upstream gradients of both signs (the batched loss weights tokens per
    user, and SimPO's pair gradient can be negative); ignored targets give 0 and no gradient. Both compute the
    softmax in fp32 (the reference casts the logits with ``.float()``), in another order of sums: tolerance 1e-5 of
    the largest value, elementwise, and 1e-5 relative L2 (seen: 1e-7 to 1e-6)."""
    gen = torch.Generator().manual_seed(int(time.time_ns() % 2**31))
    n, h, v = 50, 16, 97
    hidden = torch.randn(n, h, generator=gen, dtype=dtype) * 3
    weight = torch.randn(v, h, generator=gen, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::9] = IGNORE
    upstream = torch.randn(n, generator=gen, dtype=torch.float32)
    got = loss_and_grads(lambda a, b, t: ChunkedLinearNLL.apply(a, b, t, chunk), hidden, weight, targets, upstream)
    want = loss_and_grads(reference, hidden, weight, targets, upstream)
    for g, w, name in zip(got, want, ("loss", "grad hidden", "grad weight"), strict=True):
        assert g.dtype == w.dtype and bool(torch.isfinite(g).all()), name
        scale = float(w.abs().max())
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5 * scale, msg=name)
        assert float((g - w).norm() / w.norm()) < 1e-5, name
    assert got[0].dtype == torch.float32 and bool((got[0][::9] == 0).all())
    assert bool((got[1][::9] == 0).all())


def test_bf16_chunked_loss_is_the_unfused_one_within_bf16_rounding() -> None:
    """On bf16 inputs the logits are bf16 in both paths (as the trainer's head computes them) and the softmax fp32;
    the gradient is cast to bf16 before the projection in both. Relative L2 within 1e-2 (bf16 operands)."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(64, 32, generator=gen).bfloat16()
    weight = (torch.randn(300, 32, generator=gen) / 4).bfloat16()
    targets = torch.randint(0, 300, (64,), generator=gen)
    upstream = torch.rand(64, generator=gen)
    got = loss_and_grads(lambda a, b, t: ChunkedLinearNLL.apply(a, b, t, 5), hidden, weight, targets, upstream)
    want = loss_and_grads(reference, hidden, weight, targets, upstream)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        assert float((g.float() - w.float()).norm() / w.float().norm()) < 1e-2


def test_linear_nll_modes_and_bad_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 40)  # several chunks of a 13-word vocabulary
    hidden, weight = torch.randn(9, 4), torch.randn(13, 4)
    targets = torch.randint(0, 13, (9,))
    torch.testing.assert_close(linear_nll(hidden, weight, targets, "chunked"), reference(hidden, weight, targets))
    assert torch.equal(linear_nll(hidden, weight, targets, "off"), reference(hidden, weight, targets))
    assert linear_nll(hidden[:0], weight, targets[:0], "chunked").shape == (0,)
    with pytest.raises(ValueError, match="hidden"):
        linear_nll(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="mode"):
        linear_nll(hidden, weight, targets, "fast")
    with pytest.raises(RuntimeError, match="CUDA"):
        linear_nll(hidden, weight, targets, "liger")


@pytest.mark.skipif(
    not torch.cuda.is_available() or fused._liger() is None, reason="needs a CUDA GPU and liger-kernel"
)
def test_cuda_liger_loss_over_a_frozen_head_equals_liger_and_the_unfused_loss() -> None:
    """The one-pass liger path over a frozen head (`LigerTokenNLL`: each token's gradient from the forward, scaled
    by its upstream gradient) against liger's own function (which recomputes the logits in the backward) and the
    unfused fp32 loss: bf16, several chunks, ignored targets, upstream gradients of both signs; the hidden states'
    gradient only (the head is frozen)."""
    g = torch.Generator(device="cuda").manual_seed(11)
    n, h, v = 3000, 256, 32_000
    hidden = (torch.randn(n, h, device="cuda", generator=g) / 4).bfloat16()
    weight = (torch.randn(v, h, device="cuda", generator=g) / 8).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[::17] = IGNORE
    upstream = torch.randn(n, device="cuda", generator=g)
    got = []
    for fn in (
        lambda x, w, t: fused.LigerTokenNLL.apply(x, w, t),
        lambda x, w, t: fused._liger().flce.apply(x, w, t, None, None, IGNORE, 0.0, 0.0, "none")[0],
        lambda x, w, t: reference(x.float(), w.float(), t),
    ):
        x = hidden.clone().requires_grad_(True)
        out = fn(x, weight, targets)
        (out * upstream).sum().backward()
        got.append((out.float(), x.grad.float()))
    (loss, grad), (liger_loss, liger_grad), (ref_loss, ref_grad) = got
    assert torch.equal(loss, liger_loss)  # the same forward kernel
    assert float(grad[::17].abs().max()) == 0.0  # ignored targets: no gradient
    torch.testing.assert_close(grad, liger_grad, rtol=2e-2, atol=2e-4)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=1e-2)
    assert float((grad - ref_grad).norm() / ref_grad.norm()) < 1e-2
    with torch.no_grad():  # validations: the loss alone
        torch.testing.assert_close(fused.LigerTokenNLL.apply(hidden, weight, targets), loss)


def test_the_path_a_run_takes() -> None:
    cpu = torch.device("cpu")
    assert Fused.resolve("auto", cpu) == Fused("chunked", False)  # liger is CUDA-only
    assert Fused.resolve("chunked", cpu) == Fused("chunked", False)
    assert Fused.resolve("off", cpu) == Fused("off", False)
    with pytest.raises(ValueError, match="fused_kernels"):
        Fused.resolve("fast", cpu)


def test_micro_batches_built_ahead_come_in_order_and_errors_in_place() -> None:
    built_by: set[str] = set()

    def build(i: int) -> int:
        built_by.add(threading.current_thread().name)
        if i == 5:
            raise KeyError("five")
        return i * i

    got = []
    with pytest.raises(KeyError, match="five"):
        for value in built_ahead(build, range(10)):
            got.append(value)
    assert got == [0, 1, 4, 9, 16] and built_by == {"persona-micro-batches"}
    assert list(built_ahead(build, range(5))) == [0, 1, 4, 9, 16]
    assert list(built_ahead(build, [])) == []


def test_closing_early_stops_the_builder() -> None:
    before = threading.active_count()
    ahead = built_ahead(lambda i: i, range(10_000), depth=1)
    assert next(ahead) == 0
    ahead.close()
    time.sleep(0.05)
    assert threading.active_count() == before


def test_batched_training_with_the_chunked_loss_equals_the_unfused_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four users with pairs and validation, several micro-batches a step and several loss chunks a micro-batch:
    the adapters of the chunked loss equal the unfused loss's (test_multi compares the default path, chunked on the
    CPU, with stock peft per user)."""
    monkeypatch.setattr(fused, "CHUNK_ELEMENTS", 4096)
    base = load_base("tiny-random")
    pairs = (3, 0, 5, 1)
    results = {}
    for mode in ("chunked", "off"):
        cfg = settings(**PAIRS, fused_kernels=mode)
        jobs = [
            UserJob(user_examples(u, n), tmp_path / mode / str(u), None, 300 + u, user_pairs(u, pairs[u]))
            for u, n in enumerate((20, 12, 30, 8))
        ]
        results[mode] = train_adapters(base, jobs, cfg)
    for u in range(4):
        a, b = results["chunked"][u], results["off"][u]
        assert isinstance(a, TrainResult) and isinstance(b, TrainResult), (a, b)
        assert (a.steps, a.best_step, a.tokens) == (b.steps, b.best_step, b.tokens)
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)
        assert_same_adapter(tmp_path / "chunked" / str(u), tmp_path / "off" / str(u))


def _lora_layer_outputs(native: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from pipeline.models.multilora import LoraStack, wrap_linears

    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)  # the Linear's own init
    model = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False)).to(dtype).requires_grad_(False)
    a = torch.nn.Parameter(torch.randn(3, 4, 32, generator=gen) / 8)
    b = torch.nn.Parameter(torch.randn(3, 48, 4, generator=gen) / 8)
    x = torch.randn(5, 7, 32, generator=gen).to(dtype)
    with wrap_linears(model, {"0": LoraStack(a, b, torch.tensor([2.0, 0.5, 1.0]))}, native=native) as lora:
        lora.set_rows(torch.tensor([0, 2, 1, 0, 2]))
        out = model(x)
        (out.float() * torch.linspace(-1, 1, 48)).sum().backward()
    assert a.grad is not None and b.grad is not None and a.grad.dtype == torch.float32
    return out.detach(), a.grad, b.grad


def test_the_lora_branch_in_the_base_dtype() -> None:
    """On a bf16 base the native branch (bf16, add fused into the GEMM, fp32 weights) is peft's fp32 branch within
    bf16 rounding (relative L2 < 1e-2 on the output and the fp32 gradients); on an fp32 base it is peft's exactly."""
    fp32 = zip(_lora_layer_outputs(True, torch.float32), _lora_layer_outputs(False, torch.float32), strict=True)
    for got, want in fp32:
        assert torch.equal(got, want)
    native, peft_like = _lora_layer_outputs(True, torch.bfloat16), _lora_layer_outputs(False, torch.bfloat16)
    assert native[0].dtype == peft_like[0].dtype == torch.bfloat16
    for got, want in zip(native, peft_like, strict=True):
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2
    assert not torch.equal(native[0], peft_like[0])  # the native path did run


def test_native_branch_over_half_stacks_equals_it_over_fp32_stacks() -> None:
    """The gate keeps its (no-grad) stacks in the base's bf16: the native branch then casts nothing per forward and
    gives bit for bit what it gives over fp32 stacks of the same values (cast then gather = gather then cast)."""
    from pipeline.models.multilora import LoraStack, wrap_linears

    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(32, 48, bias=False)).to(torch.bfloat16).requires_grad_(False)
    a = (torch.randn(3, 4, 32, generator=gen) / 8).to(torch.bfloat16)
    b = (torch.randn(3, 48, 4, generator=gen) / 8).to(torch.bfloat16)
    s = torch.tensor([2.0, 0.5, 1.0])
    x = torch.randn(5, 7, 32, generator=gen).to(torch.bfloat16)
    outs = []
    for stack in (LoraStack(a.float(), b.float(), s), LoraStack(a, b, s.to(torch.bfloat16))):
        with torch.no_grad(), wrap_linears(model, {"0": stack}, native=True) as lora:
            lora.set_rows(torch.tensor([0, 2, 1, 0, 2]))
            outs.append(model(x))
    assert outs[0].dtype == outs[1].dtype == torch.bfloat16
    assert torch.equal(outs[0], outs[1])


def test_batched_directories_load_in_stock_peft_with_equal_tensors(tmp_path: Path) -> None:
    """What `train_adapters` writes straight from its stacked tensors (no PeftModel on the way) is a standard PEFT
    directory: stock ``PeftModel.from_pretrained`` loads it on a fresh base, with the saved tensors bit for bit, for
    a fresh user and one continued from a parent."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    from pipeline.models.base import tiny_random

    base = load_base("tiny-random")
    cfg = settings(max_steps=3, save_dtype="bfloat16")
    first = train_adapters(base, [UserJob(user_examples(0, 12), tmp_path / "parent", None, 5)], cfg)
    assert isinstance(first[0], TrainResult)
    jobs = [
        UserJob(user_examples(1, 12), tmp_path / "fresh", None, 6),
        UserJob(user_examples(0, 12), tmp_path / "child", tmp_path / "parent", 7),
    ]
    assert all(isinstance(r, TrainResult) for r in train_adapters(base, jobs, cfg))
    for name in ("fresh", "child"):
        saved = load_file(tmp_path / name / "adapter_model.safetensors")
        assert saved and all(t.dtype == torch.bfloat16 for t in saved.values())
        assert any(float(t.abs().max()) > 0 for k, t in saved.items() if "lora_B" in k)  # it trained
        loaded = get_peft_model_state_dict(PeftModel.from_pretrained(tiny_random(), tmp_path / name))
        assert loaded.keys() == saved.keys()
        for key, tensor in saved.items():
            assert torch.equal(loaded[key].float(), tensor.float()), key
