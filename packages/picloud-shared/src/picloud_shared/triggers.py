"""Triggers in Layout-E: one parent ``Trigger`` with per-kind ``TriggerDetails``.

The matching rule (shared by every adapter, so SQL never has to decide it):

* a glob is fnmatch-style (``*``, ``?``, ``[...]``), case-sensitive, 1-256 chars;
* an empty ``ops`` tuple matches every op — it is never "matches nothing";
* an unknown op is invalid, as is an empty glob.
"""

from __future__ import annotations

import enum
import fnmatch
import functools
import re
from collections.abc import Iterable
from datetime import datetime
from typing import TypeAlias, TypeVar

import attrs

from picloud_shared.errors import InvalidGlob, UnknownOp
from picloud_shared.ids import AppId, ScriptId, TriggerId, UserId
from picloud_shared.limits import MAX_GLOB_CHARS
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.retry import DEFAULT_RETRY_POLICY, RetryPolicy


class TriggerKind(enum.StrEnum):
    KV = "kv"
    DOCS = "docs"
    DEAD_LETTER = "dead_letter"

    @property
    def source_kind(self) -> OutboxSourceKind:
        """The outbox source kind of executions this trigger kind causes."""
        return OutboxSourceKind(self.value)


class KvOp(enum.StrEnum):
    SET = "set"
    DELETE = "delete"


class DocsOp(enum.StrEnum):
    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"


Op = TypeVar("Op", KvOp, DocsOp)


def check_glob(glob: object) -> str:
    """Return ``glob`` if valid (a 1-256 character string), else raise :class:`InvalidGlob`."""
    if not isinstance(glob, str) or not glob or len(glob) > MAX_GLOB_CHARS:
        raise InvalidGlob(f"a glob must be a string of 1 to {MAX_GLOB_CHARS} characters")
    return glob


def parse_ops(kind: type[Op], ops: Iterable[object]) -> tuple[Op, ...]:
    """Decode wire op names (deduplicated, sorted); raises :class:`UnknownOp`."""
    out: set[Op] = set()
    for op in ops:
        try:
            out.add(kind(op))
        except ValueError:
            allowed = ", ".join(m.value for m in kind)
            raise UnknownOp(f"unknown op {op!r}; expected one of: {allowed}") from None
    return tuple(sorted(out))


@functools.lru_cache(maxsize=4096)
def _compiled(glob: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(glob))


def glob_matches(glob: str, value: str) -> bool:
    """Case-sensitive fnmatch of ``value`` against ``glob``."""
    return _compiled(glob).match(value) is not None


def ops_match(ops: tuple[Op, ...], op: Op) -> bool:
    """An empty ``ops`` matches every op."""
    return not ops or op in ops


def glob_literal_prefix(glob: str) -> str:
    """The part of ``glob`` before its first wildcard: every match starts with it.

    Adapters may use it to narrow candidates in an index before applying
    :func:`glob_matches`.
    """
    for i, ch in enumerate(glob):
        if ch in "*?[":
            return glob[:i]
    return glob


@attrs.frozen
class KvTriggerDetails:
    key_glob: str = attrs.field(converter=check_glob)
    ops: tuple[KvOp, ...] = ()

    def matches(self, key: str, op: KvOp) -> bool:
        return ops_match(self.ops, op) and glob_matches(self.key_glob, key)


@attrs.frozen
class DocsTriggerDetails:
    collection_glob: str = attrs.field(converter=check_glob)
    ops: tuple[DocsOp, ...] = ()

    def matches(self, collection: str, op: DocsOp) -> bool:
        return ops_match(self.ops, op) and glob_matches(self.collection_glob, collection)


@attrs.frozen
class DeadLetterTriggerDetails:
    source_kinds: tuple[OutboxSourceKind, ...] = ()

    def matches(self, source_kind: OutboxSourceKind) -> bool:
        return not self.source_kinds or source_kind in self.source_kinds


TriggerDetails: TypeAlias = KvTriggerDetails | DocsTriggerDetails | DeadLetterTriggerDetails


def kind_of(details: TriggerDetails) -> TriggerKind:
    if isinstance(details, KvTriggerDetails):
        return TriggerKind.KV
    if isinstance(details, DocsTriggerDetails):
        return TriggerKind.DOCS
    return TriggerKind.DEAD_LETTER


@attrs.frozen
class Trigger:
    """A registered trigger: the Layout-E parent row plus its details."""

    id: TriggerId
    app_id: AppId
    script_id: ScriptId
    registered_by_principal: UserId | None
    retry: RetryPolicy
    details: TriggerDetails
    created_at: datetime

    @property
    def kind(self) -> TriggerKind:
        return kind_of(self.details)


@attrs.frozen
class CreateKvTrigger:
    app_id: AppId
    script_id: ScriptId
    registered_by_principal: UserId
    key_glob: str = attrs.field(converter=check_glob)
    ops: tuple[KvOp, ...] = ()
    retry: RetryPolicy = DEFAULT_RETRY_POLICY


@attrs.frozen
class CreateDocsTrigger:
    app_id: AppId
    script_id: ScriptId
    registered_by_principal: UserId
    collection_glob: str = attrs.field(converter=check_glob)
    ops: tuple[DocsOp, ...] = ()
    retry: RetryPolicy = DEFAULT_RETRY_POLICY


@attrs.frozen
class CreateDeadLetterTrigger:
    app_id: AppId
    script_id: ScriptId
    registered_by_principal: UserId
    source_kinds: tuple[OutboxSourceKind, ...] = ()
    retry: RetryPolicy = DEFAULT_RETRY_POLICY


@attrs.frozen
class TriggerMatch:
    """What fan-out needs of a matching trigger: who runs what, under which policy."""

    trigger_id: TriggerId
    script_id: ScriptId
    registered_by_principal: UserId | None
    retry: RetryPolicy


# The seed names one match type per kind; they carry the same fields.
KvTriggerMatch = TriggerMatch
DocsTriggerMatch = TriggerMatch
DeadLetterTriggerMatch = TriggerMatch
