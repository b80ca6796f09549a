"""The trigger matching rule and its validation."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from picloud_shared.errors import InvalidGlob, UnknownOp
from picloud_shared.ids import AppId, ScriptId, UserId
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.triggers import (
    CreateKvTrigger,
    DeadLetterTriggerDetails,
    DocsOp,
    DocsTriggerDetails,
    KvOp,
    KvTriggerDetails,
    glob_literal_prefix,
    glob_matches,
    parse_ops,
)


def test_empty_ops_match_every_op() -> None:
    """An empty ops list is "any op", never "no op"."""
    d = KvTriggerDetails("user:*", ())
    assert d.matches("user:1", KvOp.SET)
    assert d.matches("user:1", KvOp.DELETE)


def test_listed_ops_match_only_themselves() -> None:
    """ops=[delete] ignores sets."""
    d = DocsTriggerDetails("orders", (DocsOp.DELETE,))
    assert d.matches("orders", DocsOp.DELETE)
    assert not d.matches("orders", DocsOp.INSERT)


def test_glob_is_case_sensitive_fnmatch() -> None:
    """'User:*' does not match 'user:1'; ? and [..] work."""
    assert not glob_matches("User:*", "user:1")
    assert glob_matches("user:?", "user:1")
    assert glob_matches("log-[ab]", "log-b")
    assert not glob_matches("log-[ab]", "log-c")
    assert glob_matches("*", "")


def test_empty_glob_is_invalid() -> None:
    """An empty glob raises InvalidGlob."""
    with pytest.raises(InvalidGlob):
        KvTriggerDetails("", ())


def test_glob_longer_than_256_is_invalid_and_256_is_fine() -> None:
    """The glob limit sits exactly at 256 characters."""
    KvTriggerDetails("a" * 256)
    with pytest.raises(InvalidGlob):
        KvTriggerDetails("a" * 257)


def test_unknown_op_is_invalid() -> None:
    """'upsert' is not a KV op."""
    with pytest.raises(UnknownOp, match="upsert"):
        parse_ops(KvOp, ["set", "upsert"])


def test_ops_are_deduplicated() -> None:
    """Duplicate ops collapse."""
    assert parse_ops(DocsOp, ["delete", "insert", "delete"]) == (DocsOp.DELETE, DocsOp.INSERT)


def test_dead_letter_details_match_source_kinds() -> None:
    """Empty source kinds match every kind; a list matches only its members."""
    assert DeadLetterTriggerDetails(()).matches(OutboxSourceKind.HTTP)
    d = DeadLetterTriggerDetails((OutboxSourceKind.KV,))
    assert d.matches(OutboxSourceKind.KV)
    assert not d.matches(OutboxSourceKind.DOCS)


def test_create_request_validates_its_glob() -> None:
    """CreateKvTrigger refuses an empty glob at construction."""
    with pytest.raises(InvalidGlob):
        CreateKvTrigger(AppId(uuid.uuid4()), ScriptId(uuid.uuid4()), UserId(uuid.uuid4()), "")


@given(st.text(alphabet="ab*?:", min_size=1, max_size=10), st.text(alphabet="ab:", max_size=10))
def test_every_match_starts_with_the_literal_prefix(glob: str, key: str) -> None:
    """glob_literal_prefix is a sound pre-filter."""
    if glob_matches(glob, key):
        assert key.startswith(glob_literal_prefix(glob))
