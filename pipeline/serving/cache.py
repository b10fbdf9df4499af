"""The tiered adapter cache of a serving worker: device slots <- host memory <- local disk <- object store.

Lifecycle: download (``fetch`` from the object store, verified by sha256), keep a copy
on local disk (``{disk_dir}/{sha256}/``, verified again whenever it is read back; a corrupt copy is deleted and
fetched again), parse and *pack* into host memory, load into a device slot, evict. Entering host memory, an adapter
is parsed, checked against the limits (rank and target modules, here, before anything takes a device slot) and
packed once into the engine's slot layout (``SlotLoader.pack``, which checks what only the engine knows: shapes,
one rank); the host tier keeps that packed form, and its byte budget counts the packed bytes. A slot load is then one
copy of the packed form (``SlotLoader.load``), which replaces whatever the slot held; a miss that finds the adapter
in host memory parses and packs nothing. Every tier is bounded: disk and host by bytes (LRU), slots by count
(segmented LRU: adapters used again while in a slot are kept over one-off ones). An
acquired adapter (a request in flight) is pinned until released: it is never evicted from any tier meanwhile.

Thread-safety: one lock guards the bookkeeping; fetching, reading, parsing, packing and loading happen outside it (a
slow fetch of one adapter does not block hits of others), and a per-adapter lock makes concurrent requests of one
adapter load it once. A slot load needs no engine lock: a slot being loaded is reserved for the loading adapter and
one being cleared is held by none, so no queued or running request uses it (the `SlotLoader` contract). With
``write_behind`` (a serving worker), the disk copy of a fetched adapter is written by a thread of its own while the
request goes on; a copy appears only while its reservation in the disk tier stands, so a forget or an eviction that
comes while it is being written leaves nothing behind. With a ``fill`` pool (`pipeline.serving.fill`; a serving
worker has one), the file work of the disk and store tiers (fetching, checking sha256s, writing and reading the disk
copies) runs in other processes: the cache keeps the bookkeeping, a fill process writes a fetched adapter's copy into
a temporary directory and the cache moves it into place while its reservation stands.

Metrics (``persona_adapter_load_seconds`` by tier): store = fetch + verify, disk = read + verify, host = parse +
limit checks + pack, slot = the copy of the packed adapter into its slot.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from pipeline.domain.errors import NotFound
from pipeline.domain.revisions import ADAPTER_FILES
from pipeline.models.multilora import AdapterLimitError
from pipeline.observability import metrics as m
from pipeline.serving.adapters import (
    AdapterCacheError,
    AdapterKey,
    AdapterLimits,
    Packed,
    SlotLoader,
    SlotsExhausted,
    check_limits,
    header_key,
    safetensors_header,
)
from pipeline.serving.fill import DIGESTS as _DIGESTS
from pipeline.serving.fill import CorruptCopy as _CorruptCopy
from pipeline.serving.fill import FillLease, FillPool, fetch_verified, read_copy, write_copy

log = logging.getLogger(__name__)

SLOT, HOST, DISK, STORE = "slot", "host", "disk", "store"
#: Share of the device slots kept for adapters used again while in a slot (segmented LRU, `AdapterCache`).
PROTECTED_SHARE = 0.8
TIERS = (SLOT, HOST, DISK, STORE)
_CONFIG, _WEIGHTS = ADAPTER_FILES


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the cache: resident adapters and bytes per tier, and this instance's counters per tier."""

    resident: dict[str, int]
    resident_bytes: dict[str, int]
    hits: dict[str, int]
    misses: dict[str, int]
    evictions: dict[str, int]
    slots: list[AdapterKey | None]


@dataclass
class _Host:
    packed: Packed  # in the engine's slot layout (SlotLoader.pack)
    nbytes: int


@dataclass
class _Counters:
    hits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    misses: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))
    evictions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TIERS, 0))


