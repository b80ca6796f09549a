"""What a dead-letter handler receives, through a real dispatcher and executor."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from picloud_shared.events import HttpEvent
from picloud_shared.ids import RouteId, new_execution_id
from picloud_shared.outbox import HttpDispatchPayload, NewOutboxRow, OutboxSourceKind
from picloud_shared.retry import Backoff, RetryPolicy
from picloud_shared.triggers import CreateDeadLetterTrigger
from tests.manager.dispatch_world import World, make_world

pytestmark = pytest.mark.anyio

ONCE = RetryPolicy(Backoff.CONSTANT, 10, 10, 1, 0.0)
EVENT = HttpEvent("POST", "/orders/7", {"id": "7"}, {"q": "1"}, {"x-a": "b"}, '{"n": 1}', {"n": 1})
ORDERS = """
def handle(event, ctx):
    if not ctx.kv.get("allow"):
        raise RuntimeError("not yet")
    ctx.kv.set("ran", event)
"""
KEEP = """
def handle(event, ctx):
    ctx.kv.set("dead", event)
"""


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine) as w:
        yield w


async def test_an_http_dead_letter_carries_the_route_event(world: World) -> None:
    """An async request whose script raises: the handler's ``event["event"]`` is the
    route event the script got (no ``kind``, no ``route_id``); replayed, the request
    runs again with that same event."""
    script = await world.script(ORDERS)
    route = await world.route(script, "/orders/{id}", method="POST", dispatch_mode="async")
    handler = await world.script(KEEP)
    await world.triggers.create_dead_letter_trigger(
        CreateDeadLetterTrigger(world.app_id, handler, world.owner, (OutboxSourceKind.HTTP,))
    )
    await world.outbox.enqueue(
        NewOutboxRow(
            execution_id=new_execution_id(),
            app_id=world.app_id,
            source_kind=OutboxSourceKind.HTTP,
            payload=HttpDispatchPayload(RouteId(route), EVENT.to_wire()).to_wire(),
            script_id=script,
            route_id=RouteId(route),
            retry=ONCE,
        )
    )
    async with world.running():
        await world.wait_count(t.dead_letters, t.dead_letters.c.resolution == "handled")
        dead = await world.kv_value("dead")
        assert (dead["kind"], dead["source_kind"]) == ("dead_letter", "http")
        assert dead["event"] == EVENT.to_script()
        await world.kv.set(world.app_id, "allow", True)
        repo = PostgresDeadLetterRepo(world.engine, world.outbox, world.emitter)
        (letter,) = await world.rows(t.dead_letters)
        await repo.replay(world.app_id, letter.id)

        async def ran() -> bool:
            return await world.kv_value("ran") is not None

        await world.wait_for(ran)
    assert await world.kv_value("ran") == EVENT.to_script()
