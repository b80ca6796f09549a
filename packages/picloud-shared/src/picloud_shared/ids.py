"""Typed identifiers.

Every id is a UUID on the wire (its canonical string) and in PostgreSQL. The
``NewType`` wrappers let the type checker keep an ``AppId`` from being passed where
a ``ScriptId`` is expected; at run time they are plain :class:`uuid.UUID`.
"""

from __future__ import annotations

import uuid
from typing import NewType

UserId = NewType("UserId", uuid.UUID)
AppId = NewType("AppId", uuid.UUID)
ScriptId = NewType("ScriptId", uuid.UUID)
RouteId = NewType("RouteId", uuid.UUID)
TriggerId = NewType("TriggerId", uuid.UUID)
ExecutionId = NewType("ExecutionId", uuid.UUID)
InboxId = NewType("InboxId", uuid.UUID)
DeadLetterId = NewType("DeadLetterId", uuid.UUID)


def new_execution_id() -> ExecutionId:
    """A fresh, random execution id."""
    return ExecutionId(uuid.uuid4())


def new_inbox_id() -> InboxId:
    """A fresh, random inbox id."""
    return InboxId(uuid.uuid4())


def parse_uuid(value: object) -> uuid.UUID:
    """Parse a wire-form id; raises :class:`ValueError` on anything but a UUID string."""
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a UUID string, got {type(value).__name__}")
    return uuid.UUID(value)


def optional_uuid(value: object) -> uuid.UUID | None:
    """Like :func:`parse_uuid`, but ``None`` stays ``None``."""
    return None if value is None else parse_uuid(value)