class _SizedLRU(OrderedDict):
    """An LRU tier (oldest first) that keeps the sum of its entries' sizes as they come and go: a miss's bookkeeping
    (making room, the gauges) then costs what it evicts, not a pass over every entry (10,000 host and disk entries
    made each miss a few milliseconds of Python under the cache's lock)."""

    def __init__(self, size: Callable[[Any], int]) -> None:
        super().__init__()
        self.size = size
        self.total = 0

    def __setitem__(self, key: Any, value: Any) -> None:
        old = super().get(key)
        if old is not None:
            self.total -= self.size(old)
        super().__setitem__(key, value)
        self.total += self.size(value)

    def __delitem__(self, key: Any) -> None:
        self.total -= self.size(self[key])
        super().__delitem__(key)

    def pop(self, key: Any, *default: Any) -> Any:
        if key in self:
            value = super().pop(key)
            self.total -= self.size(value)
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def popitem(self, last: bool = True) -> tuple[Any, Any]:
        key, value = super().popitem(last=last)
        self.total -= self.size(value)
        return key, value


_TMP_IDS = itertools.count()


@functools.cache
def _series(metric: Any, tier: str) -> Any:
    """The tier's series of a labelled metric, looked up once (``labels`` costs microseconds under the GIL; the cache
    touches a few series on every request and more on every miss)."""
    return metric.labels(tier)


