"""The heartbeat renews only the leases its node still holds, by the database's clock."""

from __future__ import annotations

from datetime import timedelta

import anyio
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres.outbox import ClaimedRow, PostgresOutboxRepo
from picloud_shared.triggers import CreateKvTrigger
from tests.manager import factories
from tests.manager.dispatch_world import FAST_RETRY, make_world
from tests.manager.node_clock import db_now, skew_node_clock

pytestmark = pytest.mark.anyio


async def _released_claim(engine: AsyncEngine, repo: PostgresOutboxRepo) -> ClaimedRow:
    """A claim of a new row whose lease ran out and that lease recovery released."""
    await repo.enqueue(factories.http_row(await factories.app(engine)))
    (claim,) = await repo.claim_due("n", 1, 0.05)
    await anyio.sleep(0.2)
    assert await repo.recover_expired() == 1
    return claim


async def test_a_renewal_leaves_alone_a_row_another_claim_owns_now(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node whose lease ran out (and whose row another node claimed since) renews
    nothing: the new owner's lease stays as it is. The owner's own renewal extends
    it, to the database's now() + the lease, whatever the node's clock."""
    skew_node_clock(monkeypatch, -timedelta(days=1))
    repo = PostgresOutboxRepo(engine)
    mine = await _released_claim(engine, repo)
    (theirs,) = await repo.claim_due("other", 1, 30)
    assert theirs.row.id == mine.row.id
    (before,) = await factories.rows(engine, t.outbox)

    assert await repo.renew_leases({mine.row.id: mine.token}, 3600) == 0

    (after,) = await factories.rows(engine, t.outbox)
    assert (after.claimed_by, after.claimed_until) == (theirs.token, before.claimed_until)

    start = await db_now(engine)
    assert await repo.renew_leases({theirs.row.id: theirs.token}, 3600) == 1
    end = await db_now(engine)
    (renewed,) = await factories.rows(engine, t.outbox)
    assert start + timedelta(hours=1) <= renewed.claimed_until <= end + timedelta(hours=1)


async def test_a_renewal_renews_each_row_under_its_own_token(engine: AsyncEngine) -> None:
    """Rows of several claims renew together; a row with a stale token among them
    does not."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    for _ in range(3):
        await repo.enqueue(factories.http_row(app))
    first = await repo.claim_due("n", 2, 30)
    (last,) = await repo.claim_due("n", 1, 30)
    assert first[0].token != last.token
    leases = {c.row.id: c.token for c in first} | {last.row.id: "n/stale"}
    assert await repo.renew_leases(leases, 3600) == 2


async def test_a_renewal_needs_the_claim_tokens(engine: AsyncEngine) -> None:
    """Row ids alone are refused: without its token a renewal could extend the lease
    of a row's new owner."""
    with pytest.raises(TypeError, match="token"):
        await PostgresOutboxRepo(engine).renew_leases([1, 2], 30)  # type: ignore[arg-type]


SLOW = "import time\n\ndef handle(event, ctx):\n    time.sleep(2.0)\n"


async def test_the_heartbeat_keeps_a_long_execution_its_lease(engine: AsyncEngine) -> None:
    """A dispatcher whose execution outlives several leases (0.9 s each) renews it
    under its claim's token: the row never comes back, and runs once."""
    async with make_world(engine) as world:
        script = await world.script(SLOW)
        await world.triggers.create_kv_trigger(
            CreateKvTrigger(world.app_id, script, world.owner, "job:*", (), FAST_RETRY)
        )
        await world.kv.set(world.app_id, "job:1", 1)
        dispatcher = world.dispatcher(lease_seconds=0.9, recover_interval=0.1)
        async with world.running(dispatcher):
            await world.wait_count(t.executions, t.executions.c.status == "succeeded")
        (execution,) = await world.rows(t.executions)
    assert execution.attempts == 1
    assert dispatcher.metrics.claimed + dispatcher.metrics.handed_off == 1


async def test_a_renewal_skips_a_row_a_running_execution_holds_and_blocks_nobody(
    engine: AsyncEngine,
) -> None:
    """An execution locks its row from its first host call to its commit. The
    heartbeat renews the node's other rows at once instead of waiting for that
    commit, and holds none of them locked meanwhile: another execution's first host
    call on one of them is not queued behind a long script (an audit saw 504s and
    false dead letters from exactly that)."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    for _ in range(3):
        await repo.enqueue(factories.http_row(app))
    long, other, third = await repo.claim_due("n", 3, 30)
    leases = {c.row.id: c.token for c in (long, other, third)}
    async with engine.connect() as holder, holder.begin():
        assert await repo.take(long.row.id, long.token, long.row.attempt_count, conn=holder)
        with anyio.fail_after(5):
            assert await repo.renew_leases(leases, 3600) == 2  # the held one skipped
            async with engine.connect() as runner, runner.begin():
                assert await repo.take(
                    other.row.id, other.token, other.row.attempt_count, conn=runner
                )
    rows = {r.id: r for r in await factories.rows(engine, t.outbox)}
    assert rows[long.row.id].claimed_until < rows[other.row.id].claimed_until


async def test_a_row_recovery_released_under_a_running_execution_is_still_its_runners(
    engine: AsyncEngine,
) -> None:
    """Its lease ran out while its execution held it (the heartbeat skipped it), and
    recovery released it once the execution rolled back: its runner takes it again to
    book the outcome, as long as no other claim took it since."""
    repo = PostgresOutboxRepo(engine)
    mine = await _released_claim(engine, repo)
    async with engine.connect() as conn, conn.begin():
        assert await repo.take(mine.row.id, mine.token, mine.row.attempt_count, conn=conn)
    (theirs,) = await repo.claim_due("other", 1, 30)
    async with engine.connect() as conn, conn.begin():
        assert not await repo.take(mine.row.id, mine.token, mine.row.attempt_count, conn=conn)
        assert await repo.take(theirs.row.id, theirs.token, theirs.row.attempt_count, conn=conn)


async def test_a_row_recovery_released_under_its_execution_is_given_back_uncounted(
    engine: AsyncEngine,
) -> None:
    """A stopping node gives back a row whose lease ran out under its running
    execution, and that recovery released meanwhile: the cut-off run is still not
    counted (no other claim took the row since). A row another claim took is left
    to that claim."""
    repo = PostgresOutboxRepo(engine)
    mine = await _released_claim(engine, repo)
    await repo.give_back(mine.row.id, mine.token, attempt_count=mine.row.attempt_count)
    (again,) = await repo.claim_due("other", 1, 30)
    assert again.row.attempt_count == 1  # the given-back claim did not count
    await repo.give_back(mine.row.id, mine.token, attempt_count=mine.row.attempt_count)
    (row,) = await factories.rows(engine, t.outbox)
    assert (row.claimed_by, row.attempt_count) == (again.token, 1)
