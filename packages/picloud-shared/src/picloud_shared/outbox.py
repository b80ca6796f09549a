"""The transactional outbox: rows producers write and the dispatcher claims."""

from __future__ import annotations

import enum
import uuid
from datetime import datetime
from typing import Any

import attrs

from picloud_shared import wire
from picloud_shared.ids import (
    AppId,
    DeadLetterId,
    ExecutionId,
    InboxId,
    RouteId,
    ScriptId,
    TriggerId,
)
from picloud_shared.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from picloud_shared.wire import JsonObject, WireError


class OutboxSourceKind(enum.StrEnum):
    """What caused an execution."""

    KV = "kv"
    DOCS = "docs"
    DEAD_LETTER = "dead_letter"
    HTTP = "http"


@attrs.frozen
class HttpDispatchPayload:
    """The payload of an ``http`` outbox row: which route, and the request as an event.

    ``event`` is the wire form of an :class:`~picloud_shared.events.HttpEvent`.
    """

    route_id: RouteId
    event: JsonObject

    def to_wire(self) -> JsonObject:
        return {"route_id": str(self.route_id), "event": self.event}

    @classmethod
    def from_wire(cls, data: object) -> HttpDispatchPayload:
        d = wire.obj(data, "payload")
        try:
            route_id = RouteId(uuid.UUID(wire.field(d, "route_id", str)))
        except ValueError as exc:
            raise WireError("bad route_id") from exc
        return cls(route_id, dict(wire.obj(d.get("event"), "event")))


@attrs.frozen
class NewOutboxRow:
    """An outbox row as a producer writes it (one execution to run).

    ``payload`` is the event's wire form (or an :class:`HttpDispatchPayload`'s).
    ``reply_to`` is set only for sync HTTP; ``reply_node`` names the node whose
    inbox waits for it (cluster mode).
    """

    execution_id: ExecutionId
    app_id: AppId
    source_kind: OutboxSourceKind
    payload: JsonObject
    script_id: ScriptId | None = None
    trigger_id: TriggerId | None = None
    route_id: RouteId | None = None
    reply_to: InboxId | None = None
    reply_node: str | None = None
    is_dead_letter_handler: bool = False
    dead_letter_id: DeadLetterId | None = None
    trigger_depth: int = 0
    retry: RetryPolicy = DEFAULT_RETRY_POLICY
    run_at: datetime | None = None  # None: due at once


@attrs.frozen
class OutboxRow:
    """A stored outbox row, as the dispatcher sees it after claiming it."""

    id: int
    execution_id: ExecutionId
    app_id: AppId
    source_kind: OutboxSourceKind
    payload: JsonObject
    script_id: ScriptId | None
    trigger_id: TriggerId | None
    route_id: RouteId | None
    reply_to: InboxId | None
    reply_node: str | None
    is_dead_letter_handler: bool
    dead_letter_id: DeadLetterId | None
    trigger_depth: int
    attempt_count: int
    retry: RetryPolicy
    run_at: datetime

    @property
    def is_sync_http(self) -> bool:
        return self.reply_to is not None

    @property
    def next_attempt(self) -> int:
        """The 1-based number of the attempt about to run."""
        return self.attempt_count + 1

    def with_changes(self, **changes: Any) -> OutboxRow:
        return attrs.evolve(self, **changes)
