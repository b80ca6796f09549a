"""The admin API (starlette), mounted by the binary under ``/api/v1/admin``::

    app = Starlette(routes=[admin_mount(AdminDeps.from_engine(engine))])

Every answer is JSON, errors included; unknown paths answer a JSON 404 and
unknown methods on a known path a JSON 405.
"""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount

from manager_core.api import apps, documents, executions, kv, routes, scripts, triggers, users
from manager_core.api._endpoint import (
    Access,
    Operation,
    Resource,
    match_any_text,
    not_found_route,
)
from manager_core.api._http import ADMIN_PREFIX
from manager_core.api.deps import AdminDeps


def admin_routes(deps: AdminDeps) -> list[BaseRoute]:
    """Every admin endpoint, ending with the JSON 404 catch-all."""
    resources: list[Resource] = [
        *users.resources(deps),
        *apps.resources(deps),
        *scripts.resources(deps),
        *routes.resources(deps),
        *triggers.resources(deps),
        *kv.resources(deps),
        *documents.resources(deps),
        *executions.resources(deps),
    ]
    return [*resources, not_found_route(deps)]


def admin_mount(deps: AdminDeps, prefix: str = ADMIN_PREFIX) -> Mount:
    """The admin API mounted under ``prefix``: every path below it, line breaks
    included, reaches :func:`admin_routes`."""
    return match_any_text(Mount(prefix, routes=admin_routes(deps)))


__all__ = [
    "ADMIN_PREFIX",
    "Access",
    "AdminDeps",
    "Operation",
    "Resource",
    "admin_mount",
    "admin_routes",
]
