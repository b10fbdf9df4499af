"""Borrowing the shared base model: attach one adapter to it for a while, then give it back exactly as it was.

The base (`pipeline.models.base.LoadedBase`) is loaded once per process and shared by training, evaluation and
serving. peft does not copy it: ``PeftModel.from_pretrained`` and ``get_peft_model`` replace the target modules of
the base *in place* by LoRA layers, set ``peft_config`` on it and may flip flags. So every use of peft on the base
goes through `borrowed`: it holds the base's process-wide lock (one borrower at a time), records the module tree
(each module's children, parameters, buffers, hooks, attributes and train/eval flag, each parameter's
``requires_grad``, and the config's attributes) and puts all of it back afterwards, whatever happened inside. The
LoRA layers are simply dropped; nothing is merged, so the weights are never written to and stay bit-for-bit
identical.

`attached` is the common case: the base with a stored PEFT adapter directory on it (stock
``PeftModel.from_pretrained``), or the base itself.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import SafetensorError

from pipeline.domain.errors import PersonaError
from pipeline.models.base import LoadedBase

log = logging.getLogger(__name__)

# nn.Module containers whose *contents* peft may change (children replaced, hooks registered): restored by value.
_CONTAINERS = (
    "_modules",
    "_parameters",
    "_buffers",
    "_non_persistent_buffers_set",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


class AttachError(PersonaError):
    """An adapter cannot be attached to the base (bad directory, incompatible shape), or the base is in use."""


# One lock per base model object. Reentrant so a caller may hold it across a borrow (training seeds the RNG under
# it before peft initialises LoRA); a second *borrow* on the same thread is still refused by `borrowed`.
_locks: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_borrowed: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_registry_lock = threading.Lock()


def base_lock(model: torch.nn.Module) -> threading.RLock:
    """The process-wide lock of ``model`` (a shared base): held by whoever has peft layers on it."""
    with _registry_lock:
        lock = _locks.get(model)
        if lock is None:
            lock = _locks[model] = threading.RLock()
        return lock


@dataclass
class _ModuleState:
    module: torch.nn.Module
    attributes: dict[str, Any]
    containers: dict[str, Any]


@dataclass
class _Snapshot:
    modules: list[_ModuleState]
    requires_grad: list[tuple[torch.nn.Parameter, bool]]
    config: dict[str, Any] | None
    names: dict[str, int]


_MISSING = object()


def _copy_container(value: Any) -> Any:
    return set(value) if isinstance(value, set) else dict(value)


def _snapshot(model: torch.nn.Module) -> _Snapshot:
    modules = []
    for module in model.modules():
        attributes = dict(vars(module))
        containers = {k: _copy_container(attributes[k]) for k in _CONTAINERS if k in attributes}
        modules.append(_ModuleState(module, attributes, containers))
    config = getattr(model, "config", None)
    return _Snapshot(
        modules=modules,
        requires_grad=[(p, p.requires_grad) for p in model.parameters()],
        config=dict(vars(config)) if config is not None and hasattr(config, "__dict__") else None,
        names={name: id(m) for name, m in model.named_modules()},
    )


def _restore(model: torch.nn.Module, snap: _Snapshot) -> None:
    for state in snap.modules:
        current = vars(state.module)
        for key in [k for k in current if k not in state.attributes]:
            del current[key]  # e.g. peft_config, or attributes a half-built wrap left behind
        for key, value in state.attributes.items():
            if key in state.containers:
                # Same container object, old contents: references others hold to it stay valid.
                container = current.get(key)
                if container is not value:
                    current[key] = container = value
                container.clear()
                container.update(state.containers[key])
            elif current.get(key, _MISSING) is not value:
                current[key] = value
    for param, flag in snap.requires_grad:
        param.requires_grad_(flag)
    config = getattr(model, "config", None)
    if snap.config is not None and config is not None:
        now = vars(config)
        now.clear()
        now.update(snap.config)
    names = {name: id(m) for name, m in model.named_modules()}
    if names != snap.names:
        raise AttachError(
            f"the base model could not be restored: its module tree differs after peft ({len(names)} modules, "
            f"{len(snap.names)} before); this process must not use it any more"
        )


@contextlib.contextmanager
def borrowed(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Hold ``model``'s lock and yield it; afterwards put it back exactly as it was (module docstring).

    Inside, the caller may wrap ``model`` with peft (``get_peft_model``, ``PeftModel.from_pretrained``), train the
    adapter, switch modes: all of it is undone on exit, even after an exception. The weights of ``model`` itself
    must not be written to (no merging). Raises AttachError when this thread is already borrowing ``model``.
    """
    lock = base_lock(model)
    with lock:
        if model in _borrowed:
            raise AttachError("the base model is already borrowed by this thread: attach one adapter at a time")
        _borrowed.add(model)
        try:
            snap = _snapshot(model)
            try:
                yield model
            finally:
                _restore(model, snap)
        finally:
            _borrowed.discard(model)


@contextlib.contextmanager
def attached(base: LoadedBase, adapter_dir: Path | None, *, trainable: bool = False) -> Iterator[torch.nn.Module]:
    """Yield ``base.model`` with the PEFT adapter stored in ``adapter_dir`` on it, or the base itself when None.

    The adapter is loaded with stock ``PeftModel.from_pretrained`` onto the shared base (no copy), under the base's
    process-wide lock, which is held until the block ends: other borrowers wait. With ``trainable=False`` the
    yielded model is in eval mode with no trainable parameter; with ``trainable=True`` the LoRA tensors require
    gradients (the caller sets the mode). On exit the base is restored exactly (see `borrowed`): same weights
    (bit-for-bit), same modules, no ``peft_config``, same train/eval flags and ``requires_grad``. Loading does not
    consume torch's global RNG. Raises AttachError when the directory cannot be loaded as an adapter of this base.
    """
    with borrowed(base.model) as model:
        if adapter_dir is None:
            yield model
            return
        # peft initialises LoRA tensors randomly before loading the saved ones: keep the caller's RNG stream intact.
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            try:
                peft_model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
            except (OSError, ValueError, KeyError, RuntimeError, TypeError, SafetensorError) as e:
                raise AttachError(f"cannot load the adapter in {str(adapter_dir)!r} onto base: {e}") from e
        if not trainable:
            peft_model.eval()
        yield peft_model
