"""OutboxEventEmitter: KV/docs writes fan out to exactly the matching triggers, with
their execution records, in the writer's transaction."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.outbox_event_emitter import OutboxEventEmitter
from manager_core.postgres.documents import PostgresDocumentRepo
from manager_core.postgres.kv import PostgresKvRepo
from manager_core.postgres.outbox import OutboxSignal, outbox_row_from_row
from manager_core.postgres.triggers import PostgresTriggerRepo
from picloud_shared.events import DeadLetterEvent, HttpEvent
from picloud_shared.ids import AppId, DeadLetterId, ScriptId, UserId
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.retry import DEFAULT_RETRY_POLICY, Backoff, RetryPolicy
from picloud_shared.triggers import (
    CreateDeadLetterTrigger,
    CreateDocsTrigger,
    CreateKvTrigger,
    DocsOp,
    KvOp,
)
from tests.manager import factories

pytestmark = pytest.mark.anyio

POLICY = RetryPolicy(Backoff.CONSTANT, 50, 50, 2, 0.0)


class Boom(Exception):
    pass


async def _setup(engine: AsyncEngine) -> tuple[AppId, ScriptId, UserId, OutboxEventEmitter]:
    app = await factories.app(engine)
    script = await factories.script(engine, app)
    user = await factories.user(engine)
    return app, script, user, OutboxEventEmitter(PostgresTriggerRepo(engine), OutboxSignal())


async def _outbox(engine: AsyncEngine) -> list:
    return sorted(await factories.rows(engine, t.outbox), key=lambda r: r.id)


async def test_kv_set_fans_out_one_row_per_matching_trigger(engine: AsyncEngine) -> None:
    """Two matching triggers → two outbox rows with the event, policy, trigger and depth."""
    app, script, user, emitter = await _setup(engine)
    triggers = PostgresTriggerRepo(engine)
    a = await triggers.create_kv_trigger(CreateKvTrigger(app, script, user, "user:*", (), POLICY))
    b = await triggers.create_kv_trigger(CreateKvTrigger(app, script, user, "*", (KvOp.SET,)))
    await triggers.create_kv_trigger(CreateKvTrigger(app, script, user, "order:*"))
    await triggers.create_kv_trigger(CreateKvTrigger(app, script, user, "*", (KvOp.DELETE,)))
    kv = PostgresKvRepo(engine, emitter)
    await kv.set(app, "user:1", {"n": 1})
    await kv.set(app, "user:1", {"n": 2}, trigger_depth=3)

    rows = [outbox_row_from_row(r) for r in await _outbox(engine)]
    assert len(rows) == 4
    first, second = rows[:2], rows[2:]
    assert {r.trigger_id for r in first} == {a.id, b.id}
    for r in first:
        assert r.payload == {
            "kind": "kv",
            "key": "user:1",
            "op": "set",
            "value": {"n": 1},
            "prev_value": None,
        }
        assert (r.trigger_depth, r.attempt_count, r.source_kind) == (0, 0, OutboxSourceKind.KV)
        assert (r.script_id, r.app_id, r.reply_to, r.is_dead_letter_handler) == (
            script,
            app,
            None,
            False,
        )
    assert {r.retry for r in first} == {POLICY, DEFAULT_RETRY_POLICY}
    by_trigger = {r.trigger_id: r for r in first}
    assert by_trigger[a.id].retry == POLICY
    for r in second:
        assert r.payload["prev_value"] == {"n": 1}
        assert r.payload["value"] == {"n": 2}
        assert r.trigger_depth == 3


async def test_each_outbox_row_has_a_queued_execution_record(engine: AsyncEngine) -> None:
    """Every fanned-out row has its own queued execution with trigger, script and depth."""
    app, script, user, emitter = await _setup(engine)
    triggers = PostgresTriggerRepo(engine)
    trig = await triggers.create_kv_trigger(CreateKvTrigger(app, script, user, "*"))
    await PostgresKvRepo(engine, emitter).set(app, "k", 1, trigger_depth=2)
    (row,) = await _outbox(engine)
    (execution,) = await factories.rows(engine, t.executions)
    assert execution.id == row.execution_id
    assert (execution.status, execution.source_kind, execution.attempts) == ("queued", "kv", 0)
    assert (execution.trigger_id, execution.script_id, execution.app_id) == (trig.id, script, app)
    assert execution.trigger_depth == 2


async def test_kv_delete_emits_prev_value_only_when_the_key_existed(engine: AsyncEngine) -> None:
    """Deleting an existing key emits op delete with prev_value; a missing key emits nothing."""
    app, script, user, emitter = await _setup(engine)
    await PostgresTriggerRepo(engine).create_kv_trigger(
        CreateKvTrigger(app, script, user, "*", (KvOp.DELETE,))
    )
    kv = PostgresKvRepo(engine, emitter)
    await kv.set(app, "k", [1, 2])
    assert await kv.delete(app, "missing") is False
    assert await kv.delete(app, "k") is True
    (row,) = await _outbox(engine)
    assert row.payload == {
        "kind": "kv",
        "key": "k",
        "op": "delete",
        "value": None,
        "prev_value": [1, 2],
    }


async def test_no_rows_when_nothing_matches(engine: AsyncEngine) -> None:
    """Writes that match no trigger write no outbox row and no execution."""
    app, script, user, emitter = await _setup(engine)
    await PostgresTriggerRepo(engine).create_kv_trigger(CreateKvTrigger(app, script, user, "x*"))
    other = await factories.app(engine)
    await PostgresKvRepo(engine, emitter).set(app, "y", 1)
    await PostgresKvRepo(engine, emitter).set(other, "x1", 1)
    await PostgresDocumentRepo(engine, emitter).insert(app, "x", {})
    assert await _outbox(engine) == []
    assert await factories.rows(engine, t.executions) == []
    assert not emitter.signal.pending


async def test_docs_writes_fan_out_with_data_and_prev_data(engine: AsyncEngine) -> None:
    """insert, update and delete each emit their op with data/prev_data."""
    app, script, user, emitter = await _setup(engine)
    await PostgresTriggerRepo(engine).create_docs_trigger(
        CreateDocsTrigger(app, script, user, "ord*", (), POLICY)
    )
    docs = PostgresDocumentRepo(engine, emitter)
    await docs.insert(app, "orders", {"v": 1}, id="o1")
    await docs.update(app, "orders", "o1", {"v": 2}, trigger_depth=1)
    await docs.delete(app, "orders", "o1")
    payloads = [(r.payload, r.trigger_depth) for r in await _outbox(engine)]
    base = {"kind": "docs", "collection": "orders", "id": "o1"}
    assert payloads == [
        ({**base, "op": "insert", "data": {"v": 1}, "prev_data": None}, 0),
        ({**base, "op": "update", "data": {"v": 2}, "prev_data": {"v": 1}}, 1),
        ({**base, "op": "delete", "data": None, "prev_data": {"v": 2}}, 0),
    ]
    assert {r.source_kind for r in await _outbox(engine)} == {"docs"}


async def test_docs_ops_filter_and_empty_ops(engine: AsyncEngine) -> None:
    """An update-only trigger fires on update only; an empty-ops one on all three."""
    app, script, user, emitter = await _setup(engine)
    triggers = PostgresTriggerRepo(engine)
    upd = await triggers.create_docs_trigger(
        CreateDocsTrigger(app, script, user, "c", (DocsOp.UPDATE,))
    )
    every = await triggers.create_docs_trigger(CreateDocsTrigger(app, script, user, "c"))
    docs = PostgresDocumentRepo(engine, emitter)
    await docs.insert(app, "c", {}, id="d")
    await docs.update(app, "c", "d", {"x": 1})
    await docs.delete(app, "c", "d")
    fired = [(r.payload["op"], r.trigger_id) for r in await _outbox(engine)]
    assert sorted(fired) == sorted(
        [("insert", every.id), ("update", every.id), ("update", upd.id), ("delete", every.id)]
    )


async def test_write_and_outbox_rows_roll_back_together(engine: AsyncEngine) -> None:
    """A transaction that fails after the write leaves neither the write nor its rows."""
    app, script, user, emitter = await _setup(engine)
    await PostgresTriggerRepo(engine).create_kv_trigger(CreateKvTrigger(app, script, user, "*"))
    await PostgresTriggerRepo(engine).create_docs_trigger(CreateDocsTrigger(app, script, user, "*"))
    kv, docs = PostgresKvRepo(engine, emitter), PostgresDocumentRepo(engine, emitter)

    async def write_then_fail() -> None:
        async with engine.begin() as conn:
            await kv.set(app, "k", 1, conn=conn)
            await docs.insert(app, "c", {}, id="d", conn=conn)
            count = sa.select(sa.func.count()).select_from(t.outbox)
            assert (await conn.execute(count)).scalar() == 2
            raise Boom

    with pytest.raises(Boom):
        await write_then_fail()
    assert await kv.get(app, "k") is None
    assert await docs.get(app, "c", "d") is None
    assert await _outbox(engine) == []
    assert await factories.rows(engine, t.executions) == []


async def test_write_and_outbox_rows_commit_together(engine: AsyncEngine) -> None:
    """Joined writes become visible, with their rows, only at the caller's commit."""
    app, script, user, emitter = await _setup(engine)
    await PostgresTriggerRepo(engine).create_kv_trigger(CreateKvTrigger(app, script, user, "*"))
    kv = PostgresKvRepo(engine, emitter)
    async with engine.begin() as conn:
        await kv.set(app, "k", 1, conn=conn)
        assert await _outbox(engine) == []  # not visible outside yet
        assert not emitter.signal.pending  # and nobody was woken early
    assert len(await _outbox(engine)) == 1
    assert emitter.committed(conn) is True
    assert emitter.signal.pending


