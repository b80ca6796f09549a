"""Local hand-off: a row enqueued on a node whose dispatcher runs is written already
claimed by it and run without a claim transaction — and stays crash safe."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.claim_runner import CUT_OFF
from manager_core.postgres import outbox_claims, outbox_enqueue
from manager_core.postgres.outbox_claims import ScriptSources
from picloud_shared.errors import NotFound
from picloud_shared.events import HttpEvent
from picloud_shared.execution import ExecResult, ScriptResponse
from picloud_shared.ids import InboxId
from tests.manager.dispatch_world import World, make_world
from tests.manager.test_dispatcher import _route, http_row

pytestmark = pytest.mark.anyio

SET_RAN = "def handle(event, ctx):\n    ctx.kv.set('ran', ctx.attempt)\n    return 'ok'\n"


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine, gate_size=2) as w:
        yield w


async def _sync_row(world: World, source: str, node: str = "node-a"):  # type: ignore[no-untyped-def]
    script_id = await world.script(source)
    route = await _route(world, script_id)
    inbox_id, receiver = world.inbox.register()
    row = http_row(
        world, script_id, route, HttpEvent("GET", "/"), reply_to=inbox_id, reply_node=node
    )
    return row, receiver


async def test_a_sync_row_is_handed_to_the_local_dispatcher_without_a_claim(world: World) -> None:
    """Enqueued while its node's dispatcher runs: run at once, no claim statement."""
    dispatcher = world.dispatcher("node-a")
    async with world.running(dispatcher):
        row, receiver = await _sync_row(world, SET_RAN)
        with receiver:
            await world.outbox.enqueue(row)
            result = await receiver.receive(timeout=20)
    assert result is not None
    assert result.response is not None
    assert result.response.body == b"ok"
    assert dispatcher.metrics.handed_off == 1
    assert dispatcher.metrics.claimed == 0
    (execution,) = await world.rows(t.executions)
    assert (execution.status, execution.attempts) == ("succeeded", 1)
    assert await world.count(t.outbox) == 0


async def test_an_async_row_is_handed_off_and_its_result_recorded(world: World) -> None:
    """An async HTTP row enqueued on a running node runs without being claimed."""
    dispatcher = world.dispatcher("node-a")
    script_id = await world.script(SET_RAN)
    route = await _route(world, script_id)
    async with world.running(dispatcher):
        await world.outbox.enqueue(http_row(world, script_id, route, HttpEvent("POST", "/")))
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    assert (dispatcher.metrics.handed_off, dispatcher.metrics.claimed) == (1, 0)
    assert await world.kv_value("ran") == 1


async def test_a_sync_row_of_another_node_is_not_handed_off(world: World) -> None:
    """Only the dispatcher of the row's reply_node may take it; it stays due, unclaimed."""
    dispatcher = world.dispatcher("node-a")
    async with world.running(dispatcher):
        row, receiver = await _sync_row(world, SET_RAN, node="node-b")
        receiver.close()
        await world.outbox.enqueue(row)
        await anyio.sleep(0.3)
    assert dispatcher.metrics.handed_off == 0
    (outbox,) = await world.rows(t.outbox)
    assert (outbox.claimed_by, outbox.attempt_count) == (None, 0)
    assert await world.executions_by_status() == {"queued": 1}


async def test_without_a_free_slot_the_row_is_written_due_and_claimed_later(world: World) -> None:
    """A saturated gate: the row is written unclaimed, and runs through a claim once a
    slot frees, exactly once."""
    dispatcher = world.dispatcher("node-a")
    held = [world.gate.try_acquire(), world.gate.try_acquire()]
    async with world.running(dispatcher):
        row, receiver = await _sync_row(world, SET_RAN)
        with receiver:
            await world.outbox.enqueue(row)
            (outbox,) = await world.rows(t.outbox)
            assert outbox.claimed_by is None
            for permit in held:
                assert permit is not None
                permit.release()
            result = await receiver.receive(timeout=20)
    assert result is not None
    assert result.response is not None
    assert (dispatcher.metrics.handed_off, dispatcher.metrics.claimed) == (0, 1)
    assert await world.kv_value("ran") == 1


async def test_under_load_an_async_row_is_left_to_a_batched_claim(engine: AsyncEngine) -> None:
    """With more than half the gate busy, an async row is written due, to be claimed in
    a batch later (a sync row, whose caller waits, takes any free slot)."""
    async with make_world(engine, gate_size=4) as world:
        await _under_load(world)


