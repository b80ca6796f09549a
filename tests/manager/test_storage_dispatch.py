"""Storage accounting and the quota through the real dispatcher and sandboxed scripts."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres.documents import PostgresDocumentRepo
from manager_core.postgres.kv import PostgresKvRepo
from manager_core.postgres.storage import PostgresStorageRepo
from manager_core.storage import StorageQuota
from picloud_shared.triggers import CreateKvTrigger, KvOp
from tests.manager.dispatch_world import FAST_RETRY, World, make_world
from tests.manager.storage_helpers import compacted, pending, recount

pytestmark = pytest.mark.anyio

WRITE_OWN_KEY = """
def handle(event, ctx):
    n = event["value"]
    ctx.kv.set("out:" + event["key"], "v" * (n * 37))
    ctx.docs.insert("log", {"n": n, "pad": "p" * n})
    if n % 3 == 0:
        ctx.kv.delete(event["key"])
"""

CATCH_QUOTA = """
def handle(event, ctx):
    try:
        ctx.kv.set("big", "x" * 500)
    except Exception as exc:
        ctx.kv.set("caught", exc.code)
        return exc.code
    return "stored"
"""


def with_quota(world: World, limit: int | None) -> StorageQuota:
    """Give the world's repos (admin writes and scripts) a quota of ``limit`` bytes."""
    quota = StorageQuota(PostgresStorageRepo(world.engine), limit)
    world.kv = PostgresKvRepo(world.engine, world.emitter, quota)
    world.docs = PostgresDocumentRepo(world.engine, world.emitter, quota)
    return quota


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine, gate_size=8) as w:
        yield w


async def test_concurrent_executions_end_with_exact_usage_and_no_reruns(world: World) -> None:
    """60 concurrent executions of one app, each writing its own keys and documents:
    the folded usage equals a recount, and the accounting caused no conflict re-run."""
    quota = with_quota(world, 10 * 1024 * 1024)
    script = await world.script(WRITE_OWN_KEY)
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, script, world.owner, "ev:*", (KvOp.SET,), FAST_RETRY)
    )
    n = 60
    async with world.engine.begin() as conn:
        for i in range(n):
            await world.kv.set(world.app_id, f"ev:{i}", i, conn=conn)
    d1, d2 = world.dispatcher("a"), world.dispatcher("b")
    async with world.running(d1, d2):
        await world.wait_count(
            t.executions, t.executions.c.status == "succeeded", at_least=n, timeout=90
        )
    assert await world.count(t.executions, t.executions.c.status != "succeeded") == 0
    assert d1.metrics.conflict_reruns + d2.metrics.conflict_reruns == 0
    assert await pending(world.engine, world.app_id) > 0
    await quota.storage.compact()
    assert await compacted(world.engine, world.app_id) == await recount(world.engine, world.app_id)


async def test_a_script_catches_storage_quota_exceeded_and_goes_on(world: World) -> None:
    """Past the quota a script's write raises a PicloudError with code
    storage_quota_exceeded it can catch; its transaction stays usable."""
    with_quota(world, len(CATCH_QUOTA) + 100)  # the script's source counts too
    script = await world.script(CATCH_QUOTA)
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, script, world.owner, "go", (), FAST_RETRY)
    )
    await world.kv.set(world.app_id, "go", 1)
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    (row,) = await world.rows(t.executions)
    assert row.result["body"] == "storage_quota_exceeded"
    assert await world.kv_value("caught") == "storage_quota_exceeded"
    assert await world.kv_value("big") is None


async def test_an_uncaught_quota_error_fails_the_execution_and_leaves_no_delta(
    world: World,
) -> None:
    """An execution failing on the quota commits none of its writes and no delta."""
    with_quota(world, 100)
    script = await world.script(
        "def handle(event, ctx):\n    ctx.kv.set('small', 1)\n    ctx.kv.set('big', 'x' * 500)\n"
    )
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, script, world.owner, "go", (), FAST_RETRY)
    )
    await world.kv.set(world.app_id, "go", 1)
    before = await pending(world.engine, world.app_id)
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.status == "dead_lettered")
    (row,) = await world.rows(t.executions)
    assert row.error_message.startswith("StorageQuotaExceeded: the app's storage quota is 100")
    assert await world.kv_value("small") is None
    assert await pending(world.engine, world.app_id) == before


async def test_executions_one_after_another_stop_at_the_quota(world: World) -> None:
    """Executions that run one after another, with the usage read once an hour: each
    one's committed writes count on the node at once, so the fourth is refused
    rather than every one until the next read."""
    source = (
        "def handle(event, ctx):\n"
        "    try:\n"
        "        ctx.kv.set('out:' + event['key'], 'x' * 300)\n"  # 8 + 302 bytes
        "    except Exception as exc:\n"
        "        return exc.code\n"
        "    return 'stored'\n"
    )
    # the script's source counts too
    quota = StorageQuota(PostgresStorageRepo(world.engine), len(source) + 1000, refresh=3600)
    world.kv = PostgresKvRepo(world.engine, world.emitter, quota)
    world.docs = PostgresDocumentRepo(world.engine, world.emitter, quota)
    script = await world.script(source)
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, script, world.owner, "go:*", (KvOp.SET,), FAST_RETRY)
    )
    async with world.running():
        for i in range(1, 6):
            await world.kv.set(world.app_id, f"go:{i}", 1)  # 5 bytes
            await world.wait_count(t.executions, t.executions.c.status == "succeeded", at_least=i)
    answers = sorted((r.result["body"] for r in await world.rows(t.executions)), reverse=True)
    assert answers == ["stored"] * 3 + ["storage_quota_exceeded"] * 2
    assert await recount(world.engine, world.app_id) == 3 * 310 + 5 * 5
