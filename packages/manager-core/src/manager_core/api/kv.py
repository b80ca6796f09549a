"""An app's key-value store through the admin API. Writes fire KV triggers
exactly as script writes do: an admin write is an origin, as an HTTP request is, so
the executions it fires are at ``trigger_depth`` 1 (:data:`ADMIN_WRITE_DEPTH`), as
those a route's script fires are."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import Response

from manager_core.api._endpoint import Call, Operation, Resource
from manager_core.api._http import json_response, no_content, read_json
from manager_core.api._pagination import PageRequest
from picloud_shared.errors import NotFound
from picloud_shared.principals import Capability

if TYPE_CHECKING:
    from manager_core.api.deps import AdminDeps

ADMIN_WRITE_DEPTH = 1
"""The ``trigger_depth`` of what an admin write fires: that of a depth-0 script's write."""


async def put_value(call: Call) -> Response:
    """The body is the JSON value → ``{"key", "value", "version"}``: 201 when the key
    did not exist (``version`` 1, also after a delete), 200 when it was replaced, as
    ``PUT`` of a document answers."""
    value = await read_json(call.request)
    entry = await call.deps.kv.set(
        call.app_id, call.path("key"), value, trigger_depth=ADMIN_WRITE_DEPTH
    )
    return json_response(entry.to_wire(), 201 if entry.version == 1 else 200)


async def get_value(call: Call) -> Response:
    """``{"key", "value", "version"}`` or 404."""
    key = call.path("key")
    entry = await call.deps.kv.get(call.app_id, key)
    if entry is None:
        raise NotFound(f"no key {key!r}")
    return json_response(entry.to_wire())


async def delete_value(call: Call) -> Response:
    """204, or 404 when the key does not exist."""
    key = call.path("key")
    if not await call.deps.kv.delete(call.app_id, key, trigger_depth=ADMIN_WRITE_DEPTH):
        raise NotFound(f"no key {key!r}")
    return no_content()


async def list_values(call: Call) -> Response:
    """Entries whose key starts with ``?prefix=``, in key order."""
    page = PageRequest.from_request(call.request)
    prefix = call.query("prefix")
    rows = await call.deps.kv.list(
        call.app_id, prefix, page.fetch, None if page.after is None else page.after[0]
    )
    return page.respond(rows, lambda e: (e.key,), lambda e: e.to_wire())


def resources(deps: AdminDeps) -> list[Resource]:
    """The KV endpoints (keys may contain '/')."""
    write, read = Capability.APP_WRITE_DATA, Capability.APP_READ_DATA
    return [
        Resource("/apps/{id}/kv", deps, {"GET": Operation(read, list_values)}),
        Resource(
            "/apps/{id}/kv/{key:path}",
            deps,
            {
                "PUT": Operation(write, put_value),
                "GET": Operation(read, get_value),
                "DELETE": Operation(write, delete_value),
            },
        ),
    ]
