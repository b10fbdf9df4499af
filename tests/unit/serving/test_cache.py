"""The tiered adapter cache with a hand-written object store and slot loader (no services)."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import load, save

from pipeline.domain.errors import NotFound
from pipeline.serving.adapters import AdapterKey, AdapterLimitError, AdapterLimits, SlotsExhausted
from pipeline.serving.cache import AdapterCache
from pipeline.storage.objects import CorruptObject

LIMITS = AdapterLimits(max_rank=8, targets=frozenset({"q_proj", "v_proj"}))


def lora_files(seed: int, r: int = 4, targets: tuple[str, ...] = ("q_proj", "v_proj"), hidden: int = 16) -> dict:
    """A PEFT LoRA directory's two files, made by hand (the layout peft saves)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for t in targets:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{t}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, hidden, generator=gen)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(hidden, r, generator=gen)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets)}
    return {"adapter_config.json": orjson.dumps(config), "adapter_model.safetensors": save(tensors)}


FILE_BYTES = len(lora_files(0)["adapter_model.safetensors"]) + len(lora_files(0)["adapter_config.json"])
TENSOR_BYTES = 2 * 2 * 2 * 4 * 16 * 4  # layers x targets x (A, B) x r x hidden x float32


class FakeStore:
    """The object store: files by key, counting fetches; ``delay_s`` makes fetches slow."""

    def __init__(self) -> None:
        self.files: dict[AdapterKey, dict[str, bytes]] = {}
        self.fetches: list[AdapterKey] = []
        self.delay_s = 0.0

    def add(self, user: str, seed: int, **kw) -> AdapterKey:
        files = lora_files(seed, **kw)
        key = AdapterKey(user, f"rev{seed}", hashlib.sha256(files["adapter_model.safetensors"]).hexdigest())
        self.files[key] = files
        return key

    def __call__(self, key: AdapterKey) -> dict[str, bytes]:
        self.fetches.append(key)
        time.sleep(self.delay_s)
        if key not in self.files:
            raise NotFound(f"no {key}")
        return dict(self.files[key])


