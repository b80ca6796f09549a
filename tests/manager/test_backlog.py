"""``OutboxBacklog``: an app's async requests are admitted while it has fewer than
``limit`` executions in the outbox, counted in PostgreSQL (every node's rows) and,
between counts, by what this node admits."""

from __future__ import annotations

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.backlog import OutboxBacklog
from manager_core.postgres.outbox import PostgresOutboxRepo
from picloud_shared.ids import AppId
from tests.manager import factories

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _queue(engine: AsyncEngine, app: AppId, n: int) -> None:
    repo = PostgresOutboxRepo(engine)
    for _ in range(n):
        await repo.enqueue(factories.http_row(app))


async def test_admits_up_to_the_limit_then_counts_the_outbox(engine: AsyncEngine) -> None:
    """Three admitted, the fourth refused; a count of an empty outbox admits again;
    a count that finds the limit refuses, one below it admits exactly one more."""
    app = await factories.app(engine)
    backlog = OutboxBacklog(engine, 3)
    assert [backlog.admit(app) for _ in range(4)] == [True, True, True, False]
    assert backlog.refusals == 1
    await backlog.refresh()  # nothing was written: the outbox is empty
    assert backlog.admit(app)
    await _queue(engine, app, 3)
    await backlog.refresh()
    assert not backlog.admit(app)
    assert backlog.refusals == 2
    await _queue(engine, AppId(await factories.app(engine)), 5)  # another app's rows
    other = await factories.app(engine)
    assert backlog.admit(other)  # each app has its own count


async def test_rows_of_every_kind_count_but_only_up_to_the_limit(engine: AsyncEngine) -> None:
    """The count covers any node's rows (written here by another repo) and stops at
    the limit: an app far past it is simply full."""
    app = await factories.app(engine)
    backlog = OutboxBacklog(engine, 2)
    assert backlog.admit(app)
    await _queue(engine, app, 7)
    await backlog.refresh()
    assert backlog.queued(app) == 2  # counted no further than the limit
    assert not backlog.admit(app)
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM outbox WHERE app_id = :a"), {"a": app})
    await backlog.refresh()
    assert [backlog.admit(app) for _ in range(3)] == [True, True, False]


async def test_apps_quiet_for_a_while_are_forgotten(engine: AsyncEngine) -> None:
    """An app that has not asked within ``active_for`` is not counted any more (and
    starts from what this node admits when it asks again)."""
    app = await factories.app(engine)
    clock = Clock()
    backlog = OutboxBacklog(engine, 1, active_for=30, clock=clock)
    await _queue(engine, app, 1)
    assert backlog.admit(app)  # not counted yet
    await backlog.refresh()
    assert not backlog.admit(app)
    clock.now += 31
    await backlog.refresh()  # quiet for 31 s: forgotten, not counted
    assert backlog.admit(app)
    assert not backlog.admit(app)


async def test_limit_zero_admits_everything_and_run_counts_nothing(engine: AsyncEngine) -> None:
    app = await factories.app(engine)
    backlog = OutboxBacklog(engine, 0)
    assert all(backlog.admit(app) for _ in range(100))
    with anyio.fail_after(5):
        await backlog.run()  # returns at once


async def test_run_refreshes_until_stopped(engine: AsyncEngine) -> None:
    """The task counts every ``interval``; ``stop`` ends it."""
    app = await factories.app(engine)
    backlog = OutboxBacklog(engine, 5, interval=0.05)
    assert backlog.admit(app)
    assert backlog.queued(app) == 1
    await _queue(engine, app, 3)
    async with anyio.create_task_group() as tg:
        await tg.start(backlog.run)
        with anyio.fail_after(5):
            while backlog.queued(app) != 3:  # noqa: ASYNC110 - no event to wait on
                await anyio.sleep(0.02)
        backlog.stop()
