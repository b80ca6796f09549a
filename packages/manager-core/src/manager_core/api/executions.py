"""An app's executions and dead letters: read, replay, resolve."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, TypeVar

from starlette.responses import Response

from manager_core.api._endpoint import Call, Operation, Resource
from manager_core.api._http import ADMIN_PREFIX, json_response, path_uuid
from manager_core.api._pagination import PageRequest
from manager_core.api.triggers import uuid_cursor
from manager_core.postgres.dead_letters import DeadLetter
from manager_core.postgres.executions import Execution
from picloud_shared import wire
from picloud_shared.errors import InvalidInput, NotFound
from picloud_shared.ids import DeadLetterId, ExecutionId
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.principals import Capability
from picloud_shared.status import ExecutionStatus
from picloud_shared.wire import Json, JsonObject

if TYPE_CHECKING:
    from manager_core.api.deps import AdminDeps


E = TypeVar("E", ExecutionStatus, OutboxSourceKind)


def _filter(call: Call, name: str, kind: type[E]) -> E | None:
    raw = call.request.query_params.get(name)
    if not raw:
        return None
    try:
        return kind(raw)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise InvalidInput(f"{name} must be one of: {allowed}") from None


def _position(page: PageRequest) -> tuple[datetime, uuid.UUID] | None:
    """The cursor of a newest-first list: the last item's ``(created_at, id)``, so a
    page follows even when that item was deleted meanwhile (retention)."""
    if page.after is None:
        return None
    created, last = page.after
    try:
        at = datetime.fromisoformat(created)
    except ValueError:
        raise InvalidInput("malformed cursor") from None
    if at.tzinfo is None:
        raise InvalidInput("malformed cursor")
    return at, uuid_cursor(last)


def _key(item: Execution | DeadLetter) -> tuple[str, str]:
    return (wire.timestamp_text(item.created_at), str(item.id))


WITHHELD = "withheld: reading it needs app_read_data"


def _reads_data(call: Call) -> bool:
    assert call.principal is not None
    return call.principal.can(Capability.APP_READ_DATA)


def _withhold_message(error: Json) -> Json:
    """The error without the script's text: its message reads :data:`WITHHELD` and
    its traceback (which quotes the script's lines, and through them its values) is
    ``null``."""
    if isinstance(error, dict):
        return {**error, "message": WITHHELD, "traceback": None}
    return error


def _execution_to_wire(call: Call, execution: Execution) -> JsonObject:
    """An execution as the caller may see it. What its script made of the app's data
    (``result``, ``logs``, and the error's ``message`` and ``traceback``: a script's
    exception or rejection text) is withheld from a caller without ``app_read_data``;
    its status, timing and error ``kind`` are not."""
    body = execution.to_wire()
    if not _reads_data(call):
        body["result"] = None
        body["logs"] = None
        body["error"] = _withhold_message(body["error"])
    return body


async def list_executions(call: Call) -> Response:
    """Newest first; ``?status=&source_kind=`` filter."""
    page = PageRequest.from_request(call.request, key_size=2)
    status = _filter(call, "status", ExecutionStatus)
    source_kind = _filter(call, "source_kind", OutboxSourceKind)
    position = _position(page)
    after = None if position is None else (position[0], ExecutionId(position[1]))
    rows = await call.deps.executions.list(
        call.app_id, page.fetch, after, status=status, source_kind=source_kind
    )
    return page.respond(rows, _key, lambda e: _execution_to_wire(call, e))


async def get_execution(call: Call) -> Response:
    """One execution."""
    execution_id = ExecutionId(path_uuid(call.request, "execution_id", "execution"))
    execution = await call.deps.executions.get(call.app_id, execution_id)
    if execution is None:
        raise NotFound("no such execution")
    return json_response(_execution_to_wire(call, execution))


def _letter_to_wire(call: Call, letter: DeadLetter) -> JsonObject:
    """A dead letter as the caller may see it: its ``payload`` is the event the failed
    script received (for ``http``, the route event), which carries the app's data (a
    value, a document), so it is ``null`` for a caller without ``app_read_data``, and
    its error's ``message`` and ``traceback`` are withheld as an execution's are."""
    body = letter.to_wire()
    if not _reads_data(call):
        body["payload"] = None
        body["error"] = _withhold_message(body["error"])
    return body


async def list_dead_letters(call: Call) -> Response:
    """Newest first; ``?resolution=&source_kind=`` filter (``resolution=unresolved``:
    the ones nobody settled yet)."""
    page = PageRequest.from_request(call.request, key_size=2)
    resolution = call.request.query_params.get("resolution") or None
    source_kind = _filter(call, "source_kind", OutboxSourceKind)
    position = _position(page)
    after = None if position is None else (position[0], DeadLetterId(position[1]))
    rows = await call.deps.dead_letters.list(
        call.app_id, page.fetch, after, resolution=resolution, source_kind=source_kind
    )
    return page.respond(rows, _key, lambda d: _letter_to_wire(call, d))


async def get_dead_letter(call: Call) -> Response:
    """One dead letter, as listed."""
    dl_id = DeadLetterId(path_uuid(call.request, "dl_id", "dead letter"))
    letter = await call.deps.dead_letters.get(call.app_id, dl_id)
    if letter is None:
        raise NotFound("no such dead letter")
    return json_response(_letter_to_wire(call, letter))


async def replay_dead_letter(call: Call) -> Response:
    """Re-enqueue the original event → 202 ``{"execution_id"}`` with ``Location`` (the
    execution, as an async route's 202 has); 409 if replayed, or if its trigger
    (route), or script, no longer exists."""
    dl_id = DeadLetterId(path_uuid(call.request, "dl_id", "dead letter"))
    execution_id = await call.deps.dead_letters.replay(call.app_id, dl_id)
    location = f"{ADMIN_PREFIX}/apps/{call.app_id}/executions/{execution_id}"
    return json_response({"execution_id": str(execution_id)}, 202, headers={"Location": location})


async def resolve_dead_letter(call: Call) -> Response:
    """Mark the dead letter ``resolved`` → 200 with the dead letter; 409 if replayed."""
    dl_id = DeadLetterId(path_uuid(call.request, "dl_id", "dead letter"))
    letter = await call.deps.dead_letters.resolve(call.app_id, dl_id)
    return json_response(_letter_to_wire(call, letter))


def resources(deps: AdminDeps) -> list[Resource]:
    """The execution and dead-letter endpoints."""
    read, manage = Capability.APP_READ, Capability.APP_MANAGE_DEAD_LETTERS
    return [
        Resource("/apps/{id}/executions", deps, {"GET": Operation(read, list_executions)}),
        Resource(
            "/apps/{id}/executions/{execution_id}",
            deps,
            {"GET": Operation(read, get_execution)},
        ),
        Resource("/apps/{id}/dead-letters", deps, {"GET": Operation(read, list_dead_letters)}),
        Resource(
            "/apps/{id}/dead-letters/{dl_id}",
            deps,
            {"GET": Operation(read, get_dead_letter)},
        ),
        Resource(
            "/apps/{id}/dead-letters/{dl_id}/replay",
            deps,
            {"POST": Operation(manage, replay_dead_letter)},
        ),
        Resource(
            "/apps/{id}/dead-letters/{dl_id}/resolve",
            deps,
            {"POST": Operation(manage, resolve_dead_letter)},
        ),
    ]
