"""Multi-LoRA layers: per-row adapters of different ranks equal a per-row reference; limits; inject/remove."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from pipeline.domain.errors import PersonaError
from pipeline.models import multilora
from pipeline.models.base import tiny_random, weights_sha256
from pipeline.models.multilora import AdapterFormatError, AdapterLimitError, MultiLoraLinear


def _rows(index: list[int]) -> multilora._Rows:
    rows = multilora._Rows()
    rows.index = torch.tensor(index)
    return rows


def test_layer_equals_per_row_reference_with_heterogeneous_ranks():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    rows = multilora._Rows()
    layer = MultiLoraLinear(base, slots=4, max_rank=8, rows=rows)
    adapters = {}
    for slot, (rank, scale) in enumerate([(1, 2.0), (4, 0.5), (8, 1.0)]):
        a, b = torch.randn(rank, 16), torch.randn(12, rank)
        adapters[slot] = (a, b, scale)
        with torch.no_grad():
            layer.lora_A[slot, :rank] = a
            layer.lora_B[slot, :, :rank] = b
            layer.scaling[slot] = scale
    index = [2, -1, 0, 1, 3, 0]  # slot 3 is empty: base only, like -1
    x = torch.randn(len(index), 5, 16)
    rows.index = torch.tensor(index)
    got = layer(x)
    for i, slot in enumerate(index):
        want = base(x[i])
        if slot in adapters:
            a, b, scale = adapters[slot]
            want = want + (x[i] @ a.T @ b.T) * scale
        torch.testing.assert_close(got[i], want, atol=1e-5, rtol=1e-5)
    rows.index = None
    torch.testing.assert_close(layer(x), base(x))


def _peft_adapter(tmp_path, name, r, alpha, targets, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_random(), LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    )
    path = tmp_path / name
    model.save_pretrained(path)
    return path


def test_inject_load_remove_restores_the_base(tmp_path):
    model = tiny_random()
    before = weights_sha256(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    want = model(ids).logits
    handle = multilora.inject(model, ("q_proj", "v_proj"), slots=2, max_rank=4)
    assert len(handle.layers) == 4  # 2 layers x (q, v)
    state, config = multilora.read_adapter_dir(_peft_adapter(tmp_path, "a", 4, 8, ["q_proj", "v_proj"]))
    multilora.load_slot(handle, 0, state, config)
    multilora.set_rows(handle, torch.tensor([0]))
    assert not torch.allclose(model(ids).logits, want)
    multilora.set_rows(handle, torch.tensor([-1]))
    torch.testing.assert_close(model(ids).logits, want)
    handle.remove()
    assert isinstance(model.model.layers[0].self_attn.q_proj, nn.Linear)
    assert weights_sha256(model) == before
    torch.testing.assert_close(model(ids).logits, want, atol=0, rtol=0)


def test_limits_are_refused_and_leave_the_slot_unchanged(tmp_path):
    model = tiny_random()
    handle = multilora.inject(model, ("q_proj", "v_proj"), slots=2, max_rank=4)
    ok_state, ok_config = multilora.read_adapter_dir(_peft_adapter(tmp_path, "ok", 2, 4, ["q_proj", "v_proj"]))
    multilora.load_slot(handle, 1, ok_state, ok_config)
    snapshot = {p: layer.lora_A[1].clone() for p, layer in handle.layers.items()}

    big_state, big_config = multilora.read_adapter_dir(_peft_adapter(tmp_path, "big", 8, 8, ["q_proj"]))
    with pytest.raises(AdapterLimitError, match=r"rank 8 .* maximum rank 4"):
        multilora.load_slot(handle, 1, big_state, big_config)
    mlp_state, mlp_config = multilora.read_adapter_dir(_peft_adapter(tmp_path, "mlp", 2, 4, ["q_proj", "up_proj"]))
    with pytest.raises(AdapterLimitError, match="up_proj"):
        multilora.load_slot(handle, 1, mlp_state, mlp_config)
    with pytest.raises(AdapterLimitError, match="use_dora"):
        multilora.load_slot(handle, 1, ok_state, {**ok_config, "use_dora": True})
    with pytest.raises(AdapterLimitError, match="slot 2 is out of range"):
        multilora.load_slot(handle, 2, ok_state, ok_config)
    with pytest.raises(AdapterLimitError, match="slot indices"):
        multilora.set_rows(handle, torch.tensor([0, 5]))
    with pytest.raises(AdapterLimitError, match="unknown targets"):
        multilora.inject(tiny_random(), ("q_proj", "lm_head"), slots=1, max_rank=1)
    for p, layer in handle.layers.items():
        torch.testing.assert_close(layer.lora_A[1], snapshot[p], atol=0, rtol=0)
    assert issubclass(AdapterLimitError, PersonaError)

    multilora.clear_slot(handle, 1)
    assert all(float(layer.lora_A[1].abs().sum()) == 0 for layer in handle.layers.values())


def test_read_adapter_dir_errors(tmp_path):
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json"):
        multilora.read_adapter_dir(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterFormatError, match=r"adapter_model\.safetensors"):
        multilora.read_adapter_dir(tmp_path)


def test_read_safetensors_equals_the_library(tmp_path):
    """`read_safetensors` (one read, views of one buffer) gives what safetensors' load_file gives, and with a dtype
    what ``.to(dtype)`` of it gives; a file it does not take apart goes to the library (its answer, its error)."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from pipeline.models.multilora import read_safetensors

    torch.manual_seed(0)
    cases = {
        "adapter": {f"m{i}.lora_A.weight": torch.randn(1, 16).bfloat16() for i in range(5)}
        | {f"m{i}.lora_B.weight": torch.randn(24, 1).bfloat16() for i in range(5)},
        "mixed": {
            "a": torch.randn(3, 5),
            "b": torch.randn(7).bfloat16(),
            "c": torch.arange(5),
            "d": torch.zeros(0, 3),
            "e": torch.randn(3).half(),
            "f": torch.tensor([1, 2], dtype=torch.uint8),
        },
        "empty": {},
    }
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        for dtype in (None, torch.float32):
            want = load_file(str(path))
            if dtype is not None:
                want = {k: v.to(dtype) if v.is_floating_point() else v for k, v in want.items()}
            got = read_safetensors(path, dtype)
            assert set(got) == set(want)
            for key, value in want.items():
                assert got[key].dtype == value.dtype and got[key].shape == value.shape
                assert torch.equal(got[key], value)
    # A gap between two tensors' data: not this reader's to judge; the library refuses it with its own error.
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "b": {"dtype": "F32", "shape": [1],
              "data_offsets": [8, 12]}}  # fmt: skip
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    gap = tmp_path / "gap.safetensors"
    gap.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(12))
    with pytest.raises(SafetensorError):
        read_safetensors(gap)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "adapter.safetensors").read_bytes()[:40])
    with pytest.raises(SafetensorError):
        read_safetensors(cut)


