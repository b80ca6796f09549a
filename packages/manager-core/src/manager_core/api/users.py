"""Users and their tokens.

Instance admins create, list, promote or demote, and delete users, and rotate
anyone's token; every user may ask who they are (``GET /users/me``) and rotate
their own token. ``me`` never collides with a user id: ids are UUIDs.

The rules that keep the instance manageable live in the repo
(:mod:`manager_core.postgres.users`): the last instance admin can be neither
deleted nor demoted, and a user who is the only member holding
``app_manage_members`` of an app cannot be deleted (both 409 ``conflict``). The
API adds one: nobody deletes themselves (409).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import Response

from manager_core.api._endpoint import Access, Call, Operation, Resource
from manager_core.api._http import json_response, no_content, path_uuid
from manager_core.api._pagination import PageRequest
from manager_core.postgres.users import User
from picloud_shared import wire
from picloud_shared.errors import Conflict, Forbidden
from picloud_shared.ids import UserId
from picloud_shared.wire import JsonObject

if TYPE_CHECKING:
    from manager_core.api.deps import AdminDeps


def user_to_wire(user: User) -> JsonObject:
    """A user as the API answers them (never their token)."""
    return {
        "id": str(user.id),
        "name": user.name,
        "instance_admin": user.is_instance_admin,
        "created_at": wire.timestamp_text(user.created_at),
    }


def _user_id(call: Call) -> UserId:
    """The ``{user_id}`` of the path; malformed is 404 (no such user can exist)."""
    return UserId(path_uuid(call.request, "user_id", "user"))


async def create_user(call: Call) -> Response:
    """``{"name", "instance_admin"?}`` → 201 the user (as ``GET /users`` lists them)
    and its ``token``, shown this once."""
    fields = await call.fields()
    name = fields.text("name")
    instance_admin = fields.boolean("instance_admin", False)
    user, token = await call.deps.users.create_user(name, instance_admin)
    return json_response({**user_to_wire(user), "token": token}, 201)


async def list_users(call: Call) -> Response:
    """Every user, by name."""
    page = PageRequest.from_request(call.request)
    rows = await call.deps.users.list_users(
        limit=page.fetch, after=None if page.after is None else page.after[0]
    )
    return page.respond(rows, lambda u: (u.name,), user_to_wire)


async def who_am_i(call: Call) -> Response:
    """The caller: ``{"id", "name", "instance_admin", "created_at"}``."""
    return json_response(user_to_wire(call.user))


async def set_instance_admin(call: Call) -> Response:
    """``{"instance_admin": bool}`` → 200 the user; 409 demoting the last instance admin."""
    user_id = _user_id(call)
    fields = await call.fields()
    instance_admin = fields.boolean("instance_admin")
    user = await call.deps.users.set_instance_admin(user_id, instance_admin)
    return json_response(user_to_wire(user))


async def delete_user(call: Call) -> Response:
    """Delete the user and their memberships; 204. 409 for oneself, the last instance
    admin, or the only member holding ``app_manage_members`` of an app."""
    user_id = _user_id(call)
    if user_id == call.user.id:
        raise Conflict("you cannot delete yourself; ask another instance admin")
    await call.deps.users.delete(user_id)
    return no_content()


async def rotate_token(call: Call) -> Response:
    """→ 200 ``{"id", "name", "token"}``: a new token, the old one stops working.
    An instance admin rotates anyone's; any other user only their own (else 403)."""
    user_id = _user_id(call)
    if user_id != call.user.id and not call.user.is_instance_admin:
        raise Forbidden("only an instance admin rotates another user's token")
    user, token = await call.deps.users.rotate_token(user_id)
    return json_response({"id": str(user.id), "name": user.name, "token": token})


def resources(deps: AdminDeps) -> list[Resource]:
    """The user endpoints (``/users/me`` before ``/users/{user_id}``, which it would
    otherwise match)."""
    return [
        Resource(
            "/users",
            deps,
            {
                "POST": Operation(Access.INSTANCE_ADMIN, create_user),
                "GET": Operation(Access.INSTANCE_ADMIN, list_users),
            },
        ),
        Resource("/users/me", deps, {"GET": Operation(Access.ANY_USER, who_am_i)}),
        Resource(
            "/users/{user_id}",
            deps,
            {
                "PATCH": Operation(Access.INSTANCE_ADMIN, set_instance_admin),
                "DELETE": Operation(Access.INSTANCE_ADMIN, delete_user),
            },
        ),
        Resource(
            "/users/{user_id}/token",
            deps,
            {"POST": Operation(Access.ANY_USER, rotate_token)},
        ),
    ]
