"""PostgresOutboxRepo: enqueue, claim with SKIP LOCKED and leases, reschedule, release,
and the wake-up signal."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres.outbox import OutboxSignal, PostgresOutboxRepo
from picloud_shared.errors import NotFound
from picloud_shared.execution import ExecError, ExecResult
from picloud_shared.ids import AppId, InboxId, new_execution_id
from picloud_shared.outbox import NewOutboxRow, OutboxSourceKind
from picloud_shared.ports import OutboxRepo, OutboxWriter
from picloud_shared.retry import Backoff, RetryPolicy
from picloud_shared.status import ExecErrorKind
from tests.manager import factories

pytestmark = pytest.mark.anyio


def _row(app: AppId, **kw: object) -> NewOutboxRow:
    return NewOutboxRow(
        execution_id=new_execution_id(),
        app_id=app,
        source_kind=OutboxSourceKind.HTTP,
        payload={"route_id": str(uuid.uuid4()), "event": {}},
        **kw,  # type: ignore[arg-type]
    )


async def test_one_object_is_both_views(engine: AsyncEngine) -> None:
    """PostgresOutboxRepo satisfies both OutboxWriter and OutboxRepo."""
    repo = PostgresOutboxRepo(engine)
    assert isinstance(repo, OutboxWriter)
    assert isinstance(repo, OutboxRepo)


async def test_enqueue_writes_row_and_queued_execution(engine: AsyncEngine) -> None:
    """enqueue stores the row as given plus a queued execution, then wakes."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    policy = RetryPolicy(Backoff.LINEAR, 1, 2, 3, 0.1)
    new = _row(app, reply_to=InboxId(uuid.uuid4()), reply_node="n1", trigger_depth=2, retry=policy)
    await repo.enqueue(new)
    assert repo.signal.pending
    (claimed,) = await repo.claim_due("n1", 10, 30)
    assert (claimed.execution_id, claimed.payload, claimed.reply_to) == (
        new.execution_id,
        new.payload,
        new.reply_to,
    )
    assert (claimed.retry, claimed.trigger_depth, claimed.reply_node) == (policy, 2, "n1")
    (execution,) = await factories.rows(engine, t.executions)
    assert (execution.id, execution.status, execution.source_kind) == (
        new.execution_id,
        "queued",
        "http",
    )


async def test_enqueue_for_a_missing_app_is_not_found(engine: AsyncEngine) -> None:
    """An app that does not exist raises NotFound and writes nothing."""
    with pytest.raises(NotFound):
        await PostgresOutboxRepo(engine).enqueue(_row(AppId(uuid.uuid4())))
    assert await factories.rows(engine, t.outbox) == []


async def test_enqueue_tolerates_a_vanished_route(engine: AsyncEngine) -> None:
    """A route id that no longer exists stays on the outbox row; the record's is NULL."""
    app = await factories.app(engine)
    route_id = uuid.uuid4()
    await PostgresOutboxRepo(engine).enqueue(_row(app, route_id=route_id))
    (row,) = await factories.rows(engine, t.outbox)
    (execution,) = await factories.rows(engine, t.executions)
    assert (row.route_id, execution.route_id) == (route_id, None)


async def test_future_rows_are_not_due(engine: AsyncEngine) -> None:
    """A row with run_at in the future is not claimed."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(_row(app, run_at=datetime.now(UTC) + timedelta(hours=1)))
    assert await repo.claim_due("n", 10, 30) == []


async def test_claim_respects_limit_and_leases(engine: AsyncEngine) -> None:
    """claim_due takes at most limit rows and a leased row is not claimed again."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    for _ in range(5):
        await repo.enqueue(_row(app))
    first = await repo.claim_due("a", 3, 30)
    second = await repo.claim_due("b", 10, 30)
    assert (len(first), len(second)) == (3, 2)
    assert {r.id for r in first}.isdisjoint({r.id for r in second})
    assert await repo.claim_due("c", 10, 30) == []
    claimed_by = {r.id: r.claimed_by for r in await factories.rows(engine, t.outbox)}
    assert sorted(claimed_by.values()) == ["a", "a", "a", "b", "b"]


async def test_concurrent_claimers_never_share_a_row(engine: AsyncEngine) -> None:
    """Many claimers racing over the same rows get disjoint sets covering every row."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    for _ in range(40):
        await repo.enqueue(_row(app))
    results: dict[str, list[int]] = {}

    async def claim(node: str) -> None:
        got: list[int] = []
        while batch := await repo.claim_due(node, 3, 30):
            got += [r.id for r in batch]
        results[node] = got

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(claim, f"node-{i}")
    every = [row_id for ids in results.values() for row_id in ids]
    assert len(every) == len(set(every)) == 40


async def test_expired_lease_comes_back(engine: AsyncEngine) -> None:
    """A leased row is not claimable until its lease expires; then another node gets it."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(_row(app))
    (row,) = await repo.claim_due("crashed", 1, 30)
    assert await repo.claim_due("other", 1, 30) == []
    async with engine.begin() as conn:  # the lease runs out
        await conn.execute(
            sa.update(t.outbox).values(claimed_until=sa.func.now() - timedelta(seconds=1))
        )
    (again,) = await repo.claim_due("other", 1, 30)
    assert (again.id, again.attempt_count) == (row.id, 0)
    (stored,) = await factories.rows(engine, t.outbox)
    assert stored.claimed_by == "other"
    assert stored.claimed_until > datetime.now(UTC)


