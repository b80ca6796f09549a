"""The dispatcher end to end: real PostgreSQL, real sandboxed executor."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.dispatcher import CLAIM_ABORT_AFTER_STOP
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from picloud_shared.events import HttpEvent
from picloud_shared.ids import RouteId, ScriptId, new_execution_id
from picloud_shared.inbox import InboxResult
from picloud_shared.outbox import HttpDispatchPayload, NewOutboxRow, OutboxSourceKind
from picloud_shared.retry import Backoff, RetryPolicy
from picloud_shared.triggers import (
    CreateDeadLetterTrigger,
    CreateDocsTrigger,
    CreateKvTrigger,
    DocsOp,
    KvOp,
)
from tests.manager.dispatch_world import FAST_RETRY, World, make_world

pytestmark = pytest.mark.anyio

COPY_TO_MIRROR = """
def handle(event, ctx):
    ctx.kv.set("mirror:" + event["key"], {"value": event["value"], "prev": event["prev_value"],
                                         "depth": ctx.trigger_depth, "attempt": ctx.attempt})
"""
FAIL = """
def handle(event, ctx):
    raise RuntimeError("always broken")
"""
REJECT = """
def handle(event, ctx):
    ctx.reject("not acceptable")
"""


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine) as w:
        yield w


async def kv_trigger(
    world: World,
    source: str,
    glob: str,
    *,
    retry: RetryPolicy = FAST_RETRY,
    ops: tuple[KvOp, ...] = (),
) -> None:
    script = await world.script(source)
    await world.triggers.create_kv_trigger(
        CreateKvTrigger(world.app_id, script, world.owner, glob, ops, retry)
    )


async def test_kv_trigger_runs_its_script_and_commits_the_effect(world: World) -> None:
    """An admin KV write fires the trigger; the script's own write lands; the record succeeds."""
    await kv_trigger(world, COPY_TO_MIRROR, "user:*")
    await world.kv.set(world.app_id, "user:1", {"n": 1})
    await world.kv.set(world.app_id, "user:1", {"n": 2})
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
        await world.wait_count(t.executions, t.executions.c.status == "succeeded", at_least=2)
    mirror = await world.kv_value("mirror:user:1")
    assert mirror["depth"] == 0
    assert mirror["attempt"] == 1
    assert {mirror["value"]["n"], (mirror["prev"] or {}).get("n")} <= {1, 2, None}
    assert await world.count(t.outbox) == 0


async def test_docs_trigger_sees_data_and_prev_data(world: World) -> None:
    """A docs update carries data and prev_data to the script."""
    script = await world.script(
        "def handle(event, ctx):\n"
        "    ctx.kv.set('seen', [event['op'], event['data'], event['prev_data']])\n"
    )
    await world.triggers.create_docs_trigger(
        CreateDocsTrigger(world.app_id, script, world.owner, "orders", (DocsOp.UPDATE,), FAST_RETRY)
    )
    doc_id = (await world.docs.insert(world.app_id, "orders", {"total": 1})).id
    await world.docs.update(world.app_id, "orders", doc_id, {"total": 2})
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    assert await world.kv_value("seen") == ["update", {"total": 2}, {"total": 1}]


async def test_failing_trigger_is_retried_by_policy_then_dead_lettered(world: World) -> None:
    """max_attempts=3: three attempts, then one dead letter carrying the last error."""
    await kv_trigger(world, FAIL, "job:*")
    await world.kv.set(world.app_id, "job:1", 1)
    async with world.running():
        await world.wait_count(t.dead_letters)
    (dl,) = await world.rows(t.dead_letters)
    assert dl.attempts == 3
    assert dl.error_kind == "uncaught_exception"
    assert "always broken" in dl.error_message
    assert dl.source_kind == "kv"
    (execution,) = await world.rows(t.executions)
    assert execution.status == "dead_lettered"
    assert execution.attempts == 3
    assert await world.count(t.outbox) == 0


