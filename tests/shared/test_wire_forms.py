"""Every wire form round-trips through JSON text (foundation §3)."""

from __future__ import annotations

import enum
import json
import uuid

import pytest
from hypothesis import given

from picloud_shared import wire
from picloud_shared.domain import DispatchMode
from picloud_shared.events import TriggerEvent, event_from_wire, script_event
from picloud_shared.execution import ExecRequest, ExecResult
from picloud_shared.ids import AppId, ExecutionId, ScriptId, UserId
from picloud_shared.inbox import DeliveryStatus, InboxResult
from picloud_shared.outbox import HttpDispatchPayload, OutboxSourceKind
from picloud_shared.principals import Capability, Principal
from picloud_shared.retry import Backoff
from picloud_shared.status import ExecErrorKind, ExecutionStatus, InboxFailureKind
from picloud_shared.triggers import DocsOp, KvOp, TriggerKind
from tests.strategies import (
    exec_results,
    http_payloads,
    inbox_results,
    json_objects,
    trigger_events,
)

ENUMS: list[type[enum.StrEnum]] = [
    DispatchMode,
    TriggerKind,
    KvOp,
    DocsOp,
    OutboxSourceKind,
    Backoff,
    Capability,
    ExecErrorKind,
    InboxFailureKind,
    ExecutionStatus,
    DeliveryStatus,
]


def through_json(value: object) -> object:
    return json.loads(wire.dumps(value))  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", ENUMS, ids=lambda c: c.__name__)
def test_enum_wire_values_are_snake_case_and_round_trip(cls: type[enum.StrEnum]) -> None:
    """Every member's wire value is snake_case and decodes back to the member."""
    for member in cls:
        assert member.value == member.name.lower()
        assert wire.enum_value(cls, through_json(member.value)) is member


def test_unknown_enum_value_is_a_wire_error() -> None:
    """Decoding a value outside the enum raises WireError naming the allowed values."""
    with pytest.raises(wire.WireError, match="sync, async"):
        wire.enum_value(DispatchMode, "later")


@given(trigger_events)
def test_every_trigger_event_round_trips(event: TriggerEvent) -> None:
    """event → wire → JSON text → event is the identity."""
    assert event_from_wire(through_json(event.to_wire())) == event


@given(trigger_events)
def test_script_event_has_the_documented_keys(event: TriggerEvent) -> None:
    """The event handed to a script has exactly the keys API.md lists for its kind."""
    keys = {
        "kv": {"kind", "key", "op", "value", "prev_value"},
        "docs": {"kind", "collection", "id", "op", "data", "prev_data"},
        "dead_letter": {"kind", "dead_letter_id", "source_kind", "event", "error", "attempts"},
        "http": {"method", "path", "params", "query", "headers", "body", "json"},
    }[event.kind.value]
    assert set(script_event(event)) == keys


@given(exec_results)
def test_exec_result_round_trips(result: ExecResult) -> None:
    """ExecResult (success or failure, with logs) survives JSON."""
    assert ExecResult.from_wire(through_json(result.to_wire())) == result


@given(inbox_results)
def test_inbox_result_round_trips(result: InboxResult) -> None:
    """InboxResult survives JSON (it crosses nodes in cluster mode)."""
    assert InboxResult.from_wire(through_json(result.to_wire())) == result


@given(http_payloads)
def test_http_dispatch_payload_round_trips(payload: HttpDispatchPayload) -> None:
    """HttpDispatchPayload survives JSON."""
    assert HttpDispatchPayload.from_wire(through_json(payload.to_wire())) == payload


@given(json_objects)
def test_exec_request_round_trips(event: dict[str, object]) -> None:
    """ExecRequest, with its principal, survives JSON."""
    app = AppId(uuid.uuid4())
    req = ExecRequest(
        execution_id=ExecutionId(uuid.uuid4()),
        app_id=app,
        app_name="shop",
        script_id=ScriptId(uuid.uuid4()),
        script_version=3,
        source="def handle(e, c): pass",
        event=event,  # type: ignore[arg-type]
        principal=Principal(UserId(uuid.uuid4()), app, frozenset({Capability.APP_READ_DATA})),
        timeout_seconds=5,
        memory_limit_mb=64,
        attempt=2,
        trigger_depth=1,
    )
    assert ExecRequest.from_wire(through_json(req.to_wire())) == req


@pytest.mark.parametrize(
    "bad",
    [
        None,
        [],
        {"kind": "nope"},
        {"kind": "kv", "key": 1, "op": "set"},
        {"kind": "kv", "key": "k", "op": "upsert"},
        {"kind": "docs", "collection": "c", "id": "1", "op": "insert", "data": [1]},
        {
            "kind": "dead_letter",
            "dead_letter_id": "x",
            "source_kind": "kv",
            "event": {},
            "error": {},
            "attempts": 1,
        },
        {
            "kind": "http",
            "method": "GET",
            "path": "/",
            "params": {"a": 1},
            "query": {},
            "headers": {},
            "body": "",
        },
    ],
)
def test_malformed_events_raise_wire_error(bad: object) -> None:
    """Decoding never raises anything but WireError on malformed input."""
    with pytest.raises(wire.WireError):
        event_from_wire(bad)


def test_exec_result_needs_exactly_one_outcome() -> None:
    """A result with neither response nor error cannot be built."""
    with pytest.raises(ValueError, match="exactly one"):
        ExecResult(ExecutionId(uuid.uuid4()))
