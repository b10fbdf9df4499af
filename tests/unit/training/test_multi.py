"""Batched multi-user training (pipeline/training/multi.py) against the single-user peft path, on the tiny base."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import TrainingSettings
from pipeline.domain.examples import Example, PreferencePair
from pipeline.models.base import load_base, weights_sha256
from pipeline.training.lora import TrainingError, TrainResult, train_adapter
from pipeline.training.multi import UserJob, train_adapters
from tests.unit.training import tiny_settings

STYLES = [
    "yo dude, totally rad wave number {i}!!",
    "Dear colleague, I remain yours faithfully ({i}).",
    "lol ok {i} :)",
    "The quarterly figures, item {i}, are attached herewith for review.",
]


def settings(**overrides: object) -> TrainingSettings:
    values: dict[str, object] = {
        "batch_size": 4,
        "max_steps": 8,
        "eval_every": 2,
        "save_dtype": "float32",
        "micro_batch_tokens": 256,  # several micro-batches per step: a user's rows are split across them
    }
    return tiny_settings(**{**values, **overrides})


def user_examples(u: int, n: int) -> list[Example]:
    style = STYLES[u % len(STYLES)]
    return [Example("say something" if i % 3 == 0 else None, style.format(i=i % 7), f"u{u}e{i}") for i in range(n)]


def user_pairs(u: int, n: int) -> list[PreferencePair]:
    """Pairs in the user's style over another user's, of different lengths (a few longer than max_length)."""
    chosen, rejected = STYLES[u % len(STYLES)], STYLES[(u + 1) % len(STYLES)]
    return [
        PreferencePair(
            f"question {i}" * (1 + 4 * (i % 4 == 3)),
            chosen.format(i=i),
            rejected.format(i=i) * (1 + i % 3),
            f"u{u}p{i}",
        )
        for i in range(n)
    ]


#: The preference loss of the pair tests: a large weight, so that a wrong pair gradient would show.
PAIRS = {"preference_weight": 1.0, "preference_beta": 2.0, "preference_margin": 0.5, "pair_batch_size": 3}


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path, lr: float = 1e-2) -> None:
    """Equal within float32 rounding. The sums run in another order (micro-batches, rows of several users), and
    AdamW divides by sqrt(v): on coordinates whose gradient is near zero, a rounding difference of the gradient
    moves the weight by a fraction of a step, so the absolute tolerance is tied to the learning rate: 5e-3 of it
    (5e-5 at lr 1e-2). At lr 0.1 over 12 steps, one machine's CPU kernels put 3.8e-4 between the two on a handful
    of such coordinates; a real difference in training moves weights by a sizeable share of their ~1e-2 scale."""
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=5e-3 * lr, msg=key)
    assert (a / "adapter_config.json").read_text() == (b / "adapter_config.json").read_text()


@pytest.mark.parametrize(
    ("pair_counts", "anchor", "rows"),
    [
        pytest.param((0, 0, 0, 0), 0.0, "padded", id="no-pairs"),
        pytest.param((5, 2, 9, 1), 0.0, "padded", id="all-pairs"),
        pytest.param((0, 7, 4, 0), 0.0, "padded", id="mixed"),
        pytest.param((0, 7, 4, 0), 20.0, "padded", id="mixed-anchored"),
        pytest.param((5, 2, 9, 1), 0.0, "shared_prefix", id="all-pairs-shared-prefix"),
        pytest.param((5, 2, 9, 1), 0.0, "packed_rows", id="all-pairs-packed-rows"),
        pytest.param((0, 7, 4, 0), 0.0, "packed_rows+shared_prefix", id="mixed-packed-shared-prefix"),
    ],
)
def test_four_users_batched_equal_four_peft_runs(
    tmp_path: Path, pair_counts: tuple[int, ...], anchor: float, rows: str
) -> None:
    """Different example counts (so batch sizes, validation slices and epochs differ), one with a parent, one that
    stops early; users with preference pairs (fewer or more than a step draws, some rows past max_length), users
    without, and both in one batch; with and without the pull towards the starting weights; with the rows' common
    first tokens run once per user (`shared_prefix`), or the rows packed without padding (`packed_rows`): each
    adapter equals the one its own peft run gives, step for step."""
    base = load_base("tiny-random")
    sha = weights_sha256(base.model)
    cfg = settings(**PAIRS, anchor=anchor, **({key: True for key in rows.split("+")} if rows != "padded" else {}))
    train_adapter(base, user_examples(9, 20), tmp_path / "parent", cfg, parent_dir=None, seed=99)
    sizes = [24, 3, 40, 15]
    parents = [None, None, tmp_path / "parent", None]
    jobs = [
        UserJob(user_examples(u, n), tmp_path / f"batched{u}", parents[u], 100 + u, user_pairs(u, pair_counts[u]))
        for u, n in enumerate(sizes)
    ]
    progress: list[tuple[int, int]] = []
    results = train_adapters(base, jobs, cfg, progress=lambda i, s, _: progress.append((i, s)))
    assert weights_sha256(base.model) == sha and not hasattr(base.model, "peft_config")
    for u, job in enumerate(jobs):
        alone = train_adapter(
            base, job.examples, tmp_path / f"alone{u}", cfg, parent_dir=job.parent_dir, seed=job.seed, pairs=job.pairs
        )
        got = results[u]
        assert isinstance(got, TrainResult), got
        assert (got.steps, got.best_step, got.stopped_early, got.examples, got.pairs) == (
            alone.steps,
            alone.best_step,
            alone.stopped_early,
            alone.examples,
            alone.pairs,
        )
        assert got.pairs == pair_counts[u] and got.config["pairs"] == pair_counts[u]
        assert got.tokens == alone.tokens
        assert got.train_loss == pytest.approx(alone.train_loss, rel=1e-4)
        assert (got.preference_loss is None) == (alone.preference_loss is None) == (not pair_counts[u])
        if got.preference_loss is not None:
            assert got.preference_loss == pytest.approx(alone.preference_loss, rel=1e-4)
        assert (got.val_loss is None) == (alone.val_loss is None)
        if got.val_loss is not None:
            assert got.val_loss == pytest.approx(alone.val_loss, rel=1e-4)
        assert {k: v for k, v in got.config.items() if k != "batched_users"} == alone.config
        assert_same_adapter(tmp_path / f"batched{u}", tmp_path / f"alone{u}")
        assert [s for i, s in progress if i == u] == list(range(1, got.steps + 1))
    assert weights_sha256(base.model) == sha


def test_users_stop_early_on_their_own(tmp_path: Path) -> None:
    """One user's validation stops improving at once (its one text is learnt); the other goes on to max_steps."""
    base = load_base("tiny-random")
    cfg = settings(learning_rate=0.1, max_steps=12, eval_every=2, patience=1, micro_batch_tokens=4096)
    same = [Example(None, STYLES[0].format(i=0), f"s{i}") for i in range(12)]  # one text: validation overshoots
    jobs = [UserJob(same, tmp_path / "b0", None, 1), UserJob(user_examples(1, 30), tmp_path / "b1", None, 3)]
    results = train_adapters(base, jobs, cfg)
    alone = [
        train_adapter(base, j.examples, tmp_path / f"a{i}", cfg, parent_dir=None, seed=j.seed)
        for i, j in enumerate(jobs)
    ]
    assert all(isinstance(r, TrainResult) for r in results)
    assert [(r.steps, r.stopped_early) for r in results] == [(a.steps, a.stopped_early) for a in alone]  # type: ignore[union-attr]
    assert [(a.steps, a.stopped_early) for a in alone] == [(2, True), (12, False)]
    for i in range(2):
        assert_same_adapter(tmp_path / f"b{i}", tmp_path / f"a{i}", lr=cfg.learning_rate)