async def test_reject_dead_letters_at_once(world: World) -> None:
    """ctx.reject on a trigger: no retry, dead-lettered after one attempt."""
    await kv_trigger(world, REJECT, "job:*", retry=RetryPolicy(Backoff.CONSTANT, 10, 10, 5, 0.0))
    await world.kv.set(world.app_id, "job:1", 1)
    async with world.running():
        await world.wait_count(t.dead_letters)
    (dl,) = await world.rows(t.dead_letters)
    assert (dl.attempts, dl.error_kind) == (1, "rejected")


async def test_a_dead_letter_is_logged_without_the_scripts_text(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The operator's log names the dead letter and its error kind, never the script's
    message: it may quote the app's data, or forge a log line with a newline."""
    forged = "x\n2026-01-01 CRITICAL picloud: forged"
    await kv_trigger(
        world,
        f"def handle(event, ctx):\n    ctx.reject({forged!r})\n",
        "job:*",
        retry=RetryPolicy(Backoff.CONSTANT, 10, 10, 5, 0.0),
    )
    await world.kv.set(world.app_id, "job:1", 1)
    with caplog.at_level("INFO", logger="picloud.dispatcher"):
        async with world.running():
            await world.wait_count(t.dead_letters)
    (dl,) = await world.rows(t.dead_letters)
    assert dl.error_message == forged
    logged = [r.getMessage() for r in caplog.records]
    assert any(str(dl.id) in m and "(rejected)" in m for m in logged), logged
    assert not any("forged" in m for m in logged), logged


async def test_dead_letter_trigger_fires_and_marks_handled(world: World) -> None:
    """A dead letter fans out to the dead-letter trigger, whose success marks it handled."""
    await kv_trigger(world, REJECT, "job:*")
    handler = await world.script(
        "def handle(event, ctx):\n"
        "    e = event\n"
        "    ctx.kv.set('handled', [e['source_kind'], e['error']['kind'], e['attempts']])\n"
    )
    await world.triggers.create_dead_letter_trigger(
        CreateDeadLetterTrigger(world.app_id, handler, world.owner, (OutboxSourceKind.KV,))
    )
    await world.kv.set(world.app_id, "job:1", 1)
    async with world.running():
        await world.wait_count(t.dead_letters, t.dead_letters.c.resolution == "handled")
    assert await world.kv_value("handled") == ["kv", "rejected", 1]


async def test_a_handler_finishing_after_a_replay_leaves_the_letter_replayed(
    world: World,
) -> None:
    """A dead letter replayed while its handler (which writes nothing) still runs stays
    ``replayed``: the handler's group-committed success does not make it ``handled``
    (which would let it be replayed again)."""
    await kv_trigger(world, REJECT, "job:*")
    handler = await world.script("import time\ndef handle(event, ctx):\n    time.sleep(1)\n")
    await world.triggers.create_dead_letter_trigger(
        CreateDeadLetterTrigger(world.app_id, handler, world.owner, (OutboxSourceKind.KV,))
    )
    await world.kv.set(world.app_id, "job:1", 1)
    running = t.executions.c.status == "running"
    async with world.running():
        await world.wait_count(t.dead_letters)
        (letter,) = await world.rows(t.dead_letters)
        await world.wait_count(t.executions, running)
        (handling,) = await world.rows(t.executions, running)
        repo = PostgresDeadLetterRepo(world.engine, world.outbox, world.emitter)
        await repo.replay(world.app_id, letter.id)
        done = sa.and_(t.executions.c.id == handling.id, t.executions.c.status == "succeeded")
        await world.wait_count(t.executions, done)
    (letter,) = await world.rows(t.dead_letters, t.dead_letters.c.id == letter.id)
    assert letter.resolution == "replayed"


async def test_failing_dead_letter_handler_marks_handler_failed_and_does_not_recurse(
    world: World,
) -> None:
    """A broken handler is not retried, not dead-lettered, and fires nothing."""
    await kv_trigger(world, REJECT, "job:*")
    handler = await world.script(FAIL)
    await world.triggers.create_dead_letter_trigger(
        CreateDeadLetterTrigger(world.app_id, handler, world.owner, ())
    )
    await world.kv.set(world.app_id, "job:1", 1)
    async with world.running():
        await world.wait_count(t.dead_letters, t.dead_letters.c.resolution == "handler_failed")
        await anyio.sleep(0.3)  # give a (wrong) recursion the chance to show up
    assert await world.count(t.dead_letters) == 1
    statuses = await world.executions_by_status()
    assert statuses == {"dead_lettered": 1, "failed": 1}
    assert await world.count(t.outbox) == 0


async def test_self_triggering_script_stops_at_the_depth_limit(world: World) -> None:
    """Each run writes the key that triggers it; depth 0..8 run, depth 9 is skipped."""
    await kv_trigger(
        world,
        "def handle(event, ctx):\n    ctx.kv.set('loop', (event['value'] or 0) + 1)\n",
        "loop",
    )
    await world.kv.set(world.app_id, "loop", 0)
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.status == "skipped")
    statuses = await world.executions_by_status()
    assert statuses == {"succeeded": 9, "skipped": 1}
    (skipped,) = await world.rows(t.executions, t.executions.c.status == "skipped")
    assert skipped.trigger_depth == 9
    assert await world.kv_value("loop") == 9
    assert await world.count(t.dead_letters) == 0


