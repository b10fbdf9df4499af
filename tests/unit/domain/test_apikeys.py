from datetime import UTC, datetime

import pytest

from pipeline.domain import apikeys
from pipeline.domain.apikeys import Principal
from pipeline.domain.errors import Forbidden, InvalidInput
from pipeline.domain.events import valid_user_id


def test_new_key_round_trip():
    key_id, key = apikeys.new_key()
    assert apikeys.key_id_of(key) == key_id
    assert apikeys.key_id_of(key + "x") is None
    assert apikeys.key_id_of("pk_" + key_id) is None
    assert len(apikeys.hash_key(key)) == 32


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("Bearer   abc  ", "abc"),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("Bearer a b", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header, token):
    assert apikeys.bearer_token(header) == token


def test_check_scopes():
    assert apikeys.check_scopes(["serve", "ingest", "serve"], operator=False) == ("ingest", "serve")
    assert apikeys.check_scopes(["admin"], operator=True) == ("admin",)
    with pytest.raises(InvalidInput, match=r"unknown scope.*'root'.*allowed: ingest, serve, admin"):
        apikeys.check_scopes(["root"], operator=False)
    with pytest.raises(InvalidInput, match="at least one scope"):
        apikeys.check_scopes([], operator=False)
    with pytest.raises(InvalidInput, match="operator key"):
        apikeys.check_scopes(["admin", "serve"], operator=True)


def test_principal():
    app = Principal("k1", "notes", frozenset({"ingest"}), datetime(2030, 1, 1, tzinfo=UTC))
    app.require("ingest")
    with pytest.raises(Forbidden, match=r"key k1 has scope.*ingest; this needs 'serve'") as e:
        app.require("serve")
    assert e.value.http_status == 403
    assert app.may_act_for("notes") and not app.may_act_for("mail") and not app.may_act_for(None)
    assert app.name == "app:notes/key:k1" and not app.operator
    op = Principal("k2", None, frozenset({"admin"}))
    assert op.operator and op.may_act_for("mail") and not op.may_act_for(None)
    assert op.name == "operator/key:k2"


@pytest.mark.parametrize(
    ("user_id", "ok"),
    [
        ("a", True),
        (".a", True),
        ("a.", True),
        ("a..b", True),
        ("alice@example.com", True),
        (".", False),
        ("..", False),
        ("...", False),
        ("", False),
        ("a/b", False),
        ("a" * 128, True),
        ("a" * 129, False),
    ],
)
def test_valid_user_id(user_id, ok):
    assert valid_user_id(user_id) is ok
