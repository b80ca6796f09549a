"""The schema's CHECKed wire values are exactly picloud_shared's enum values."""

from __future__ import annotations

import enum

import pytest

from manager_core import tables
from picloud_shared.domain import DispatchMode
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.principals import Capability
from picloud_shared.retry import Backoff
from picloud_shared.status import ExecutionStatus
from picloud_shared.triggers import DocsOp, KvOp, TriggerKind


@pytest.mark.parametrize(
    ("values", "enum_type"),
    [
        (tables.DISPATCH_MODES, DispatchMode),
        (tables.TRIGGER_KINDS, TriggerKind),
        (tables.OUTBOX_SOURCE_KINDS, OutboxSourceKind),
        (tables.EXECUTION_STATUSES, ExecutionStatus),
        (tables.BACKOFFS, Backoff),
        (tables.KV_OPS, KvOp),
        (tables.DOCS_OPS, DocsOp),
        (tables.CAPABILITIES, Capability),
    ],
)
def test_check_values_match_the_shared_enum(
    values: tuple[str, ...], enum_type: type[enum.StrEnum]
) -> None:
    """Every enum member is allowed by the schema, and nothing else is."""
    assert set(values) == {member.value for member in enum_type}
