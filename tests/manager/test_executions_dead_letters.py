"""PostgresExecutionRepo and PostgresDeadLetterRepo on real PostgreSQL."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.outbox_event_emitter import OutboxEventEmitter
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.executions import PostgresExecutionRepo
from manager_core.postgres.outbox import OutboxSignal, PostgresOutboxRepo
from manager_core.postgres.triggers import PostgresTriggerRepo
from picloud_shared.errors import Conflict, InvalidInput, NotFound
from picloud_shared.execution import ExecError, ExecResult, ScriptResponse
from picloud_shared.ids import AppId, DeadLetterId, ExecutionId, new_execution_id
from picloud_shared.outbox import NewOutboxRow, OutboxRow, OutboxSourceKind
from picloud_shared.retry import Backoff, RetryPolicy
from picloud_shared.status import ExecErrorKind, ExecutionStatus
from picloud_shared.triggers import CreateDeadLetterTrigger, CreateKvTrigger
from tests.manager import factories

pytestmark = pytest.mark.anyio


async def _enqueue(
    outbox: PostgresOutboxRepo, app: AppId, kind: OutboxSourceKind = OutboxSourceKind.KV, **kw
) -> ExecutionId:
    execution_id = new_execution_id()
    payload = {"kind": "kv", "key": "k", "op": "set", "value": 1, "prev_value": None}
    await outbox.enqueue(NewOutboxRow(execution_id, app, kind, payload, **kw))
    return execution_id


# -- executions -------------------------------------------------------------------------


async def test_new_execution_reads_as_queued(engine: AsyncEngine) -> None:
    """An enqueued execution is readable at once in the API's wire form."""
    app = await factories.app(engine)
    execution_id = await _enqueue(PostgresOutboxRepo(engine), app, trigger_depth=1)
    execution = await PostgresExecutionRepo(engine).get(app, execution_id)
    assert execution is not None
    wire = execution.to_wire()
    assert set(wire) == {
        "id",
        "status",
        "source_kind",
        "attempts",
        "trigger_depth",
        "error",
        "logs",
        "result",
        "created_at",
        "finished_at",
    }
    assert (wire["id"], wire["status"], wire["source_kind"]) == (str(execution_id), "queued", "kv")
    assert (wire["attempts"], wire["trigger_depth"], wire["error"]) == (0, 1, None)
    assert (wire["logs"], wire["result"], wire["finished_at"]) == ([], None, None)


async def test_get_is_scoped_to_the_app(engine: AsyncEngine) -> None:
    """Another app's execution reads as None."""
    app = await factories.app(engine)
    execution_id = await _enqueue(PostgresOutboxRepo(engine), app)
    assert (
        await PostgresExecutionRepo(engine).get(await factories.app(engine), execution_id) is None
    )


async def test_running_then_finished(engine: AsyncEngine) -> None:
    """mark_running counts the attempt; finish_with stores error, logs and finished_at."""
    app = await factories.app(engine)
    repo = PostgresExecutionRepo(engine)
    execution_id = await _enqueue(PostgresOutboxRepo(engine), app)
    await repo.mark_running(execution_id, 2)
    running = await repo.get(app, execution_id)
    assert running is not None
    assert (running.status, running.attempts, running.started_at is not None) == (
        ExecutionStatus.RUNNING,
        2,
        True,
    )
    failed = ExecResult.failed(execution_id, ExecError(ExecErrorKind.TIMEOUT, "slow"), ("l1",))
    await repo.finish_with(execution_id, ExecutionStatus.FAILED, failed)
    wire = (await repo.get(app, execution_id)).to_wire()  # type: ignore[union-attr]
    assert wire["error"] == {"kind": "timeout", "message": "slow"}
    assert (wire["status"], wire["logs"]) == ("failed", ["l1"])
    assert wire["finished_at"] is not None


