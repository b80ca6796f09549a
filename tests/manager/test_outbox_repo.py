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
from manager_core.postgres.outbox import PostgresOutboxRepo
from picloud_shared.errors import NotFound
from picloud_shared.execution import ExecError, ExecResult
from picloud_shared.ids import AppId, InboxId
from picloud_shared.outbox import NewOutboxRow
from picloud_shared.ports import OutboxRepo, OutboxWriter
from picloud_shared.retry import Backoff, RetryPolicy
from picloud_shared.status import ExecErrorKind
from tests.manager import factories

pytestmark = pytest.mark.anyio


_row = factories.http_row


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
    (execution,) = await factories.rows(engine, t.executions)
    assert (execution.id, execution.status, execution.source_kind) == (
        new.execution_id,
        "queued",
        "http",
    )
    (claimed,) = await repo.claim_due("n1", 10, 30)
    assert (claimed.row.execution_id, claimed.row.payload, claimed.row.reply_to) == (
        new.execution_id,
        new.payload,
        new.reply_to,
    )
    assert (claimed.row.retry, claimed.row.trigger_depth, claimed.row.reply_node) == (
        policy,
        2,
        "n1",
    )
    (execution,) = await factories.rows(engine, t.executions)
    assert (execution.status, execution.attempts) == ("running", 1)


async def test_enqueue_for_a_missing_app_is_not_found(engine: AsyncEngine) -> None:
    """An app that does not exist raises NotFound and writes nothing."""
    with pytest.raises(NotFound):
        await PostgresOutboxRepo(engine).enqueue(_row(AppId(uuid.uuid4())))
    assert await factories.rows(engine, t.outbox) == []


async def test_concurrent_enqueues_share_statements_and_commits(engine: AsyncEngine) -> None:
    """Enqueues that arrive while one is being written go out together (group commit);
    every row is written once."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    rows = [_row(app) for _ in range(24)]
    async with anyio.create_task_group() as tg:
        for row in rows:
            tg.start_soon(repo.enqueue, row)
    assert repo._writer.rows == 24
    assert repo._writer.batches < 24
    written = await factories.rows(engine, t.outbox)
    assert sorted(str(r.execution_id) for r in written) == sorted(str(r.execution_id) for r in rows)


async def test_a_missing_app_fails_only_its_own_row_in_a_batch(engine: AsyncEngine) -> None:
    """A row for an app that does not exist is NotFound; the rows batched with it are
    written."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    good = [_row(app) for _ in range(6)]
    bad = _row(AppId(uuid.uuid4()))
    outcomes: dict[str, str] = {}

    async def enqueue(row: NewOutboxRow) -> None:
        try:
            await repo.enqueue(row)
            outcomes[str(row.execution_id)] = "ok"
        except NotFound:
            outcomes[str(row.execution_id)] = "not_found"

    async with anyio.create_task_group() as tg:
        for row in [*good[:3], bad, *good[3:]]:
            tg.start_soon(enqueue, row)
    assert outcomes.pop(str(bad.execution_id)) == "not_found"
    assert set(outcomes.values()) == {"ok"}
    assert len(await factories.rows(engine, t.outbox)) == 6


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
    assert {c.row.id for c in first}.isdisjoint({c.row.id for c in second})
    assert await repo.claim_due("c", 10, 30) == []
    claimed_by = [r.claimed_by for r in await factories.rows(engine, t.outbox)]
    assert sorted(token.split("/")[0] for token in claimed_by) == ["a", "a", "a", "b", "b"]
    assert {c.token for c in first} == {
        r.claimed_by
        for r in await factories.rows(engine, t.outbox)
        if r.claimed_by.startswith("a/")
    }


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
            got += [c.row.id for c in batch]
        results[node] = got

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(claim, f"node-{i}")
    every = [row_id for ids in results.values() for row_id in ids]
    assert len(every) == len(set(every)) == 40


