"""The serving worker's API key cache: one lookup per key and TTL, hashed keys, bounded, expiry exact."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.domain import apikeys
from pipeline.domain.apikeys import Principal
from pipeline.domain.errors import Unauthorized
from pipeline.serving.auth import KeyCache, bearer_key


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Lookup:
    """A fake registry: key -> principal, counting the calls."""

    def __init__(self, known: dict[str, Principal]) -> None:
        self.known = known
        self.calls: list[str] = []

    def __call__(self, key: str) -> Principal | None:
        self.calls.append(key)
        return self.known.get(key)


def principal(app="a", expires_at=None) -> Principal:
    return Principal("k1", app, frozenset({"serve"}), expires_at)


def test_a_key_is_looked_up_once_per_ttl_and_a_revocation_shows_after_it():
    _, key = apikeys.new_key()
    lookup, clock = Lookup({key: principal()}), Clock()
    cache = KeyCache(lookup, ttl_s=30, max_entries=10, clock=clock)
    assert cache.principal(key) == principal()
    clock.t += 29
    assert cache.principal(key) == principal() and len(lookup.calls) == 1
    del lookup.known[key]  # revoked in the registry
    assert cache.principal(key) == principal()  # still within the TTL
    clock.t += 2
    assert cache.principal(key) is None and len(lookup.calls) == 2
    assert cache.principal(key) is None and len(lookup.calls) == 2  # the refusal is remembered too


def test_the_raw_key_is_never_kept():
    _, key = apikeys.new_key()
    cache = KeyCache(Lookup({key: principal()}), ttl_s=30, max_entries=10)
    cache.principal(key)
    held = repr(cache._good) + repr(cache._bad)
    assert key not in held and apikeys.hash_key(key) in cache._good


def test_malformed_keys_never_reach_the_database():
    lookup = Lookup({})
    cache = KeyCache(lookup, ttl_s=30, max_entries=10)
    for bad in ["", "sk-123", "pk_nothex_x", "x" * 10_000, "pk_0123456789ab_\x00"]:
        assert cache.principal(bad) is None
    assert lookup.calls == [] and len(cache) == 0


def test_an_expiry_is_exact_even_while_cached():
    _, key = apikeys.new_key()
    now = [datetime(2030, 1, 1, tzinfo=UTC)]
    p = principal(expires_at=now[0] + timedelta(seconds=5))
    cache = KeyCache(Lookup({key: p}), ttl_s=3600, max_entries=10, now=lambda: now[0])
    assert cache.principal(key) == p
    now[0] += timedelta(seconds=5)
    assert cache.principal(key) is None


def test_ttl_zero_asks_every_time():
    _, key = apikeys.new_key()
    lookup = Lookup({key: principal()})
    cache = KeyCache(lookup, ttl_s=0, max_entries=10)
    for _ in range(3):
        assert cache.principal(key) == principal()
    assert len(lookup.calls) == 3 and len(cache) == 0


def test_bounded_and_a_flood_of_made_up_keys_does_not_evict_good_ones():
    good = [apikeys.new_key()[1] for _ in range(8)]
    lookup = Lookup({k: principal() for k in good})
    cache = KeyCache(lookup, ttl_s=30, max_entries=8)
    for k in good:
        cache.principal(k)
    for _ in range(100):
        cache.principal(apikeys.new_key()[1])  # well-formed, unknown
    assert len(cache) <= 8 + 2
    calls = len(lookup.calls)
    for k in good:
        assert cache.principal(k) == principal()
    assert len(lookup.calls) == calls  # all still cached
    cache.principal(apikeys.new_key()[1])
    newest = apikeys.new_key()[1]
    lookup.known[newest] = principal("b")
    cache.principal(newest)  # a 9th good key evicts the least recently used one
    assert len(cache._good) == 8


def test_a_failing_lookup_propagates_and_is_not_remembered():
    _, key = apikeys.new_key()

    def down(_: str) -> Principal | None:
        raise ConnectionError("database down")

    cache = KeyCache(down, ttl_s=30, max_entries=10)
    with pytest.raises(ConnectionError):
        cache.principal(key)
    assert len(cache) == 0


def test_thread_safe_under_concurrent_use():
    keys = [apikeys.new_key()[1] for _ in range(50)]
    lookup = Lookup({k: principal() for k in keys[:25]})
    cache = KeyCache(lookup, ttl_s=30, max_entries=16)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                for i, k in enumerate(keys):
                    assert (cache.principal(k) is not None) is (i < 25)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(cache) <= 16 + 4


@pytest.mark.parametrize(
    ("header", "key"),
    [("Bearer pk_x", "pk_x"), ("bearer pk_x", "pk_x"), ("Bearer  pk_x ", "pk_x")],
)
def test_bearer_key(header, key):
    assert bearer_key(header) == key


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer", "Bearer a b", "pk_x"])
def test_no_bearer_key_is_401(header):
    with pytest.raises(Unauthorized) as e:
        bearer_key(header)
    assert e.value.http_status == 401 and e.value.code == "invalid_api_key"
