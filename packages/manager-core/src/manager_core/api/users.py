"""``POST /users``: instance admins create users and hand out their tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.responses import Response

from manager_core.api._endpoint import Access, Call, Operation, Resource
from manager_core.api._http import json_response

if TYPE_CHECKING:
    from manager_core.api.deps import AdminDeps


async def create_user(call: Call) -> Response:
    """``{"name", "instance_admin"?}`` → 201 ``{"id", "name", "token", "instance_admin"}``."""
    fields = await call.fields()
    name = fields.text("name")
    instance_admin = fields.boolean("instance_admin", False)
    user, token = await call.deps.users.create_user(name, instance_admin)
    body = {
        "id": str(user.id),
        "name": user.name,
        "token": token,
        "instance_admin": user.is_instance_admin,
    }
    return json_response(body, 201)


def resources(deps: AdminDeps) -> list[Resource]:
    """The user endpoints."""
    return [Resource("/users", deps, {"POST": Operation(Access.INSTANCE_ADMIN, create_user)})]