async def test_expired_lease_comes_back_with_its_attempt_counted(engine: AsyncEngine) -> None:
    """A leased row is not claimable until its lease expires; then it is recovered and
    another node gets it, the dead node's attempt still counted."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(_row(app))
    (first,) = await repo.claim_due("crashed", 1, 30)
    assert await repo.recover_expired() == 0
    assert await repo.claim_due("other", 1, 30) == []
    async with engine.begin() as conn:  # the lease runs out
        await conn.execute(
            sa.update(t.outbox).values(claimed_until=sa.func.now() - timedelta(seconds=1))
        )
    assert await repo.recover_expired() == 1
    (again,) = await repo.claim_due("other", 1, 30)
    assert (again.row.id, again.row.attempt_count) == (first.row.id, 2)
    (stored,) = await factories.rows(engine, t.outbox)
    assert stored.claimed_by == again.token
    assert stored.claimed_by.startswith("other/")
    assert stored.claimed_until > datetime.now(UTC)


async def test_short_lease_expires_by_itself(engine: AsyncEngine) -> None:
    """A lease of 50 ms is recovered and claimable again after it passed."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(_row(app))
    (first,) = await repo.claim_due("crashed", 1, 0.05)
    await anyio.sleep(0.2)
    assert await repo.recover_expired() == 1
    assert [c.row.id for c in await repo.claim_due("other", 1, 30)] == [first.row.id]


async def test_a_renewed_lease_does_not_expire(engine: AsyncEngine) -> None:
    """renew_leases keeps a running row's lease from running out."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(_row(app))
    (first,) = await repo.claim_due("n", 1, 0.3)
    assert await repo.renew_leases({first.row.id: first.token}, 30) == 1
    await anyio.sleep(0.5)
    assert await repo.recover_expired() == 0
    assert await repo.claim_due("other", 1, 30) == []


async def test_reschedule_keeps_the_attempt_and_give_back_uncounts_it(engine: AsyncEngine) -> None:
    """A claim counts an attempt; reschedule keeps it (due after the delay); give_back
    takes it back (due at once)."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(_row(app))
    (c,) = await repo.claim_due("n", 1, 30)
    assert c.row.attempt_count == 1
    await repo.reschedule(c.row.id, delay_ms=0)
    (c,) = await repo.claim_due("n", 1, 30)
    assert c.row.attempt_count == 2
    await repo.give_back(c.row.id, c.token)
    assert repo.signal.pending
    (c,) = await repo.claim_due("n", 1, 30)
    assert c.row.attempt_count == 2
    await repo.reschedule(c.row.id, delay_ms=3_600_000)
    assert await repo.claim_due("n", 1, 30) == []
    stored = await repo.get(c.row.id)
    assert stored is not None
    assert stored.attempt_count == 2
    assert stored.run_at > datetime.now(UTC) + timedelta(minutes=59)


async def test_give_back_needs_the_claims_token(engine: AsyncEngine) -> None:
    """Only the claim that owns a row can give it back; rows come back due at once."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(_row(app))
    await repo.enqueue(_row(app))
    claimed = await repo.claim_due("n", 10, 300)
    await repo.give_back(claimed[0].row.id, "someone-else/0")
    assert await repo.claim_due("m", 10, 300) == []
    for c in claimed:
        await repo.give_back(c.row.id, c.token)
    again = await repo.claim_due("m", 10, 300)
    assert sorted(c.row.id for c in again) == sorted(c.row.id for c in claimed)
    assert {c.row.attempt_count for c in again} == {1}


async def test_delete_removes_a_finished_row(engine: AsyncEngine) -> None:
    """delete removes the row; the execution record stays."""
    app = await factories.app(engine)
    repo = PostgresOutboxRepo(engine)
    await repo.enqueue(_row(app))
    (c,) = await repo.claim_due("n", 1, 30)
    assert await repo.delete(c.row.id) is True
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