def test_adapter_table_holds_the_adapter_dir_tensors(tmp_path):
    """`read_adapter_table` (one vector per adapter, the layout parsed once per header) gives the tensors
    `read_adapter_dir` gives, for an adapter of one dtype and for one the library must read; a file cut short
    under a header already seen is an AdapterFormatError, not a short table."""
    import json

    from safetensors.torch import save_file

    from pipeline.models.multilora import AdapterFormatError, read_adapter_dir, read_adapter_table

    torch.manual_seed(1)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    cases = {
        "one": {"base_model.model.m.q_proj.lora_A.weight": torch.randn(2, 8).bfloat16(),
                "base_model.model.m.q_proj.lora_B.weight": torch.randn(6, 2).bfloat16()},
        "mixed": {"base_model.model.m.q_proj.lora_A.weight": torch.randn(2, 8),
                  "base_model.model.m.q_proj.lora_B.weight": torch.randn(6, 2).bfloat16()},
    }  # fmt: skip
    for name, tensors in cases.items():
        for copy in ("a", "b"):  # the second read of a layout comes from the parsed-header cache
            folder = tmp_path / f"{name}-{copy}"
            folder.mkdir()
            (folder / "adapter_config.json").write_text(json.dumps(config))
            save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
            table = read_adapter_table(folder, torch.float32)
            want, _ = read_adapter_dir(folder, torch.float32)
            got = table.tensors()
            assert table.config == config and set(got) == set(want)
            assert all(torch.equal(got[k], want[k]) for k in want)
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "adapter_config.json").write_text(json.dumps(config))
    whole = (tmp_path / "one-a" / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").write_bytes(whole[:-4])
    with pytest.raises(AdapterFormatError):
        read_adapter_table(cut)


@pytest.mark.parametrize("rank", [1, 4])
def test_training_node_equals_the_autograd_ops_in_bf16(rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batched training's layer in bf16 over fp32 stacks (`_TrainBranch`, one autograd node that adds the branch's
    input gradient into the base's in place) gives the output and gradients of the plain autograd ops."""
    torch.manual_seed(0)
    users, rows, tokens, d_in, d_out = 5, 7, 6, 24, 40
    base = nn.Linear(d_in, d_out, bias=False).to(torch.bfloat16).requires_grad_(False)
    a = nn.Parameter(torch.randn(users, rank, d_in) / d_in**0.5)
    b = nn.Parameter(torch.randn(users, d_out, rank) * 0.1)
    scaling = torch.rand(users) + 0.5
    index = torch.randint(0, users, (rows,))
    x = torch.randn(rows, tokens, d_in).to(torch.bfloat16)
    upstream = torch.randn(rows, tokens, d_out).to(torch.bfloat16)
    wrap = multilora._Rows(native=True)
    wrap.index = index
    layer = MultiLoraLinear.over(base, multilora.LoraStack(a, b, scaling), wrap)
    got = {}
    for node in (True, False):
        monkeypatch.setattr(multilora, "TRAIN_BRANCH", node)
        a.grad = b.grad = None
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out.float() * upstream.float()).sum().backward()
        assert out.dtype == torch.bfloat16 and out.shape == (rows, tokens, d_out)
        got[node] = (out.detach().float(), xi.grad.float(), a.grad.clone(), b.grad.clone())
    for mine, ref in zip(got[True], got[False], strict=True):
        assert (mine - ref).norm() / ref.norm() < 1e-2
    # Users without rows get no gradient; every user with rows gets one.
    seen = set(index.tolist())
    for user in range(users):
        assert bool(got[True][2][user].abs().sum() > 0) == (user in seen)


@pytest.mark.parametrize("rank", [1, 3])
def test_dense_branch_equals_the_per_token_path_on_packed_rows(rank: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed training rows through `_DenseBranch` (the branch as dense GEMMs over every stack row's columns, the
    other users' blocks zero) give the output and gradients of the per-token torch path in bf16; a user without
    tokens gets no gradient; the share rule picks the dense form for narrow stacks only."""
    torch.manual_seed(1)
    users, d_in, d_out = 5, 24, 40
    lengths = [3, 7, 1, 5, 6, 2]
    base = nn.Linear(d_in, d_out, bias=True).to(torch.bfloat16).requires_grad_(False)
    a = nn.Parameter(torch.randn(users, rank, d_in) / d_in**0.5)
    b = nn.Parameter(torch.randn(users, d_out, rank) * 0.1)
    scaling = torch.rand(users) + 0.5
    index = torch.tensor([0, 2, 3, 2, 0, 1])  # user 4 has no tokens
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    x = torch.randn(1, sum(lengths), d_in).to(torch.bfloat16)
    upstream = torch.randn(1, sum(lengths), d_out).to(torch.bfloat16)
    wrap = multilora._Rows(native=True)
    wrap.index, wrap.offsets, wrap.longest = index, offsets, max(lengths)
    wrap.token_index = torch.repeat_interleave(index, torch.tensor(lengths))
    layer = MultiLoraLinear.over(base, multilora.LoraStack(a, b, scaling), wrap)
    monkeypatch.setattr(multilora, "DENSE_MAX_SHARE", 1.0)
    got = {}
    for dense in (True, False):
        monkeypatch.setattr(multilora, "DENSE_BRANCH", dense)
        assert layer._dense(x) is dense
        a.grad = b.grad = None
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out.float() * upstream.float()).sum().backward()
        assert out.dtype == torch.bfloat16 and out.shape == (1, sum(lengths), d_out)
        got[dense] = (out.detach().float(), xi.grad.float(), a.grad.clone(), b.grad.clone())
    for mine, ref in zip(got[True], got[False], strict=True):
        assert (mine - ref).norm() / ref.norm() < 1e-2
    assert got[True][2].dtype == a.dtype and got[True][3].shape == b.shape
    assert torch.equal(got[True][2][4], torch.zeros_like(got[True][2][4]))
    assert torch.equal(got[True][3][4], torch.zeros_like(got[True][3][4]))
    assert all(bool(got[True][2][u].abs().sum() > 0) for u in range(4))
    monkeypatch.setattr(multilora, "DENSE_BRANCH", True)
    monkeypatch.setattr(multilora, "DENSE_MAX_SHARE", users * rank / min(d_in, d_out))  # the columns: exactly it
    assert layer._dense(x)
    monkeypatch.setattr(multilora, "DENSE_MAX_SHARE", (users * rank - 0.5) / min(d_in, d_out))
    assert not layer._dense(x)
    with torch.no_grad():
        assert not layer._dense(x)  # no gradients: the gate's path, not this one


def test_dense_no_grad_forward_equals_the_torch_path_on_padded_and_packed_rows(monkeypatch: pytest.MonkeyPatch):
    """The gate's no-grad forward through `_dense_forward` (rows of equal length, and packed rows) gives the torch
    path's output in bf16."""
    torch.manual_seed(2)
    users, rank, d_in, d_out = 4, 2, 32, 48
    base = nn.Linear(d_in, d_out, bias=False).to(torch.bfloat16).requires_grad_(False)
    stack = multilora.LoraStack(torch.randn(users, rank, d_in) / d_in**0.5, torch.randn(users, d_out, rank) * 0.1,
                                torch.rand(users) + 0.5)  # fmt: skip
    wrap = multilora._Rows(native=True)
    layer = MultiLoraLinear.over(base, stack, wrap)
    monkeypatch.setattr(multilora, "DENSE_MAX_SHARE", 1.0)
    x = torch.randn(3, 5, d_in).to(torch.bfloat16)
    wrap.index = torch.tensor([2, 0, 2])
    lengths = [4, 1, 6]
    packed = torch.randn(1, sum(lengths), d_in).to(torch.bfloat16)
    got = {}
    with torch.no_grad():
        for dense in (True, False):
            monkeypatch.setattr(multilora, "DENSE_BRANCH", dense)
            assert layer._dense_fits(x) is dense
            wrap.offsets = wrap.token_index = None
            padded = layer(x).float()
            wrap.offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
            wrap.token_index = torch.repeat_interleave(torch.tensor([1, 3, 0]), torch.tensor(lengths))
            wrap.index, wrap.longest = torch.tensor([1, 3, 0]), max(lengths)
            got[dense] = (padded, layer(packed).float())
            wrap.index = torch.tensor([2, 0, 2])
    for mine, ref in zip(got[True], got[False], strict=True):
        assert mine.shape == ref.shape and (mine - ref).norm() / ref.norm() < 1e-2


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _node_names(out: torch.Tensor) -> list[str]:
    """The names of the autograd nodes behind ``out``."""
    seen, todo, names = set(), [out.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return names


def _grouped_model_grads(
    device: str, group: bool, monkeypatch: pytest.MonkeyPatch, packed: bool = False, dtype=torch.bfloat16
):
    """A tiny Llama in ``dtype`` (bf16: the native training layers) with a trainable rank-2 stack (fp32) on each
    of its seven projections (a different scaling on each, every row its own), trained one backward through
    `wrap_linears`' layers: the logits, every stack gradient, and the autograd nodes' names."""
    monkeypatch.setattr(multilora, "GROUP_BRANCH", group)
    torch.manual_seed(3)
    model = tiny_random(seed=5).to(device=device, dtype=dtype).requires_grad_(False)
    users, rank = 4, 2
    stacks = {}
    for i, layer in enumerate(model.model.layers):
        for j, name in enumerate(_PROJECTIONS):
            owner = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            linear = getattr(owner, name)
            a = torch.randn(users, rank, linear.in_features) / linear.in_features**0.5
            b = torch.randn(users, linear.out_features, rank) * 0.3
            scaling = torch.rand(users) + 0.5 + j
            path = f"model.layers.{i}.{'self_attn' if owner is layer.self_attn else 'mlp'}.{name}"
            stacks[path] = multilora.LoraStack(
                nn.Parameter(a.to(device)), nn.Parameter(b.to(device)), scaling.to(device)
            )
    wrap = multilora.wrap_linears(model, stacks, native=True)
    lengths = [9, 4, 12]
    index = torch.tensor([2, 0, 2], device=device)
    ids = [torch.randint(3, 384, (n,), generator=torch.Generator().manual_seed(n)).to(device) for n in lengths]
    if packed:
        offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device, dtype=torch.int32)
        token_index = torch.repeat_interleave(index, torch.tensor(lengths, device=device))
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]
        wrap.set_packed(index, offsets, max(lengths), token_index)
        logits = model(input_ids=torch.cat(ids)[None], position_ids=positions).logits
    else:
        wrap.set_rows(index)
        logits = model(input_ids=torch.stack([t[:4] for t in ids])).logits
    upstream = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(device)
    (logits.float() * upstream).sum().backward()
    grads = {p: (s.lora_A.grad.clone(), s.lora_B.grad.clone()) for p, s in stacks.items()}
    names = _node_names(logits)
    assert len(wrap.groups) == 2 * len(model.model.layers)
    wrap.remove()
    return logits.detach().float(), grads, names


def test_grouped_training_node_equals_a_node_a_projection(monkeypatch: pytest.MonkeyPatch) -> None:
    """q|k|v and gate|up as one autograd node each (`_TrainGroup`: the siblings' shrinks in one pass over their
    input, their input gradients summed in one place) give the logits and stack gradients of one `_TrainBranch` a
    projection, in bf16 on the CPU (the torch path; tests/unit/models/test_lora_kernels.py has the kernels')."""
    want, want_grads, names = _grouped_model_grads("cpu", False, monkeypatch)
    assert "_TrainGroupBackward" not in names and names.count("_TrainBranchBackward") == 14
    got, got_grads, names = _grouped_model_grads("cpu", True, monkeypatch)
    assert names.count("_TrainGroupBackward") == 4 and names.count("_TrainBranchBackward") == 4  # o, down x 2 layers
    assert torch.equal(got, want)  # the forward's arithmetic is the same
    # The same model in fp32 (the stacks' own dtype: peft's arithmetic): how far bf16 is from it either way.
    _, fp32_grads, _ = _grouped_model_grads("cpu", False, monkeypatch, dtype=torch.float32)
    for path, (da, db) in want_grads.items():
        ga, gb = got_grads[path]
        if ".layers.1." in path:  # the last layer: the same arithmetic, nothing summed differently above it
            assert torch.equal(ga, da) and torch.equal(gb, db), path
        # Below it the input gradient of q|k|v (gate|up) is summed in another order in bf16, and the rounding
        # travels down through attention: the first layer's stack gradients move by up to a few percent, where bf16
        # itself puts either way 5-45% from the fp32 model's on this tiny random model (a layer alone:
        # `test_grouped_siblings_equal_a_node_a_projection`, within 1%).
        assert (ga - da).norm() / da.norm() < 5e-2, path
        assert (gb - db).norm() / db.norm() < 5e-2, path
        for g, w, ref in ((ga, da, fp32_grads[path][0]), (gb, db, fp32_grads[path][1])):
            assert (g - ref).norm() <= 1.25 * (w - ref).norm() + 1e-6, path
        assert float(ga[[1, 3]].abs().sum()) == 0.0 and float(gb[[1, 3]].abs().sum()) == 0.0  # users without rows


def test_grouped_layers_called_apart_keep_their_own_function(monkeypatch: pytest.MonkeyPatch) -> None:
    """A module that calls grouped siblings on different inputs (or changes the input in place between them) gets
    each layer's own output and gradients: a kept output is used only for the same unchanged input and rows."""
    torch.manual_seed(0)
    parent = nn.Module()
    for name, out in (("q_proj", 12), ("k_proj", 8), ("v_proj", 8)):
        setattr(parent, name, nn.Linear(16, out, bias=False).to(torch.bfloat16).requires_grad_(False))
    stacks = {
        n: multilora.LoraStack(
            nn.Parameter(torch.randn(3, 1, 16) * 0.2),
            nn.Parameter(torch.randn(3, getattr(parent, n).out_features, 1)),
            torch.tensor([1.0, 2.0, 3.0]),
        )
        for n in ("q_proj", "k_proj", "v_proj")
    }
    x = torch.randn(2, 5, 16).to(torch.bfloat16)

    def run(group: bool) -> list[torch.Tensor]:
        monkeypatch.setattr(multilora, "GROUP_BRANCH", group)
        with multilora.wrap_linears(parent, stacks, native=True) as wrap:
            assert len(wrap.groups) == 1
            wrap.set_rows(torch.tensor([2, 0]))
            xi = x.clone().requires_grad_(True)
            q = parent.q_proj(xi)
            k = parent.k_proj(xi * 2)  # another input
            v = parent.v_proj(xi)  # the input q's node ran for, but the group last ran for k's
            q2 = parent.q_proj(xi)  # q's output was taken: runs again
            wrap.set_rows(torch.tensor([1, 1]))
            v2 = parent.v_proj(xi)  # new rows: never an output kept for the old ones
            sum(t.float().square().sum() for t in (q, k, v, q2, v2)).backward()
            return [q, k, v, q2, v2, xi.grad, *[s.lora_A.grad for s in stacks.values()]]

    want = [t.detach().clone() for t in run(False)]
    for s in stacks.values():
        s.lora_A.grad = s.lora_B.grad = None
    got = [t.detach().clone() for t in run(True)]
    for g, w in zip(got, want, strict=True):
        assert (g.float() - w.float()).norm() / w.float().norm() < 1e-2


def _siblings(device: str = "cpu") -> tuple[nn.Module, dict[str, multilora.LoraStack]]:
    """A module with q|k|v projections of three widths (bias on k), their rank-1..3 fp32 stacks over 4 users (a
    scaling a projection and user), the base in bf16."""
    gen = torch.Generator().manual_seed(4)
    parent = nn.Module()
    stacks = {}
    for j, (name, out, rank) in enumerate((("q_proj", 48, 1), ("k_proj", 16, 3), ("v_proj", 24, 2))):
        linear = nn.Linear(40, out, bias=name == "k_proj").to(device=device, dtype=torch.bfloat16)
        setattr(parent, name, linear.requires_grad_(False))
        stacks[name] = multilora.LoraStack(
            nn.Parameter((torch.randn(4, rank, 40, generator=gen) * 0.2).to(device)),
            nn.Parameter(torch.randn(4, out, rank, generator=gen).to(device)),
            (torch.rand(4, generator=gen) + 0.5 + j).to(device),
        )
    return parent, stacks


def grouped_siblings_compared(device: str, monkeypatch: pytest.MonkeyPatch, packed: bool = False) -> dict[str, float]:
    """q|k|v called on one input, trained one backward with and without `GROUP_BRANCH`: the relative difference of
    each output, the input gradient and every stack gradient (and the group's node was the one used)."""
    parent, stacks = _siblings(device)
    gen = torch.Generator().manual_seed(9)
    lengths, index = [7, 3, 12, 5], torch.tensor([2, 0, 2, 3], device=device)
    x = torch.randn(len(lengths), max(lengths), 40, generator=gen).to(device=device, dtype=torch.bfloat16)
    ups = {n: torch.randn(*x.shape[:2], getattr(parent, n).out_features, generator=gen).to(device) for n in stacks}
    got: dict[bool, list[torch.Tensor]] = {}
    for group in (False, True):
        monkeypatch.setattr(multilora, "GROUP_BRANCH", group)
        for s in stacks.values():
            s.lora_A.grad = s.lora_B.grad = None
        with multilora.wrap_linears(parent, stacks, native=True) as wrap:
            if packed:  # the rows one after the other, each its true length
                xi = torch.cat([x[i, :n] for i, n in enumerate(lengths)])[None].requires_grad_(True)
                offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=device)
                tokens = torch.repeat_interleave(index, torch.tensor(lengths, device=device))
                wrap.set_packed(index, offsets.to(torch.int32), max(lengths), tokens)
                up = {n: torch.cat([u[i, :k] for i, k in enumerate(lengths)])[None] for n, u in ups.items()}
            else:
                xi = x.clone().requires_grad_(True)
                wrap.set_rows(index)
                up = ups
            outs = [getattr(parent, n)(xi) for n in stacks]
            assert (type(outs[0].grad_fn).__name__ == "_TrainGroupBackward") == group
            sum((o.float() * up[n]).sum() for o, n in zip(outs, stacks, strict=True)).backward()
            got[group] = [*outs, xi.grad, *[t.grad for s in stacks.values() for t in (s.lora_A, s.lora_B)]]
    names = ["q", "k", "v", "dx", *[f"d{t}_{n}" for n in ("q", "k", "v") for t in ("A", "B")]]
    return {
        name: float((g.detach().float() - w.detach().float()).norm() / w.detach().float().norm())
        for name, g, w in zip(names, got[True], got[False], strict=True)
    }


def test_grouped_siblings_equal_a_node_a_projection(monkeypatch: pytest.MonkeyPatch) -> None:
    """One layer's q|k|v through `_TrainGroup` (ranks 1, 3 and 2 side by side, a scaling each, a bias on k) equal
    one `_TrainBranch` a projection: the outputs exactly (same arithmetic), the input and stack gradients within
    bf16's rounding of a sum taken in another order."""
    diffs = grouped_siblings_compared("cpu", monkeypatch)
    assert diffs["q"] == diffs["k"] == diffs["v"] == 0.0, diffs
    assert all(d < 1e-2 for d in diffs.values()), diffs


def test_groups_form_from_the_wrapped_siblings_within_the_kernels_rank_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """k|v without q still make a group; a group whose ranks together pass the kernels' limit trains a node a
    projection (and still trains)."""
    parent, stacks = _siblings()
    with multilora.wrap_linears(parent, {n: stacks[n] for n in ("k_proj", "v_proj")}, native=True) as wrap:
        assert [len(g.layers) for g in wrap.groups] == [2]
        wrap.set_rows(torch.tensor([1]))
        x = torch.randn(1, 3, 40).to(torch.bfloat16)
        assert type(parent.k_proj(x).grad_fn).__name__ == "_TrainGroupBackward"
    big = {
        n: multilora.LoraStack(
            nn.Parameter(torch.randn(2, 40, 40) * 0.1),
            nn.Parameter(torch.randn(2, getattr(parent, n).out_features, 40)),
            torch.ones(2),
        )
        for n in ("q_proj", "k_proj")
    }
    with multilora.wrap_linears(parent, big, native=True) as wrap:
        assert wrap.groups[0].rank == 80 > multilora.lora_kernels.MAX_RANK
        wrap.set_rows(torch.tensor([1]))
        out = parent.q_proj(torch.randn(1, 3, 40).to(torch.bfloat16))
        assert type(out.grad_fn).__name__ == "_TrainBranchBackward"
        out.float().sum().backward()
        assert big["q_proj"].lora_B.grad is not None