async def test_short_lease_expires_by_itself(engine: AsyncEngine) -> None:
    """A lease of 50 ms is claimable again after it passed."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(_row(app))
    (row,) = await repo.claim_due("crashed", 1, 0.05)
    await anyio.sleep(0.2)
    assert [r.id for r in await repo.claim_due("other", 1, 30)] == [row.id]


async def test_reschedule_counts_attempts_only_when_asked(engine: AsyncEngine) -> None:
    """reschedule unclaims the row at run_at; attempt_count bumps only with count_attempt."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(_row(app))
    (row,) = await repo.claim_due("n", 1, 30)
    await repo.reschedule(row.id, datetime.now(UTC) - timedelta(seconds=1), count_attempt=True)
    (row,) = await repo.claim_due("n", 1, 30)
    assert row.attempt_count == 1
    await repo.reschedule(row.id, datetime.now(UTC) - timedelta(seconds=1), count_attempt=False)
    (row,) = await repo.claim_due("n", 1, 30)
    assert row.attempt_count == 1
    later = datetime.now(UTC) + timedelta(hours=1)
    await repo.reschedule(row.id, later, count_attempt=True)
    assert await repo.claim_due("n", 1, 30) == []
    stored = await repo.get(row.id)
    assert stored is not None
    assert (stored.attempt_count, stored.run_at) == (2, later)


async def test_release_makes_rows_due_now_unchanged(engine: AsyncEngine) -> None:
    """release gives claimed rows back unclaimed, due at once, attempts untouched."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(_row(app))
    await repo.enqueue(_row(app))
    claimed = await repo.claim_due("n", 10, 300)
    await repo.release([r.id for r in claimed])
    again = await repo.claim_due("m", 10, 300)
    assert sorted(r.id for r in again) == sorted(r.id for r in claimed)
    assert {r.attempt_count for r in again} == {0}


async def test_delete_removes_a_finished_row(engine: AsyncEngine) -> None:
    """delete removes the row; the execution record stays."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(_row(app))
    (row,) = await repo.claim_due("n", 1, 30)
    assert await repo.delete(row.id) is True
    assert await factories.rows(engine, t.outbox) == []
    assert len(await factories.rows(engine, t.executions)) == 1


async def test_record_abandoned_is_idempotent(engine: AsyncEngine) -> None:
    """An abandoned sync answer is recorded once, with its app and result."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    new = _row(app, reply_to=InboxId(uuid.uuid4()))
    await repo.enqueue(new)
    assert new.reply_to is not None
    result = ExecResult.failed(new.execution_id, ExecError(ExecErrorKind.TIMEOUT, "slow"))
    await repo.record_abandoned(new.execution_id, new.reply_to, "receiver gone", result)
    await repo.record_abandoned(new.execution_id, new.reply_to, "again", None)
    (row,) = await factories.rows(engine, t.abandoned_executions)
    assert (row.app_id, row.inbox_id, row.reason) == (app, new.reply_to, "receiver gone")
    assert row.result == result.to_wire()


async def test_mark_dead_letter_sets_resolution(engine: AsyncEngine) -> None:
    """mark_dead_letter stores the resolution and its time."""
    app = await factories.app(engine)
    async with engine.begin() as conn:
        dl_id = (
            await conn.execute(
                sa.insert(t.dead_letters)
                .values(app_id=app, execution_id=uuid.uuid4(), source_kind="kv", payload={})
                .returning(t.dead_letters.c.id)
            )
        ).scalar_one()
    await PostgresOutboxRepo(engine).mark_dead_letter(dl_id, "handler_failed")
    (row,) = await factories.rows(engine, t.dead_letters)
    assert row.resolution == "handler_failed"
    assert row.resolved_at is not None


async def test_wait_for_work_returns_on_enqueue_or_timeout(engine: AsyncEngine) -> None:
    """wait_for_work times out when idle and returns promptly after an enqueue."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine, OutboxSignal())
    with anyio.fail_after(2):
        await repo.wait_for_work(0.01)  # idle: times out
    async with anyio.create_task_group() as tg:

        async def enqueue_later() -> None:
            await anyio.sleep(0.05)
            await repo.enqueue(_row(app))

        tg.start_soon(enqueue_later)
        with anyio.fail_after(5):
            await repo.wait_for_work(30)
    assert not repo.signal.pending


async def test_enqueue_in_a_callers_transaction_wakes_only_after_commit(
    engine: AsyncEngine,
) -> None:
    """Joining a transaction defers the wake-up until the caller reports the commit."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    async with engine.begin() as conn:
        await repo.enqueue(_row(app), conn=conn)
        assert not repo.signal.pending
    assert repo.signal.committed(conn) is True
    assert repo.signal.pending