def test_a_bad_user_fails_alone(tmp_path: Path) -> None:
    """No usable example (pairs alone are not enough), a missing parent, a NaN loss (in the example and the pair
    rows) and a callback that raises each fail their user only."""
    base = load_base("tiny-random")
    sha = weights_sha256(base.model)
    cfg = settings(val_fraction=0.0, max_steps=4, **PAIRS)
    train_adapter(base, user_examples(5, 10), tmp_path / "nanparent", cfg, parent_dir=None, seed=5)
    poisoned = weights(tmp_path / "nanparent")
    key = next(k for k in poisoned if "lora_A" in k)
    poisoned[key] = torch.full_like(poisoned[key], math.nan)
    from safetensors.torch import save_file

    save_file(poisoned, str(tmp_path / "nanparent" / "adapter_model.safetensors"), metadata={"format": "pt"})

    class Stop(Exception):
        pass

    def progress(i: int, step: int, loss: float) -> None:
        if i == 4 and step == 2:
            raise Stop("lease lost")

    jobs = [
        UserJob(user_examples(0, 12), tmp_path / "good0", None, 1, user_pairs(0, 4)),
        UserJob([], tmp_path / "empty", None, 2, user_pairs(1, 4)),
        UserJob(user_examples(2, 12), tmp_path / "missing", tmp_path / "nowhere", 3),
        UserJob(user_examples(3, 12), tmp_path / "nan", tmp_path / "nanparent", 4, user_pairs(3, 4)),
        UserJob(user_examples(4, 12), tmp_path / "stopped", None, 5),
        UserJob(user_examples(5, 12), tmp_path / "good5", None, 6),
    ]
    results = train_adapters(base, jobs, cfg, progress=progress)
    assert isinstance(results[1], TrainingError) and "no training examples" in str(results[1])
    assert isinstance(results[2], TrainingError) and "parent adapter" in str(results[2])
    assert isinstance(results[3], TrainingError) and "not finite" in str(results[3])
    assert isinstance(results[4], Stop)
    assert not (tmp_path / "nan").exists() and not (tmp_path / "stopped").exists()
    for i, name in ((0, "good0"), (5, "good5")):
        assert isinstance(results[i], TrainResult) and results[i].steps == 4  # type: ignore[union-attr]
        alone = tmp_path / f"alone-{name}"
        train_adapter(base, jobs[i].examples, alone, cfg, parent_dir=None, seed=jobs[i].seed, pairs=jobs[i].pairs)
        assert_same_adapter(tmp_path / name, alone)
    assert weights_sha256(base.model) == sha


