"""What a serving worker knows about an adapter before it is cached: its key, the slots' limits, how an adapter is
packed and a slot loaded (`SlotLoader`), and where its files come from (the registry, sha256-verified)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from safetensors.torch import load as load_safetensors

from pipeline.domain.errors import CapacityExhausted, NotFound, PersonaError
from pipeline.models.multilora import AdapterLimitError
from pipeline.serving.fill import registry_fetch  # noqa: F401 (re-exported: the cache's fetch, in a worker's process)

if TYPE_CHECKING:
    from pipeline.storage.stores import Stores


class AdapterCacheError(PersonaError):
    """The adapter cache cannot serve a request (see the subclasses)."""


class SlotsExhausted(AdapterCacheError, CapacityExhausted):
    """Every device slot holds an adapter in use by a request in flight: nothing can be evicted to make room."""

    code = "slots_exhausted"


@dataclass(frozen=True)
class AdapterKey:
    """One revision of one user's adapter; ``sha256`` is that of its adapter_model.safetensors."""

    user_id: str
    revision_id: str
    sha256: str


@dataclass(frozen=True)
class AdapterLimits:
    """What the device slots accept: LoRA rank up to ``max_rank``, LoRA only on modules named in ``targets``."""

    max_rank: int
    targets: frozenset[str]


class Packed(Protocol):
    """An adapter packed into the slot layout of one engine (`SlotLoader.pack`): what the host tier keeps."""

    @property
    def nbytes(self) -> int:
        """Bytes the packed form occupies in host memory (what the host tier's byte budget counts)."""
        ...


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, from its header: dtype name (``BF16``, ``F32``...), shape, byte range in
    the data section."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


#: Parsed safetensors headers by their bytes (`safetensors_header`): the adapters one trainer writes share one header
#: (same names, shapes, offsets and metadata), so a serving worker parses each layout once, not each adapter.
_HEADERS: OrderedDict[bytes, tuple[Mapping[str, TensorEntry], int]] = OrderedDict()
_HEADERS_MAX = 64
_HEADERS_LOCK = threading.Lock()


def header_key(raw: bytes) -> bytes:
    """The header bytes of a safetensors file (what identifies its layout: adapters with equal header bytes have
    their tensors at the same places). Raises AdapterLimitError for a file too short for its header."""
    if len(raw) < 8:
        raise AdapterLimitError("adapter_model.safetensors is shorter than its header length")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise AdapterLimitError(f"adapter_model.safetensors: header length {n} exceeds the file ({len(raw)} bytes)")
    head = raw[8 : 8 + n]
    return head if isinstance(head, bytes) else bytes(head)  # a view (a fill process's buffer): bytes, a dict key


def safetensors_header(raw: bytes) -> tuple[Mapping[str, TensorEntry], int]:
    """The tensors a safetensors file holds (from its header only, no tensor is built) and where its data section
    starts. Raises AdapterLimitError for a file that is not safetensors or whose tensors lie outside it.

    A layout is parsed once per process (kept by its header bytes, the last 64): building ~400 entries in Python
    took ~2 ms holding the GIL, on every miss of a serving worker, twice. The mapping returned is shared: read only.
    """
    head = header_key(raw)
    with _HEADERS_LOCK:
        hit = _HEADERS.get(head)
        if hit is not None:
            _HEADERS.move_to_end(head)
    if hit is None:
        hit = _parse_header(head)
        with _HEADERS_LOCK:
            _HEADERS[head] = hit
            while len(_HEADERS) > _HEADERS_MAX:
                _HEADERS.popitem(last=False)
    entries, end = hit
    data = 8 + len(head)
    if end > len(raw) - data:  # per file: a truncated file may share its header with a whole one
        name = next(k for k, e in entries.items() if e.end > len(raw) - data)
        raise AdapterLimitError(f"adapter_model.safetensors: tensor {name!r} lies outside the file")
    return entries, data


def _parse_header(head: bytes) -> tuple[Mapping[str, TensorEntry], int]:
    """(entries, the end of the last tensor's bytes in the data section) of a header."""
    try:
        header = orjson.loads(head)
        entries = {
            name: TensorEntry(str(e["dtype"]), tuple(int(d) for d in e["shape"]), *map(int, e["data_offsets"]))
            for name, e in header.items()
            if name != "__metadata__"
        }
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise AdapterLimitError(f"adapter_model.safetensors has no valid header: {err}") from err
    for name, entry in entries.items():
        if not 0 <= entry.start <= entry.end:
            raise AdapterLimitError(f"adapter_model.safetensors: tensor {name!r} lies outside the file")
    return MappingProxyType(entries), max((e.end for e in entries.values()), default=0)


