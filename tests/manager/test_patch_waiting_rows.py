"""A trigger changed (``PostgresTriggerRepo.update``) while its executions wait: the
real dispatcher runs each with what it was fired with. Real PostgreSQL, real
sandboxed executor."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres.triggers import TriggerChanges
from picloud_shared.retry import Backoff, RetryPolicy
from picloud_shared.triggers import CreateKvTrigger
from tests.manager.dispatch_world import World, make_world

pytestmark = pytest.mark.anyio

OLD = """
def handle(event, ctx):
    raise RuntimeError("the old script")
"""
NEW = """
def handle(event, ctx):
    ctx.kv.set("seen/" + event["key"], ["new", ctx.attempt])
"""


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine) as w:
        yield w


async def test_rows_fired_before_a_patch_run_as_they_were_fired(world: World) -> None:
    """An event fired before the PATCH runs the old script under the old policy (two
    attempts, then a dead letter of the old script); one fired after it runs the new
    script. The trigger itself still exists, so neither is "no longer exists"."""
    old = await world.script(OLD, name="old")
    new = await world.script(NEW, name="new")
    two_tries = RetryPolicy(Backoff.CONSTANT, 10, 10, 2, 0.0)
    trigger = await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, old, world.owner, "job/*", (), two_tries)
    )
    await world.kv.set(world.app_id, "job/1", 1)  # waits: no dispatcher runs yet
    patched = await world.triggers.update(
        world.app_id,
        trigger.id,
        TriggerChanges(script_id=new, retry=RetryPolicy(Backoff.CONSTANT, 10, 10, 5, 0.0)),
        registered_by_principal=world.owner,
    )
    assert patched is not None
    assert (patched[0].script_id, patched[1]) == (new, "new")
    await world.kv.set(world.app_id, "job/2", 2)
    async with world.running():
        await world.wait_count(t.dead_letters)
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    (letter,) = await world.rows(t.dead_letters)
    assert letter.payload["key"] == "job/1"
    assert (letter.script_id, letter.attempts) == (old, 2)
    assert "the old script" in letter.error_message
    assert await world.kv_value("seen/job/2") == ["new", 1]
    assert await world.kv_value("seen/job/1") is None
    assert await world.count(t.outbox) == 0
