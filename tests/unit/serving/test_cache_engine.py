"""The adapter cache on the real engines (reference and fast, on the CPU): the host tier keeps adapters packed in the
engine's slot layout, packed once per host entry; a slot load does not wait for the engine's lock; an adapter the
engine refuses touches no slot; a promotion's prefetch lands packed. The engines are wrapped only to count calls."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from prometheus_client import REGISTRY

from pipeline.models.base import LoadedBase, tiny_random, tiny_tokenizer
from pipeline.models.multilora import AdapterLimitError, read_adapter_dir
from pipeline.serving.adapters import AdapterKey, AdapterLimits, EngineSlots
from pipeline.serving.cache import AdapterCache
from pipeline.serving.engine import Engine, Request
from pipeline.serving.fast_engine import FastEngine
from pipeline.serving.server import engine_slots
from tests.unit.serving.test_cache import FakeStore

TARGETS = ("q_proj", "v_proj")
LIMITS = AdapterLimits(max_rank=8, targets=frozenset(TARGETS))
ENGINES = ["reference", "fast"]


def make_engine(kind: str, slots: int) -> Engine | FastEngine:
    base = LoadedBase(tiny_random(), tiny_tokenizer(), None)
    if kind == "fast":
        return FastEngine(base, slots=slots, max_rank=8, targets=TARGETS, max_seq=64)
    return Engine(base, slots=slots, max_rank=8, targets=TARGETS)


class Counting:
    """The engine as the cache's loader sees it, counting packs, loads and clears (the work is the engine's)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.packs = 0
        self.loads: list[tuple[int, Any]] = []
        self.clears: list[int] = []

    def pack_adapter(self, state: dict, config: dict) -> Any:
        self.packs += 1
        return self.engine.pack_adapter(state, config)

    def load_packed(self, slot: int, packed: Any) -> None:
        self.loads.append((slot, packed))
        self.engine.load_packed(slot, packed)

    def clear_adapter(self, slot: int) -> None:
        self.clears.append(slot)
        self.engine.clear_adapter(slot)


@pytest.fixture(scope="module")
def peft_dirs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("peft")
    dirs = []
    for i in range(2):
        torch.manual_seed(10 + i)
        model = get_peft_model(tiny_random(), LoraConfig(r=4, target_modules=list(TARGETS), init_lora_weights=False))
        model.save_pretrained(root / f"a{i}")
        dirs.append(root / f"a{i}")
    return dirs