class SlotLoader(Protocol):
    """Device slots of the serving engine (its multi-LoRA slots).

    - ``pack(weights, config)``: check a PEFT adapter (its adapter_model.safetensors bytes and config) against the
      slots' limits and lay it out in the slot layout, in host memory, once per host-tier entry. Raises
      AdapterLimitError when it does not fit. Pure and thread-safe; touches no slot and never takes the engine's
      lock. ``weights`` may be a view of a fill process's buffer (`pipeline.serving.fill`), valid only during the
      call: the packed form must not refer to it.
    - ``load(slot, packed)``: copy a packed adapter into ``slot``, replacing whatever it held (no ``clear`` needed
      first). May run while the engine steps, in another thread: no queued or running request uses a slot being
      loaded (the cache reserved it for the loading adapter).
    - ``clear(slot)``: empty ``slot`` (a dropped or forgotten adapter, a failed load); same contract as ``load``.

    Called from several threads, never twice at once for one slot.
    """

    def pack(self, weights: bytes, config: dict[str, Any]) -> Packed: ...

    def load(self, slot: int, packed: Any) -> None: ...

    def clear(self, slot: int) -> None: ...


class EngineSlots:
    """SlotLoader over a serving engine's slots: ``pack_adapter`` (or ``pack_adapter_bytes``, straight from the file's
    bytes, where the engine has it) / ``load_packed`` / ``clear_adapter``.

    The engines' contract: ``load_packed`` and ``clear_adapter`` may be called from another thread while
    ``step`` runs, provided no queued or running request uses that slot; packing is pure. ``clear_lock``,
    when given, is held around ``clear_adapter`` for an engine whose clear is not safe beside a running step.
    """

    def __init__(self, engine: Any, *, clear_lock: AbstractContextManager[Any] | None = None) -> None:
        self.engine = engine
        self.clear_lock = clear_lock

    def pack(self, weights: bytes, config: dict[str, Any]) -> Packed:
        from_bytes = getattr(self.engine, "pack_adapter_bytes", None)
        packed: Packed
        if from_bytes is not None:
            packed = from_bytes(weights, config)
        else:
            packed = self.engine.pack_adapter(load_safetensors(bytes(weights)), config)
        return packed

    def load(self, slot: int, packed: Any) -> None:
        self.engine.load_packed(slot, packed)

    def clear(self, slot: int) -> None:
        with self.clear_lock or nullcontext():
            self.engine.clear_adapter(slot)


def check_limits(config: dict[str, Any], tensors: Mapping[str, Any] | None, limits: AdapterLimits) -> None:
    """Raise AdapterLimitError unless the adapter's rank and target modules are within ``limits``.

    The PEFT config is checked first; the tensors (when given: anything with a ``shape`` per name, tensors or
    `TensorEntry`) are checked too, so an adapter whose config understates its rank or modules is refused as well.
    """
    allowed = ", ".join(sorted(limits.targets))
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLimitError(f"peft_type {config.get('peft_type')!r} is not served; only LORA adapters are")
    ranks = [int(config.get("r", 0))] + [int(v) for v in (config.get("rank_pattern") or {}).values()]
    if max(ranks) > limits.max_rank:
        raise AdapterLimitError(f"LoRA rank {max(ranks)} exceeds the maximum rank {limits.max_rank} of the slots")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # PEFT reads a string as a regular expression (or "all-linear"): not checkable
        targets = [targets]
    bad = sorted(set(targets) - limits.targets)
    if bad:
        raise AdapterLimitError(f"target modules {', '.join(bad)} are not served; allowed: {allowed}")
    if config.get("modules_to_save"):
        raise AdapterLimitError(f"modules_to_save {config['modules_to_save']} are not served; only LoRA A/B weights")
    if config.get("use_dora"):
        raise AdapterLimitError("DoRA adapters are not served; only plain LoRA")
    for name, tensor in (tensors or {}).items():
        module, sep, rest = name.partition(".lora_")
        if not sep or rest not in ("A.weight", "B.weight"):
            raise AdapterLimitError(f"tensor {name!r} is not a LoRA A/B weight; only those are served")
        if len(tensor.shape) != 2:
            raise AdapterLimitError(f"tensor {name!r} has shape {tuple(tensor.shape)}; LoRA weights are matrices")
        short = module.rsplit(".", 1)[-1]
        if short not in limits.targets:
            raise AdapterLimitError(f"tensor {name!r} targets module {short!r}; allowed: {allowed}")
        rank = tensor.shape[0] if rest == "A.weight" else tensor.shape[-1]
        if rank > limits.max_rank:
            raise AdapterLimitError(f"tensor {name!r} has rank {rank}; the maximum rank is {limits.max_rank}")


def registry_check(stores: Stores) -> Callable[[AdapterKey], bool]:
    """A ``registered`` for AdapterCache: whether the registry still has ``key``'s revision, of that user, with
    that sha256 (one index probe). Database errors propagate (StorageError): they are not a "no"."""
    from pipeline.storage.registry import get_revision

    def registered(key: AdapterKey) -> bool:
        try:
            with stores.db.connection() as conn:
                rev = get_revision(conn, key.revision_id)
        except NotFound:
            return False
        return rev.user_id == key.user_id and rev.sha256 == key.sha256

    return registered
