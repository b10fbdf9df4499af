"""The adapter cache's fill processes (`pipeline.serving.fill`): real child processes over a store directory."""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from pipeline.domain.errors import NotFound
from pipeline.serving.adapters import AdapterKey
from pipeline.serving.cache import AdapterCache
from pipeline.serving.fill import CorruptCopy, DirectoryFetchSpec, FillPool, read_copy, write_copy
from pipeline.storage.objects import CorruptObject
from tests.unit.serving.test_cache import FILE_BYTES, LIMITS, TENSOR_BYTES, FakeSlots, lora_files


def put(root: Path, user: str, seed: int) -> AdapterKey:
    """One adapter in ``root`` in the object store's layout; its key."""
    files = lora_files(seed)
    key = AdapterKey(user, f"rev{seed}", hashlib.sha256(files["adapter_model.safetensors"]).hexdigest())
    folder = root / "users" / user / "revisions" / key.revision_id
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return key


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def pool(root):
    with FillPool(DirectoryFetchSpec(str(root)), processes=2, start=2) as p:
        yield p


def test_a_fill_process_fetches_checks_and_writes_a_complete_copy(pool, root, tmp_path):
    key = put(root, "u1", 1)
    files, written = pool.fetch(key, tmp_path / "copy")
    assert files == lora_files(1)
    assert written == tmp_path / "copy"
    assert read_copy(written, key.sha256) == files  # digests included: a complete copy
    assert pool.read(written, key.sha256) == files
    files, written = pool.fetch(key, None)  # no disk tier: nothing written
    assert files == lora_files(1) and written is None


def test_errors_raised_in_a_fill_process_are_raised_to_the_caller(pool, root, tmp_path):
    key = put(root, "u2", 2)
    with pytest.raises(NotFound, match="not in"):
        pool.fetch(AdapterKey("nobody", "rev9", key.sha256), None)
    with pytest.raises(CorruptObject, match="does not have sha256"):
        pool.fetch(AdapterKey("u2", "rev2", "0" * 64), tmp_path / "never")
    assert not (tmp_path / "never").exists()
    copy = tmp_path / "c"
    write_copy(copy, key.sha256, lora_files(2))
    (copy / "adapter_model.safetensors").write_bytes(b"not the same bytes")
    with pytest.raises(CorruptCopy, match="does not match"):
        pool.read(copy, key.sha256)
    assert pool.fetch(key, None)[0] == lora_files(2)  # the processes go on after errors


def test_a_fill_process_that_dies_is_replaced_and_the_request_goes_on(root, tmp_path):
    key = put(root, "u3", 3)
    with FillPool(DirectoryFetchSpec(str(root)), processes=1) as pool:
        (first,) = pool.pids()
        os.kill(first, signal.SIGKILL)
        time.sleep(0.2)
        assert pool.fetch(key, None)[0] == lora_files(3)  # sent to the dead one, then tried on a new one
        (second,) = pool.pids()
        assert second != first
    with pytest.raises(Exception, match="closed"):
        pool.fetch(key, None)


def make_cache(tmp_path: Path, pool: FillPool, **kw) -> AdapterCache:
    def no_fetch(key: AdapterKey) -> dict[str, bytes]:
        raise AssertionError("with a fill pool, the cache does not fetch on its own thread")

    args = dict(disk_dir=tmp_path / "disk", disk_bytes=10 * FILE_BYTES, host_bytes=10 * TENSOR_BYTES, slots=2)
    args.update(kw)
    return AdapterCache(no_fetch, limits=LIMITS, loader=FakeSlots(), fill=pool, **args)


def test_the_cache_through_fill_processes_keeps_its_tiers_and_disk_copies(root, tmp_path):
    keys = [put(root, f"c{i}", 10 + i) for i in range(3)]
    with FillPool(DirectoryFetchSpec(str(root)), processes=2) as pool:
        cache = make_cache(tmp_path, pool)
        for key in keys:
            with cache.use(key):
                pass
        s = cache.stats()
        assert s.hits["store"] == 3 and s.misses["disk"] == 3
        assert sorted(cache.disk_entries()) == sorted(k.sha256 for k in keys)
        assert [p.name for p in (tmp_path / "disk").iterdir() if p.name.startswith(".tmp-")] == []
        for key in keys:
            assert read_copy(tmp_path / "disk" / key.sha256, key.sha256) == lora_files(int(key.revision_id[3:]))
        # A new worker on the same disk: the copies are read (and checked) by the fill processes.
        (tmp_path / "disk" / keys[0].sha256 / "adapter_model.safetensors").write_bytes(b"corrupt")
        again = make_cache(tmp_path, pool)
        for key in keys:
            with again.use(key):
                pass
        s = again.stats()
        assert s.hits["disk"] == 2 and s.hits["store"] == 1  # the corrupt copy was deleted and fetched again
        assert read_copy(tmp_path / "disk" / keys[0].sha256, keys[0].sha256) == lora_files(10)
        # Forgotten: the disk copies go, and nothing comes back on its own.
        assert again.forget("c1", [keys[1].sha256]) == 1
        assert not (tmp_path / "disk" / keys[1].sha256).exists()
        cache.fill = again.fill = None  # the pool is closed by its own context


