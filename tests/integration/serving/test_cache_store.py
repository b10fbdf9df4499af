"""The adapter cache on the real registry (PostgreSQL + S3) and the promotion listener on the real broker."""

from __future__ import annotations

import io
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from kafka import KafkaProducer
from peft import LoraConfig, get_peft_model
from safetensors.torch import load

from pipeline.domain.revisions import EventsUsed
from pipeline.flows import promotion
from pipeline.models.base import TINY_RANDOM_ID, ref, tiny_random
from pipeline.serving.adapters import AdapterKey, AdapterLimits, registry_fetch
from pipeline.serving.cache import AdapterCache
from pipeline.serving.promotions import Announcer, PromotionListener
from pipeline.storage.objects import CorruptObject, revision_prefix
from pipeline.storage.registry import Registry
from tests.integration.helpers import fresh_topics

pytestmark = pytest.mark.integration

LIMITS = AdapterLimits(max_rank=8, targets=frozenset({"q_proj", "k_proj", "v_proj", "o_proj"}))


class Packed(dict):
    """What RecordingSlots.pack makes: the tensors as given."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.values())


class RecordingSlots:
    """Device slots that record what they were given (``packs``: how many adapters were packed)."""

    def __init__(self) -> None:
        self.loads: list[int] = []
        self.packs = 0
        self.held: dict[int, dict] = {}

    def pack(self, weights: bytes, config: dict) -> Packed:
        self.packs += 1
        return Packed(load(weights))

    def load(self, slot: int, packed: Packed) -> None:
        self.loads.append(slot)
        self.held[slot] = packed

    def clear(self, slot: int) -> None:
        self.held.pop(slot, None)


@pytest.fixture(scope="module")
def base():
    return tiny_random()


@pytest.fixture(scope="module")
def registry(stores):
    return stores.registry


def write(registry: Registry, base, tmp_path: Path, user: str, seed: int, parent: str | None = None):
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_random(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.save_pretrained(tmp_path / f"a{seed}")
    return registry.write_revision(
        user,
        tmp_path / f"a{seed}",
        parent_id=parent,
        base=ref(base, TINY_RANDOM_ID),
        training={"seed": seed},
        events=EventsUsed.of([(f"e{seed}", seed)]),
        app="test",
    )


def key_of(rev) -> AdapterKey:
    return AdapterKey(rev.user_id, rev.revision_id, rev.sha256)


@pytest.fixture
def slots():
    return RecordingSlots()


@pytest.fixture
def cache(stores, tmp_path, slots):
    c = AdapterCache(
        registry_fetch(stores),
        disk_dir=tmp_path / "cache",
        disk_bytes=1 << 24,
        host_bytes=1 << 24,
        slots=2,
        limits=LIMITS,
        loader=slots,
    )
    yield c
    c.close()


def test_acquire_through_the_real_store_and_a_corrupt_object_is_refused(registry, base, tmp_path, cache, slots):
    user = f"cache-{uuid.uuid4().hex[:8]}"
    good, bad = write(registry, base, tmp_path, user, 1), write(registry, base, tmp_path, user, 2)
    with cache.use(key_of(good)) as slot:
        assert len(slots.held[slot]) == 8  # 2 layers x (q, v) x (A, B)
    assert cache.stats().hits["store"] == 1 and (cache.disk_dir / good.sha256).is_dir()

    key = revision_prefix(user, bad.revision_id) + "adapter_model.safetensors"
    data = bytearray(registry.store.get(key))
    data[-1] ^= 0x01  # one flipped bit in the stored weights
    registry.store.client.put_object(registry.store.bucket, key, io.BytesIO(bytes(data)), len(data))
    with pytest.raises(CorruptObject, match="corrupt"):
        cache.acquire(key_of(bad))
    s = cache.stats()
    assert slots.loads == [slot] and s.resident == {"slot": 1, "host": 1, "disk": 1}
    assert not (cache.disk_dir / bad.sha256).exists()


def test_a_promotion_reaches_the_listener_which_invalidates_and_prefetches(
    registry, stores, base, tmp_path, cache, slots, services
):
    kafka = fresh_topics(services.kafka, partitions=2)
    user = f"cache-{uuid.uuid4().hex[:8]}"
    old = write(registry, base, tmp_path, user, 3)
    new = write(registry, base, tmp_path, user, 4, parent=old.revision_id)
    with cache.use(key_of(old)):
        pass
    heard: list[dict] = []
    done = threading.Event()

    def on_promotion(event: dict) -> None:  # what a serving worker does
        cache.invalidate(event["user_id"], keep_revision=event["revision_id"])
        cache.prefetch(AdapterKey(event["user_id"], event["revision_id"], event["sha256"])).result(timeout=30)
        heard.append(event)
        done.set()

    listener = PromotionListener(kafka, f"serving-{uuid.uuid4().hex[:8]}", on_promotion).start()
    try:
        assert listener.wait_ready(30), "the listener got no partitions"
        producer = KafkaProducer(bootstrap_servers=kafka.servers)
        producer.send(kafka.topic_promotions, key=user.encode(), value=b'{"schema": "promotion.v1"}').get(10)
        producer.close()
        started = time.monotonic()
        announcer = Announcer(kafka)
        try:  # the alias moves, the pointer is published, then the promotion is announced
            assert promotion.promote(stores, announcer, user, new.revision_id, expected=None, reason="gate").announced
        finally:
            announcer.close()
        assert done.wait(30), "the promotion was not heard"
        latency = time.monotonic() - started
    finally:
        listener.stop()
    assert [e["revision_id"] for e in heard] == [new.revision_id] and listener.skipped == 1
    s = cache.stats()
    assert key_of(old) not in s.slots and s.resident["host"] == 1  # old gone, new prefetched
    assert slots.packs == 2 and len(slots.loads) == 1  # the new one is packed in host memory, not in a slot yet
    with cache.use(key_of(new)):
        pass
    assert cache.stats().hits["host"] == 1 and latency < 30
    assert slots.packs == 2 and len(slots.loads) == 2  # the request paid only the copy into a slot