class _Tally(dict[AdapterKey, int]):
    """A dict of sizes that keeps their total (the gauges read it on every load and eviction)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __setitem__(self, key: AdapterKey, value: int) -> None:
        self.total += value - self.get(key, 0)
        super().__setitem__(key, value)

    def pop(self, key: AdapterKey, default: Any = None) -> Any:
        if key not in self:
            return default
        value = super().pop(key)
        self.total -= value
        return value


class AdapterCache:
    """Adapters of many users on a few device slots, through host memory and local disk (see the module doc)."""

    def __init__(
        self,
        fetch: Callable[[AdapterKey], dict[str, bytes]],
        *,
        disk_dir: Path,
        disk_bytes: int,
        host_bytes: int,
        slots: int,
        limits: AdapterLimits,
        loader: SlotLoader,
        prefetch_workers: int = 2,
        registered: Callable[[AdapterKey], bool] | None = None,
        write_behind: bool = False,
        protected_share: float = PROTECTED_SHARE,
        fill: FillPool | None = None,
    ) -> None:
        if slots < 1 or disk_bytes < 0 or host_bytes < 0:
            raise ValueError(f"slots must be >= 1 and capacities >= 0 (got {slots}, {disk_bytes}, {host_bytes})")
        if not 0.0 <= protected_share < 1.0:
            raise ValueError(f"protected_share must be in [0, 1) (got {protected_share}); 0 is one LRU")
        self.fetch = fetch
        self.disk_dir = Path(disk_dir)
        self.disk_bytes = disk_bytes
        self.host_bytes = host_bytes
        self.limits = limits
        self.loader = loader
        # Asked before a disk copy is adopted: False (the registry no longer has that revision of that user, e.g. it
        # was forgotten while this worker was down) deletes the copy and answers NotFound.
        self.registered = registered
        #: Fill processes for the disk and store tiers' file work (None: on the calling thread, as ``fetch``).
        self.fill = fill
        self._lock = threading.Lock()
        self._key_locks: dict[AdapterKey, list[Any]] = {}  # key -> [lock, users]
        self._slots: list[AdapterKey | None] = [None] * slots
        # Empty slots, lowest first (a heap): found in O(log n), not by a scan of every slot on each miss.
        self._empty: list[int] = list(range(slots))
        self._slot_of: dict[AdapterKey, int] = {}
        # The slots' eviction order, segmented LRU: an adapter loaded into a slot starts on probation; a second use
        # while it is there makes it protected (at most ``protected_share`` of the slots; the oldest protected goes
        # back to probation). Victims come from probation first, oldest first: under skewed traffic the head stays
        # while one-off adapters of the tail pass through probation (`bench/slot_policy.py`).
        self._probation: OrderedDict[AdapterKey, None] = OrderedDict()
        self._protected: OrderedDict[AdapterKey, None] = OrderedDict()
        self._protected_cap = int(protected_share * slots)
        self._slot_bytes: _Tally = _Tally()  # key -> packed bytes in its slot (and their total)
        self._host: _SizedLRU = _SizedLRU(lambda h: h.nbytes)  # AdapterKey -> _Host
        self._disk: _SizedLRU = _SizedLRU(int)  # sha256 -> bytes on disk
        self._refs: dict[AdapterKey, int] = {}  # acquired and not yet released
        self._stale: set[AdapterKey] = set()  # invalidated while in use: dropped on release
        self._counters = _Counters()
        self._checked: OrderedDict[bytes, None] = OrderedDict()  # header layouts within the limits (_check_tensors)
        self._executor = ThreadPoolExecutor(max_workers=prefetch_workers, thread_name_prefix="adapter-prefetch")
        #: ``write_behind``: the disk copy of an adapter fetched from the object store is written by this thread,
        #: not on the request's path (`close` waits for the writes queued).
        self._writer = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-disk-write") if write_behind else None
        )
        self._scan_disk()
        self._gauges()

    # --- public API ---
    def acquire(self, key: AdapterKey) -> int:
        """The device slot holding ``key``, loading it through the tiers as needed; pinned until ``release``.

        Raises AdapterLimitError (nothing loaded, no slot touched), CorruptObject (the object store's bytes do not
        match the sha256), NotFound, or SlotsExhausted (every slot holds an adapter in use).
        """
        with self._key_lock(key):
            with self._lock:
                slot = self._slot_of.get(key)
                if slot is not None:
                    self._count(SLOT, hit=True)
                    self._touch(key)
                    self._refs[key] = self._refs.get(key, 0) + 1
                    return slot
                self._count(SLOT, hit=False)
            host = self._host_get(key)
            with self._lock:
                slot = self._reserve_slot(key)
            start = time.perf_counter()
            try:
                self.loader.load(slot, host.packed)
            except BaseException:
                with self._lock:
                    self._free_slot(slot)
                raise
            _series(m.ADAPTER_LOAD_SECONDS, SLOT).observe(time.perf_counter() - start)
            with self._lock:
                self._slot_bytes[key] = host.nbytes
                self._gauges()
            return slot

    def release(self, key: AdapterKey) -> None:
        """End one ``acquire`` of ``key``: once no request uses it, it may be evicted again."""
        with self._lock:
            n = self._refs.get(key, 0)
            if n <= 0:
                raise AdapterCacheError(f"release of {key} without a matching acquire")
            if n == 1:
                del self._refs[key]
                if key in self._stale:
                    self._stale.discard(key)
                    self._drop(key)
            else:
                self._refs[key] = n - 1

    @contextlib.contextmanager
    def use(self, key: AdapterKey) -> Iterator[int]:
        """``with cache.use(key) as slot:`` acquire and release around a request."""
        slot = self.acquire(key)
        try:
            yield slot
        finally:
            self.release(key)

    def invalidate(self, user_id: str, *, keep_revision: str | None = None) -> int:
        """Drop ``user_id``'s adapters from host memory and device slots (except revision ``keep_revision``).

        Adapters in use are dropped when released. The disk copies stay (they are
        content-addressed and bounded by their LRU). Returns how many adapters were dropped now.
        """
        dropped = 0
        with self._lock:
            keys = {
                k for k in (*self._host, *self._slot_of) if k.user_id == user_id and k.revision_id != keep_revision
            }
            for key in keys:
                if self._refs.get(key):
                    self._stale.add(key)
                    continue
                self._drop(key)
                dropped += 1
        if keys:
            log.info("invalidated %d adapter(s) of %s", dropped, user_id)
        return dropped

    def forget(self, user_id: str, sha256s: list[str]) -> int:
        """``user_id`` was forgotten: drop their adapters from host memory and device slots (as ``invalidate``) and
        delete the disk copies of ``sha256s``. An adapter in use by a request in flight goes when that request
        ends. Returns the number of disk copies deleted."""
        self.invalidate(user_id)
        deleted = 0
        for sha in sha256s:
            with self._lock:
                had = self._disk.pop(sha, None) is not None
            entry = self.disk_dir / sha
            if had or entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
                deleted += 1
        with self._lock:
            self._gauges()
        log.info("forgot %s: %d disk cop%s deleted", user_id, deleted, "y" if deleted == 1 else "ies")
        return deleted

    def disk_entries(self) -> list[str]:
        """The sha256 of every adapter copy on the disk tier now."""
        with self._lock:
            return list(self._disk)

    def prune_disk(self, keep: set[str], among: list[str]) -> list[str]:
        """Delete the disk copies of those of ``among`` that are not in ``keep`` (a worker's start: copies of
        revisions the registry no longer has) and are not in use; returns the sha256s deleted."""
        with self._lock:
            held = {k.sha256 for k in self._refs}
            gone = [s for s in among if s not in keep and s not in held and self._disk.pop(s, None) is not None]
            self._gauges()
        for sha in gone:
            shutil.rmtree(self.disk_dir / sha, ignore_errors=True)
        return gone

    def prefetch(self, key: AdapterKey) -> Future[bool]:
        """Load ``key`` into host memory, packed (or at least onto local disk) in the background; best effort: the
        first request then pays only the copy into a slot.

        The future is True when the adapter reached host memory or disk, False when loading failed (logged).
        """
        return self._executor.submit(self._prefetch, key)

    def stats(self) -> CacheStats:
        """Resident adapters and bytes per tier, and this instance's hits, misses and evictions per tier."""
        with self._lock:
            return CacheStats(
                resident={SLOT: len(self._slot_of), HOST: len(self._host), DISK: len(self._disk)},
                resident_bytes={
                    SLOT: self._slot_bytes.total,
                    HOST: self._host.total,
                    DISK: self._disk.total,
                },
                hits=dict(self._counters.hits),
                misses=dict(self._counters.misses),
                evictions=dict(self._counters.evictions),
                slots=list(self._slots),
            )

    def close(self) -> None:
        """Stop the prefetch threads (waits for those running) and finish the disk copies queued for writing."""
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self.fill is not None:
            self.fill.close()

    # --- tiers ---
    def _prefetch(self, key: AdapterKey) -> bool:
        try:
            with self._key_lock(key):
                with self._lock:
                    if key in self._host or key in self._slot_of:
                        return True
                self._host_get(key)
            return True
        except Exception:
            log.warning("prefetch of %s failed", key, exc_info=True)
            return False

    def _host_get(self, key: AdapterKey) -> _Host:
        """Host tier (caller holds the key's lock): the adapter packed for the slots, limits checked."""
        with self._lock:
            host = self._host.get(key)
            if host is not None:
                self._count(HOST, hit=True)
                self._host.move_to_end(key)
                return host
            self._count(HOST, hit=False)
        # With fill processes, one is held until the adapter is packed: the files are views of its shared buffer.
        with self.fill.lease() if self.fill is not None else contextlib.nullcontext() as lease:
            files = self._disk_get(key, lease)
            start = time.perf_counter()
            try:
                config = orjson.loads(files[_CONFIG])
            except (orjson.JSONDecodeError, KeyError) as e:
                raise AdapterLimitError(f"{key}: adapter_config.json is missing or not JSON: {e}") from e
            check_limits(config, None, self.limits)  # before parsing the weights: cheap refusals first
            weights = files[_WEIGHTS]
            self._check_tensors(weights)
            packed = self.loader.pack(weights, config)  # AdapterLimitError for the engine's checks; no slot touched
            del files, weights
        host = _Host(packed, int(packed.nbytes))
        _series(m.ADAPTER_LOAD_SECONDS, HOST).observe(time.perf_counter() - start)
        with self._lock:
            if self._make_room_host(host.nbytes):
                self._host[key] = host
            else:  # too big for what is evictable: serve it from this copy without keeping it
                log.info("%s (%d bytes) does not fit host memory now; not kept there", key, host.nbytes)
            self._gauges()
        return host

    def _check_tensors(self, weights: bytes) -> None:
        """The tensors' part of `check_limits`, once per header layout (adapters of one trainer share one): the
        check is a Python pass over every tensor, held the GIL ~0.6 ms a miss, and depends on the header only."""
        entries, _ = safetensors_header(weights)  # each file: it holds the bytes its header promises
        head = header_key(weights)
        with self._lock:
            if head in self._checked:
                self._checked.move_to_end(head)
                return
        check_limits({}, entries, self.limits)
        with self._lock:
            self._checked[head] = None
            while len(self._checked) > 64:
                self._checked.popitem(last=False)

    def _disk_get(self, key: AdapterKey, lease: FillLease | None = None) -> Mapping[str, Any]:
        """Disk tier, else the object store (copied to disk when it fits); through ``lease``'s fill process when
        given (the files are then views of its buffer, valid while the lease is held)."""
        entry = self.disk_dir / key.sha256
        with self._lock:
            present = key.sha256 in self._disk
        if present and self.registered is not None and not self.registered(key):
            with self._lock:
                self._disk.pop(key.sha256, None)
                self._gauges()
            shutil.rmtree(entry, ignore_errors=True)
            log.info("deleted the disk copy of %s: the registry no longer has that revision", key)
            raise NotFound(f"revision {key.revision_id} of {key.user_id!r} is no longer in the registry")
        if present:
            start = time.perf_counter()
            try:
                files = read_copy(entry, key.sha256) if lease is None else lease.read(entry, key.sha256)
            except _CorruptCopy as e:
                log.warning("disk copy of %s is corrupt (%s); deleting it and fetching again", key, e)
                with self._lock:
                    self._disk.pop(key.sha256, None)
                shutil.rmtree(entry, ignore_errors=True)
            else:
                _series(m.ADAPTER_LOAD_SECONDS, DISK).observe(time.perf_counter() - start)
                with self._lock:
                    self._count(DISK, hit=True)
                    if key.sha256 in self._disk:
                        self._disk.move_to_end(key.sha256)
                return files
        with self._lock:
            self._count(DISK, hit=False)
        if lease is not None:
            return self._fill_get(key, lease)
        with self._store_tier():
            files = fetch_verified(self.fetch, key)
        if self._reserve_disk(key.sha256, files):
            if self._writer is not None:  # write behind: the request goes on with the bytes it has
                self._writer.submit(self._write_disk, key.sha256, files)
            else:
                self._write_disk(key.sha256, files)
        return files

    def _fill_get(self, key: AdapterKey, lease: FillLease) -> Mapping[str, Any]:
        """The object store tier through a fill process, which also writes the disk copy into a temporary directory;
        moved into place here if room for it is reserved (else deleted)."""
        tmp = self._tmp_dir() if self.disk_bytes > 0 else None
        try:
            with self._store_tier():
                files, written = lease.fetch(key, tmp)
        except BaseException:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # a fill process that died while writing leaves a part
            raise
        if written is not None:
            if self._reserve_disk(key.sha256, files):
                self._place(written, key.sha256)
            else:
                shutil.rmtree(written, ignore_errors=True)
        return files

    @contextlib.contextmanager
    def _store_tier(self) -> Iterator[None]:
        """Around a fetch from the object store: its time and a hit counted, or a miss when it is not there."""
        start = time.perf_counter()
        try:
            yield
        except NotFound:
            with self._lock:
                self._count(STORE, hit=False)
            raise
        _series(m.ADAPTER_LOAD_SECONDS, STORE).observe(time.perf_counter() - start)
        with self._lock:
            self._count(STORE, hit=True)

    def _tmp_dir(self) -> Path:
        """A new temporary directory name in the disk tier (unique on this host; uuid4 cost ~0.1 ms here)."""
        return self.disk_dir / f".tmp-{os.getpid()}-{next(_TMP_IDS)}"

    def _place(self, tmp: Path, sha256: str) -> None:
        """Move the complete copy ``tmp`` into place as ``sha256``'s, if its reservation still stands (a forget, or an
        eviction, that came meanwhile removed it, and the copy must not outlive it: the check and the rename are one
        step); else delete it."""
        try:
            with self._lock:
                entry = self.disk_dir / sha256
                placed = sha256 in self._disk and not entry.exists()
                if placed:
                    tmp.rename(entry)
            if not placed:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            log.warning("could not place the disk copy of %s", sha256[:12], exc_info=True)
            shutil.rmtree(tmp, ignore_errors=True)
            with self._lock:
                self._disk.pop(sha256, None)
        with self._lock:
            self._gauges()

    def _reserve_disk(self, sha256: str, files: dict[str, bytes]) -> bool:
        """Room for a copy of ``files`` on the disk tier, reserved now (True) for `_write_disk`; False when a copy is
        there or reserved already, or it does not fit. A reader of a copy not yet written refetches it."""
        size = sum(len(files[n]) for n in ADAPTER_FILES)
        with self._lock:
            if sha256 in self._disk:
                return False
            fits = self._make_room_disk(size)
            if fits:
                self._disk[sha256] = size
        if not fits:
            log.info("adapter %s (%d bytes) does not fit the disk cache now; not kept there", sha256[:12], size)
        return fits

    def _write_disk(self, sha256: str, files: dict[str, bytes]) -> None:
        """Write the copy `_reserve_disk` reserved room for."""
        tmp = self._tmp_dir()
        try:
            write_copy(tmp, sha256, files)
        except OSError:
            log.warning("could not write the disk copy of %s", sha256[:12], exc_info=True)
            shutil.rmtree(tmp, ignore_errors=True)
            with self._lock:
                self._disk.pop(sha256, None)
                self._gauges()
            return
        self._place(tmp, sha256)

    def _scan_disk(self) -> None:
        """Adopt complete copies left by an earlier process (oldest first); remove partial ones."""
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        entries = []
        for d in self.disk_dir.iterdir():
            if d.name.startswith(".tmp-") or not (d / _DIGESTS).exists():
                shutil.rmtree(d, ignore_errors=True)
                continue
            size = sum((d / n).stat().st_size for n in ADAPTER_FILES if (d / n).exists())
            entries.append(((d / _DIGESTS).stat().st_mtime, d.name, size))
        for _, name, size in sorted(entries):
            self._disk[name] = size
        while self._disk.total > self.disk_bytes and self._disk:
            name, _ = self._disk.popitem(last=False)
            shutil.rmtree(self.disk_dir / name, ignore_errors=True)

    # --- bookkeeping (caller holds self._lock) ---
    def _held(self, key: AdapterKey) -> bool:
        return self._refs.get(key, 0) > 0

    def _reserve_slot(self, key: AdapterKey) -> int:
        if self._empty:
            slot = heapq.heappop(self._empty)
        else:
            victim = next((k for k in self._probation if not self._held(k)), None)
            if victim is None:
                victim = next((k for k in self._protected if not self._held(k)), None)
            if victim is None:
                raise SlotsExhausted(
                    f"all {len(self._slots)} device slots hold adapters in use; {key.user_id}@"
                    f"{key.revision_id} cannot be loaded until one is released (or add slots)"
                )
            slot = self._slot_of.pop(victim)
            self._unrank(victim)
            self._slot_bytes.pop(victim, None)
            # No clear: the load that follows replaces what the slot held (a clear would be one more device write).
            self._evicted(SLOT)
        self._slots[slot] = key
        self._slot_of[key] = slot
        self._probation[key] = None
        self._refs[key] = self._refs.get(key, 0) + 1
        return slot

    def _touch(self, key: AdapterKey) -> None:
        """A use of ``key``, in a slot: protected (most recent), the oldest protected back to probation when over."""
        if key in self._protected:
            self._protected.move_to_end(key)
            return
        self._probation.pop(key, None)
        self._protected[key] = None
        while len(self._protected) > self._protected_cap:
            oldest, _ = self._protected.popitem(last=False)
            self._probation[oldest] = None  # the most recent of probation: it goes after the one-off adapters

    def _unrank(self, key: AdapterKey) -> None:
        self._probation.pop(key, None)
        self._protected.pop(key, None)

    def _free_slot(self, slot: int) -> None:
        key = self._slots[slot]
        self._slots[slot] = None
        if key is not None:
            heapq.heappush(self._empty, slot)
            self._slot_of.pop(key, None)
            self._unrank(key)
            self._slot_bytes.pop(key, None)
            n = self._refs.get(key, 0) - 1
            if n > 0:
                self._refs[key] = n
            else:
                self._refs.pop(key, None)
        with contextlib.suppress(Exception):
            self.loader.clear(slot)
        self._gauges()

    def _make_room_host(self, nbytes: int) -> bool:
        return self._make_room(self._host, nbytes, self.host_bytes, HOST, self._held)

    def _make_room_disk(self, nbytes: int) -> bool:
        if self._disk.total + nbytes <= self.disk_bytes:
            return True
        held = {k.sha256 for k in self._refs}

        def evict(sha: str) -> None:
            shutil.rmtree(self.disk_dir / sha, ignore_errors=True)

        return self._make_room(self._disk, nbytes, self.disk_bytes, DISK, held.__contains__, evict)

    def _make_room(
        self,
        tier: _SizedLRU,
        nbytes: int,
        capacity: int,
        name: str,
        held: Callable[[Any], bool],
        on_evict: Callable[[Any], None] | None = None,
    ) -> bool:
        """Evict unheld entries, oldest first, until ``nbytes`` more fit; False (nothing evicted) if they cannot.
        Walks from the oldest entry only as far as the room it needs."""
        need = tier.total + nbytes - capacity
        if need <= 0:
            return True
        victims, freed = [], 0
        for k in tier:
            if held(k):
                continue
            victims.append(k)
            freed += tier.size(tier[k])
            if freed >= need:
                break
        else:
            return False
        for k in victims:
            tier.pop(k)
            if on_evict:
                on_evict(k)
            self._evicted(name)
        return True

    def _drop(self, key: AdapterKey) -> None:
        self._host.pop(key, None)
        slot = self._slot_of.pop(key, None)
        self._unrank(key)
        if slot is not None:
            self._slots[slot] = None
            heapq.heappush(self._empty, slot)
            self._slot_bytes.pop(key, None)
            self.loader.clear(slot)
        self._gauges()

    def _evicted(self, tier: str) -> None:
        self._counters.evictions[tier] += 1
        _series(m.ADAPTER_CACHE_EVICTIONS, tier).inc()

    def _count(self, tier: str, *, hit: bool) -> None:
        if hit:
            self._counters.hits[tier] += 1
            _series(m.ADAPTER_CACHE_HITS, tier).inc()
        else:
            self._counters.misses[tier] += 1
            _series(m.ADAPTER_CACHE_MISSES, tier).inc()

    def _gauges(self) -> None:
        # Gauges are process-wide: one cache per serving process.
        for tier, n, b in (
            (SLOT, len(self._slot_of), self._slot_bytes.total),
            (HOST, len(self._host), self._host.total),
            (DISK, len(self._disk), self._disk.total),
        ):
            _series(m.ADAPTER_CACHE_RESIDENT, tier).set(n)
            _series(m.ADAPTER_CACHE_RESIDENT_BYTES, tier).set(b)

    @contextlib.contextmanager
    def _key_lock(self, key: AdapterKey) -> Iterator[None]:
        """One loader per adapter at a time; the lock object lives while someone holds or waits for it."""
        with self._lock:
            entry = self._key_locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._key_locks[key]