def test_a_copy_whose_reservation_went_meanwhile_is_not_placed(root, tmp_path):
    key = put(root, "f1", 20)
    with FillPool(DirectoryFetchSpec(str(root)), processes=1) as pool:
        cache = make_cache(tmp_path, pool)
        tmp = tmp_path / "disk" / ".tmp-x"
        _, written = pool.fetch(key, tmp)
        assert written == tmp and tmp.exists()
        cache._place(tmp, key.sha256)  # no reservation (a forget came while the fill process wrote it)
        assert not tmp.exists() and not (tmp_path / "disk" / key.sha256).exists()
        assert cache.disk_entries() == []
        cache.fill = None


def test_no_disk_tier_means_no_copy_written(root, tmp_path):
    key = put(root, "n1", 30)
    with FillPool(DirectoryFetchSpec(str(root)), processes=1) as pool:
        cache = make_cache(tmp_path, pool, disk_bytes=0)
        with cache.use(key):
            pass
        assert cache.disk_entries() == [] and list((tmp_path / "disk").iterdir()) == []
        cache.fill = None


def test_files_come_back_as_views_of_the_buffer_or_through_the_pipe_when_it_is_too_small(root):
    key = put(root, "b1", 40)
    with FillPool(DirectoryFetchSpec(str(root)), processes=1, buffer_bytes=1 << 20) as pool:
        with pool.lease() as lease:
            files, _ = lease.fetch(key, None)
            assert all(isinstance(v, memoryview) for v in files.values())  # no copy through the pipe
            assert {n: bytes(v) for n, v in files.items()} == lora_files(40)
    for size in (0, 64):  # no buffer; a buffer smaller than the files
        with FillPool(DirectoryFetchSpec(str(root)), processes=1, buffer_bytes=size) as pool:
            with pool.lease() as lease:
                files, _ = lease.fetch(key, None)
                assert files == lora_files(40) and all(isinstance(v, bytes) for v in files.values())


@pytest.mark.parametrize("kind", ["reference", "fast"])
def test_engines_pack_from_the_fill_buffer_and_serve_what_peft_serves(kind, tmp_path):
    """The real engines' packing reads the adapter straight from a fill process's buffer (a view, valid only while
    the process is held): the slot then serves what stock peft computes, after the buffer was reused."""
    import torch
    from peft import LoraConfig, get_peft_model

    from pipeline.models.base import tiny_random
    from pipeline.serving.adapters import AdapterLimits, EngineSlots
    from tests.unit.serving.test_cache_engine import TARGETS, assert_serves, make_engine

    root = tmp_path / "store"
    keys, dirs = [], []
    for i in range(2):
        torch.manual_seed(20 + i)
        model = get_peft_model(tiny_random(), LoraConfig(r=4, target_modules=list(TARGETS), init_lora_weights=False))
        folder = root / "users" / f"p{i}" / "revisions" / f"r{i}"
        model.save_pretrained(folder)
        weights = (folder / "adapter_model.safetensors").read_bytes()
        keys.append(AdapterKey(f"p{i}", f"r{i}", hashlib.sha256(weights).hexdigest()))
        dirs.append(folder)
    engine = make_engine(kind, slots=2)
    limits = AdapterLimits(max_rank=8, targets=frozenset(TARGETS))
    with FillPool(DirectoryFetchSpec(str(root)), processes=1) as pool:
        cache = AdapterCache(
            lambda key: {}, disk_dir=tmp_path / "disk", disk_bytes=1 << 24, host_bytes=1 << 24, slots=2,
            limits=limits, loader=EngineSlots(engine), fill=pool,
        )  # fmt: skip
        slots = [cache.acquire(k) for k in keys]  # one fill process: the second adapter reused the first's buffer
        for slot, folder in zip(slots, dirs, strict=True):
            assert_serves(engine, slot, folder)
        cache.fill = None


def test_the_pool_grows_while_misses_overlap_up_to_its_most_and_its_processes_do_not_load_torch(root):
    key = put(root, "g1", 50)
    shm = Path("/dev/shm")
    before = set(shm.glob("persona-fill-*")) if shm.is_dir() else set()
    with FillPool(DirectoryFetchSpec(str(root)), processes=2, start=1) as pool:
        if shm.is_dir():  # the buffers are unlinked at once: a killed worker leaves none behind
            assert set(shm.glob("persona-fill-*")) <= before
        assert pool.started == 1
        with pool.lease() as first:
            with pool.lease() as second:  # the first is busy: a second process starts
                assert pool.started == 2 and {first.index, second.index} == {0, 1}
                assert {bytes(v) for v in second.fetch(key, None)[0].values()} == set(lora_files(50).values())
                got: list[int] = []
                waiter = threading.Thread(target=lambda: got.append(_lease_index(pool)))
                waiter.start()  # both busy, at the most: it waits for one
                time.sleep(0.3)
                assert not got and pool.started == 2
            waiter.join(timeout=10)
            assert got == [second.index]
            for i in range(pool.started):  # the test holds or owns both now
                pid, torch_loaded = pool._call(i, "ping", ())
                assert pid > 0 and not torch_loaded  # a fill process boots without torch (fast, small)


def _lease_index(pool: FillPool) -> int:
    with pool.lease() as lease:
        return lease.index
