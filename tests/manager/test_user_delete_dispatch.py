"""A deleted user's routes and triggers stay, and no longer run: their executions end
``principal_revoked`` (the dispatcher end to end, real PostgreSQL and executor)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from picloud_shared.events import HttpEvent
from picloud_shared.ids import RouteId, new_execution_id
from picloud_shared.outbox import HttpDispatchPayload, NewOutboxRow, OutboxSourceKind
from picloud_shared.principals import ALL_CAPABILITIES
from picloud_shared.triggers import CreateKvTrigger
from tests.manager.dispatch_world import FAST_RETRY, World, make_world

pytestmark = pytest.mark.anyio

WRITE = "def handle(event, ctx):\n    ctx.kv.set('ran', True)\n"


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine) as w:
        # another manager of the app, so that its owner may be deleted
        heir, _ = await w.users.create_user("heir")
        await w.apps.set_capabilities(w.app_id, heir.id, ALL_CAPABILITIES)
        yield w


async def test_a_deleted_users_kv_trigger_ends_principal_revoked(world: World) -> None:
    """The trigger stays (registered_by NULL) and still fans out; its execution is
    dead-lettered as principal_revoked on the first attempt, the script not run."""
    script = await world.script(WRITE)
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, script, world.owner, "k", (), FAST_RETRY)
    )
    await world.users.delete(world.owner)
    (trigger,) = await world.rows(t.triggers)
    assert trigger.registered_by_principal is None
    await world.kv.set(world.app_id, "k", 1)
    async with world.running():
        await world.wait_count(t.dead_letters)
    (dl,) = await world.rows(t.dead_letters)
    assert (dl.error_kind, dl.attempts) == ("principal_revoked", 0)
    assert "no longer exists" in dl.error_message
    assert await world.kv_value("ran") is None


async def test_a_deleted_users_async_route_ends_principal_revoked(world: World) -> None:
    """An async request to a route the deleted user registered: the execution ends
    principal_revoked, the script not run."""
    script = await world.script(WRITE)
    route = await world.route(script, "/later", method="POST", dispatch_mode="async")
    await world.users.delete(world.owner)
    await world.outbox.enqueue(
        NewOutboxRow(
            execution_id=new_execution_id(),
            app_id=world.app_id,
            source_kind=OutboxSourceKind.HTTP,
            payload=HttpDispatchPayload(
                RouteId(route), HttpEvent("POST", "/later").to_wire()
            ).to_wire(),
            script_id=script,
            route_id=RouteId(route),
        )
    )
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.finished_at.is_not(None))
    (execution,) = await world.rows(t.executions)
    assert execution.error_kind == "principal_revoked"
    assert "no longer exists" in execution.error_message
    assert await world.kv_value("ran") is None