async def _under_load(world: World) -> None:
    dispatcher = world.dispatcher("node-a")
    script_id = await world.script(SET_RAN)
    route = await _route(world, script_id)
    held = [world.gate.try_acquire() for _ in range(3)]  # 1 of 4 free
    async with world.running(dispatcher):
        await world.outbox.enqueue(http_row(world, script_id, route, HttpEvent("POST", "/")))
        for permit in held:
            assert permit is not None
            permit.release()
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    assert (dispatcher.metrics.handed_off, dispatcher.metrics.claimed) == (0, 1)


async def test_a_stopped_dispatcher_takes_no_hand_off(world: World) -> None:
    """After stop, enqueue writes plain due rows (a later node claims them)."""
    dispatcher = world.dispatcher("node-a")
    async with world.running(dispatcher):
        pass
    row, receiver = await _sync_row(world, SET_RAN)
    receiver.close()
    await world.outbox.enqueue(row)
    (outbox,) = await world.rows(t.outbox)
    assert outbox.claimed_by is None
    assert dispatcher.metrics.handed_off == 0


async def _write_claimed_then_die(world: World, row: object, lease: float) -> None:
    """What a node leaves behind when it dies right after writing a row claimed."""
    async with world.engine.connect() as conn:
        written = await outbox_enqueue.write(
            conn,
            [outbox_enqueue.Pending(row, "dead-node/x")],  # type: ignore[arg-type]
            lease_seconds=lease,
            sources=ScriptSources(),
        )
        await conn.commit()
    (claim,) = written.values()
    assert claim.row.attempt_count == 1


async def test_a_sync_row_whose_node_died_after_writing_it_is_failed_not_run(
    world: World,
) -> None:
    """Its caller died with the node: once its lease expired and nobody can wait for it
    any more, another node fails it without running it."""
    row, receiver = await _sync_row(world, SET_RAN, node="dead-node")
    receiver.close()
    await _write_claimed_then_die(world, row, lease=0.2)
    async with world.running(world.dispatcher("node-a")):
        await world.wait_for(_lease_recovered(world))
        assert await world.executions_by_status() == {"running": 1}  # not run meanwhile
        async with world.engine.begin() as conn:  # past the longest possible wait
            await conn.execute(
                sa.update(t.outbox).values(created_at=sa.text("now() - interval '1 hour'"))
            )
        await world.wait_count(t.executions, t.executions.c.status == "failed")
    (execution,) = await world.rows(t.executions)
    assert execution.error_kind == "worker_crash"
    assert execution.error_message == CUT_OFF
    assert execution.attempts == 1  # the run its node died in; failing it ran nothing
    assert await world.kv_value("ran") is None


def _lease_recovered(world: World):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        (row,) = await world.rows(t.outbox)
        return row.claimed_by is None

    return check


async def test_an_async_row_whose_node_died_after_writing_it_runs_elsewhere(
    world: World,
) -> None:
    """Nothing is lost: after the lease expires another node runs it (attempt 2)."""
    script_id = await world.script(SET_RAN)
    route = await _route(world, script_id)
    row = http_row(world, script_id, route, HttpEvent("POST", "/"))
    await _write_claimed_then_die(world, row, lease=0.2)
    async with world.running(world.dispatcher("node-a")):
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    assert await world.kv_value("ran") == 2


@pytest.mark.parametrize(("sync", "own"), [(True, True), (False, True), (True, False)])
async def test_only_a_sync_row_is_written_without_waiting_for_the_disk(
    world: World, sync: bool, own: bool
) -> None:
    """A sync row's own write commits asynchronously (its caller dies with a crash); an
    async row's is durable (its 202 promised acceptance); a caller's transaction keeps
    its own commit mode whatever it writes."""
    script_id = await world.script(SET_RAN)
    route = await _route(world, script_id)
    reply = {"reply_to": InboxId(uuid.uuid4()), "reply_node": "n"} if sync else {}
    row = http_row(world, script_id, route, HttpEvent("GET", "/"), **reply)
    async with world.engine.begin() as conn:
        await conn.execute(sa.text("SET LOCAL synchronous_commit = remote_write"))
        await outbox_enqueue.write(
            conn,
            [outbox_enqueue.Pending(row, "n/x")],
            lease_seconds=30,
            sources=ScriptSources(),
            own_transaction=own,
        )
        mode = (await conn.execute(sa.text("SHOW synchronous_commit"))).scalar_one()
    assert mode == ("off" if sync and own else "remote_write")


