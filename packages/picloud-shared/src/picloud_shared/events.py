"""Trigger events: what a script receives as ``event`` (API.md, "Scripts").

Each variant's wire form is exactly the script-facing event, with a ``kind`` key;
the HTTP event is delivered to scripts without it (:meth:`HttpEvent.to_script`).
"""

from __future__ import annotations

import uuid
from typing import Any, TypeAlias

import attrs

from picloud_shared import wire
from picloud_shared.ids import DeadLetterId
from picloud_shared.outbox import HttpDispatchPayload, OutboxSourceKind
from picloud_shared.triggers import DocsOp, KvOp
from picloud_shared.wire import Json, JsonObject, WireError


@attrs.frozen
class KvEvent:
    key: str
    op: KvOp
    value: Json = None
    prev_value: Json = None

    kind = OutboxSourceKind.KV

    def to_wire(self) -> JsonObject:
        return {
            "kind": "kv",
            "key": self.key,
            "op": self.op.value,
            "value": self.value,
            "prev_value": self.prev_value,
        }

    @classmethod
    def from_wire(cls, d: Any) -> KvEvent:
        return cls(
            wire.field(d, "key", str),
            wire.enum_value(KvOp, d.get("op")),
            d.get("value"),
            d.get("prev_value"),
        )


@attrs.frozen
class DocsEvent:
    collection: str
    id: str
    op: DocsOp
    data: JsonObject | None = None
    prev_data: JsonObject | None = None

    kind = OutboxSourceKind.DOCS

    def to_wire(self) -> JsonObject:
        return {
            "kind": "docs",
            "collection": self.collection,
            "id": self.id,
            "op": self.op.value,
            "data": self.data,
            "prev_data": self.prev_data,
        }

    @classmethod
    def from_wire(cls, d: Any) -> DocsEvent:
        data, prev = d.get("data"), d.get("prev_data")
        for name, v in (("data", data), ("prev_data", prev)):
            if v is not None and not isinstance(v, dict):
                raise WireError(f"{name} must be an object or null")
        return cls(
            wire.field(d, "collection", str),
            wire.field(d, "id", str),
            wire.enum_value(DocsOp, d.get("op")),
            data,
            prev,
        )


@attrs.frozen
class DeadLetterEvent:
    """``event`` is the event the failed script received (:func:`received_event`)."""

    dead_letter_id: DeadLetterId
    source_kind: OutboxSourceKind
    event: JsonObject
    error: JsonObject
    attempts: int

    kind = OutboxSourceKind.DEAD_LETTER

    def to_wire(self) -> JsonObject:
        return {
            "kind": "dead_letter",
            "dead_letter_id": str(self.dead_letter_id),
            "source_kind": self.source_kind.value,
            "event": self.event,
            "error": self.error,
            "attempts": self.attempts,
        }

    @classmethod
    def from_wire(cls, d: Any) -> DeadLetterEvent:
        try:
            dl_id = DeadLetterId(uuid.UUID(wire.field(d, "dead_letter_id", str)))
        except ValueError as exc:
            raise WireError("bad dead_letter_id") from exc
        return cls(
            dl_id,
            wire.enum_value(OutboxSourceKind, d.get("source_kind")),
            dict(wire.obj(d.get("event"), "event")),
            dict(wire.obj(d.get("error"), "error")),
            wire.field(d, "attempts", int),
        )


@attrs.frozen
class HttpEvent:
    method: str
    path: str
    params: dict[str, str] = attrs.Factory(dict)
    query: dict[str, str] = attrs.Factory(dict)
    headers: dict[str, str] = attrs.Factory(dict)
    body: str = ""
    json: Json = None

    kind = OutboxSourceKind.HTTP

    def to_script(self) -> JsonObject:
        return {
            "method": self.method,
            "path": self.path,
            "params": dict(self.params),
            "query": dict(self.query),
            "headers": dict(self.headers),
            "body": self.body,
            "json": self.json,
        }

    def to_wire(self) -> JsonObject:
        return {"kind": "http", **self.to_script()}

    @classmethod
    def from_wire(cls, d: Any) -> HttpEvent:
        maps = []
        for name in ("params", "query", "headers"):
            m = wire.obj(d.get(name), name)
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
                raise WireError(f"{name} must map strings to strings")
            maps.append(dict(m))
        return cls(
            wire.field(d, "method", str),
            wire.field(d, "path", str),
            maps[0],
            maps[1],
            maps[2],
            wire.field(d, "body", str),
            d.get("json"),
        )


TriggerEvent: TypeAlias = KvEvent | DocsEvent | DeadLetterEvent | HttpEvent

_BY_KIND: dict[str, type[KvEvent] | type[DocsEvent] | type[DeadLetterEvent] | type[HttpEvent]] = {
    "kv": KvEvent,
    "docs": DocsEvent,
    "dead_letter": DeadLetterEvent,
    "http": HttpEvent,
}


def event_from_wire(data: object) -> TriggerEvent:
    """Decode any event by its ``kind``; raises :class:`WireError`."""
    d = wire.obj(data, "event")
    cls = _BY_KIND.get(d.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        raise WireError(f"unknown event kind {d.get('kind')!r}")
    return cls.from_wire(d)


def script_event(event: TriggerEvent) -> JsonObject:
    """The ``event`` argument a script's ``handle`` receives."""
    return event.to_script() if isinstance(event, HttpEvent) else event.to_wire()


def received_event(source_kind: OutboxSourceKind, payload: JsonObject) -> JsonObject:
    """The ``event`` a script ran with for an outbox ``payload`` of ``source_kind``: for
    ``http`` the route event inside the :class:`HttpDispatchPayload` (no ``kind``, no
    ``route_id``), otherwise the payload itself. Raises :class:`WireError`."""
    if source_kind is not OutboxSourceKind.HTTP:
        return payload
    return HttpEvent.from_wire(HttpDispatchPayload.from_wire(payload).event).to_script()