async def test_revoked_principal_dead_letters_with_principal_revoked(world: World) -> None:
    """A registrant who lost app_manage_triggers: no run, no retry, a dead letter."""
    await kv_trigger(world, COPY_TO_MIRROR, "k")
    await world.apps.set_capabilities(world.app_id, world.owner, ["app_read", "app_manage_members"])
    await world.kv.set(world.app_id, "k", 1)
    async with world.running():
        await world.wait_count(t.dead_letters)
    (dl,) = await world.rows(t.dead_letters)
    assert (dl.error_kind, dl.attempts) == ("principal_revoked", 0)  # never ran
    assert await world.kv_value("mirror:k") is None


async def test_failed_attempt_leaves_no_partial_write(world: World) -> None:
    """Writes made before the script raised are rolled back on every attempt."""
    await kv_trigger(
        world,
        "def handle(event, ctx):\n    ctx.kv.set('partial', 1)\n    raise ValueError('late')\n",
        "job",
    )
    await world.kv.set(world.app_id, "job", 1)
    async with world.running():
        await world.wait_count(t.dead_letters)
    assert await world.kv_value("partial") is None


async def test_saturated_gate_runs_nothing_then_everything_exactly_once(world: World) -> None:
    """With every gate slot held elsewhere, rows wait; freed, each runs once, no attempt lost."""
    await kv_trigger(
        world, "def handle(event, ctx):\n    ctx.kv.set('ran:' + event['key'], 1)\n", "n:*"
    )
    held = [world.gate.try_acquire() for _ in range(world.gate.capacity)]
    for i in range(10):
        await world.kv.set(world.app_id, f"n:{i}", i)
    async with world.running():
        await anyio.sleep(0.5)
        assert await world.executions_by_status() == {"queued": 10}
        for permit in held:
            assert permit is not None
            permit.release()
        await world.wait_count(t.executions, t.executions.c.status == "succeeded", at_least=10)
    rows = await world.rows(t.executions)
    assert all(r.attempts == 1 for r in rows)


async def test_sync_http_row_answers_the_inbox(world: World) -> None:
    """An http row with reply_to is delivered to the waiting receiver."""
    script_id = await world.script("def handle(event, ctx):\n    return {'path': event['path']}\n")
    route = await _route(world, script_id)
    result = await sync_answer(world, script_id, route, HttpEvent("GET", "/hi"), timeout=20)
    assert result.response is not None
    assert result.response.body == b'{"path":"/hi"}'