def test_unsupported_lora_falls_back_to_the_single_path(tmp_path: Path) -> None:
    base = load_base("tiny-random")
    cfg = settings(dropout=0.1, val_fraction=0.0, max_steps=2, **PAIRS)
    results = train_adapters(base, [UserJob(user_examples(0, 8), tmp_path / "d", None, 1, user_pairs(0, 2))], cfg)
    assert isinstance(results[0], TrainResult) and "batched_users" not in results[0].config
    assert results[0].pairs == 2 and results[0].preference_loss is not None
    assert (tmp_path / "d" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"rank": 2, "alpha": 3.0, "target_modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"},
        {"rank": 8, "alpha": 16.0, "target_modules": "down_proj"},
    ],
)
def test_a_users_start_without_peft_equals_peft_fresh_and_from_a_parent(tmp_path: Path, overrides: dict) -> None:
    """`_start` builds a user's initial LoRA without a PeftModel: fresh from the seed (peft's draws, in its order)
    and from a parent directory, it equals what peft builds (`_start_peft`) bit for bit, config included; LoRA
    options it does not mirror go through peft, and what the batched path cannot train is refused the same way."""
    from pipeline.training.multi import _start, _start_direct, _start_peft, _Unsupported

    base = load_base("tiny-random")
    cfg = settings(**overrides)

    def same(x, y) -> None:
        assert x.config.to_dict() == y.config.to_dict()
        assert x.keys == y.keys and list(x.modules) == list(y.modules)
        for path, (a, b, s) in x.modules.items():
            a2, b2, s2 = y.modules[path]
            assert a.dtype == a2.dtype == torch.float32 and s == s2
            assert torch.equal(a, a2) and torch.equal(b, b2), path

    for seed in (0, 7):
        same(_start_direct(base, cfg, None, seed), _start_peft(base, cfg, None, seed))
    parent = tmp_path / "parent"
    train_adapter(base, user_examples(0, 12), parent, settings(**overrides, max_steps=2), parent_dir=None, seed=3)
    same(_start_direct(base, cfg, parent, 5), _start_peft(base, cfg, parent, 5))
    before = torch.random.get_rng_state()
    _start(base, cfg, None, 11)
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG stream is left as it was
    with pytest.raises(_Unsupported):
        _start(base, settings(**overrides, dropout=0.1), None, 0)
    with pytest.raises(TrainingError, match="parent"):
        _start(base, cfg, tmp_path / "missing", 0)
    # a parent whose tensors do not fit the base: refused by name, whichever user of a batch it is
    from safetensors.torch import load_file, save_file

    tensors = load_file(parent / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    for name, broken in (
        ("missing", {k: v for k, v in tensors.items() if k != first}),
        ("shape", {**tensors, first: torch.cat([tensors[first], tensors[first]], dim=1)}),
        ("extra", {**tensors, "base_model.model.lm_head.lora_A.weight": tensors[first].clone()}),
    ):
        bad = tmp_path / f"bad-{name}"
        bad.mkdir()
        (bad / "adapter_config.json").write_bytes((parent / "adapter_config.json").read_bytes())
        save_file(broken, bad / "adapter_model.safetensors")
        with pytest.raises(TrainingError, match=r"the parent adapter in .*(has no LoRA|does not fit|no place for)"):
            _start_direct(base, cfg, bad, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_users_file_is_what_safetensors_writes(tmp_path, dtype):
    """The batched trainer writes each user's adapter_model.safetensors from one table of the group (`_Files`):
    byte for byte the file safetensors' own save_file makes of that user's tensors."""
    from safetensors.torch import save_file

    from pipeline.training.multi import _Files

    torch.manual_seed(0)
    users = 3
    stacks = [torch.randn(users, 2, 5), torch.randn(users, 7, 2), torch.randn(users, 2, 3), torch.randn(users, 4, 2)]
    keys = {
        "base_model.model.m.q.lora_A.weight": ("m.q", "A"),
        "base_model.model.m.q.lora_B.weight": ("m.q", "B"),
        "base_model.model.m.v.lora_A.weight": ("m.v", "A"),
        "base_model.model.m.v.lora_B.weight": ("m.v", "B"),
    }
    position = {"m.q": 0, "m.v": 1}
    files = _Files(stacks, keys, position, dtype)
    for slot in range(users):
        files.write(slot, tmp_path / f"ours-{slot}.safetensors")
        theirs = {k: stacks[position[p] * 2 + (kind == "B")][slot].to(dtype).clone() for k, (p, kind) in keys.items()}
        save_file(theirs, str(tmp_path / f"theirs-{slot}.safetensors"), metadata={"format": "pt"})
        ours = (tmp_path / f"ours-{slot}.safetensors").read_bytes()
        assert ours == (tmp_path / f"theirs-{slot}.safetensors").read_bytes()
        loaded = load_file(tmp_path / f"ours-{slot}.safetensors")
        assert all(torch.equal(loaded[k], v) for k, v in theirs.items())


def test_users_are_prepared_by_threads_with_the_same_result_and_under_a_held_base_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch's users are prepared by several threads (encoding, parents, fresh draws from the global generator
    under the base's lock): the adapters equal those of a batch prepared one user at a time, and a caller that holds
    the base's lock still gets its batch (prepared in its own thread)."""
    from pipeline.models.attach import base_lock
    from pipeline.training import multi

    base = load_base("tiny-random")
    cfg = settings(max_steps=2)

    def run(folder: str, *, threads: int, locked: bool) -> list[dict[str, torch.Tensor]]:
        jobs = [UserJob(user_examples(u, 10), tmp_path / folder / str(u), None, 40 + u) for u in range(5)]
        monkeypatch.setattr(multi, "_prepare_threads", lambda users: threads)
        if locked:
            with base_lock(base.model):
                results = train_adapters(base, jobs, cfg)
        else:
            results = train_adapters(base, jobs, cfg)
        assert all(isinstance(r, TrainResult) for r in results), results
        return [load_file(job.out_dir / "adapter_model.safetensors") for job in jobs]

    one = run("one", threads=1, locked=False)
    for got in (run("four", threads=4, locked=False), run("locked", threads=4, locked=True)):
        for a, b in zip(got, one, strict=True):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_batch_trains_without_cyclic_garbage_collection(tmp_path: Path) -> None:
    """`train_adapters` runs under `gc_paused` (no full collection walking every live object mid-batch) and gives the
    collector back as it found it."""
    import gc

    base = load_base("tiny-random")
    seen: list[bool] = []
    was = gc.isenabled()
    gc.enable()
    try:
        results = train_adapters(
            base,
            [UserJob(user_examples(0, 12), tmp_path / "u0", None, 1)],
            settings(max_steps=2),
            progress=lambda j, step, loss: seen.append(gc.isenabled()),
        )
        assert isinstance(results[0], TrainResult)
        assert seen and not any(seen)
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()