async def test_success_stores_the_response(engine: AsyncEngine) -> None:
    """A successful result is stored as the response's wire form."""
    app = await factories.app(engine)
    repo = PostgresExecutionRepo(engine)
    execution_id = await _enqueue(PostgresOutboxRepo(engine), app)
    ok = ExecResult.succeeded(execution_id, ScriptResponse.json({"a": 1}))
    await repo.finish_with(execution_id, ExecutionStatus.SUCCEEDED, ok)
    got = await repo.get(app, execution_id)
    assert got is not None
    assert (got.status, got.result, got.error_kind) == (
        ExecutionStatus.SUCCEEDED,
        ok.response.to_wire(),  # type: ignore[union-attr]
        None,
    )


async def test_list_newest_first_with_filters_and_keyset(engine: AsyncEngine) -> None:
    """list pages newest first; status and source_kind filter."""
    app = await factories.app(engine)
    outbox, repo = PostgresOutboxRepo(engine), PostgresExecutionRepo(engine)
    ids = [await _enqueue(outbox, app) for _ in range(4)]
    http = await _enqueue(outbox, app, OutboxSourceKind.HTTP)
    await repo.finish(ids[0], ExecutionStatus.SUCCEEDED)
    first = await repo.list(app, limit=3)
    rest = await repo.list(app, limit=3, after=first[-1].id)
    listed = [e.id for e in [*first, *rest]]
    assert sorted(listed) == sorted([*ids, http])
    assert [e.created_at for e in [*first, *rest]] == sorted(
        (e.created_at for e in [*first, *rest]), reverse=True
    )
    assert [e.id for e in await repo.list(app, source_kind=OutboxSourceKind.HTTP)] == [http]
    assert [e.id for e in await repo.list(app, status=ExecutionStatus.SUCCEEDED)] == [ids[0]]
    assert await repo.list(await factories.app(engine)) == []


# -- dead letters -----------------------------------------------------------------------


async def _claimed(outbox: PostgresOutboxRepo, app: AppId, **kw) -> OutboxRow:
    await _enqueue(outbox, app, **kw)
    (claimed,) = await outbox.claim_due("n", 1, 30)
    return claimed.row


async def test_create_get_list_resolve(engine: AsyncEngine) -> None:
    """A dead letter keeps payload, source, attempts, error and depth; resolve marks it."""
    app = await factories.app(engine)
    outbox = PostgresOutboxRepo(engine)
    repo = PostgresDeadLetterRepo(engine, outbox)
    row = await _claimed(outbox, app, trigger_depth=2)
    letter = await repo.create(
        row, attempts=5, error_kind=ExecErrorKind.UNCAUGHT_EXCEPTION, error_message="boom"
    )
    got = await repo.get(app, letter.id)
    assert got == letter
    assert (got.payload, got.attempts, got.trigger_depth) == (row.payload, 5, 2)
    assert got.to_wire()["error"] == {"kind": "uncaught_exception", "message": "boom"}
    assert [d.id for d in await repo.list(app)] == [letter.id]
    assert await repo.get(await factories.app(engine), letter.id) is None
    assert await repo.resolve(app, letter.id) is True
    assert (await repo.get(app, letter.id)).resolution == "resolved"  # type: ignore[union-attr]
    assert await repo.resolve(app, DeadLetterId(uuid.uuid4())) is False


async def test_list_paginates_newest_first(engine: AsyncEngine) -> None:
    """Keyset pagination over dead letters visits each once."""
    app = await factories.app(engine)
    outbox = PostgresOutboxRepo(engine)
    repo = PostgresDeadLetterRepo(engine, outbox)
    made = []
    for _ in range(3):
        row = await _claimed(outbox, app)
        made.append((await repo.create(row, attempts=1, error_kind=None, error_message=None)).id)
        await outbox.delete(row.id)
    first = await repo.list(app, limit=2)
    rest = await repo.list(app, limit=2, after=first[-1].id)
    assert sorted(d.id for d in [*first, *rest]) == sorted(made)


