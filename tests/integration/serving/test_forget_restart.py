"""Forget on the serving side across restarts, on the real registry and broker: a worker that was down during a
forget hears it when it comes back (its promotions listener is a stable consumer group with committed offsets),
deletes at start the disk copies no revision has any more, and serves nothing of the forgotten user."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from pipeline.flows import promotion
from pipeline.serving.api import create_app, listen_for_promotions
from pipeline.serving.promotions import Announcer, PromotionListener
from pipeline.serving.server import Server
from tests.integration.helpers import free_port, fresh_topics
from tests.integration.serving.conftest import World, issue_key, on_socket, serving_settings, tiny_base

pytestmark = pytest.mark.integration


def wait_for(predicate, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def hi(w: World, user: str) -> httpx.Response:
    return w.post("/v1/completions", json={"model": f"user:{user}", "prompt": "Hi", "max_tokens": 2})


@contextlib.contextmanager
def worker(settings, stores, announcer, key: str, *, listen: bool = True) -> Iterator[World]:
    """A serving worker (``settings`` fix its worker id and disk cache) with its listener, on a real socket."""
    server = Server(settings, tiny_base())
    listener = listen_for_promotions(server, settings.kafka) if listen else None
    if listener is not None:
        assert listener.wait_ready(30)
    try:
        with on_socket(create_app(server)) as url:
            yield World(url, stores, announcer, settings, settings.serving.cache_dir.parent, server, key,
                        settings.kafka, listener)  # fmt: skip
    finally:
        if listener is not None:
            listener.stop()
        server.close()


def test_a_worker_restarted_after_a_forget_neither_serves_nor_keeps_the_user(services, stores, tmp_path):
    kafka = fresh_topics(services.kafka)
    settings = serving_settings(services, kafka, tmp_path)  # one worker id and one cache dir for both lives
    announcer = Announcer(kafka)
    _, key = issue_key(stores)
    try:
        with worker(settings, stores, announcer, key) as w:
            gone, gone_rev = w.served_user("gone", 80)
            kept, kept_rev = w.served_user("kept", 81)
            for u in (gone, kept):
                assert hi(w, u).status_code == 200
        cache_dir = settings.serving.cache_dir
        assert (cache_dir / gone_rev.sha256).exists() and (cache_dir / kept_rev.sha256).exists()

        report = promotion.forget(stores, announcer, gone)  # while the worker is down
        assert report.announced and report.sha256s == [gone_rev.sha256]
        assert (cache_dir / gone_rev.sha256).exists()  # nobody was there to hear it

        with worker(settings, stores, announcer, key) as w:
            assert wait_for(w.server.pruned.is_set)
            assert wait_for(lambda: w.listener.heard >= 1)  # the missed forget, from the committed position
            assert not (cache_dir / gone_rev.sha256).exists()
            assert (cache_dir / kept_rev.sha256).exists()  # the living user's copy stays
            r = w.post("/v1/completions", json={"model": f"user:{gone}", "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            ok = w.post("/v1/completions", json={"model": f"user:{kept}", "prompt": "Hi", "max_tokens": 2})
            assert ok.status_code == 200 and ok.headers["x-persona-revision"] == kept_rev.revision_id
            assert w.server.cache.stats().hits["disk"] >= 1  # the kept copy was adopted from disk
    finally:
        announcer.close()


def test_the_start_up_check_removes_copies_even_when_the_forget_was_never_heard(services, stores, tmp_path):
    """The forget's announcement went nowhere this worker listens (lost, or older than the broker keeps): the disk
    copy still goes at the worker's next start, by the registry alone."""
    settings = serving_settings(services, fresh_topics(services.kafka), tmp_path)
    deaf = Announcer(fresh_topics(services.kafka))  # a topic no worker reads
    _, key = issue_key(stores)
    try:
        with worker(settings, stores, deaf, key, listen=False) as w:
            user, rev = w.served_user("unheard", 82)
            assert hi(w, user).status_code == 200
        copy = settings.serving.cache_dir / rev.sha256
        assert copy.exists()
        promotion.forget(stores, deaf, user)
        with worker(settings, stores, deaf, key, listen=False) as w:
            assert wait_for(w.server.pruned.is_set)
            assert not copy.exists() and rev.sha256 not in w.server.cache.disk_entries()
    finally:
        deaf.close()


