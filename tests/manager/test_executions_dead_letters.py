"""PostgresExecutionRepo and PostgresDeadLetterRepo on real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.outbox_event_emitter import OutboxEventEmitter
from manager_core.postgres.dead_letters import DeadLetter, PostgresDeadLetterRepo
from manager_core.postgres.executions import PostgresExecutionRepo
from manager_core.postgres.outbox import OutboxSignal, PostgresOutboxRepo
from manager_core.postgres.triggers import PostgresTriggerRepo
from picloud_shared.errors import Conflict, InvalidInput, NotFound
from picloud_shared.events import HttpEvent
from picloud_shared.execution import ExecError, ExecResult, ScriptResponse
from picloud_shared.ids import (
    AppId,
    DeadLetterId,
    ExecutionId,
    RouteId,
    TriggerId,
    new_execution_id,
)
from picloud_shared.outbox import HttpDispatchPayload, NewOutboxRow, OutboxRow, OutboxSourceKind
from picloud_shared.retry import Backoff, RetryPolicy
from picloud_shared.status import ExecErrorKind, ExecutionStatus
from picloud_shared.triggers import CreateDeadLetterTrigger, CreateKvTrigger
from tests.manager import factories

pytestmark = pytest.mark.anyio


async def _enqueue(
    outbox: PostgresOutboxRepo,
    app: AppId,
    kind: OutboxSourceKind = OutboxSourceKind.KV,
    payload: dict | None = None,
    **kw,
) -> ExecutionId:
    execution_id = new_execution_id()
    payload = payload or {"kind": "kv", "key": "k", "op": "set", "value": 1, "prev_value": None}
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
        "started_at",
        "finished_at",
    }
    assert (wire["id"], wire["status"], wire["source_kind"]) == (str(execution_id), "queued", "kv")
    assert (wire["attempts"], wire["trigger_depth"], wire["error"]) == (0, 1, None)
    assert (wire["logs"], wire["result"], wire["finished_at"]) == ([], None, None)
    assert wire["started_at"] is None  # not run yet


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
    assert wire["error"] == {"kind": "timeout", "message": "slow", "traceback": None}
    assert (wire["status"], wire["logs"]) == ("failed", ["l1"])
    assert wire["finished_at"] is not None
    assert wire["created_at"] <= wire["started_at"] <= wire["finished_at"]


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
    rest = await repo.list(app, limit=3, after=(first[-1].created_at, first[-1].id))
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
    assert got.to_wire()["error"] == {
        "kind": "uncaught_exception",
        "message": "boom",
        "traceback": None,
    }
    assert [d.id for d in await repo.list(app)] == [letter.id]
    assert await repo.get(await factories.app(engine), letter.id) is None
    resolved = await repo.resolve(app, letter.id)
    assert resolved.resolution == "resolved"
    assert resolved == await repo.get(app, letter.id)
    with pytest.raises(NotFound):
        await repo.resolve(app, DeadLetterId(uuid.uuid4()))


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
    rest = await repo.list(app, limit=2, after=(first[-1].created_at, first[-1].id))
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


# -- replayed is final; a replay that could never run is refused ----------------------


async def _live_letter(
    engine: AsyncEngine, repo: PostgresDeadLetterRepo, app: AppId
) -> tuple[DeadLetter, TriggerId]:
    """A dead letter of a kv trigger that still exists, its outbox row gone."""
    script, user = await factories.script(engine, app), await factories.user(engine)
    trig = await PostgresTriggerRepo(engine).create_kv_trigger(
        CreateKvTrigger(app, script, user, "*", ())
    )
    outbox = PostgresOutboxRepo(engine)
    row = await _claimed(outbox, app, trigger_id=trig.id, script_id=script)
    letter = await repo.create(row, attempts=5, error_kind=None, error_message=None)
    await outbox.delete(row.id)
    return letter, trig.id


async def test_a_replayed_letter_stays_replayed(engine: AsyncEngine) -> None:
    """After a replay, resolve is a Conflict and a handler's late outcome changes
    nothing: the letter stays ``replayed`` and cannot be replayed again."""
    app = await factories.app(engine)
    repo = PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine))
    letter, _ = await _live_letter(engine, repo, app)
    await repo.replay(app, letter.id)
    with pytest.raises(Conflict, match="already replayed"):
        await repo.resolve(app, letter.id)
    assert await repo.mark(app, letter.id, "handled") is False
    assert await repo.mark(app, letter.id, "handler_failed") is False
    assert (await repo.get(app, letter.id)).resolution == "replayed"  # type: ignore[union-attr]
    with pytest.raises(Conflict, match="already replayed"):
        await repo.replay(app, letter.id)
    assert len(await factories.rows(engine, t.outbox)) == 1


async def test_a_resolve_waiting_on_a_replay_sees_it(engine: AsyncEngine) -> None:
    """A resolve that waits for a replay's row lock answers Conflict once the replay
    commits; so does a second replay."""
    app = await factories.app(engine)
    repo = PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine))
    letter, _ = await _live_letter(engine, repo, app)
    refused: list[str] = []

    async def attempt(op: Callable[..., Awaitable[object]]) -> None:
        with pytest.raises(Conflict) as exc:
            await op(app, letter.id)
        refused.append(exc.value.message)

    async with engine.connect() as conn:
        await conn.begin()
        await repo.replay(app, letter.id, conn=conn)
        async with anyio.create_task_group() as tg:
            tg.start_soon(attempt, repo.resolve)
            tg.start_soon(attempt, repo.replay)
            await anyio.sleep(0.3)  # both now wait on the row lock
            assert refused == []
            await conn.commit()
    assert sorted(refused) == ["this dead letter was already replayed"] * 2
    assert (await repo.get(app, letter.id)).resolution == "replayed"  # type: ignore[union-attr]
    assert len(await factories.rows(engine, t.outbox)) == 1


@pytest.mark.parametrize("resolution", [None, "handled", "handler_failed", "resolved"])
async def test_any_other_letter_may_be_resolved_then_replayed(
    engine: AsyncEngine, resolution: str | None
) -> None:
    """Unresolved, handled, handler_failed or resolved: resolve makes it ``resolved``, and
    a replay after that is still allowed (once)."""
    app = await factories.app(engine)
    repo = PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine))
    letter, _ = await _live_letter(engine, repo, app)
    if resolution is not None:
        assert await repo.mark(app, letter.id, resolution) is True
    assert (await repo.resolve(app, letter.id)).resolution == "resolved"
    await repo.replay(app, letter.id)
    assert (await repo.get(app, letter.id)).resolution == "replayed"  # type: ignore[union-attr]


async def _nothing_written(
    engine: AsyncEngine, repo: PostgresDeadLetterRepo, letter: DeadLetter
) -> None:
    assert await factories.rows(engine, t.outbox) == []
    assert len(await factories.rows(engine, t.executions)) == 1  # the original one
    assert await repo.get(letter.app_id, letter.id) == letter


async def test_replay_refuses_a_letter_whose_trigger_is_gone(engine: AsyncEngine) -> None:
    """Its trigger deleted, the letter could never run: Conflict, nothing written."""
    app = await factories.app(engine)
    repo = PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine))
    letter, trigger_id = await _live_letter(engine, repo, app)
    assert await PostgresTriggerRepo(engine).delete(app, trigger_id)
    with pytest.raises(Conflict, match=r"^the trigger no longer exists$"):
        await repo.replay(app, letter.id)
    await _nothing_written(engine, repo, letter)


async def test_replay_refuses_a_letter_whose_script_is_gone(engine: AsyncEngine) -> None:
    """Its trigger kept but the script it ran deleted: Conflict, nothing written."""
    app = await factories.app(engine)
    repo = PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine))
    letter, _ = await _live_letter(engine, repo, app)
    gone = await factories.script(engine, app)
    async with engine.begin() as conn:
        await conn.execute(sa.delete(t.scripts).where(t.scripts.c.id == gone))
        await conn.execute(
            sa.update(t.dead_letters).where(t.dead_letters.c.id == letter.id).values(script_id=gone)
        )
    letter = await repo.get(app, letter.id)  # type: ignore[assignment]
    with pytest.raises(Conflict, match=r"^the script no longer exists$"):
        await repo.replay(app, letter.id)
    await _nothing_written(engine, repo, letter)


async def _http_letter(
    engine: AsyncEngine, repo: PostgresDeadLetterRepo, app: AppId
) -> tuple[DeadLetter, OutboxRow, HttpEvent]:
    """A dead letter of an async request to a route that still exists."""
    script = await factories.script(engine, app)
    async with engine.begin() as conn:
        route = (
            await conn.execute(
                sa.insert(t.routes)
                .values(app_id=app, method="POST", path="/orders/{id}", script_id=script)
                .returning(t.routes.c.id)
            )
        ).scalar_one()
    event = HttpEvent("POST", "/orders/7", {"id": "7"}, {"q": "1"}, {"a": "b"}, '{"n":1}', {"n": 1})
    outbox = PostgresOutboxRepo(engine)
    payload = HttpDispatchPayload(RouteId(route), event.to_wire()).to_wire()
    row = await _claimed(
        outbox, app, kind=OutboxSourceKind.HTTP, payload=payload, route_id=route, script_id=script
    )
    letter = await repo.create(row, attempts=5, error_kind=None, error_message=None)
    await outbox.delete(row.id)
    return letter, row, event


async def test_replay_refuses_a_letter_whose_route_is_gone(engine: AsyncEngine) -> None:
    """An async request's route deleted: Conflict naming the route, nothing written."""
    app = await factories.app(engine)
    repo = PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine))
    letter, row, _ = await _http_letter(engine, repo, app)
    async with engine.begin() as conn:
        await conn.execute(sa.delete(t.routes).where(t.routes.c.id == row.route_id))
    with pytest.raises(Conflict, match=r"^the route no longer exists$"):
        await repo.replay(app, letter.id)
    await _nothing_written(engine, repo, letter)


async def test_an_http_letters_event_is_the_route_event(engine: AsyncEngine) -> None:
    """Handlers and the listing see the route event the script got (no ``kind``, no
    ``route_id``); the stored payload, which a replay enqueues, is unchanged."""
    app = await factories.app(engine)
    outbox = PostgresOutboxRepo(engine)
    repo = PostgresDeadLetterRepo(engine, outbox)
    letter, row, event = await _http_letter(engine, repo, app)
    assert letter.to_event().event == event.to_script()
    assert letter.to_event().to_wire()["event"] == event.to_script()
    assert letter.to_wire()["payload"] == event.to_script()
    assert letter.payload == row.payload
    new_id = await repo.replay(app, letter.id)
    (claimed,) = await outbox.claim_due("n", 1, 30)
    assert (claimed.row.execution_id, claimed.row.source_kind) == (new_id, OutboxSourceKind.HTTP)
    assert (claimed.row.payload, claimed.row.route_id) == (row.payload, row.route_id)