async def test_create_fans_out_to_dead_letter_triggers(engine: AsyncEngine) -> None:
    """With an emitter, a new dead letter enqueues handler rows at depth + 1."""
    app = await factories.app(engine)
    script, user = await factories.script(engine, app), await factories.user(engine)
    triggers = PostgresTriggerRepo(engine)
    handler = await triggers.create_dead_letter_trigger(CreateDeadLetterTrigger(app, script, user))
    signal = OutboxSignal()
    outbox = PostgresOutboxRepo(engine, signal)
    repo = PostgresDeadLetterRepo(engine, outbox, OutboxEventEmitter(triggers, signal))
    row = await _claimed(outbox, app, trigger_depth=1)
    await outbox.delete(row.id)
    letter = await repo.create(row, attempts=3, error_kind=None, error_message=None)
    (claimed,) = await outbox.claim_due("n", 10, 30)
    out = claimed.row
    assert (out.is_dead_letter_handler, out.dead_letter_id, out.trigger_id) == (
        True,
        letter.id,
        handler.id,
    )
    assert out.trigger_depth == 2
    assert out.payload == letter.to_event().to_wire()
    assert signal.pending


async def test_replay_enqueues_a_fresh_execution(engine: AsyncEngine) -> None:
    """replay writes a new outbox row (new id, attempt 0, trigger's policy) and marks it."""
    app = await factories.app(engine)
    script, user = await factories.script(engine, app), await factories.user(engine)
    policy = RetryPolicy(Backoff.LINEAR, 5, 10, 7, 0.0)
    trig = await PostgresTriggerRepo(engine).create_kv_trigger(
        CreateKvTrigger(app, script, user, "*", (), policy)
    )
    outbox = PostgresOutboxRepo(engine)
    repo = PostgresDeadLetterRepo(engine, outbox)
    row = await _claimed(outbox, app, trigger_id=trig.id, script_id=script, trigger_depth=1)
    await outbox.reschedule(row.id, delay_ms=0)
    (claimed,) = await outbox.claim_due("n", 1, 30)
    row = claimed.row
    assert row.attempt_count == 2
    letter = await repo.create(row, attempts=2, error_kind=None, error_message=None)
    await outbox.delete(row.id)
    outbox.signal.notify()
    await outbox.wait_for_work(0)

    new_id = await repo.replay(app, letter.id)
    assert new_id != row.execution_id
    assert outbox.signal.pending
    (stored,) = await factories.rows(engine, t.outbox)
    assert (stored.execution_id, stored.attempt_count) == (new_id, 0)
    execution = await PostgresExecutionRepo(engine).get(app, new_id)
    assert execution is not None
    assert execution.status is ExecutionStatus.QUEUED
    (claimed,) = await outbox.claim_due("n", 10, 30)
    again = claimed.row
    assert (again.execution_id, again.attempt_count, again.retry) == (new_id, 1, policy)
    assert (again.payload, again.trigger_id, again.trigger_depth) == (row.payload, trig.id, 1)
    assert (await repo.get(app, letter.id)).resolution == "replayed"  # type: ignore[union-attr]
    with pytest.raises(Conflict):
        await repo.replay(app, letter.id)
    with pytest.raises(NotFound):
        await repo.replay(await factories.app(engine), letter.id)
    assert len(await factories.rows(engine, t.outbox)) == 1


async def test_mark_sets_the_resolution_and_its_time(engine: AsyncEngine) -> None:
    """mark stores the resolution and its time; an unknown resolution is refused."""
    app = await factories.app(engine)
    async with engine.begin() as conn:
        dl_id = (
            await conn.execute(
                sa.insert(t.dead_letters)
                .values(app_id=app, execution_id=uuid.uuid4(), source_kind="kv", payload={})
                .returning(t.dead_letters.c.id)
            )
        ).scalar_one()
    repo = PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine))
    assert await repo.mark(app, dl_id, "handler_failed") is True
    (row,) = await factories.rows(engine, t.dead_letters)
    assert row.resolution == "handler_failed"
    assert row.resolved_at is not None
    with pytest.raises(InvalidInput):
        await repo.mark(app, dl_id, "forgotten")
