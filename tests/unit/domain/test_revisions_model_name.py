"""Parsing of the serving API's ``model``: the base, ``user:ID`` and ``user:ID@REV`` with ``@`` inside user ids."""

from __future__ import annotations

import pytest

from pipeline.domain.errors import InvalidInput
from pipeline.domain.revisions import (
    MAX_MODEL_NAME,
    InvalidModelName,
    ModelName,
    new_revision_id,
    parse_model_name,
)

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
REV = new_revision_id()


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (BASE, ModelName(None)),
        ("user:alice", ModelName("alice")),
        (f"user:alice@{REV}", ModelName("alice", REV)),
        (f"user:alice@{REV.lower()}", ModelName("alice", REV)),  # revision ids are case-insensitive (canonical: upper)
        ("user:a@b", ModelName("a@b")),  # the tail is not a revision id: all of it is the user id
        ("user:alice@example.com", ModelName("alice@example.com")),
        (f"user:alice@example.com@{REV}", ModelName("alice@example.com", REV)),
        (f"user:a@b@{REV}", ModelName("a@b", REV)),
        (f"user:a@{REV}@{REV}", ModelName(f"a@{REV}", REV)),  # split at the LAST @ only
        ("user:alice@", ModelName("alice@")),  # a trailing @ is part of the id (which may hold @)
        ("user:alice@01ABC", ModelName("alice@01ABC")),
        ("user:@", ModelName("@")),  # "@" is a well-formed (if odd) user id  # not a ULID: part of the user id
        ("user:" + "u" * 128, ModelName("u" * 128)),
        ("user:" + "u" * 128 + "@" + REV, ModelName("u" * 128, REV)),
    ],
)
def test_accepted_forms(model, expected):
    assert parse_model_name(model, BASE) == expected
    assert parse_model_name(model, BASE).base is (expected.user_id is None)


@pytest.mark.parametrize(
    "model",
    [
        "",
        "user:",  # no user id
        f"user:@{REV}",  # an empty user id before the revision
        "gpt-4",
        "User:alice",
        " user:alice",
        "user:alice ",
        "user:ali ce",
        "user:alice\x00",  # NUL
        "user:\x00",
        f"user:alice\x00@{REV}",
        "user:alice\n",
        "user:al\x7fice",  # DEL
        "user:al\u200bice",  # a zero-width space
        "user:alicé",
        "user:..",  # only dots: a path segment
        "user:alice/bob",
        "user:" + "u" * 129,  # user id longer than 128
        "user:" + "u" * 129 + "@" + REV,
        "user:" + "u" * 10_000,  # overly long
        "x" * 1_000_000,
        f"{BASE}@{REV}",
    ],
)
def test_bad_syntax_is_invalid_model_400(model):
    with pytest.raises(InvalidModelName) as e:
        parse_model_name(model, BASE)
    assert isinstance(e.value, InvalidInput) and e.value.http_status == 400 and e.value.code == "invalid_model"
    assert e.value.param == "model"
    assert len(str(e.value)) < 400  # never echoes an unbounded value


def test_the_longest_accepted_name_is_bounded():
    longest = "user:" + "u" * 128 + "@" + REV
    assert len(longest) == MAX_MODEL_NAME
    with pytest.raises(InvalidModelName, match="longer than"):
        parse_model_name(longest + "x", BASE)


def test_a_base_id_longer_than_the_bound_is_still_the_base():
    base = "org/" + "m" * 300
    assert parse_model_name(base, base).base
