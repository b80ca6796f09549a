"""The admin API (starlette), mounted by the binary under ``/api/v1/admin``::

    routes = admin_routes(AdminDeps.from_engine(engine))
    app = Starlette(routes=[Mount("/api/v1/admin", routes=routes)])

Every answer is JSON, errors included; unknown paths answer a JSON 404 and
unknown methods on a known path a JSON 405.
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from manager_core.api import apps, documents, executions, kv, routes, scripts, triggers, users
from manager_core.api._endpoint import Access, Operation, Resource, not_found_route
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


__all__ = ["Access", "AdminDeps", "Operation", "Resource", "admin_routes"]