def test_a_forgotten_users_host_copy_is_not_served_before_the_forget_is_heard(services, stores, tmp_path):
    """A worker that has not heard the forget (yet) still holds the adapter in memory; the per-request resolution
    against the registry refuses it all the same."""
    settings = serving_settings(services, fresh_topics(services.kafka), tmp_path)
    deaf = Announcer(fresh_topics(services.kafka))
    _, key = issue_key(stores)
    try:
        with worker(settings, stores, deaf, key, listen=False) as w:
            user, rev = w.served_user("deaf", 83)
            body = {"model": f"user:{user}", "prompt": "Hi", "max_tokens": 2}
            assert w.post("/v1/completions", json=body).status_code == 200
            assert any(k is not None and k.user_id == user for k in w.server.cache.stats().slots)
            promotion.forget(stores, deaf, user)
            for model in (f"user:{user}", f"user:{user}@{rev.revision_id}"):
                r = w.post("/v1/completions", json={**body, "model": model})
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    finally:
        deaf.close()


def test_the_listener_resumes_where_it_stopped_and_a_new_group_does_not_replay(services, stores):
    kafka = fresh_topics(services.kafka)
    announcer = Announcer(kafka)
    group = f"persona-serving-test-{uuid.uuid4().hex[:8]}"
    heard: list[str] = []

    def listener(group_id: str) -> PromotionListener:
        made = PromotionListener(kafka, group_id, lambda e: heard.append("promotion"),
                                 on_forget=lambda e: heard.append(e["user_id"]))  # fmt: skip
        made.start()
        assert made.wait_ready(30)
        return made

    try:
        first = listener(group)
        announcer.forget("early", [])
        assert wait_for(lambda: heard == ["early"]), heard
        first.stop()
        announcer.forget("while-down-1", [])
        announcer.forget("while-down-2", [])
        second = listener(group)
        # Resumed, and nothing twice (records of two users: two partitions, in no set order between them).
        assert wait_for(lambda: sorted(heard) == ["early", "while-down-1", "while-down-2"]), heard
        second.stop()
        fresh = listener(f"persona-serving-test-{uuid.uuid4().hex[:8]}")
        time.sleep(2)
        assert sorted(heard) == ["early", "while-down-1", "while-down-2"]  # a brand-new worker replays no history
        announcer.forget("after", [])
        assert wait_for(lambda: heard[-1:] == ["after"])
        fresh.stop()
    finally:
        announcer.close()


class Forwarder:
    """A TCP forwarder to ``target`` that accepts only once ``open()`` was called (a database that comes up)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._sock: socket.socket | None = None

    def open(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self._sock is not None
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()


def test_a_worker_starts_while_the_database_is_down_and_checks_its_disk_once_it_is_back(services, stores, tmp_path):
    settings = serving_settings(services, services.kafka, tmp_path)
    probe = Server(settings, tiny_base())  # fill the disk cache with one copy whose revision is then forgotten
    try:
        with on_socket(create_app(probe)) as url:
            w = World(url, stores, Announcer(fresh_topics(services.kafka)), settings, tmp_path, probe,
                      issue_key(stores)[1], settings.kafka)  # fmt: skip
            user, rev = w.served_user("outage", 84)
            assert hi(w, user).status_code == 200
            promotion.forget(stores, w.announcer, user)
            w.announcer.close()
    finally:
        probe.close()
    copy = settings.serving.cache_dir / rev.sha256
    assert copy.exists()

    db_url = urlsplit(services.db.url)
    forwarder = Forwarder((db_url.hostname or "127.0.0.1", db_url.port or 5432))
    via = urlunsplit(db_url._replace(netloc=f"{db_url.username}@127.0.0.1:{forwarder.port}"))
    down = settings.replace(services.db.model_copy(update={"url": via, "connect_timeout_s": 1}))
    server = Server(down, tiny_base())  # starts although PostgreSQL does not answer
    try:
        with on_socket(create_app(server)) as url:
            assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
            time.sleep(2)
            assert not server.pruned.is_set() and copy.exists()  # retrying with backoff meanwhile
            forwarder.open()  # PostgreSQL is back
            assert wait_for(server.pruned.is_set, 60)
            assert not copy.exists()
    finally:
        server.close()
        forwarder.close()