async def test_sync_http_answer_without_receiver_is_recorded_abandoned(world: World) -> None:
    """When nobody waits any more, the answer lands in abandoned_executions."""
    script_id = await world.script("def handle(event, ctx):\n    return 'late'\n")
    route = await _route(world, script_id)
    inbox_id, receiver = world.inbox.register()
    receiver.close()
    row = http_row(
        world, script_id, route, HttpEvent("GET", "/"), reply_to=inbox_id, reply_node="node-a"
    )
    await world.outbox.enqueue(row)
    async with world.running():
        await world.wait_count(t.abandoned_executions)
    (abandoned,) = await world.rows(t.abandoned_executions)
    assert abandoned.execution_id == row.execution_id


async def test_async_http_row_records_its_result(world: World) -> None:
    """An async http execution keeps the script's response as its result."""
    script_id = await world.script("def handle(event, ctx):\n    return {'ok': event['json']}\n")
    route = await _route(world, script_id)
    row = http_row(world, script_id, route, HttpEvent("POST", "/", json=[1]))
    await world.outbox.enqueue(row)
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    (execution,) = await world.rows(t.executions)
    assert execution.result["status"] == 200
    assert execution.result["body"] == '{"ok":[1]}'
    assert execution.finished_at is not None


def http_row(
    world: World, script_id: ScriptId, route: uuid.UUID, event: HttpEvent, **reply: object
) -> NewOutboxRow:
    """The outbox row the orchestrator writes for a request to ``route``."""
    return NewOutboxRow(
        execution_id=new_execution_id(),
        app_id=world.app_id,
        source_kind=OutboxSourceKind.HTTP,
        payload=HttpDispatchPayload(RouteId(route), event.to_wire()).to_wire(),
        script_id=script_id,
        route_id=RouteId(route),
        **reply,  # type: ignore[arg-type]
    )


async def sync_answer(
    world: World, script_id: ScriptId, route: uuid.UUID, event: HttpEvent, *, timeout: float
) -> InboxResult:
    """What a caller waiting on ``route`` of this node gets, one dispatcher running."""
    inbox_id, receiver = world.inbox.register()
    row = http_row(world, script_id, route, event, reply_to=inbox_id, reply_node="node-a")
    with receiver:
        await world.outbox.enqueue(row)
        async with world.running():
            result = await receiver.receive(timeout=timeout)
    assert result is not None
    return result


async def _route(world: World, script_id: ScriptId) -> uuid.UUID:
    return await world.route(script_id, f"/r{uuid.uuid4().hex[:6]}")


async def test_a_records_finish_is_when_the_execution_finished(world: World) -> None:
    """``finished_at`` is when the execution committed, not when its transaction began
    (at its first host call): a script that reads, then works for 0.5 s, has a record
    that spans the 0.5 s."""
    source = (
        "import time\ndef handle(event, ctx):\n    ctx.kv.get('x')\n"
        "    time.sleep(0.5)\n    ctx.kv.set('done', 1)\n"
    )
    await kv_trigger(world, source, "k")
    await world.kv.set(world.app_id, "k", 1)
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    (record,) = await world.rows(t.executions)
    assert (record.finished_at - record.started_at).total_seconds() >= 0.5


async def test_a_row_that_keeps_crashing_its_worker_ends_dead_lettered(world: World) -> None:
    """A worker crash counts as an attempt; at max_attempts the row is dead-lettered."""
    await kv_trigger(world, "import os\ndef handle(event, ctx):\n    os._exit(3)\n", "boom")
    await world.kv.set(world.app_id, "boom", 1)
    async with world.running():
        await world.wait_count(t.dead_letters)
    (dl,) = await world.rows(t.dead_letters)
    assert (dl.attempts, dl.error_kind) == (3, "worker_crash")


