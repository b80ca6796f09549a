"""Every admin endpoint, with who may call it and a sample body that succeeds.

The capability matrix (``test_capability_matrix.py``) runs over this table, and a
completeness test checks it against ``admin_routes``: a new endpoint must be
appended here. Path templates are filled from the world ``seed_world`` builds:
``{id}`` (the app), ``{user_id}`` (a user to manage), ``{name}`` (a script),
``{route_id}`` (a route).
"""

from __future__ import annotations

from typing import Any

import attrs

from manager_core.api import Access
from picloud_shared.principals import Capability
from tests.manager.api.helpers import SOURCE, Api


@attrs.frozen
class Endpoint:
    method: str
    path: str
    access: Capability | Access
    body: Any = None

    @property
    def app_scoped(self) -> bool:
        return isinstance(self.access, Capability)

    def url(self, world: dict[str, str]) -> str:
        return self.path.format(**world)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


C = Capability
ENDPOINTS: list[Endpoint] = [
    Endpoint("POST", "/users", Access.INSTANCE_ADMIN, {"name": "newbie"}),
    Endpoint("POST", "/apps", Access.ANY_USER, {"name": "new-app"}),
    Endpoint("GET", "/apps", Access.ANY_USER),
    Endpoint("GET", "/apps/{id}", C.APP_READ),
    Endpoint("DELETE", "/apps/{id}", C.APP_DELETE),
    Endpoint(
        "PUT",
        "/apps/{id}/members/{user_id}",
        C.APP_MANAGE_MEMBERS,
        {"capabilities": ["app_manage_members"]},
    ),
    Endpoint("POST", "/apps/{id}/scripts", C.APP_MANAGE_SCRIPTS, {"name": "new", "source": SOURCE}),
    Endpoint("GET", "/apps/{id}/scripts", C.APP_READ),
    Endpoint("PUT", "/apps/{id}/scripts/{name}", C.APP_MANAGE_SCRIPTS, {"source": SOURCE}),
    Endpoint("GET", "/apps/{id}/scripts/{name}", C.APP_READ),
    Endpoint("DELETE", "/apps/{id}/scripts/{name}", C.APP_MANAGE_SCRIPTS),
    Endpoint(
        "POST",
        "/apps/{id}/routes",
        C.APP_MANAGE_ROUTES,
        {"method": "POST", "path": "/new", "script": "s"},
    ),
    Endpoint("GET", "/apps/{id}/routes", C.APP_READ),
    Endpoint("DELETE", "/apps/{id}/routes/{route_id}", C.APP_MANAGE_ROUTES),
]

APP_ENDPOINTS = [e for e in ENDPOINTS if e.app_scoped]


async def seed_world(api: Api) -> dict[str, str]:
    """The objects the path templates refer to, in the app ``shop``."""
    user_id, _ = await api.user_id("target")
    await api.script("s")
    await api.script("unused")
    route = await api.route("GET", "/", "s")
    return {"id": api.app_id, "user_id": user_id, "name": "unused", "route_id": route["id"]}
