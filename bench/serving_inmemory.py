"""The ``--stack inmemory`` serving worker's stand-ins for the registry (bench/serving_load.py, REPLACED_INMEMORY):
one API key and a dict of users -> (revision, sha256) instead of PostgreSQL, and the adapters read from a directory
in the bucket layout. A module of its own so that the worker's HTTP processes (`pipeline.serving.frontends`, spawned)
can import the class they build; everything else in the worker is the code `persona serve` runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pipeline.domain.apikeys import Principal
from pipeline.domain.errors import NotFound
from pipeline.domain.revisions import parse_model_name
from pipeline.serving.adapters import AdapterKey
from pipeline.serving.fill import DirectoryFetchSpec
from pipeline.serving.frontends import Frontend
from pipeline.serving.server import Server, Target, not_found

APP = "bench-load"


class IndexResolution:
    """Keys, model resolution and the models list from the bench's spec (``self.extra``: key, key_id, index)."""

    extra: dict[str, Any]
    base_id: str
    settings: Any

    @property
    def users(self) -> dict[str, tuple[str, str]]:
        index = self.__dict__.get("_index")
        if index is None:
            index = self.__dict__["_index"] = {u: (r, s) for u, (r, s) in self.extra["index"].items()}
        return index

    def _authenticate(self, key: str) -> Principal | None:
        if key != self.extra["key"]:
            return None
        return Principal(self.extra["key_id"], APP, frozenset({"serve"}))

    def resolve(self, model: str, principal: Principal) -> Target:
        name = parse_model_name(model, self.base_id)
        if name.user_id is None:
            return Target(None, "base", model)
        hit = self.users.get(name.user_id)
        if hit is None or not principal.may_act_for(APP) or name.revision_id not in (None, hit[0]):
            raise not_found(model)
        return Target(AdapterKey(name.user_id, hit[0], hit[1]), hit[0], model)

    def models(self, principal: Principal) -> list[tuple[str, int]]:
        if principal.app_id != APP:
            return []
        return [(f"user:{u}", 0) for u in sorted(self.users)[: self.settings.serving.models_list_limit]]


class InMemoryServer(IndexResolution, Server):
    """`Server` with the registry and object store replaced; engine, cache and API are real."""

    def __init__(self, settings: Any, base: Any, spec: dict[str, Any]) -> None:
        self.extra = spec
        super().__init__(settings, base)
        self.stores.close()  # opened by Server.__init__ (without waiting); nothing here reads PostgreSQL or S3
        store = Path(spec["store"])
        latency_s = spec.get("store_latency_ms", 0) / 1e3
        index = self.users

        def fetch(key: AdapterKey) -> dict[str, bytes]:
            if index.get(key.user_id) != (key.revision_id, key.sha256):
                raise NotFound(f"revision {key.revision_id} of {key.user_id!r} is not in the bench's store")
            if latency_s:
                time.sleep(latency_s)
            folder = store / "users" / key.user_id / "revisions" / key.revision_id
            return {n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}

        def registered(key: AdapterKey) -> bool:
            return index.get(key.user_id) == (key.revision_id, key.sha256)

        self.cache.fetch = fetch
        self.cache.registered = registered

    def fetch_spec(self) -> DirectoryFetchSpec:
        # The fill processes read the store's directory (the registry check stays in this process).
        return DirectoryFetchSpec(str(self.extra["store"]), self.extra.get("store_latency_ms", 0) / 1e3)


class InMemoryFrontend(IndexResolution, Frontend):
    """An HTTP process of the in-memory worker: the same stand-ins, no registry to open."""

    def open_stores(self) -> Any:
        return None
