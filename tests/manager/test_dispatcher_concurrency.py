"""Dispatcher guarantees under concurrency and crashes (real PostgreSQL, real executor)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from picloud_shared.triggers import CreateKvTrigger
from tests.manager.dispatch_world import FAST_RETRY, World, make_world

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parents[2]

COUNT_PER_KEY = """
def handle(event, ctx):
    name = "count:" + event["key"]
    ctx.kv.set(name, (ctx.kv.get(name) or 0) + 1)
"""


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine, gate_size=8) as w:
        yield w


async def fill(world: World, n: int, prefix: str = "ev:") -> None:
    """n admin writes, in batches of one transaction each, each firing one trigger row."""
    async with world.engine.begin() as conn:
        for i in range(n):
            await world.kv.set(world.app_id, f"{prefix}{i}", i, conn=conn)


async def counts(world: World) -> list[int]:
    async with world.engine.connect() as conn:
        rows = await conn.execute(
            sa.select(t.kv_entries.c.value).where(
                t.kv_entries.c.app_id == world.app_id, t.kv_entries.c.key.like("count:%")
            )
        )
        return [r.value for r in rows]


async def test_fifty_concurrent_increments_of_one_counter_end_at_fifty(world: World) -> None:
    """Read-modify-write under concurrency never loses an update (conflicts re-run)."""
    script = await world.script(
        "def handle(event, ctx):\n    ctx.kv.set('counter', (ctx.kv.get('counter') or 0) + 1)\n"
    )
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, script, world.owner, "inc:*", (), FAST_RETRY)
    )
    await fill(world, 50, "inc:")
    d1, d2 = world.dispatcher("a"), world.dispatcher("b")
    async with world.running(d1, d2):
        await world.wait_count(
            t.executions, t.executions.c.status == "succeeded", at_least=50, timeout=60
        )
    assert await world.kv_value("counter") == 50
    rows = await world.rows(t.executions)
    assert all(r.attempts == 1 for r in rows), "a conflict re-run must not count as an attempt"


async def test_executions_in_conflict_rerun_one_at_a_time_not_in_a_storm(world: World) -> None:
    """Sixty increments of one key on one node: once they conflict they re-run in the
    app's lane, one after another, so each re-runs about once (racing, they re-ran
    5-10 times each, and a sync caller could give up first); none is lost."""
    script = await world.script(
        "def handle(event, ctx):\n    ctx.kv.set('counter', (ctx.kv.get('counter') or 0) + 1)\n"
    )
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, script, world.owner, "inc:*", (), FAST_RETRY)
    )
    n = 60
    await fill(world, n, "inc:")
    d = world.dispatcher("a")
    async with world.running(d):
        await world.wait_count(
            t.executions, t.executions.c.status == "succeeded", at_least=n, timeout=60
        )
    assert await world.kv_value("counter") == n
    assert d.metrics.conflict_reruns <= 2 * n, d.metrics.conflict_reruns


async def test_two_dispatchers_never_run_a_row_twice(world: World) -> None:
    """Two dispatchers share 2000 rows: every row runs exactly once."""
    script = await world.script(COUNT_PER_KEY)
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, script, world.owner, "ev:*", (), FAST_RETRY)
    )
    n = 2000
    await fill(world, n)
    d1, d2 = world.dispatcher("a", batch_size=32), world.dispatcher("b", batch_size=32)
    async with world.running(d1, d2):
        await world.wait_count(
            t.executions, t.executions.c.status == "succeeded", at_least=n, timeout=240
        )
    assert sorted(await counts(world)) == [1] * n
    ran = sum(v for (_, outcome), v in d1.metrics.executions.items() if outcome == "succeeded")
    ran += sum(v for (_, outcome), v in d2.metrics.executions.items() if outcome == "succeeded")
    assert ran == n
    assert d1.metrics.claimed > 0
    assert d2.metrics.claimed > 0


async def test_sigkill_mid_batch_then_restart_runs_everything_exactly_once(
    world: World, db_url: str
) -> None:
    """Kill a dispatcher process with SIGKILL while it works; a fresh one finishes the job:
    no event lost, no effect applied twice."""
    script = await world.script(COUNT_PER_KEY + "    import time\n    time.sleep(0.01)\n")
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, script, world.owner, "ev:*", (), FAST_RETRY)
    )
    n = 300
    await fill(world, n)
    proc = await anyio.open_process(
        [sys.executable, "-m", "tests.manager.dispatcher_proc", db_url, "victim"],
        cwd=ROOT,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    async with proc:
        try:
            await world.wait_count(
                t.executions, t.executions.c.status == "succeeded", at_least=40, timeout=60
            )
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    done_at_kill = await world.count(t.executions, t.executions.c.status == "succeeded")
    assert done_at_kill < n, "the victim finished everything before it was killed"
    survivor = world.dispatcher("survivor", lease_seconds=2.0, recover_interval=0.2)
    async with world.running(survivor):
        await world.wait_count(
            t.executions, t.executions.c.status == "succeeded", at_least=n, timeout=120
        )
        await anyio.sleep(0.2)
    assert sorted(await counts(world)) == [1] * n
    assert await world.count(t.outbox) == 0
    assert await world.count(t.dead_letters) == 0
