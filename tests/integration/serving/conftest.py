"""Serving workers on real sockets over the real registry (PostgreSQL + S3) and broker, with the tiny model; API keys
issued in the registry as `persona apps keys create` issues them."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn
from peft import LoraConfig, get_peft_model

from pipeline.config import KafkaSettings, ModelSettings, ServingSettings, Settings
from pipeline.domain.revisions import EventsUsed, Revision
from pipeline.flows import promotion
from pipeline.models.base import TINY_RANDOM_ID, LoadedBase, ref, tiny_random, tiny_tokenizer
from pipeline.serving.api import create_app, listen_for_promotions
from pipeline.serving.hub import FrontendHub
from pipeline.serving.promotions import Announcer
from pipeline.serving.server import Server
from pipeline.storage import apps
from pipeline.storage.stores import Stores
from tests.integration.helpers import free_port, fresh_topics

#: The application that owns the users the serving tests create (registered in every test database).
APP = "serve"
#: Another application, whose users a key of APP must not reach.
OTHER_APP = "a"


def make_adapter(out: Path, seed: int, targets=("q_proj", "v_proj"), r: int = 4) -> Path:
    torch.manual_seed(seed)
    model = get_peft_model(
        tiny_random(), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False)
    )
    with torch.no_grad():  # large enough to change what the model says
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


def issue_key(
    stores: Stores, app: str | None = APP, scopes: tuple[str, ...] = ("serve",), expires_at: datetime | None = None
) -> tuple[str, str]:
    """(key_id, key) of a new key in the registry."""
    with stores.db.connection() as conn:
        return apps.create_key(conn, app, "serving tests", scopes=scopes, expires_at=expires_at)


def tiny_base() -> LoadedBase:
    model = tiny_random()  # the server's own base: the engine injects its multi-LoRA layers into it
    return LoadedBase(model, tiny_tokenizer(), ref(model, TINY_RANDOM_ID))


@contextlib.contextmanager
def on_socket(app: Any) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port; yields its URL."""
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def served(server: Server) -> Iterator[tuple[str, FrontendHub | None]]:
    """``server``'s API on a real socket: in this process, or in its HTTP processes (``http_processes``, on the port
    of its settings, as `persona serve` runs them); yields its URL and the processes' hub (None: in process)."""
    cfg = server.settings.serving
    if not cfg.http_processes:
        with on_socket(create_app(server)) as url:
            yield url, None
        return
    hub = FrontendHub(server, cfg.http_processes, create_app)
    try:
        yield f"http://127.0.0.1:{cfg.port}", hub
    finally:
        hub.close()


@dataclass
class World:
    """A running serving worker and what the tests need around it."""

    url: str
    stores: Stores
    announcer: Announcer
    settings: Settings
    tmp: Path
    server: Server
    key: str  # APP's key with the serve scope
    kafka: KafkaSettings
    listener: Any = None
    hub: FrontendHub | None = None  # the HTTP processes, when the API runs in them
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def client(self, key: str | None = "", **kw: Any) -> httpx.Client:
        """An HTTP client of this worker sending ``key`` (default: the world's; None: no key at all)."""
        headers = {} if key is None else {"Authorization": f"Bearer {key or self.key}"}
        made = httpx.Client(base_url=self.url, headers=headers, timeout=60, **kw)
        self.clients.append(made)
        return made

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", headers={**self.auth, **kw.pop("headers", {})}, timeout=60, **kw)

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers={**self.auth, **kw.pop("headers", {})}, timeout=60, **kw)

    def new_revision(self, user: str, seed: int, parent: str | None = None, app: str = APP, **kw: Any) -> Revision:
        d = make_adapter(self.tmp / f"{user}-{seed}", seed, **kw)
        base_ref = ref(tiny_random(), TINY_RANDOM_ID)
        return self.stores.registry.write_revision(
            user, d, parent_id=parent, base=base_ref, training={"seed": seed}, events=EventsUsed.of([]), app=app
        )

    def promote(self, user_id: str, revision_id: str) -> None:
        done = promotion.promote(self.stores, self.announcer, user_id, revision_id)
        assert done.announced, done.warning

    def served_user(self, prefix: str, seed: int, app: str = APP, **kw: Any) -> tuple[str, Revision]:
        """A new user of ``app`` with a promoted revision."""
        user = f"{prefix}-{uuid.uuid4().hex[:6]}"
        rev = self.new_revision(user, seed, app=app, **kw)
        self.promote(user, rev.revision_id)
        return user, rev


def serving_settings(services, kafka: KafkaSettings, tmp: Path, **serving: Any) -> Settings:
    defaults: dict[str, Any] = {
        "slots": 2,
        "max_rank": 8,
        "cache_dir": tmp / "cache",
        "max_tokens": 32,
        "worker_id": f"test-{uuid.uuid4().hex[:8]}",
    }
    return Settings(
        services.db, services.s3, kafka, ModelSettings(base=TINY_RANDOM_ID), ServingSettings(**{**defaults, **serving})
    )


@contextlib.contextmanager
def running_world(services, stores, tmp: Path, **serving: Any) -> Iterator[World]:
    """A serving worker (with its promotions listener on fresh topics) on a real socket."""
    kafka = fresh_topics(services.kafka)
    settings = serving_settings(services, kafka, tmp, **serving)
    server = Server(settings, tiny_base())
    listener = listen_for_promotions(server, kafka)
    assert listener.wait_ready(30)
    announcer = Announcer(kafka)  # promotions go to this world's topic, which the worker listens to
    _, key = issue_key(stores)
    try:
        with served(server) as (url, hub):
            world = World(url, stores, announcer, settings, tmp, server, key, kafka, listener, hub)
            try:
                yield world
            finally:
                for c in world.clients:
                    c.close()
    finally:
        listener.stop()
        server.close()
        announcer.close()


@pytest.fixture(scope="module", params=["reference", "fast", "fast+http-processes"])
def world(services, stores, tmp_path_factory, request):
    """A serving worker on a real socket; every test runs against both engines (the fast one on the CPU here), and
    with the fast one behind two HTTP processes (`pipeline.serving.frontends`)."""
    engine, _, http = request.param.partition("+")
    extra: dict[str, Any] = {"http_processes": 2, "port": free_port(), "host": "127.0.0.1"} if http else {}
    with running_world(services, stores, tmp_path_factory.mktemp("serving"), engine=engine, **extra) as w:
        assert type(w.server.engine).__name__ == {"reference": "Engine", "fast": "FastEngine"}[engine]
        yield w


@pytest.fixture(scope="module")
def ref_world(services, stores, tmp_path_factory):
    """One serving worker with the reference engine (tests whose subject is not the engine)."""
    with running_world(services, stores, tmp_path_factory.mktemp("serving-ref"), engine="reference") as w:
        yield w
