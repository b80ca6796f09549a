"""An app's user routes: create, list, read, change, delete."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import Response

from manager_core.api._endpoint import Call, Operation, Resource
from manager_core.api._http import json_response, no_content, path_uuid
from manager_core.api._pagination import PageRequest
from manager_core.postgres.routes import RouteEntry
from picloud_shared import wire
from picloud_shared.domain import DispatchMode
from picloud_shared.errors import InvalidInput, NotFound
from picloud_shared.ids import RouteId
from picloud_shared.principals import Capability
from picloud_shared.wire import JsonObject

if TYPE_CHECKING:
    from manager_core.api.deps import AdminDeps


def route_to_wire(entry: RouteEntry) -> JsonObject:
    """A route as the API answers it."""
    route = entry.route
    return {
        "id": str(route.id),
        "method": route.method,
        "path": route.path,
        "script": entry.script_name,
        "script_id": str(route.script_id),
        "dispatch_mode": str(route.dispatch_mode),
        "registered_by": None if route.registered_by is None else str(route.registered_by),
        "created_at": wire.timestamp_text(entry.created_at),
    }


def _dispatch_mode(mode: str) -> DispatchMode:
    try:
        return DispatchMode(mode)
    except ValueError:
        raise InvalidInput("field 'dispatch_mode' must be 'sync' or 'async'") from None


async def create_route(call: Call) -> Response:
    """``{"method", "path", "script", "dispatch_mode"?: "sync"}`` → 201; 409 on the
    same method and path."""
    fields = await call.fields()
    method = fields.text("method")
    path = fields.text("path")
    script = fields.text("script")
    dispatch_mode = _dispatch_mode(fields.text("dispatch_mode", DispatchMode.SYNC.value))
    entry = await call.deps.routes.create(
        call.app_id,
        method,
        path,
        script,
        dispatch_mode=dispatch_mode,
        registered_by=call.user.id,
    )
    return json_response(route_to_wire(entry), 201)


async def list_routes(call: Call) -> Response:
    """The app's routes by path, then method."""
    page = PageRequest.from_request(call.request, key_size=2)
    after = None if page.after is None else (page.after[0], page.after[1])
    rows = await call.deps.routes.list(call.app_id, limit=page.fetch, after=after)
    return page.respond(rows, lambda e: (e.route.path, e.route.method), route_to_wire)


async def get_route(call: Call) -> Response:
    """One route, as listed."""
    route_id = RouteId(path_uuid(call.request, "route_id", "route"))
    entry = await call.deps.routes.get(call.app_id, route_id)
    if entry is None:
        raise NotFound("no such route")
    return json_response(route_to_wire(entry))


async def patch_route(call: Call) -> Response:
    """Any of ``{"script", "dispatch_mode"}`` → 200 the route, now registered by the
    caller. ``method`` and ``path`` may be given only as they are (422 otherwise):
    another method or path is another route."""
    route_id = RouteId(path_uuid(call.request, "route_id", "route"))
    fields = await call.fields()
    script = fields.text("script", None)
    mode = fields.text("dispatch_mode", None)
    dispatch_mode = None if mode is None else _dispatch_mode(mode)
    method = fields.text("method", None)
    path = fields.text("path", None)
    entry = await call.deps.routes.get(call.app_id, route_id)
    if entry is None:
        raise NotFound("no such route")
    for name, given, current in (
        ("method", None if method is None else method.upper(), entry.route.method),
        ("path", path, entry.route.path),
    ):
        if given is not None and given != current:
            raise InvalidInput(
                f"field {name!r}: a route's method and path cannot change; create another route"
            )
    updated = await call.deps.routes.update(
        call.app_id,
        route_id,
        registered_by=call.user.id,
        script_name=script,
        dispatch_mode=dispatch_mode,
    )
    if updated is None:
        raise NotFound("no such route")
    return json_response(route_to_wire(updated))


async def delete_route(call: Call) -> Response:
    """Delete one route; 204."""
    route_id = RouteId(path_uuid(call.request, "route_id", "route"))
    if not await call.deps.routes.delete(call.app_id, route_id):
        raise NotFound("no such route")
    return no_content()


def resources(deps: AdminDeps) -> list[Resource]:
    """The route endpoints."""
    return [
        Resource(
            "/apps/{id}/routes",
            deps,
            {
                "POST": Operation(Capability.APP_MANAGE_ROUTES, create_route),
                "GET": Operation(Capability.APP_READ, list_routes),
            },
        ),
        Resource(
            "/apps/{id}/routes/{route_id}",
            deps,
            {
                "GET": Operation(Capability.APP_READ, get_route),
                "PATCH": Operation(Capability.APP_MANAGE_ROUTES, patch_route),
                "DELETE": Operation(Capability.APP_MANAGE_ROUTES, delete_route),
            },
        ),
    ]