async def test_a_row_whose_node_died_on_its_last_attempt_is_dead_lettered_not_run(
    world: World,
) -> None:
    """Attempts counted at claim time survive a node's death: past max_attempts, no run;
    the claim that finds the runs used up is no attempt (3 of 3, not 4)."""
    await kv_trigger(world, COPY_TO_MIRROR, "k")
    await world.kv.set(world.app_id, "k", 1)
    async with world.engine.begin() as conn:  # three claims whose node died mid-run
        await conn.execute(sa.update(t.outbox).values(attempt_count=3))
    async with world.running():
        await world.wait_count(t.dead_letters)
    (dl,) = await world.rows(t.dead_letters)
    assert (dl.attempts, dl.error_kind) == (3, "worker_crash")
    (record,) = await world.rows(t.executions)
    assert record.attempts == 3
    assert await world.kv_value("mirror:k") is None


async def test_a_slow_lease_recovery_does_not_hold_up_claims(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery runs beside the claim loop: while it hangs (here 30 s; a database
    under pressure, or the 6 s plan of session 4), due rows are still claimed and run."""
    recoveries: list[float] = []

    async def hanging_recovery(**_: object) -> int:
        recoveries.append(time.monotonic())
        await anyio.sleep(30)
        return 0

    monkeypatch.setattr(world.outbox, "recover_expired", hanging_recovery)
    await kv_trigger(world, COPY_TO_MIRROR, "user:*")
    await world.kv.set(world.app_id, "user:1", {"n": 1})
    async with world.running():
        with anyio.fail_after(10):
            await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    assert recoveries, "recovery never ran"
    assert await world.kv_value("mirror:user:1") is not None


async def test_stop_lets_in_flight_executions_finish_within_the_grace(world: World) -> None:
    """stop() stops claiming but a running script completes and commits."""
    await kv_trigger(
        world,
        "import time\ndef handle(event, ctx):\n    time.sleep(0.5)\n    ctx.kv.set('done', 1)\n",
        "go",
    )
    await world.kv.set(world.app_id, "go", 1)
    async with world.running(world.dispatcher(shutdown_grace=10)):
        await world.wait_count(t.executions, t.executions.c.status == "running")
    assert await world.executions_by_status() == {"succeeded": 1}
    assert await world.kv_value("done") == 1


async def test_stop_cuts_short_a_claim_stuck_waiting_for_the_database(world: World) -> None:
    """A claim waiting for a connection (every one taken, as when PostgreSQL went
    away) does not hold stop() for the pool's 30 s timeout: it is cut after
    CLAIM_ABORT_AFTER_STOP."""
    pool = world.outbox._pool
    assert pool is not None
    dispatcher = world.dispatcher(poll_interval=0.02)
    async with contextlib.AsyncExitStack() as held:
        for _ in range(pool.max_size):  # nothing left for the claim
            await held.enter_async_context(pool.connection())
        async with anyio.create_task_group() as tg:
            await tg.start(dispatcher.run)
            await anyio.sleep(0.3)  # the claim loop is waiting for a connection
            assert dispatcher._claiming is not None
            started = time.monotonic()
            dispatcher.stop()
        stopped_after = time.monotonic() - started
    assert stopped_after < CLAIM_ABORT_AFTER_STOP + 5  # not the pool's 30 s


async def test_stop_gives_back_what_outlives_the_grace_and_it_runs_later(world: World) -> None:
    """Past the grace period the execution is cancelled, its row given back uncounted,
    and the next dispatcher runs it once."""
    await kv_trigger(
        world,
        "import time\ndef handle(event, ctx):\n"
        "    if ctx.kv.get('slow') is None:\n        time.sleep(30)\n    ctx.kv.set('done', 1)\n",
        "go",
    )
    await world.kv.set(world.app_id, "go", 1)
    async with world.running(world.dispatcher(shutdown_grace=0.3)):
        await world.wait_count(t.executions, t.executions.c.status == "running")
    (row,) = await world.rows(t.outbox)
    assert (row.claimed_until, row.attempt_count) == (None, 0)
    assert await world.executions_by_status() == {"queued": 1}
    await world.kv.set(world.app_id, "slow", False)
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    (execution,) = await world.rows(t.executions)
    assert execution.attempts == 1
    assert await world.kv_value("done") == 1


async def test_a_sync_row_whose_caller_was_let_go_at_stop_is_failed_not_given_back(
    world: World,
) -> None:
    """A stopping node answers its waiting sync callers (InboxRegistry.stop_waiting);
    a sync execution still running past the grace is then booked failed at once, its
    effects discarded, rather than given back to sit queued until another node fails it
    minutes later."""
    script_id = await world.script(
        "import time\ndef handle(event, ctx):\n    ctx.kv.set('ran', 1)\n    time.sleep(30)\n",
        timeout=60,
    )
    route = await _route(world, script_id)
    inbox_id, receiver = world.inbox.register()
    with receiver:
        row = http_row(
            world, script_id, route, HttpEvent("GET", "/"), reply_to=inbox_id, reply_node="node-a"
        )
        async with world.running(world.dispatcher("node-a", shutdown_grace=0.3)):
            await world.outbox.enqueue(row)
            await world.wait_count(t.executions, t.executions.c.status == "running")
            assert world.inbox.stop_waiting() == 1
    assert await world.rows(t.outbox) == []
    (execution,) = await world.rows(t.executions)
    assert (execution.status, execution.error_kind) == ("failed", "timeout")
    assert "stopped waiting" in execution.error_message
    assert await world.count(t.abandoned_executions) == 1
    assert await world.kv_value("ran") is None


async def test_sync_rows_run_only_on_the_node_whose_caller_waits(world: World) -> None:
    """Another node never runs a sync row it cannot answer; once orphaned (older than the
    longest wait), any node fails it without running it."""
    script_id = await world.script("def handle(event, ctx):\n    ctx.kv.set('ran', 1)\n")
    route = await _route(world, script_id)
    inbox_id, receiver = world.inbox.register()  # as if this node's inbox were elsewhere
    receiver.close()
    row = http_row(
        world,
        script_id,
        route,
        HttpEvent("GET", "/"),
        reply_to=inbox_id,
        reply_node="node-elsewhere",
    )
    await world.outbox.enqueue(row)
    async with world.running(world.dispatcher("node-a")):
        await anyio.sleep(0.5)
    assert await world.executions_by_status() == {"queued": 1}
    async with world.engine.begin() as conn:
        await conn.execute(
            sa.update(t.outbox).values(created_at=sa.text("now() - interval '1 hour'"))
        )
    async with world.running(world.dispatcher("node-a")):
        await world.wait_count(t.executions, t.executions.c.status == "failed")
    (execution,) = await world.rows(t.executions)
    assert execution.error_kind == "worker_crash"
    assert await world.kv_value("ran") is None


async def test_rows_that_lose_their_slot_after_the_claim_are_given_back_uncounted(
    world: World,
) -> None:
    """Sync HTTP may take the free slots between a claim and its permits: those rows go
    back due at once, no attempt counted, and run later exactly once."""
    await kv_trigger(
        world, "def handle(event, ctx):\n    ctx.kv.set('ran:' + event['key'], 1)\n", "n:*"
    )
    for i in range(3):
        await world.kv.set(world.app_id, f"n:{i}", i)
    dispatcher = world.dispatcher()
    real_claim = dispatcher._claim
    stolen: list[object] = []

    async def claim_then_lose_the_slots(limit: int):  # type: ignore[no-untyped-def]
        claims = await real_claim(limit)
        if claims and not stolen:  # the first claim races a burst of sync requests
            while (permit := world.gate.try_acquire()) is not None:
                stolen.append(permit)
        return claims

    dispatcher._claim = claim_then_lose_the_slots  # type: ignore[method-assign]
    async with world.running(dispatcher):
        await world.wait_for(lambda: _has(stolen))
        await anyio.sleep(0.3)
        assert await world.executions_by_status() == {"queued": 3}
        assert {r.attempt_count for r in await world.rows(t.outbox)} == {0}
        for permit in stolen:
            permit.release()  # type: ignore[attr-defined]
        await world.wait_count(t.executions, t.executions.c.status == "succeeded", at_least=3)
    assert {r.attempts for r in await world.rows(t.executions)} == {1}


async def _has(items: list[object]) -> bool:
    return bool(items)


async def test_a_row_whose_trigger_was_deleted_is_dead_lettered_at_once(world: World) -> None:
    """The trigger was deleted while its row waited: no attempt could ever run it, so it
    is dead-lettered at once (not retried up to max_attempts), not run, after 0 runs."""
    await kv_trigger(world, COPY_TO_MIRROR, "k")  # FAST_RETRY: 3 attempts
    (trigger,) = await world.rows(t.triggers)
    await world.kv.set(world.app_id, "k", 1)
    async with world.engine.begin() as conn:
        await conn.execute(sa.delete(t.triggers).where(t.triggers.c.id == trigger.id))
    async with world.running():
        await world.wait_count(t.dead_letters)
    (dl,) = await world.rows(t.dead_letters)
    assert (dl.attempts, dl.error_message) == (0, "the trigger no longer exists")
    (record,) = await world.rows(t.executions)
    assert record.attempts == 0
    assert await world.executions_by_status() == {"dead_lettered": 1}
    assert await world.kv_value("mirror:k") is None


async def test_a_retrying_row_whose_trigger_was_deleted_keeps_its_last_error(
    world: World,
) -> None:
    """The trigger was deleted while its row waited for a retry: the dead letter says
    why it is dead and keeps what the attempt that ran failed with (message, traceback,
    logs); the claim that found the trigger gone ran nothing and is no attempt."""
    source = "def handle(event, ctx):\n    ctx.log('tried')\n    raise ValueError('boom')\n"
    slow = RetryPolicy(Backoff.CONSTANT, 60_000, 60_000, 5, 0.0)
    await kv_trigger(world, source, "k", retry=slow)
    (trigger,) = await world.rows(t.triggers)
    await world.kv.set(world.app_id, "k", 1)
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.status == "retrying")
    async with world.engine.begin() as conn:
        await conn.execute(sa.delete(t.triggers).where(t.triggers.c.id == trigger.id))
        await conn.execute(sa.update(t.outbox).values(run_at=sa.func.now()))
    async with world.running():
        await world.wait_count(t.dead_letters)
    (dl,) = await world.rows(t.dead_letters)
    assert dl.attempts == 1
    assert dl.error_message == (
        "the trigger no longer exists (attempt 1 had failed: uncaught_exception: ValueError: boom)"
    )
    assert "raise ValueError('boom')" in dl.error_traceback
    (record,) = await world.rows(t.executions)
    assert (record.status, record.error_message) == ("dead_lettered", dl.error_message)
    assert record.logs == ["tried"]


async def test_a_registrant_who_no_longer_exists_is_principal_revoked(world: World) -> None:
    """The trigger's registrant was deleted: dead-lettered as principal_revoked, not run."""
    await kv_trigger(world, COPY_TO_MIRROR, "k")
    async with world.engine.begin() as conn:
        await conn.execute(sa.delete(t.users).where(t.users.c.id == world.owner))
    await world.kv.set(world.app_id, "k", 1)
    async with world.running():
        await world.wait_count(t.dead_letters)
    (dl,) = await world.rows(t.dead_letters)
    assert (dl.error_kind, dl.attempts) == ("principal_revoked", 0)
    assert "no longer exists" in dl.error_message
