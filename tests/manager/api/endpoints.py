"""Every admin endpoint, with who may call it and a sample body that succeeds.

The capability matrix (``test_capability_matrix.py``) runs over this table, and a
completeness test checks it against ``admin_routes``: a new endpoint must be
appended here. Path templates are filled from the world ``seed_world`` builds:
``{id}`` (the app), ``{user_id}`` (a user to manage: "target", a member of the app
holding ``app_manage_members`` alone), ``{name}`` (a script),
``{route_id}`` (a route), ``{trigger_id}``, ``{key}``, ``{collection}``/``{doc_id}``,
``{execution_id}`` and ``{dl_id}``.
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs
import sqlalchemy as sa

from manager_core import tables as t
from manager_core.api import Access
from manager_core.postgres.outbox import PostgresOutboxRepo
from picloud_shared.ids import AppId, ExecutionId, new_execution_id
from picloud_shared.outbox import NewOutboxRow, OutboxSourceKind
from picloud_shared.principals import Capability
from tests.manager.api.helpers import SOURCE, Api


@attrs.frozen
class Endpoint:
    method: str
    path: str
    access: Capability | Access
    body: Any = None
    also: frozenset[Capability] = frozenset()  # needed besides ``access``
    # ``Access.ANY_USER`` on one's own ``{user_id}`` only; an instance admin on anyone's.
    own_user_only: bool = False

    @property
    def required(self) -> frozenset[Capability]:
        """Every capability an app endpoint needs."""
        assert isinstance(self.access, Capability)
        return self.also | {self.access}

    @property
    def app_scoped(self) -> bool:
        return isinstance(self.access, Capability)

    def url(self, world: dict[str, str]) -> str:
        return self.path.replace(":path}", "}").format(**world)

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


C = Capability
ENDPOINTS: list[Endpoint] = [
    Endpoint("POST", "/users", Access.INSTANCE_ADMIN, {"name": "newbie"}),
    Endpoint("GET", "/users", Access.INSTANCE_ADMIN),
    Endpoint("GET", "/users/me", Access.ANY_USER),
    Endpoint("PATCH", "/users/{user_id}", Access.INSTANCE_ADMIN, {"instance_admin": True}),
    Endpoint("DELETE", "/users/{user_id}", Access.INSTANCE_ADMIN),
    Endpoint("POST", "/users/{user_id}/token", Access.ANY_USER, own_user_only=True),
    Endpoint("POST", "/apps", Access.ANY_USER, {"name": "new-app"}),
    Endpoint("GET", "/apps", Access.ANY_USER),
    Endpoint("GET", "/apps/{id}", C.APP_READ),
    Endpoint("DELETE", "/apps/{id}", C.APP_DELETE),
    Endpoint("GET", "/apps/{id}/members", C.APP_READ),
    Endpoint("GET", "/apps/{id}/members/{user_id}", C.APP_READ),
    Endpoint(
        "PUT",
        "/apps/{id}/members/{user_id}",
        C.APP_MANAGE_MEMBERS,
        {"capabilities": ["app_manage_members"]},
    ),
    Endpoint("DELETE", "/apps/{id}/members/{user_id}", C.APP_MANAGE_MEMBERS),
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
    Endpoint("GET", "/apps/{id}/routes/{route_id}", C.APP_READ),
    Endpoint(
        "PATCH",
        "/apps/{id}/routes/{route_id}",
        C.APP_MANAGE_ROUTES,
        {"script": "s", "dispatch_mode": "async"},
    ),
    Endpoint("DELETE", "/apps/{id}/routes/{route_id}", C.APP_MANAGE_ROUTES),
    Endpoint(
        "POST",
        "/apps/{id}/triggers/kv",
        C.APP_MANAGE_TRIGGERS,
        {"script": "s", "key_glob": "orders/*"},
        frozenset({C.APP_READ_DATA}),
    ),
    Endpoint(
        "POST",
        "/apps/{id}/triggers/docs",
        C.APP_MANAGE_TRIGGERS,
        {"script": "s", "collection_glob": "orders"},
        frozenset({C.APP_READ_DATA}),
    ),
    Endpoint(
        "POST",
        "/apps/{id}/triggers/dead-letter",
        C.APP_MANAGE_TRIGGERS,
        {"script": "s"},
        frozenset({C.APP_READ_DATA}),
    ),
    Endpoint("GET", "/apps/{id}/triggers", C.APP_READ),
    Endpoint("GET", "/apps/{id}/triggers/{trigger_id}", C.APP_READ),
    Endpoint(
        "PATCH",
        "/apps/{id}/triggers/{trigger_id}",
        C.APP_MANAGE_TRIGGERS,
        {"script": "s", "key_glob": "y/*", "ops": ["set"], "retry": {"max_attempts": 2}},
        frozenset({C.APP_READ_DATA}),
    ),
    Endpoint("DELETE", "/apps/{id}/triggers/{trigger_id}", C.APP_MANAGE_TRIGGERS),
    Endpoint("GET", "/apps/{id}/kv", C.APP_READ_DATA),
    Endpoint("PUT", "/apps/{id}/kv/{key:path}", C.APP_WRITE_DATA, {"v": 2}),
    Endpoint("GET", "/apps/{id}/kv/{key:path}", C.APP_READ_DATA),
    Endpoint("DELETE", "/apps/{id}/kv/{key:path}", C.APP_WRITE_DATA),
    Endpoint("POST", "/apps/{id}/docs/{collection}", C.APP_WRITE_DATA, {"a": 1}),
    Endpoint("GET", "/apps/{id}/docs/{collection}", C.APP_READ_DATA),
    Endpoint("PUT", "/apps/{id}/docs/{collection}/{doc_id:path}", C.APP_WRITE_DATA, {"a": 2}),
    Endpoint("GET", "/apps/{id}/docs/{collection}/{doc_id:path}", C.APP_READ_DATA),
    Endpoint("DELETE", "/apps/{id}/docs/{collection}/{doc_id:path}", C.APP_WRITE_DATA),
    Endpoint("GET", "/apps/{id}/executions", C.APP_READ),
    Endpoint("GET", "/apps/{id}/executions/{execution_id}", C.APP_READ),
    Endpoint("GET", "/apps/{id}/dead-letters", C.APP_READ),
    Endpoint("GET", "/apps/{id}/dead-letters/{dl_id}", C.APP_READ),
    Endpoint("POST", "/apps/{id}/dead-letters/{dl_id}/replay", C.APP_MANAGE_DEAD_LETTERS),
    Endpoint("POST", "/apps/{id}/dead-letters/{dl_id}/resolve", C.APP_MANAGE_DEAD_LETTERS),
]

APP_ENDPOINTS = [e for e in ENDPOINTS if e.app_scoped]


async def seed_world(api: Api) -> dict[str, str]:
    """The objects the path templates refer to, in the app ``shop``."""
    user_id, _ = await api.user_id("target")
    member = {"capabilities": ["app_manage_members"]}
    await api.call("PUT", f"/apps/{api.app_id}/members/{user_id}", api.root, member)
    await api.script("s")
    await api.script("unused")
    route = await api.route("GET", "/", "s")
    trigger = await api.call(
        "POST", f"/apps/{api.app_id}/triggers/kv", api.root, {"script": "s", "key_glob": "x/*"}
    )
    app_id = AppId(uuid.UUID(api.app_id))
    await api.deps.kv.set(app_id, "a/b", 1)
    await api.deps.documents.insert(app_id, "things", {"a": 1}, "d1")
    execution_id = await enqueue_execution(api)
    dl_id = await insert_dead_letter(api, execution_id)
    return {
        "id": api.app_id,
        "user_id": user_id,
        "name": "unused",
        "route_id": route["id"],
        "trigger_id": trigger.json()["id"],
        "key": "a/b",
        "collection": "things",
        "doc_id": "d1",
        "execution_id": str(execution_id),
        "dl_id": str(dl_id),
    }


async def enqueue_execution(api: Api, app_id: str | None = None) -> ExecutionId:
    """A queued HTTP execution in the app (default: shop), through the real outbox."""
    execution_id = new_execution_id()
    await PostgresOutboxRepo(api.deps.users._engine).enqueue(
        NewOutboxRow(
            execution_id=execution_id,
            app_id=AppId(uuid.UUID(app_id or api.app_id)),
            source_kind=OutboxSourceKind.HTTP,
            payload={"method": "GET", "path": "/"},
        )
    )
    return execution_id


async def insert_dead_letter(api: Api, execution_id: ExecutionId, **values: Any) -> uuid.UUID:
    """A dead letter of ``execution_id`` in shop, as the dispatcher would leave it: of a
    kv trigger (and script) made for it, so that it can be replayed; ``values`` override
    columns."""
    if "trigger_id" not in values:
        script = await api.script(f"dl-{uuid.uuid4().hex[:8]}")
        trigger = await api.call(
            "POST",
            f"/apps/{api.app_id}/triggers/kv",
            api.root,
            {"script": script["name"], "key_glob": "dl/*"},
        )
        values = {"trigger_id": trigger.json()["id"], "script_id": script["id"], **values}
    async with api.deps.users._engine.begin() as conn:
        stmt = sa.insert(t.dead_letters).values(
            {
                "app_id": uuid.UUID(api.app_id),
                "execution_id": execution_id,
                "source_kind": "kv",
                "payload": {"kind": "kv", "key": "k", "op": "set", "value": 1, "prev_value": None},
                "attempts": 5,
                "error_kind": "uncaught_exception",
                "error_message": "boom",
                **values,
            }
        )
        return (await conn.execute(stmt.returning(t.dead_letters.c.id))).scalar_one()
