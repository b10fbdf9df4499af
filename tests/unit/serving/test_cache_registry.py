"""The adapter cache against the registry: a disk copy is adopted only while its revision exists, and a worker's
start deletes the copies no revision has any more (hand-written fakes, no services)."""

from __future__ import annotations

import pytest

from pipeline.domain.errors import NotFound
from pipeline.serving.cache import AdapterCache
from tests.unit.serving.test_cache import LIMITS, FakeSlots, FakeStore


def cache_of(tmp_path, store, registered=None) -> AdapterCache:
    return AdapterCache(
        store,
        disk_dir=tmp_path / "disk",
        disk_bytes=1 << 30,
        host_bytes=1 << 30,
        slots=2,
        limits=LIMITS,
        loader=FakeSlots(),
        registered=registered,
    )


def test_a_disk_copy_of_a_revision_the_registry_lost_is_deleted_not_served(tmp_path):
    store = FakeStore()
    key = store.add("u1", 1)
    first = cache_of(tmp_path, store)
    first.acquire(key)
    first.release(key)
    first.close()
    assert (tmp_path / "disk" / key.sha256).exists()
    del store.files[key]  # forgotten while no worker ran
    registry = {key: False}
    asked = []

    def registered(k):
        asked.append(k)
        return registry.get(k, True)

    second = cache_of(tmp_path, store, registered)  # a restarted worker finds the copy on disk
    with pytest.raises(NotFound):
        second.acquire(key)
    assert asked == [key] and not (tmp_path / "disk" / key.sha256).exists()
    assert key.sha256 not in second.disk_entries()
    second.close()


def test_a_disk_copy_of_a_live_revision_is_adopted_without_a_fetch(tmp_path):
    store = FakeStore()
    key = store.add("u1", 1)
    first = cache_of(tmp_path, store)
    first.acquire(key)
    first.release(key)
    first.close()
    fetches = len(store.fetches)
    second = cache_of(tmp_path, store, lambda k: True)
    second.acquire(key)
    second.release(key)
    assert len(store.fetches) == fetches  # from disk
    second.close()


def test_prune_deletes_copies_outside_the_registry_but_not_those_in_use(tmp_path):
    store = FakeStore()
    keys = [store.add(f"u{i}", i) for i in range(3)]
    cache = cache_of(tmp_path, store)
    for k in keys:
        cache.acquire(k)
        cache.release(k)
    cache.acquire(keys[2])  # in use by a request
    among = cache.disk_entries()
    assert sorted(among) == sorted(k.sha256 for k in keys)
    gone = cache.prune_disk({keys[0].sha256}, among)
    assert gone == [keys[1].sha256]
    assert (tmp_path / "disk" / keys[0].sha256).exists() and not (tmp_path / "disk" / keys[1].sha256).exists()
    assert (tmp_path / "disk" / keys[2].sha256).exists()
    cache.release(keys[2])
    cache.close()