@dataclass
class FakePacked:
    """What FakeSlots.pack makes: the tensors and config as given, and their bytes."""

    tensors: dict
    config: dict

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class FakeSlots:
    """Device slots: records every load and clear in ``calls`` and every pack in ``packs``."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.packs: list[int] = []  # the rank of each adapter packed
        self.held: dict[int, dict] = {}

    def pack(self, weights: bytes, config: dict) -> FakePacked:
        self.packs.append(config["r"])
        return FakePacked(load(bytes(weights)), config)  # bytes, or a view of a fill process's buffer

    def load(self, slot: int, packed: FakePacked) -> None:
        self.calls.append(("load", slot, packed.config["r"]))
        self.held[slot] = packed.tensors

    def clear(self, slot: int) -> None:
        self.calls.append(("clear", slot))
        self.held.pop(slot, None)


@pytest.fixture
def store():
    return FakeStore()


@pytest.fixture
def slots():
    return FakeSlots()


@pytest.fixture
def make(tmp_path, store, slots):
    made = []

    def make(**kw) -> AdapterCache:
        args = dict(disk_dir=tmp_path / "disk", disk_bytes=10 * FILE_BYTES, host_bytes=10 * TENSOR_BYTES, slots=2)
        args.update(kw)
        cache = AdapterCache(store, limits=LIMITS, loader=slots, **args)
        made.append(cache)
        return cache

    yield make
    for c in made:
        c.close()


def test_first_acquire_misses_every_tier_then_hits_the_slot(make, store, slots):
    cache = make()
    key = store.add("u1", 1)
    before = REGISTRY.get_sample_value("persona_adapter_cache_hits_total", {"tier": "slot"}) or 0
    slot = cache.acquire(key)
    cache.release(key)
    s = cache.stats()
    assert s.misses == {"slot": 1, "host": 1, "disk": 1, "store": 0} and s.hits["store"] == 1
    assert cache.acquire(key) == slot
    cache.release(key)
    s = cache.stats()
    assert s.hits["slot"] == 1 and len(store.fetches) == 1 and slots.calls == [("load", slot, 4)]
    assert slots.packs == [4]
    assert s.resident == {"slot": 1, "host": 1, "disk": 1}
    assert s.resident_bytes["host"] == TENSOR_BYTES and s.resident_bytes["disk"] == FILE_BYTES
    assert REGISTRY.get_sample_value("persona_adapter_cache_hits_total", {"tier": "slot"}) == before + 1
    assert REGISTRY.get_sample_value("persona_adapter_load_seconds_count", {"tier": "store"}) >= 1
    loaded = slots.held[slot]
    assert all(t.device.type == "cpu" for t in loaded.values()) and len(loaded) == 8


def test_lower_tiers_answer_after_eviction_from_upper_ones(make, store, slots, tmp_path):
    cache = make(slots=1, host_bytes=TENSOR_BYTES)  # one adapter per slot and in host memory
    a, b = store.add("u1", 1), store.add("u2", 2)
    with cache.use(a):
        pass
    with cache.use(b):  # evicts a from the slot and from host memory
        pass
    assert cache.stats().evictions == {"slot": 1, "host": 1, "disk": 0, "store": 0}
    assert slots.calls == [("load", 0, 4), ("load", 0, 4)]  # an eviction does not clear: the load replaces
    with cache.use(a):  # from disk: no second fetch
        pass
    s = cache.stats()
    assert s.hits["disk"] == 1 and [k.user_id for k in store.fetches] == ["u1", "u2"]

    # A new cache on the same directory adopts the disk copies (a restarted worker).
    again = make(disk_dir=tmp_path / "disk")
    with again.use(b):
        pass
    assert again.stats().hits["disk"] == 1 and len(store.fetches) == 2


def test_disk_and_host_are_bounded_by_bytes_in_lru_order(make, store):
    cache = make(disk_bytes=2 * FILE_BYTES, host_bytes=2 * TENSOR_BYTES, slots=3)
    keys = [store.add(f"u{i}", i) for i in range(3)]
    for k in keys[:2]:
        with cache.use(k):
            pass
    with cache.use(keys[0]):  # keys[0] is now the most recently used in the slots, not in host/disk (a slot hit)
        pass
    with cache.use(keys[2]):
        pass
    s = cache.stats()
    assert s.resident == {"slot": 3, "host": 2, "disk": 2}
    assert s.resident_bytes["disk"] <= 2 * FILE_BYTES and s.resident_bytes["host"] <= 2 * TENSOR_BYTES
    assert not (cache.disk_dir / keys[0].sha256).exists()  # oldest on disk went first
    assert (cache.disk_dir / keys[2].sha256).exists()


def test_slots_evict_the_least_recently_used_of_probation(make, store, slots):
    cache = make(slots=2)
    a, b, c = (store.add(f"u{i}", i) for i in range(3))
    sa, sb = cache.acquire(a), cache.acquire(b)
    cache.release(a), cache.release(b)
    cache.acquire(a), cache.release(a)  # b is now the least recently used
    assert cache.acquire(c) == sb
    cache.release(c)
    assert cache.stats().slots[sa] == a and cache.stats().slots[sb] == c
    # The slots' bytes are a running total: through loads, an eviction and an invalidation.
    assert cache.stats().resident_bytes["slot"] == 2 * TENSOR_BYTES
    cache.invalidate("u0")
    assert cache.stats().resident_bytes["slot"] == TENSOR_BYTES
    assert REGISTRY.get_sample_value("persona_adapter_cache_resident_bytes", {"tier": "slot"}) == TENSOR_BYTES


def test_an_adapter_used_again_outlives_one_off_adapters(make, store, slots):
    """Segmented LRU: an adapter used twice while in a slot is protected and stays while adapters used once pass
    through (one LRU evicted it: the oldest); with protected_share=0 the cache is one LRU again."""
    for share, kept in ((0.8, True), (0.0, False)):
        cache = make(slots=3, protected_share=share)
        hot, *once = (store.add(f"{share}-u{i}", i) for i in range(5))
        for key in (hot, hot, once[0], once[1], once[2], once[3]):
            with cache.use(key):
                pass
        assert (hot in cache.stats().slots) is kept, share
    with pytest.raises(ValueError, match="protected_share"):
        make(slots=2, protected_share=1.0)


def test_acquired_adapters_are_never_evicted(make, store):
    cache = make(slots=2, host_bytes=TENSOR_BYTES)
    a, b, c = (store.add(f"u{i}", i) for i in range(3))
    cache.acquire(a)  # in use
    cache.acquire(b)  # in use too
    with pytest.raises(SlotsExhausted, match="all 2 device slots hold adapters in use"):
        cache.acquire(c)
    s = cache.stats()
    assert set(s.slots) == {a, b} and s.evictions["slot"] == 0
    cache.release(b)
    with cache.use(c):
        assert set(cache.stats().slots) == {a, c}  # b went, a (in use) stayed
    cache.release(a)


def test_a_corrupt_disk_copy_is_deleted_and_fetched_again(make, store):
    cache = make(host_bytes=0)  # nothing kept in host memory: every slot load reads the disk
    key = store.add("u1", 1)
    with cache.use(key):
        pass
    weights = cache.disk_dir / key.sha256 / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    cache.invalidate("u1")  # out of the slot, so the next acquire goes down to the disk
    with cache.use(key):
        pass
    assert len(store.fetches) == 2 and cache.stats().hits["disk"] == 0
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == key.sha256  # the copy was replaced


def test_a_fetch_with_other_bytes_is_refused(make, store, slots):
    cache = make()
    key = store.add("u1", 1)
    store.files[key] = lora_files(99)  # the store returns bytes of another sha256
    with pytest.raises(CorruptObject):
        cache.acquire(key)
    assert slots.calls == [] and cache.stats().resident == {"slot": 0, "host": 0, "disk": 0}


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"r": 16}, "LoRA rank 16 exceeds the maximum rank 8"),
        ({"targets": ("q_proj", "o_proj")}, "target modules o_proj are not served; allowed: q_proj, v_proj"),
    ],
)
def test_limits_are_refused_before_a_slot_is_touched(make, store, slots, kw, match):
    cache = make()
    key = store.add("u1", 1, **kw)
    with pytest.raises(AdapterLimitError, match=match):
        cache.acquire(key)
    s = cache.stats()
    assert slots.calls == [] and s.resident["slot"] == s.resident["host"] == 0 and s.slots == [None, None]


def test_a_config_that_understates_the_rank_is_refused_by_the_tensors(make, store, slots):
    cache = make()
    key = store.add("u1", 1, r=16)
    files = store.files[key]
    store.files[key] = {**files, "adapter_config.json": orjson.dumps({"r": 4, "target_modules": ["q_proj"]})}
    with pytest.raises(AdapterLimitError, match="rank 16; the maximum rank is 8"):
        cache.acquire(key)
    assert slots.calls == []


def test_a_header_layout_is_parsed_once_and_still_checked_against_each_file(make, store, slots, monkeypatch):
    """Adapters of one layout share one parse of the safetensors header and one tensor check (each took
    milliseconds of Python under the GIL per miss); a file that shares a whole file's header but is cut short is still
    refused, and a layout over the limits is refused every time it comes (a refusal is not remembered as a pass)."""
    from pipeline.serving import adapters

    parsed = []
    real = adapters._parse_header
    monkeypatch.setattr(adapters, "_parse_header", lambda head: parsed.append(head) or real(head))
    adapters._HEADERS.clear()
    cache = make(slots=3)
    keys = [store.add(f"u{i}", i) for i in range(3)]
    for key in keys:
        with cache.use(key):
            pass
    assert len(parsed) == 1 and len(slots.packs) == 3
    assert [torch.equal(slots.held[i]["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"],
                        load(store.files[k]["adapter_model.safetensors"])[
                            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"])
            for i, k in enumerate(keys)] == [True] * 3  # fmt: skip
    whole = lora_files(7)["adapter_model.safetensors"]
    cut = whole[:-8]
    key = AdapterKey("u-cut", "rev-cut", hashlib.sha256(cut).hexdigest())
    store.files[key] = {"adapter_config.json": lora_files(7)["adapter_config.json"], "adapter_model.safetensors": cut}
    with pytest.raises(AdapterLimitError, match="lies outside the file"):
        cache.acquire(key)
    assert len(parsed) == 1  # the same header: not parsed again, but checked against this file's length
    over = [store.add(f"v{i}", 10 + i, r=16) for i in range(2)]
    for key in over:
        store.files[key] = {**store.files[key], "adapter_config.json": orjson.dumps({"r": 4, "target_modules": []})}
        with pytest.raises(AdapterLimitError, match="rank 16; the maximum rank is 8"):
            cache.acquire(key)
    assert len(parsed) == 2 and len(slots.packs) == 3


def test_invalidate_drops_a_users_adapters_now_or_when_released(make, store, slots):
    cache = make(slots=3)
    old, other, busy = store.add("u1", 1), store.add("u2", 2), store.add("u1", 3)
    for k in (old, other):
        with cache.use(k):
            pass
    cache.acquire(busy)
    assert cache.invalidate("u1") == 1  # old now; busy when released
    s = cache.stats()
    assert old not in s.slots and busy in s.slots and other in s.slots and s.resident["host"] == 2
    cache.release(busy)
    assert busy not in cache.stats().slots and cache.stats().resident["host"] == 1
    with cache.use(old):  # the next request loads again, from disk
        pass
    assert cache.stats().hits["disk"] == 1
    assert cache.invalidate("u1", keep_revision=old.revision_id) == 0


def test_concurrent_acquires_of_one_adapter_load_it_once(make, store, slots):
    cache = make()
    key = store.add("u1", 1)
    store.delay_s = 0.3
    got: list[int] = []
    barrier = threading.Barrier(6)

    def go() -> None:
        barrier.wait()
        got.append(cache.acquire(key))

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and len(got) == 6
    assert len(store.fetches) == 1 and [c for c in slots.calls if c[0] == "load"] == [("load", got[0], 4)]
    for _ in got:
        cache.release(key)
    assert cache.stats().hits["slot"] == 5


def test_a_slow_fetch_does_not_block_hits_of_other_adapters(make, store):
    cache = make()
    hot, cold = store.add("u1", 1), store.add("u2", 2)
    with cache.use(hot):
        pass
    store.delay_s = 1.0

    def cold_request() -> None:
        with cache.use(cold):
            pass

    t = threading.Thread(target=cold_request)
    t.start()
    time.sleep(0.1)
    start = time.perf_counter()
    with cache.use(hot):
        pass
    assert time.perf_counter() - start < 0.5
    t.join()


def test_prefetch_loads_host_memory_in_the_background(make, store, slots):
    cache = make()
    key, missing = store.add("u1", 1), AdapterKey("u1", "nope", "0" * 64)
    assert cache.prefetch(key).result(timeout=10) is True
    assert cache.prefetch(missing).result(timeout=10) is False  # best effort: logged, not raised
    assert slots.calls == [] and cache.stats().resident["host"] == 1 and slots.packs == [4]  # packed, not loaded
    with cache.use(key):
        pass
    assert cache.stats().hits["host"] == 1 and len(store.fetches) == 2 and slots.packs == [4]


def test_a_real_peft_adapter_loads(make, store, slots, tmp_path: Path):
    from peft import LoraConfig, get_peft_model

    from pipeline.models.base import tiny_random

    model = get_peft_model(tiny_random(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(tmp_path / "peft")
    files = {n: (tmp_path / "peft" / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    key = AdapterKey("u1", "r1", hashlib.sha256(files["adapter_model.safetensors"]).hexdigest())
    store.files[key] = files
    cache = make()
    with cache.use(key) as slot:
        assert len(slots.held[slot]) == 2 * 2 * 2
    too_small = AdapterCache(
        store, disk_dir=tmp_path / "d2", disk_bytes=0, host_bytes=0, slots=1, loader=slots,
        limits=AdapterLimits(max_rank=2, targets=frozenset({"q_proj", "v_proj"})),
    )  # fmt: skip
    with pytest.raises(AdapterLimitError, match="rank 4 exceeds the maximum rank 2"):
        too_small.acquire(key)
    too_small.close()


def test_engine_slots_load_a_cached_adapter_into_the_real_engine(store, tmp_path: Path):
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model

    from pipeline.models.base import tiny_random
    from pipeline.serving.adapters import EngineSlots

    engine_mod = pytest.importorskip("pipeline.serving.engine")
    torch.manual_seed(0)
    peft_model = get_peft_model(
        tiny_random(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.save_pretrained(tmp_path / "peft")
    files = {n: (tmp_path / "peft" / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}
    key = AdapterKey("u1", "r1", hashlib.sha256(files["adapter_model.safetensors"]).hexdigest())
    store.files[key] = files
    engine = engine_mod.Engine(SimpleNamespace(model=tiny_random(), tokenizer=None), 2, 8, ("q_proj", "v_proj"))
    cache = AdapterCache(
        store, disk_dir=tmp_path / "d", disk_bytes=1 << 20, host_bytes=1 << 20, slots=2, limits=LIMITS,
        loader=EngineSlots(engine),
    )  # fmt: skip
    ids = torch.tensor([[5, 6, 7, 8]])
    with cache.use(key) as slot:
        with torch.no_grad():
            got = engine.logits(ids, None, [slot])
            want = peft_model(input_ids=ids).logits
        assert torch.allclose(got, want, atol=1e-4)
    cache.close()


def test_sized_lru_keeps_its_total_through_every_change():
    """The tiers' byte totals are kept as entries come and go (no pass over the tier per miss): set, replace, pop
    (with and without a default), del, popitem from either end; equal to the sum at every point."""
    import random

    from pipeline.serving.cache import _SizedLRU

    tier = _SizedLRU(int)
    rng = random.Random(0)
    for _ in range(2000):
        op = rng.randrange(5)
        k = rng.randrange(30)
        if op == 0 or not tier:
            tier[k] = rng.randrange(1000)
        elif op == 1:
            tier.pop(k, None)
        elif op == 2 and k in tier:
            del tier[k]
        elif op == 3:
            tier.popitem(last=rng.random() < 0.5)
        else:
            tier.move_to_end(next(iter(tier)))
        assert tier.total == sum(tier.values())
    with pytest.raises(KeyError):
        tier.pop("absent")


def test_write_behind_copies_reach_disk_and_a_forget_meanwhile_leaves_none(make, store, tmp_path):
    """write_behind: the request does not wait for the disk copy (the writer is held here until the forget came); a
    copy whose reservation a forget removed while it was being written never appears; others are written and adopted
    by the next cache over the same directory."""
    import threading

    cache = make(write_behind=True)
    gate = threading.Event()
    cache._writer.submit(gate.wait, 30)  # the writer is busy: the next copies queue behind this
    try:
        gone, kept = store.add("gone", 1), store.add("kept", 2)
        for key in (gone, kept):
            cache.acquire(key)  # returns while its copy waits to be written
            cache.release(key)
        assert not (cache.disk_dir / gone.sha256).exists() and not (cache.disk_dir / kept.sha256).exists()
        cache.forget("gone", [gone.sha256])  # nothing on disk yet: its reservation goes
        assert cache.disk_entries() == [kept.sha256]
    finally:
        gate.set()
    cache.close()  # waits for the queued writes
    assert not (cache.disk_dir / gone.sha256).exists()
    assert (cache.disk_dir / kept.sha256).is_dir()
    assert not [p for p in cache.disk_dir.iterdir() if p.name.startswith(".tmp-")]
    again = make()
    assert again.disk_entries() == [kept.sha256]
