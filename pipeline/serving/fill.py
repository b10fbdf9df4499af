"""The adapter cache's file work in other processes: fetching from the object store, checking sha256s, writing and
reading the disk copies (`FillPool`).

Why: a serving worker is one Python process whose event loop (HTTP, streaming) and engine thread share one GIL. A
miss that reaches the object store or the disk tier runs dozens of calls that give the GIL away and take it back (the
registry query, the object store's HTTP reads, hashing, each file read and write), and every take-back interrupts
whichever thread holds the GIL then. Under skewed traffic those first touches come tens of times a second and cost
the worker capacity that resident adapters do not (bench/results/serving_load.md). In a fill process that work
costs the serving process one request sent and one reply received; what stays in the serving process is the pack
(a few whole-array operations) and the slot load.

The pool: at most ``processes`` child processes (``spawn``; 2 at start, another whenever a caller finds every one
busy, so that misses waiting on a slow object store still wait in parallel), each with its own request and reply
pipes and used by one thread at a time (a caller takes an idle child, sends, waits for the reply, puts it back). A
child imports no torch (it starts in well under a second) and opens its own fetch from a picklable `FetchSpec` (the
registry and object store for a worker: `RegistryFetchSpec`), so nothing of the serving process's clients crosses.
Each process has a shared buffer (a file in /dev/shm, 8 MiB by default, its room allocated when the process starts):
a reply names where in it the files are, and the caller reads them there, with no copy through the pipe
(`FillPool.lease`: the views are valid while the caller holds that process); files too big for it, or all of a
process's when /dev/shm has no room for its buffer, come through the pipe. An exception raised in a fill process is
raised again in the caller. A child that dies (killed, out of memory) is replaced and the request tried once more on
the new one; a second death raises `FillProcessError` (an `Unavailable`: the request fails with 503, the worker goes
on).

The disk tier's bookkeeping stays in the cache (`AdapterCache`): a child writes a fetched adapter's copy into the
temporary directory it is given, complete with its digests, and the cache moves it into place only if its reservation
still stands (a forget in between leaves nothing behind).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

import orjson

from pipeline.domain.errors import NotFound, Unavailable
from pipeline.domain.revisions import ADAPTER_FILES
from pipeline.storage.objects import CorruptObject, sha256_hex

if TYPE_CHECKING:
    from pipeline.config import DatabaseSettings, S3Settings
    from pipeline.storage.stores import Stores

log = logging.getLogger(__name__)

_CONFIG, _WEIGHTS = ADAPTER_FILES
DIGESTS = "sha256.json"  # written last in a disk copy: its presence marks a complete copy
_PIPE_BYTES = 1 << 20  # F_SETPIPE_SZ: the reply pipe's buffer (Linux allows up to fs.pipe-max-size, 1 MiB by default)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class FillProcessError(Unavailable):
    """A fill process died twice on one request (or the pool is closed): the adapter was not loaded."""

    code = "adapter_fill_failed"
    retry_after_s = 1.0


class CorruptCopy(Exception):
    """A disk copy is incomplete or does not match its digests."""


class FetchSpec(Protocol):
    """What a fill process opens to fetch adapters (picklable: it crosses to the child once, at its start)."""

    def open(self) -> Callable[[KeyFields], dict[str, bytes]]:
        """The fetch: the adapter's PEFT files by name, from wherever the spec says."""
        ...


@dataclass(frozen=True)
class RegistryFetchSpec:
    """A serving worker's fetch: the revision looked up in the registry, its files read from the object store and
    checked against the sha256s the registry recorded (`registry_fetch`)."""

    db: DatabaseSettings
    s3: S3Settings

    def open(self) -> Callable[[KeyFields], dict[str, bytes]]:
        from pipeline.storage.stores import Stores

        return registry_fetch(Stores.open(self.db, self.s3, name="persona-serve-fill", wait=False))


def registry_fetch(stores: Stores) -> Callable[[KeyFields], dict[str, bytes]]:
    """A ``fetch`` for AdapterCache: the revision's PEFT files from the object store, verified by the registry."""
    from pipeline.storage.registry import get_revision

    def fetch(key: KeyFields) -> dict[str, bytes]:
        with stores.db.connection() as conn:
            rev = get_revision(conn, key.revision_id)
        if rev.user_id != key.user_id or rev.sha256 != key.sha256:
            raise NotFound(
                f"revision {key.revision_id} is ({rev.user_id!r}, {rev.sha256[:12]}), "
                f"not ({key.user_id!r}, {key.sha256[:12]}) as requested"
            )
        return stores.registry.adapter_files(rev)

    return fetch


