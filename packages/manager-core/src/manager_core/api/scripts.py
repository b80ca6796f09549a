"""An app's scripts: create, update (bumps ``version``), read, list, delete.

An app holds at most ``MAX_SCRIPTS_PER_APP`` scripts (422 ``limit_exceeded``), and
their sources count in its storage quota: a create or update that would grow the app
past it is answered 507 ``storage_quota_exceeded``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import Response

from manager_core.api._endpoint import Call, Operation, Resource
from manager_core.api._http import json_response, no_content
from manager_core.api._pagination import PageRequest
from manager_core.postgres.scripts import ScriptSummary
from picloud_shared.domain import SCRIPT_NAME_RE, Script
from picloud_shared.errors import NotFound
from picloud_shared.limits import DEFAULT_MEMORY_LIMIT_MB, DEFAULT_TIMEOUT_SECONDS
from picloud_shared.principals import Capability
from picloud_shared.wire import JsonObject

if TYPE_CHECKING:
    from manager_core.api.deps import AdminDeps


def script_to_wire(script: Script | ScriptSummary, *, source: bool = False) -> JsonObject:
    """A script as the API answers it (with its source only when asked)."""
    body: JsonObject = {
        "id": str(script.id),
        "name": script.name,
        "version": script.version,
        "timeout_seconds": script.timeout_seconds,
        "memory_limit_mb": script.memory_limit_mb,
        "data_capabilities": sorted(c.value for c in script.data_capabilities),
    }
    if source and isinstance(script, Script):
        body["source"] = script.source
    return body


def _authors_data_capabilities(call: Call) -> frozenset[Capability]:
    """What the caller may do with the app's data: all a version they save may do."""
    assert call.principal is not None
    return call.principal.data_rights


def _name(call: Call) -> str:
    name = call.path("name")
    if not SCRIPT_NAME_RE.fullmatch(name):
        raise NotFound(f"no script named {name!r}")
    return name


async def create_script(call: Call) -> Response:
    """``{"name", "source", "timeout_seconds"?, "memory_limit_mb"?}`` → 201."""
    fields = await call.fields()
    script = await call.deps.scripts.create(
        call.app_id,
        fields.text("name"),
        fields.text("source"),
        timeout_seconds=fields.integer("timeout_seconds", DEFAULT_TIMEOUT_SECONDS),
        memory_limit_mb=fields.integer("memory_limit_mb", DEFAULT_MEMORY_LIMIT_MB),
        data_capabilities=_authors_data_capabilities(call),
    )
    return json_response(script_to_wire(script), 201)


async def list_scripts(call: Call) -> Response:
    """The app's scripts by name, without their source."""
    page = PageRequest.from_request(call.request)
    rows = await call.deps.scripts.list(
        call.app_id, limit=page.fetch, after=None if page.after is None else page.after[0]
    )
    return page.respond(rows, lambda s: (s.name,), script_to_wire)


async def get_script(call: Call) -> Response:
    """One script with its source."""
    name = _name(call)
    script = await call.deps.scripts.get(call.app_id, name)
    if script is None:
        raise NotFound(f"no script named {name!r}")
    return json_response(script_to_wire(script, source=True))


async def update_script(call: Call) -> Response:
    """``{"source"?, "timeout_seconds"?, "memory_limit_mb"?}``: replace what is
    given, keep the rest, bump ``version``. The new version's data capabilities are
    the caller's, whatever the old version had."""
    name = _name(call)
    fields = await call.fields()
    script = await call.deps.scripts.update(
        call.app_id,
        name,
        source=fields.text("source", None),
        timeout_seconds=fields.integer("timeout_seconds", None),
        memory_limit_mb=fields.integer("memory_limit_mb", None),
        data_capabilities=_authors_data_capabilities(call),
    )
    return json_response(script_to_wire(script))


async def delete_script(call: Call) -> Response:
    """Delete a script (409 while a route or trigger uses it); 204."""
    name = _name(call)
    if not await call.deps.scripts.delete(call.app_id, name):
        raise NotFound(f"no script named {name!r}")
    return no_content()


def resources(deps: AdminDeps) -> list[Resource]:
    """The script endpoints."""
    return [
        Resource(
            "/apps/{id}/scripts",
            deps,
            {
                "POST": Operation(Capability.APP_MANAGE_SCRIPTS, create_script),
                "GET": Operation(Capability.APP_READ, list_scripts),
            },
        ),
        Resource(
            "/apps/{id}/scripts/{name}",
            deps,
            {
                "PUT": Operation(Capability.APP_MANAGE_SCRIPTS, update_script),
                "GET": Operation(Capability.APP_READ, get_script),
                "DELETE": Operation(Capability.APP_MANAGE_SCRIPTS, delete_script),
            },
        ),
    ]
