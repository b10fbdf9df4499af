"""What a serving worker knows about an adapter before it is cached: its key, the slots' limits, how a slot is
loaded, and where its files come from (the registry, sha256-verified)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from pipeline.domain.errors import CapacityExhausted, NotFound, PersonaError
from pipeline.models.multilora import AdapterLimitError

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


class SlotLoader(Protocol):
    """Device slots of the serving engine (its multi-LoRA slots).

    Called from several threads, never twice at once for one slot; ``load`` replaces whatever the slot held.
    """

    def load(self, slot: int, tensors: dict[str, Tensor], config: dict[str, Any]) -> None: ...

    def clear(self, slot: int) -> None: ...


class EngineSlots:
    """SlotLoader over the serving engine's multi-LoRA slots (``Engine.load_adapter_state``/``clear_adapter``)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def load(self, slot: int, tensors: dict[str, Tensor], config: dict[str, Any]) -> None:
        self.engine.load_adapter_state(slot, tensors, config)

    def clear(self, slot: int) -> None:
        self.engine.clear_adapter(slot)


def check_limits(config: dict[str, Any], tensors: dict[str, Tensor] | None, limits: AdapterLimits) -> None:
    """Raise AdapterLimitError unless the adapter's rank and target modules are within ``limits``.

    The PEFT config is checked first; the tensors (when given) are checked too, so an adapter whose config
    understates its rank or modules is refused as well.
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
        short = module.rsplit(".", 1)[-1]
        if short not in limits.targets:
            raise AdapterLimitError(f"tensor {name!r} targets module {short!r}; allowed: {allowed}")
        rank = tensor.shape[0] if rest == "A.weight" else tensor.shape[-1]
        if rank > limits.max_rank:
            raise AdapterLimitError(f"tensor {name!r} has rank {rank}; the maximum rank is {limits.max_rank}")


def registry_fetch(stores: Stores) -> Callable[[AdapterKey], dict[str, bytes]]:
    """A ``fetch`` for AdapterCache: the revision's PEFT files from the object store, verified by the registry."""
    from pipeline.storage.registry import get_revision

    def fetch(key: AdapterKey) -> dict[str, bytes]:
        with stores.db.connection() as conn:
            rev = get_revision(conn, key.revision_id)
        if rev.user_id != key.user_id or rev.sha256 != key.sha256:
            raise NotFound(
                f"revision {key.revision_id} is ({rev.user_id!r}, {rev.sha256[:12]}), "
                f"not ({key.user_id!r}, {key.sha256[:12]}) as requested"
            )
        return stores.registry.adapter_files(rev)

    return fetch


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
