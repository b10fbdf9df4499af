"""Console sessions: tokens are random and kept as sha256, sessions expire, CSRF is compared exactly."""

from __future__ import annotations

import time

from pipeline.console.sessions import Sessions
from pipeline.domain.apikeys import Principal


def principal(app: str | None = None, key: str = "k1") -> Principal:
    return Principal(key, app, frozenset({"admin"}))


def test_a_session_is_found_by_its_token_only_and_ends():
    sessions = Sessions(ttl_s=60)
    token, s = sessions.create(principal())
    assert sessions.get(token) is s and sessions.get(token + "x") is None and sessions.get(None) is None
    assert token not in sessions._by_digest  # only its sha256 is kept
    sessions.drop(token)
    assert sessions.get(token) is None


def test_sessions_expire_and_a_key_can_end_all_of_its_sessions():
    sessions = Sessions(ttl_s=0.05)
    token, _ = sessions.create(principal())
    time.sleep(0.1)
    assert sessions.get(token) is None
    sessions = Sessions(ttl_s=60)
    a, _ = sessions.create(principal(key="k1"))
    b, _ = sessions.create(principal(key="k2"))
    sessions.drop_key("k1")
    assert sessions.get(a) is None and sessions.get(b) is not None


def test_csrf_and_scope_of_a_session():
    _, op = Sessions(60).create(principal())
    _, app = Sessions(60).create(principal("notes"))
    assert (
        op.check_csrf(op.csrf)
        and not op.check_csrf(op.csrf[:-1])
        and not op.check_csrf("")
        and not op.check_csrf(None)
    )
    assert op.actor == "console:operator/key:k1" and app.actor == "console:app:notes/key:k1"
    assert op.may_see("mail") and app.may_see("notes") and not app.may_see("mail") and not app.may_see(None)
