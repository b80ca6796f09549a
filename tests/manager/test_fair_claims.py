"""Claims share their batch between the apps that have rows due, so one app's backlog
never holds up another app's executions (real PostgreSQL; the last test with the
real dispatcher and sandboxed executor)."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres import outbox_claims
from manager_core.postgres.outbox import PostgresOutboxRepo
from picloud_shared.ids import AppId, InboxId
from picloud_shared.triggers import CreateKvTrigger
from tests.manager import factories
from tests.manager.dispatch_world import FAST_RETRY, World, make_world

pytestmark = pytest.mark.anyio


_row = factories.http_row


async def _backlog(engine: AsyncEngine, repo: PostgresOutboxRepo, app: AppId, n: int) -> list[int]:
    """``n`` due rows of ``app``, oldest first; their ids."""
    for _ in range(n):
        await repo.enqueue(_row(app))
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(t.outbox.c.id).where(t.outbox.c.app_id == app))
        return sorted(r.id for r in rows)


async def test_a_late_app_is_served_in_the_first_claim_behind_a_backlog(
    engine: AsyncEngine,
) -> None:
    """App A has 50 rows due, app B two written after them: a claim of 10 takes both
    of B's and makes up its batch with A's oldest eight (two statements)."""
    a, b = await factories.app(engine), await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    a_ids = await _backlog(engine, repo, a, 50)
    b_ids = await _backlog(engine, repo, b, 2)
    claimed = await repo.claim_due("n", 10, 30)
    ids = [c.row.id for c in claimed]
    assert len(ids) == 10
    assert set(b_ids) <= set(ids)
    assert sorted(set(ids) - set(b_ids)) == a_ids[:8]


async def test_apps_share_a_claim_equally_while_each_has_rows(engine: AsyncEngine) -> None:
    """Three apps with a backlog each: a claim of 9 takes three of each, oldest first."""
    apps = [await factories.app(engine) for _ in range(3)]
    repo = PostgresOutboxRepo(engine)
    oldest = {app: (await _backlog(engine, repo, app, 20))[:3] for app in apps}
    claimed = await repo.claim_due("n", 9, 30)
    by_app = Counter(c.row.app_id for c in claimed)
    assert by_app == {app: 3 for app in apps}
    assert {c.row.id for c in claimed} == {i for ids in oldest.values() for i in ids}


async def test_claims_take_turns_round_more_apps_than_a_batch(engine: AsyncEngine) -> None:
    """Five apps with rows due and claims of two: in three claims every app is served
    once before any is served twice."""
    apps = [await factories.app(engine) for _ in range(5)]
    repo = PostgresOutboxRepo(engine)
    for app in apps:
        await _backlog(engine, repo, app, 4)
    served: list[AppId] = []
    for _ in range(3):
        claimed = await repo.claim_due("n", 2, 30)
        assert len(claimed) == 2
        served += [c.row.app_id for c in claimed]
    assert set(apps) <= set(served)
    assert max(Counter(served).values()) == 2  # one app twice: the round wrapped


async def test_a_claim_takes_everything_due_across_apps_then_nothing(
    engine: AsyncEngine,
) -> None:
    """Uneven apps (1, 3 and 30 rows): claims of 16 take 16, 16 and the last two, and
    never a row twice; a sync row of another node's caller is left alone."""
    apps = [await factories.app(engine) for _ in range(3)]
    repo = PostgresOutboxRepo(engine)
    for app, n in zip(apps, (1, 3, 30), strict=True):
        await _backlog(engine, repo, app, n)
    await repo.enqueue(_row(apps[0], reply_to=InboxId(uuid.uuid4()), reply_node="other"))
    sizes, seen = [], []
    for _ in range(4):
        claimed = await repo.claim_due("n", 16, 30)
        sizes.append(len(claimed))
        seen += [c.row.id for c in claimed]
    assert sizes == [16, 16, 2, 0]
    assert len(seen) == len(set(seen)) == 34


async def test_concurrent_claimers_share_apps_without_sharing_a_row(engine: AsyncEngine) -> None:
    """Four nodes claiming over eight apps at once get disjoint rows covering all."""
    apps = [await factories.app(engine) for _ in range(8)]
    repo = PostgresOutboxRepo(engine)
    for app in apps:
        await _backlog(engine, repo, app, 10)
    got: list[int] = []

    async def node(name: str) -> None:
        mine = PostgresOutboxRepo(engine)  # a node of its own: its own turn round the apps
        while batch := await mine.claim_due(name, 3, 30):
            got.extend(c.row.id for c in batch)

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(node, f"node-{i}")
    assert len(got) == len(set(got)) == 80


SLOW = "import time\n\ndef handle(event, ctx):\n    time.sleep(0.05)\n"


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine, gate_size=2) as w:
        yield w


async def test_one_apps_backlog_does_not_hold_up_another_app(world: World) -> None:
    """40 slow executions of one app are due on a gate of two when another app's
    trigger fires: the other app's execution runs within the first claims, not after
    the backlog (oldest-first across the outbox ran it 41st)."""
    busy = world.app_id
    other = (await world.apps.create(f"other-{uuid.uuid4().hex[:6]}", world.owner)).id
    for app in (busy, other):
        script = (await world.scripts.create(app, "slow", SLOW)).id
        await world.triggers.create_kv_trigger(
            CreateKvTrigger(app, script, world.owner, "k:*", (), FAST_RETRY)
        )
    for i in range(40):
        await world.kv.set(busy, f"k:{i}", i)
    await world.kv.set(other, "k:0", 0)
    async with world.running():
        await world.wait_count(
            t.executions, t.executions.c.app_id == other, t.executions.c.status == "succeeded"
        )
        busy_done = await world.count(
            t.executions, t.executions.c.app_id == busy, t.executions.c.status == "succeeded"
        )
    assert busy_done <= 4


async def test_a_claim_that_can_be_served_in_one_statement_is(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One app with a backlog, claims of one row (a nearly full gate): each is one
    statement, not a second one looking for apps past the last; two apps and claims
    of one alternate between them, still one statement each."""
    a, b = await factories.app(engine), await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await _backlog(engine, repo, a, 6)
    statements = 0
    real_fetch = outbox_claims.fetch

    async def counting_fetch(*args: object, **kw: object) -> object:
        nonlocal statements
        statements += 1
        return await real_fetch(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(outbox_claims, "fetch", counting_fetch)
    for _ in range(3):
        assert len(await repo.claim_due("n", 1, 30)) == 1
    assert statements == 3
    await _backlog(engine, repo, b, 3)
    served = [(await repo.claim_due("n", 1, 30))[0].row.app_id for _ in range(2)]
    assert sorted(map(str, served)) == sorted(map(str, (a, b)))
    assert statements == 5
