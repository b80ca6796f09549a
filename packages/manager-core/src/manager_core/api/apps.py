"""Apps and their members.

``POST /apps`` is open to every user (the creator gets every capability), up to
``MAX_APPS_PER_USER`` apps they created at a time (422 ``limit_exceeded``; instance
admins have no cap); ``GET /apps`` lists the apps where the caller holds
``app_read`` (all of them for an instance admin). ``PUT /apps/{id}/members/{user_id}``
replaces a member's capabilities and ``DELETE`` removes the member; a caller who is
not an instance admin may only grant capabilities they hold themselves, and change
only members who hold nothing they lack, so nobody escalates through either, and a
delegated manager cannot demote the app's owner. ``GET /apps/{id}/members[/{user_id}]`` shows who
holds what, to anyone who may read the app.

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
from manager_core.postgres.apps import Member
from picloud_shared import wire
from picloud_shared.domain import App
from picloud_shared.errors import Forbidden, InvalidInput, NotFound
from picloud_shared.ids import AppId, UserId
from picloud_shared.principals import Capability
from picloud_shared.wire import JsonObject

if TYPE_CHECKING:
    from manager_core.api.deps import AdminDeps


def app_to_wire(app: App) -> JsonObject:
    """An app's own fields (see :func:`apps_to_wire` for the resource)."""
    return {"id": str(app.id), "name": app.name, "created_at": wire.timestamp_text(app.created_at)}


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


def member_to_wire(app_id: AppId, member: Member) -> JsonObject:
    """A member as the API answers them (listed, read or set)."""
    return {
        "app_id": str(app_id),
        "user_id": str(member.user_id),
        "name": member.name,
        "capabilities": sorted(str(c) for c in member.capabilities),
    }


def _member_id(call: Call) -> UserId:
    """The ``{user_id}`` of the path; malformed is 404 (no such user can exist)."""
    return UserId(path_uuid(call.request, "user_id", "user"))


async def list_members(call: Call) -> Response:
    """The app's members, by user name: ``{"items": [{"app_id", "user_id", "name",
    "capabilities"}], "next_cursor"}``."""
    page = PageRequest.from_request(call.request)
    rows = await call.deps.apps.list_members(
        call.app_id, limit=page.fetch, after=None if page.after is None else page.after[0]
    )
    return page.respond(rows, lambda m: (m.name,), lambda m: member_to_wire(call.app_id, m))


async def get_member(call: Call) -> Response:
    """One member; 404 when the user is not a member of the app."""
    member = await call.deps.apps.get_member(call.app_id, _member_id(call))
    if member is None:
        raise NotFound("no such member of this app")
    return json_response(member_to_wire(call.app_id, member))


async def _change_member(
    call: Call,
    user_id: UserId,
    wanted: frozenset[Capability],
    current: frozenset[Capability] | None = None,
) -> frozenset[Capability]:
    """Give ``user_id`` exactly ``wanted`` in the app (none: not a member), within
    what the caller may grant or revoke; ``current``: what they hold now, when the
    caller read it already."""
    principal = call.principal
    assert principal is not None
    if not principal.is_instance_admin:
        if current is None:
            current = await call.deps.apps.capabilities_of(call.app_id, user_id) or frozenset()
        above = current - principal.capabilities
        if above:
            names = ", ".join(sorted(above))
            raise Forbidden(
                f"you can only change members who hold nothing you lack; they hold {names}"
            )
        beyond = wanted - principal.capabilities
        if beyond:
            names = ", ".join(sorted(beyond))
            raise Forbidden(f"you can only grant capabilities you hold ({names})")
    return await call.deps.apps.set_capabilities(call.app_id, user_id, wanted)


async def set_member(call: Call) -> Response:
    """``{"capabilities": [...]}`` → 200 the member as ``GET`` shows them
    (``{"app_id", "user_id", "name", "capabilities"}``); an empty list removes the
    member (``capabilities`` ``[]``)."""
    user_id = _member_id(call)
    fields = await call.fields()
    try:
        wanted = Capability.parse_all(fields.text_list("capabilities"))
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    stored = await _change_member(call, user_id, wanted)
    user = await call.deps.users.get(user_id)
    if user is None:  # deleted meanwhile
        raise NotFound("no such user")
    return json_response(member_to_wire(call.app_id, Member(user_id, user.name, stored)))


async def remove_member(call: Call) -> Response:
    """Remove the member; 204. 404 when the user is not a member, 403 when the
    caller lacks one of their capabilities, 409 for the app's last member manager."""
    user_id = _member_id(call)
    current = await call.deps.apps.capabilities_of(call.app_id, user_id)
    if current is None:
        raise NotFound("no such member of this app")
    await _change_member(call, user_id, frozenset(), current)
    return no_content()


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
        Resource("/apps/{id}/members", deps, {"GET": Operation(Capability.APP_READ, list_members)}),
        Resource(
            "/apps/{id}/members/{user_id}",
            deps,
            {
                "GET": Operation(Capability.APP_READ, get_member),
                "PUT": Operation(Capability.APP_MANAGE_MEMBERS, set_member),
                "DELETE": Operation(Capability.APP_MANAGE_MEMBERS, remove_member),
            },
        ),
    ]
