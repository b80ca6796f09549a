"""Apps and their members.

``POST /apps`` is open to every user (the creator gets every capability), up to
``MAX_APPS_PER_USER`` apps they created at a time (422 ``limit_exceeded``; instance
admins have no cap); ``GET /apps`` lists the apps where the caller holds
``app_read`` (all of them for an instance admin). ``PUT /apps/{id}/members/{user_id}``
replaces a member's capabilities; a caller who is not an instance admin may only
grant or revoke capabilities they hold themselves, so nobody escalates through it.

An app answers (created, read or listed) with ``storage_bytes`` (what it stores
now, its scripts' sources included: the usage its storage quota is checked against)
and ``storage_quota_bytes`` (``null``: unlimited).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from starlette.responses import Response

from manager_core.api._endpoint import Access, Call, Operation, Resource
from manager_core.api._http import json_response, no_content, path_uuid
from manager_core.api._pagination import PageRequest
from picloud_shared.domain import App
from picloud_shared.errors import Forbidden, InvalidInput, NotFound
from picloud_shared.ids import AppId, UserId
from picloud_shared.principals import Capability
from picloud_shared.wire import JsonObject

if TYPE_CHECKING:
    from manager_core.api.deps import AdminDeps


def app_to_wire(app: App) -> JsonObject:
    """An app's own fields (see :func:`apps_to_wire` for the resource)."""
    return {"id": str(app.id), "name": app.name, "created_at": app.created_at.isoformat()}


async def apps_to_wire(deps: AdminDeps, apps: Sequence[App]) -> dict[AppId, JsonObject]:
    """Apps as the API answers them: with their storage usage and quota (one query)."""
    used = await deps.quota.storage.usage(a.id for a in apps)
    limit = deps.quota.limit_bytes
    return {
        a.id: {**app_to_wire(a), "storage_bytes": used[a.id], "storage_quota_bytes": limit}
        for a in apps
    }


async def create_app(call: Call) -> Response:
    """``{"name"}`` → 201 app (``storage_bytes`` 0); 409 when the name is taken, 422
    ``limit_exceeded`` when the caller already has ``MAX_APPS_PER_USER`` apps."""
    fields = await call.fields()
    app = await call.deps.apps.create(fields.text("name"), call.user.id)
    return json_response((await apps_to_wire(call.deps, [app]))[app.id], 201)


async def list_apps(call: Call) -> Response:
    """The apps the caller may read, by name."""
    page = PageRequest.from_request(call.request)
    rows = await call.deps.apps.list_visible(
        call.user.id,
        instance_admin=call.user.is_instance_admin,
        capability=Capability.APP_READ,
        limit=page.fetch,
        after=None if page.after is None else page.after[0],
    )
    wire = await apps_to_wire(call.deps, rows[: page.limit])
    return page.respond(rows, lambda a: (a.name,), lambda a: wire[a.id])


async def get_app(call: Call) -> Response:
    """One app."""
    app = await call.deps.apps.get(call.app_id)
    if app is None:
        raise NotFound("no such app")
    return json_response((await apps_to_wire(call.deps, [app]))[app.id])


async def delete_app(call: Call) -> Response:
    """Delete the app and everything it owns; 204."""
    if not await call.deps.apps.delete(call.app_id):
        raise NotFound("no such app")
    return no_content()


async def set_member(call: Call) -> Response:
    """``{"capabilities": [...]}`` → 200 ``{"app_id", "user_id", "capabilities"}``;
    an empty list removes the member."""
    user_id = UserId(path_uuid(call.request, "user_id", "user"))
    fields = await call.fields()
    try:
        wanted = Capability.parse_all(fields.text_list("capabilities"))
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    principal = call.principal
    assert principal is not None
    if not principal.is_instance_admin:
        current = await call.deps.apps.capabilities_of(call.app_id, user_id) or frozenset()
        beyond = (wanted ^ current) - principal.capabilities
        if beyond:
            names = ", ".join(sorted(beyond))
            raise Forbidden(f"you can only grant or revoke capabilities you hold ({names})")
    stored = await call.deps.apps.set_capabilities(call.app_id, user_id, wanted)
    body = {
        "app_id": str(call.app_id),
        "user_id": str(user_id),
        "capabilities": sorted(str(c) for c in stored),
    }
    return json_response(body)


def resources(deps: AdminDeps) -> list[Resource]:
    """The app and member endpoints."""
    return [
        Resource(
            "/apps",
            deps,
            {
                "POST": Operation(Access.ANY_USER, create_app),
                "GET": Operation(Access.ANY_USER, list_apps),
            },
        ),
        Resource(
            "/apps/{id}",
            deps,
            {
                "GET": Operation(Capability.APP_READ, get_app),
                "DELETE": Operation(Capability.APP_DELETE, delete_app),
            },
        ),
        Resource(
            "/apps/{id}/members/{user_id}",
            deps,
            {"PUT": Operation(Capability.APP_MANAGE_MEMBERS, set_member)},
        ),
    ]