class KeyFields(Protocol):
    """What the fill side reads of an adapter's key (`pipeline.serving.adapters.AdapterKey` has these fields)."""

    @property
    def user_id(self) -> str: ...

    @property
    def revision_id(self) -> str: ...

    @property
    def sha256(self) -> str: ...


K = TypeVar("K", bound=KeyFields)


class FillKey(NamedTuple):
    """An adapter's key as a fill process sees it (`AdapterKey`'s fields: its module, and torch, stay out of it)."""

    user_id: str
    revision_id: str
    sha256: str


@dataclass(frozen=True)
class DirectoryFetchSpec:
    """Adapters from a local directory in the object store's layout (``users/ID/revisions/REV/FILE``): benches and
    tests. ``latency_s`` is slept before each read (a stand-in for the network)."""

    root: str
    latency_s: float = 0.0

    def open(self) -> Callable[[KeyFields], dict[str, bytes]]:
        root, latency_s = Path(self.root), self.latency_s

        def fetch(key: KeyFields) -> dict[str, bytes]:
            folder = root / "users" / key.user_id / "revisions" / key.revision_id
            if latency_s:
                time.sleep(latency_s)
            try:
                return {name: (folder / name).read_bytes() for name in ADAPTER_FILES}
            except FileNotFoundError as e:
                raise NotFound(f"revision {key.revision_id} of {key.user_id!r} is not in {root}") from e

        return fetch


# --- the file work itself (in a fill process, or in the serving process when there is no pool) ---


def write_copy(tmp: Path, sha256: str, files: dict[str, bytes]) -> None:
    """A complete disk copy of ``files`` in the new directory ``tmp`` (the digests file last). The weights were
    checked against ``sha256`` when fetched: only the other files are hashed here."""
    tmp.mkdir(parents=True)
    for name in ADAPTER_FILES:
        (tmp / name).write_bytes(files[name])
    digests = {n: sha256 if n == _WEIGHTS else sha256_hex(files[n]) for n in ADAPTER_FILES}
    (tmp / DIGESTS).write_bytes(orjson.dumps(digests))


def read_copy(entry: Path, sha256: str) -> dict[str, bytes]:
    """The files of the disk copy ``entry``, each checked against its recorded digest; CorruptCopy otherwise."""
    try:
        digests = orjson.loads((entry / DIGESTS).read_bytes())
        files = {name: (entry / name).read_bytes() for name in ADAPTER_FILES}
    except (OSError, orjson.JSONDecodeError) as e:
        raise CorruptCopy(str(e)) from e
    for name, data in files.items():
        if sha256_hex(data) != digests.get(name):
            raise CorruptCopy(f"{name} does not match its recorded sha256")
    if digests.get(_WEIGHTS) != sha256:
        raise CorruptCopy(f"{_WEIGHTS} is not the one of sha256 {sha256}")
    return files


def fetch_verified(fetch: Callable[[K], dict[str, bytes]], key: K) -> dict[str, bytes]:
    """``fetch(key)``, its weights checked against ``key.sha256`` (the registry's fetch checks too; this guards a fetch
    that does not)."""
    files = fetch(key)
    if sha256_hex(files.get(_WEIGHTS, b"")) != key.sha256:
        raise CorruptObject(f"{key}: the fetched adapter_model.safetensors does not have sha256 {key.sha256}")
    return files


# --- the child ---


def _child(requests: Connection, replies: Connection, spec: FetchSpec, buffer: str | None, size: int) -> None:
    from pipeline.observability import logs

    logs.setup(os.environ.get("PERSONA_LOG_LEVEL", "INFO"))
    fetch = spec.open()
    view = None
    if buffer is not None:
        with open(buffer, "r+b") as f:
            view = memoryview(mmap.mmap(f.fileno(), size))
    while True:
        try:
            op, args = requests.recv()
        except (EOFError, OSError):  # the serving process closed its end (or died): nothing more to do
            return
        reply: tuple[str, Any]
        try:
            if op == "fetch":
                fields, tmp = args
                key: Any = FillKey(*fields)
                files = fetch_verified(fetch, key)
                if tmp is not None:
                    try:
                        write_copy(Path(tmp), key.sha256, files)
                    except OSError:
                        log.warning("could not write the disk copy of %s", key.sha256[:12], exc_info=True)
                        shutil.rmtree(tmp, ignore_errors=True)
                        tmp = None
                reply = ("ok", (_place_files(view, files), tmp))
            elif op == "read":
                reply = ("ok", _place_files(view, read_copy(*args)))
            elif op == "ping":
                reply = ("ok", (os.getpid(), "torch" in sys.modules))
            else:
                reply = ("error", ValueError(f"unknown fill operation {op!r}"))
        except Exception as e:
            reply = ("error", e)
        try:
            replies.send(reply)
        except Exception as e:
            replies.send(("error", FillProcessError(f"{type(e).__name__} in a fill process: {reply[1]!r}")))