async def test_admin_write_wakes_the_dispatcher_after_commit(engine: AsyncEngine) -> None:
    """A write that owns its transaction notifies the signal once it committed."""
    app, script, user, emitter = await _setup(engine)
    await PostgresTriggerRepo(engine).create_kv_trigger(CreateKvTrigger(app, script, user, "*"))
    await PostgresKvRepo(engine, emitter).set(app, "k", 1)
    assert emitter.signal.pending
    assert await emitter.signal.wait(0) is True
    assert not emitter.signal.pending


async def test_dead_letter_event_fans_out_to_handlers(engine: AsyncEngine) -> None:
    """A dead letter fans out as dead-letter-handler rows pointing at it."""
    app, script, user, emitter = await _setup(engine)
    trig = await PostgresTriggerRepo(engine).create_dead_letter_trigger(
        CreateDeadLetterTrigger(app, script, user, (OutboxSourceKind.KV,))
    )
    event = DeadLetterEvent(
        DeadLetterId(uuid.uuid4()), OutboxSourceKind.KV, {"kind": "kv"}, {"kind": "timeout"}, 5
    )
    async with engine.begin() as conn:
        assert await emitter.emit(conn, app, event, 4) == 1
        http = DeadLetterEvent(event.dead_letter_id, OutboxSourceKind.HTTP, {}, {}, 1)
        assert await emitter.emit(conn, app, http, 4) == 0
    (row,) = [outbox_row_from_row(r) for r in await _outbox(engine)]
    assert (row.is_dead_letter_handler, row.dead_letter_id) == (True, event.dead_letter_id)
    assert (row.trigger_id, row.trigger_depth, row.payload) == (trig.id, 4, event.to_wire())


async def test_http_events_are_not_fanned_out(engine: AsyncEngine) -> None:
    """emit refuses an HTTP event: it is not a data change."""
    app, _, _, emitter = await _setup(engine)
    async with engine.connect() as conn:
        with pytest.raises(TypeError):
            await emitter.emit(conn, app, HttpEvent("GET", "/"), 0)