def add(store: FakeStore, user: str, path: Path) -> AdapterKey:
    files = {n: (path / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    key = AdapterKey(user, path.name, hashlib.sha256(files["adapter_model.safetensors"]).hexdigest())
    store.files[key] = files
    return key


def cache_of(tmp_path: Path, store: FakeStore, loader: Any, slots: int) -> AdapterCache:
    return AdapterCache(
        store, disk_dir=tmp_path / "disk", disk_bytes=1 << 24, host_bytes=1 << 24, slots=slots, limits=LIMITS,
        loader=loader,
    )  # fmt: skip


def sample(name: str, tier: str) -> float:
    return REGISTRY.get_sample_value(f"persona_adapter_load_seconds_{name}", {"tier": tier}) or 0.0


def assert_serves(engine: Any, slot: int, path: Path) -> None:
    ids = torch.tensor([[5, 6, 7, 8]])
    want = PeftModel.from_pretrained(tiny_random(), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            engine.logits(ids, None, [slot]).float(), want(input_ids=ids).logits, atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize("kind", ENGINES)
def test_the_host_tier_keeps_adapters_packed_once_per_entry(kind, peft_dirs, tmp_path):
    engine = make_engine(kind, slots=1)
    counting = Counting(engine)
    store = FakeStore()
    a, b = add(store, "u1", peft_dirs[0]), add(store, "u2", peft_dirs[1])
    cache = cache_of(tmp_path, store, EngineSlots(counting), slots=1)
    try:
        with cache.use(a):
            pass
        with cache.use(b) as slot:  # evicts a from the one slot; host memory keeps both, packed
            assert_serves(engine, slot, peft_dirs[1])
        assert counting.packs == 2 and [s for s, _ in counting.loads] == [0, 0]
        with cache.use(a) as slot:  # a host hit: one copy into the slot, no parsing, no packing
            assert_serves(engine, slot, peft_dirs[0])
        s = cache.stats()
        assert counting.packs == 2 and len(counting.loads) == 3 and counting.clears == []
        assert s.hits["host"] == 1 and s.misses["host"] == 2 and s.resident["host"] == 2
        assert counting.loads[2][1] is counting.loads[0][1]  # the very packed object host memory kept
        packed = [p for _, p in counting.loads[:2]]
        assert s.resident_bytes["host"] == sum(p.nbytes for p in packed)
        assert s.resident_bytes["slot"] == packed[0].nbytes
    finally:
        cache.close()


@pytest.mark.parametrize("kind", ENGINES)
def test_a_slot_load_does_not_wait_for_the_engine_lock(kind, peft_dirs, tmp_path):
    """The serving worker's wiring (`engine_slots`): while the engine thread holds the lock and steps a request on
    one slot, a miss loads another slot; the running request's tokens are those it has alone."""
    engine = make_engine(kind, slots=2)
    store = FakeStore()
    a, b = add(store, "u1", peft_dirs[0]), add(store, "u2", peft_dirs[1])
    lock = threading.Lock()
    cache = cache_of(tmp_path, store, engine_slots(engine, lock), slots=2)
    try:
        slot_a = cache.acquire(a)
        request = Request([10, 20, 30, 40, 50], slot=slot_a, max_tokens=40, ignore_eos=True)
        alone = engine.generate([request])[0].output_ids
        gen = engine.submit(request)
        holding, loaded = threading.Event(), threading.Event()
        steps_meanwhile: list[int] = []

        def engine_thread() -> None:  # the serving loop: every step under the lock
            deadline = time.monotonic() + 15
            with lock:
                holding.set()
                steps = 0
                while not loaded.is_set() and time.monotonic() < deadline:
                    engine.step()
                    steps += 1
                steps_meanwhile.append(steps)

        thread = threading.Thread(target=engine_thread)
        thread.start()
        assert holding.wait(10)
        slot_b = cache.acquire(b)  # parse, pack and load, while the lock is held by the engine thread
        still_held = lock.locked() and thread.is_alive()
        loaded.set()
        thread.join(10)
        assert still_held and steps_meanwhile and steps_meanwhile[0] >= 1
        engine.run_until_done()
        assert slot_b != slot_a and gen.output_ids == alone
        assert_serves(engine, slot_b, peft_dirs[1])
        cache.release(a)
        cache.release(b)
    finally:
        cache.close()


@pytest.mark.parametrize("kind", ENGINES)
def test_an_adapter_the_engine_refuses_touches_no_slot(kind, peft_dirs, tmp_path):
    """Shapes the base does not have pass the cache's own limit checks (rank, targets) but not the engine's
    packing: refused before a slot is reserved, so the adapter in the one slot stays, not even evicted."""
    engine = make_engine(kind, slots=1)
    counting = Counting(engine)
    store = FakeStore()
    good = add(store, "u1", peft_dirs[0])
    bad = store.add("u2", 1, r=4, targets=TARGETS, hidden=16)  # the base's hidden size is 64
    cache = cache_of(tmp_path, store, EngineSlots(counting), slots=1)
    try:
        with cache.use(good):
            pass
        with pytest.raises(AdapterLimitError, match="shapes"):
            cache.acquire(bad)
        s = cache.stats()
        assert counting.packs == 2 and len(counting.loads) == 1 and counting.clears == []
        assert s.slots == [good] and s.evictions["slot"] == 0 and s.resident["host"] == 1
        with cache.use(good) as slot:
            assert_serves(engine, slot, peft_dirs[0])
    finally:
        cache.close()


@pytest.mark.parametrize("kind", ENGINES)
def test_a_promotion_prefetch_leaves_the_adapter_packed_in_host_memory(kind, peft_dirs, tmp_path):
    """What a serving worker does on promotion.v1 (`api.listen_for_promotions`): invalidate the user's other
    revisions, prefetch the new one. It lands packed (host time = parse + pack); the first request pays the copy."""
    engine = make_engine(kind, slots=2)
    counting = Counting(engine)
    store = FakeStore()
    old, new = add(store, "u1", peft_dirs[0]), add(store, "u1", peft_dirs[1])
    cache = cache_of(tmp_path, store, EngineSlots(counting), slots=2)
    try:
        with cache.use(old):
            pass
        host_before, slot_before = sample("count", "host"), sample("count", "slot")
        cache.invalidate(new.user_id, keep_revision=new.revision_id)
        assert cache.prefetch(new).result(timeout=30) is True
        s = cache.stats()
        assert counting.packs == 2 and len(counting.loads) == 1 and counting.clears == [0]  # old's slot emptied
        assert s.resident["host"] == 1
        assert s.resident_bytes["host"] == engine.pack_adapter(*read_adapter_dir(peft_dirs[1])).nbytes
        assert sample("count", "host") == host_before + 1 and sample("count", "slot") == slot_before
        with cache.use(new) as slot:
            assert_serves(engine, slot, peft_dirs[1])
        assert counting.packs == 2 and len(counting.loads) == 2 and cache.stats().hits["host"] == 1
        assert sample("count", "host") == host_before + 1 and sample("count", "slot") == slot_before + 1
    finally:
        cache.close()


def test_the_cache_refuses_by_its_own_limits_before_the_engine_packs(tmp_path):
    engine = make_engine("fast", slots=1)
    counting = Counting(engine)
    store = FakeStore()
    key = store.add("u1", 1, r=16, hidden=64)
    cache = cache_of(tmp_path, store, EngineSlots(counting), slots=1)
    try:
        with pytest.raises(AdapterLimitError, match="rank 16 exceeds"):
            cache.acquire(key)
        assert counting.packs == 0 and counting.loads == [] and cache.stats().slots == [None]
    finally:
        cache.close()