def _place_files(view: memoryview | None, files: dict[str, bytes]) -> dict[str, Any]:
    """The files in the shared buffer (their (offset, length) by name) when they fit, else the files themselves."""
    if view is None or sum(len(d) for d in files.values()) > len(view):
        return files
    placed, off = {}, 0
    for name, data in files.items():
        view[off : off + len(data)] = data
        placed[name] = (off, len(data))
        off += len(data)
    return placed


@dataclass
class _Proc:
    process: Any
    requests: Connection
    replies: Connection


class _Buffer:
    """One fill process's shared buffer: a file in shared memory (``/dev/shm`` where there is one, mode 0600), its
    room allocated up front (a full /dev/shm is an error here, at the start, and not a SIGBUS in the child later).
    Where /proc is, the file is unlinked at once and the child opens it through this process's descriptor
    (``/proc/PID/fd/N``): a worker killed with SIGKILL leaves nothing in /dev/shm."""

    def __init__(self, size: int) -> None:
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()  # noqa: S108 - POSIX shm
        self.fd, name = tempfile.mkstemp(prefix="persona-fill-", dir=folder)
        try:
            os.posix_fallocate(self.fd, 0, size)
            self.map = mmap.mmap(self.fd, size)
        except BaseException:
            os.close(self.fd)
            os.unlink(name)
            raise
        proc = f"/proc/{os.getpid()}/fd/{self.fd}"
        if os.path.exists(proc):
            os.unlink(name)
            self.path, self._name = proc, None
        else:
            self.path, self._name = name, name
        self.view = memoryview(self.map)

    def close(self) -> None:
        if self._name is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._name)
        with contextlib.suppress(BufferError, ValueError):
            self.view.release()
        with contextlib.suppress(BufferError):  # a caller still holds a view: the mapping goes with it
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class FillLease:
    """One fill process, held by one caller (`FillPool.lease`): the files it returns are views of its shared buffer,
    valid until the lease ends (copy what must outlive it)."""

    def __init__(self, pool: FillPool, index: int) -> None:
        self._pool = pool
        self.index = index

    def fetch(self, key: KeyFields, tmp: Path | None) -> tuple[dict[str, Any], Path | None]:
        """The adapter's files from the spec's fetch, sha256-checked; with ``tmp``, a complete disk copy written
        there too (the second value: ``tmp``, or None when it could not be written)."""
        fields = (key.user_id, key.revision_id, key.sha256)
        placed, written = self._pool._call(self.index, "fetch", (fields, None if tmp is None else str(tmp)))
        return self._files(placed), None if written is None else Path(written)

    def read(self, entry: Path, sha256: str) -> dict[str, Any]:
        """The files of a disk copy, checked against its digests (CorruptCopy otherwise)."""
        return self._files(self._pool._call(self.index, "read", (entry, sha256)))

    def _files(self, placed: dict[str, Any]) -> dict[str, Any]:
        buffer = self._pool._buffers[self.index]
        if buffer is None or not all(isinstance(v, tuple) for v in placed.values()):
            return placed
        return {name: buffer.view[off : off + n] for name, (off, n) in placed.items()}


