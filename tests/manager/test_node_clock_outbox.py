"""The outbox's times are the database's: a retry's backoff and a give-back are due
their delay after PostgreSQL's ``now()``, whatever the clock of the node that wrote
them (``tests.manager.node_clock``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres.outbox import PostgresOutboxRepo
from picloud_shared.retry import Backoff, RetryPolicy
from picloud_shared.triggers import CreateKvTrigger
from tests.manager import factories
from tests.manager.dispatch_world import World, make_world
from tests.manager.node_clock import db_now, skew_node_clock

pytestmark = pytest.mark.anyio

# Far ahead and far behind the database.
SKEWS = pytest.mark.parametrize(
    "skew", [timedelta(days=1), -timedelta(days=1)], ids=["ahead", "behind"]
)
# What a statement of this test may take, at most, on a slow machine.
SLACK = timedelta(seconds=5)


async def stored_run_at(engine: AsyncEngine, row_id: int) -> datetime:
    (row,) = await factories.rows(engine, t.outbox, t.outbox.c.id == row_id)
    run_at: datetime = row.run_at
    return run_at


@SKEWS
async def test_a_reschedule_is_due_its_delay_after_the_databases_now(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, skew: timedelta
) -> None:
    """A row rescheduled by a node whose clock is a day off is due ``delay`` after
    the database's now(): not at once (clock behind), not a day late (clock ahead)."""
    skew_node_clock(monkeypatch, skew)
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(factories.http_row(app))
    (c,) = await repo.claim_due("n", 1, 30)

    before = await db_now(engine)
    await repo.reschedule(c.row.id, delay_ms=60_000)
    after = await db_now(engine)
    run_at = await stored_run_at(engine, c.row.id)
    assert before + timedelta(minutes=1) <= run_at <= after + timedelta(minutes=1)
    assert await repo.claim_due("n", 1, 30) == []  # not due yet

    async with engine.begin() as conn:  # make it due again, claimed
        await conn.execute(sa.update(t.outbox).values(run_at=sa.func.now()))
    (c,) = await repo.claim_due("n", 1, 30)
    await repo.reschedule(c.row.id, delay_ms=200)
    await anyio.sleep(0.4)
    assert [x.row.id for x in await repo.claim_due("n", 1, 30)] == [c.row.id]  # due now


@SKEWS
async def test_a_give_back_is_due_its_delay_after_the_databases_now(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, skew: timedelta
) -> None:
    """A row given back (saturation, shutdown) by a node whose clock is a day off is
    due ``delay`` after the database's now(); given back without a delay, at once."""
    skew_node_clock(monkeypatch, skew)
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(factories.http_row(app))
    (c,) = await repo.claim_due("n", 1, 30)

    before = await db_now(engine)
    await repo.give_back(c.row.id, c.token, delay_ms=60_000)
    after = await db_now(engine)
    run_at = await stored_run_at(engine, c.row.id)
    assert before + timedelta(minutes=1) <= run_at <= after + timedelta(minutes=1)
    assert await repo.claim_due("n", 1, 30) == []

    async with engine.begin() as conn:
        await conn.execute(sa.update(t.outbox).values(run_at=sa.func.now()))
    (c,) = await repo.claim_due("n", 1, 30)
    await repo.give_back(c.row.id, c.token)
    assert [x.row.id for x in await repo.claim_due("n", 1, 30)] == [c.row.id]


FAIL = """
def handle(event, ctx):
    raise RuntimeError("always broken")
"""


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine) as w:
        yield w


@SKEWS
async def test_retries_are_spaced_by_the_policy_whatever_the_nodes_clock(
    world: World, monkeypatch: pytest.MonkeyPatch, skew: timedelta
) -> None:
    """The audit's case end to end: a failing trigger (3 attempts, 400 ms apart) run
    by a dispatcher whose clock is a day off is dead-lettered after its two delays,
    not at once (clock behind) and not a day later (clock ahead)."""
    skew_node_clock(monkeypatch, skew)
    script = await world.script(FAIL)
    policy = RetryPolicy(Backoff.CONSTANT, 400, 400, 3, 0.0)
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, script, world.owner, "job:*", (), policy)
    )
    await world.kv.set(world.app_id, "job:1", 1)
    async with world.running():
        await world.wait_count(t.dead_letters, timeout=20)
    (letter,) = await world.rows(t.dead_letters)
    (execution,) = await world.rows(t.executions)
    assert letter.attempts == 3
    took = letter.created_at - execution.started_at  # both by the database's clock
    assert timedelta(milliseconds=800) <= took < SLACK + timedelta(milliseconds=800)


def test_the_skew_reaches_the_modules_that_read_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The helper does skew the node: the orchestrator's 202 body reads the clock."""
    from orchestrator_core import routes

    skew_node_clock(monkeypatch, timedelta(days=1))
    assert routes.datetime.now(UTC) - datetime.now(UTC) > timedelta(hours=23)