@pytest.mark.parametrize("own", [True, False])
async def test_a_no_write_completion_is_committed_without_waiting_for_the_disk(
    world: World, own: bool
) -> None:
    """Its own statement records bookkeeping only (the script wrote nothing): it does
    not wait for the disk; in a caller's transaction it keeps that commit mode."""
    script_id = await world.script(SET_RAN)
    route = await _route(world, script_id)
    row = http_row(world, script_id, route, HttpEvent("GET", "/"))
    async with world.engine.begin() as conn:
        written = await outbox_enqueue.write(
            conn, [outbox_enqueue.Pending(row, "n/x")], lease_seconds=30, sources=ScriptSources()
        )
    (claim,) = written.values()
    result = ExecResult.succeeded(row.execution_id, ScriptResponse.empty(), ("line",), 1.0)
    async with world.engine.begin() as conn:
        await conn.execute(sa.text("SET LOCAL synchronous_commit = remote_write"))
        owned = await outbox_claims.complete_batch(conn, [(claim, result)], own_transaction=own)
        mode = (await conn.execute(sa.text("SHOW synchronous_commit"))).scalar_one()
    assert mode == ("off" if own else "remote_write")
    assert owned == {claim.row.id}
    assert await world.rows(t.outbox) == []
    (execution,) = await world.rows(t.executions)
    assert (execution.status, execution.logs) == ("succeeded", ["line"])


async def test_a_no_write_execution_is_group_committed_with_its_logs_and_result(
    world: World,
) -> None:
    """No data touched: the completer records status, attempts, logs and the response."""
    dispatcher = world.dispatcher("node-a")
    source = "def handle(event, ctx):\n    ctx.log('one')\n    ctx.log('two')\n    return [1]\n"
    script_id = await world.script(source)
    route = await _route(world, script_id)
    async with world.running(dispatcher):
        await world.outbox.enqueue(http_row(world, script_id, route, HttpEvent("POST", "/")))
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    assert dispatcher._completer.rows == 1
    (execution,) = await world.rows(t.executions)
    assert execution.logs == ["one", "two"]
    assert (execution.attempts, execution.result["status"], execution.result["body"]) == (
        1,
        200,
        "[1]",
    )
    assert execution.finished_at is not None


async def test_rows_no_runner_took_before_the_stop_are_given_back_uncounted(
    world: World,
) -> None:
    """A row handed to the runners but not started when the dispatcher stops goes back
    due, its attempt not counted, its slot freed."""
    dispatcher = world.dispatcher("node-a")
    script_id = await world.script(SET_RAN)
    route = await _route(world, script_id)
    await world.outbox.enqueue(http_row(world, script_id, route, HttpEvent("POST", "/")))
    (claim,) = await world.outbox.claim_due("node-a", 10, 30)
    permit = world.gate.try_acquire()
    assert permit is not None
    send, receive = anyio.create_memory_object_stream[object](10)
    with send, receive:
        dispatcher._started()
        send.send_nowait((claim, permit))
        await dispatcher._give_back_unstarted(receive)  # type: ignore[arg-type]
    (row,) = await world.rows(t.outbox)
    assert (row.claimed_by, row.attempt_count) == (None, 0)
    assert world.gate.free == world.gate.capacity
    assert await world.executions_by_status() == {"queued": 1}


async def test_a_row_violating_a_constraint_fails_alone_in_its_batch(world: World) -> None:
    """On the pool (plain psycopg errors) as on the engine: the row that cannot be
    written (here a reused execution id) fails with NotFound, and the rows batched with
    it are written."""
    script_id = await world.script(SET_RAN)
    route = await _route(world, script_id)
    first = http_row(world, script_id, route, HttpEvent("POST", "/"))
    await world.outbox.enqueue(first)  # no dispatcher: written due
    others = [http_row(world, script_id, route, HttpEvent("POST", "/")) for _ in range(5)]
    outcomes: list[str] = []

    async def enqueue(row: object) -> None:
        try:
            await world.outbox.enqueue(row)  # type: ignore[arg-type]
            outcomes.append("ok")
        except NotFound:
            outcomes.append("not_found")

    async with anyio.create_task_group() as tg:
        for row in [*others[:2], first, *others[2:]]:
            tg.start_soon(enqueue, row)
    assert sorted(outcomes) == ["not_found"] + ["ok"] * 5
    assert await world.count(t.outbox) == 6