class FillPool:
    """At most ``processes`` fill processes (see the module doc), ``start`` of them at once and more while misses
    overlap (a request that finds every one busy starts another: under a slow object store, misses wait on the
    network in parallel, as they did on the request threads); thread-safe. ``buffer_bytes``: each process's shared
    buffer, through which files up to that size come back (larger ones, or all when there is no room for the
    buffers, through the reply pipe)."""

    def __init__(self, spec: FetchSpec, processes: int = 8, *, start: int = 2, buffer_bytes: int = 8 << 20) -> None:
        if processes < 1:
            raise ValueError(f"a fill pool needs at least one process (got {processes})")
        self.spec = spec
        self.processes = processes
        self.buffer_bytes = buffer_bytes
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._procs: list[_Proc | None] = []
        self._buffers: list[_Buffer | None] = []
        self._lock = threading.Lock()
        self._closed = False
        for _ in range(max(1, min(start, processes))):
            self._idle.put(self._add())

    @property
    def started(self) -> int:
        """Fill processes started so far."""
        return len(self._procs)

    @contextlib.contextmanager
    def lease(self) -> Iterator[FillLease]:
        """One fill process for the caller until the block ends (the files it returns are valid until then)."""
        if self._closed:
            raise FillProcessError("the adapter fill pool is closed")
        try:
            index = self._idle.get_nowait()
        except queue.Empty:
            grown = self._grow()
            index = self._idle.get() if grown is None else grown
        try:
            yield FillLease(self, index)
        finally:
            self._idle.put(index)

    def fetch(self, key: KeyFields, tmp: Path | None) -> tuple[dict[str, bytes], Path | None]:
        """`FillLease.fetch` with the files copied out (for callers that keep them)."""
        with self.lease() as lease:
            files, written = lease.fetch(key, tmp)
            return {name: bytes(data) for name, data in files.items()}, written

    def read(self, entry: Path, sha256: str) -> dict[str, bytes]:
        """`FillLease.read` with the files copied out."""
        with self.lease() as lease:
            return {name: bytes(data) for name, data in lease.read(entry, sha256).items()}

    def pids(self) -> list[int]:
        """The started fill processes' pids, as they answer (each one asked once, all held meanwhile): a caller that
        gets them knows every started process is up."""
        held = [self._idle.get() for _ in range(self.started)]
        try:
            return [self._call(i, "ping", ())[0] for i in held]
        finally:
            for i in held:
                self._idle.put(i)

    def close(self) -> None:
        """Stop the fill processes (a call in flight fails with FillProcessError)."""
        with self._lock:
            self._closed = True
            procs = [p for p in self._procs if p is not None]
            self._procs = [None] * len(self._procs)
        for p in procs:
            with contextlib.suppress(OSError):
                p.requests.close()
        for p in procs:
            p.process.join(timeout=5)
            if p.process.is_alive():
                p.process.kill()
                p.process.join(timeout=5)
            with contextlib.suppress(OSError):
                p.replies.close()
        for b in self._buffers:
            if b is not None:
                b.close()

    def __enter__(self) -> FillPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---
    def _add(self) -> int:
        """Start one more fill process, with its buffer (caller: the constructor, or `_grow` under the lock)."""
        index = len(self._procs)
        buffer = None
        if self.buffer_bytes > 0:
            try:
                buffer = _Buffer(self.buffer_bytes)
            except OSError as e:
                log.warning("no shared buffer of %d bytes for adapter fill process %d (%s): its files come back "
                            "through its pipe", self.buffer_bytes, index, e)  # fmt: skip
        self._buffers.append(buffer)
        self._procs.append(None)
        self._procs[index] = self._start(index)
        return index

    def _grow(self) -> int | None:
        """Another fill process for a caller that found every one busy; None at the most (it waits then)."""
        with self._lock:
            if self._closed or len(self._procs) >= self.processes:
                return None
            index = self._add()
        log.info("adapter fill processes: %d of at most %d (every one was busy)", index + 1, self.processes)
        return index

    def _start(self, index: int) -> _Proc:
        req_r, req_w = self._ctx.Pipe(duplex=False)
        rep_r, rep_w = self._ctx.Pipe(duplex=False)
        with contextlib.suppress(OSError):  # a bigger reply pipe: files that do not fit the buffer in fewer reads
            fcntl.fcntl(rep_w.fileno(), _F_SETPIPE_SZ, _PIPE_BYTES)
        buffer = self._buffers[index]
        args = (req_r, rep_w, self.spec, None if buffer is None else buffer.path, len(buffer.map) if buffer else 0)
        process = self._ctx.Process(target=_child, args=args, name="persona-adapter-fill", daemon=True)
        process.start()
        req_r.close()  # the child's ends: held by the child only, so its death shows as EOF here
        rep_w.close()
        return _Proc(process, req_w, rep_r)

    def _replace(self, index: int, dead: _Proc) -> _Proc:
        for conn in (dead.requests, dead.replies):
            with contextlib.suppress(OSError):
                conn.close()
        dead.process.join(timeout=1)
        with self._lock:
            if self._closed:
                raise FillProcessError("the adapter fill pool is closed")
            log.warning("adapter fill process %s ended (exit code %s); starting another", dead.process.pid,
                        dead.process.exitcode)  # fmt: skip
            proc = self._procs[index] = self._start(index)
        return proc

    def _call(self, index: int, op: str, args: tuple[Any, ...]) -> Any:
        proc = self._procs[index]
        if proc is None or self._closed:
            raise FillProcessError("the adapter fill pool is closed")
        for attempt in (1, 2):
            try:
                proc.requests.send((op, args))
                status, value = proc.replies.recv()
                break
            except (EOFError, OSError) as e:
                proc = self._replace(index, proc)
                if attempt == 2:
                    raise FillProcessError(f"adapter fill processes died twice on one {op}: {e!r}") from e
        if status == "error":
            raise value
        return value
