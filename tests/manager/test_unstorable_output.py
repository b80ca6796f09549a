"""Script output PostgreSQL cannot hold as text (a NUL) still ends in a final,
readable execution record; and a row it cannot store fails alone, never the batch
of other executions it was group-committed with."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator

import anyio
import psycopg
import pytest
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.completer import BatchCompleter
from manager_core.guarded_host import GuardedHost, HostUnavailable
from manager_core.postgres.outbox import ClaimedRow
from picloud_shared.errors import InvalidInput
from picloud_shared.events import HttpEvent
from picloud_shared.execution import ExecResult, ScriptResponse
from picloud_shared.outbox import NewOutboxRow
from picloud_shared.ports import HostApi
from tests.manager.dispatch_world import World, make_world
from tests.manager.test_dispatcher import _route, http_row, kv_trigger, sync_answer

pytestmark = pytest.mark.anyio

NUL_OUTPUT = """
def handle(event, ctx):
    print("log\\x00line")
    if event["method"] == "DELETE":
        raise ValueError("bad\\x00value")
    return ctx.response(b"a\\x00b")
"""


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine) as w:
        yield w


async def test_a_response_and_logs_with_nul_are_recorded(world: World) -> None:
    """The body is kept whole (base64), the log line with U+FFFD for the NUL."""
    script_id = await world.script(NUL_OUTPUT)
    route = await _route(world, script_id)
    await world.outbox.enqueue(http_row(world, script_id, route, HttpEvent("GET", "/")))
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    (execution,) = await world.rows(t.executions)
    assert execution.result["body_encoding"] == "base64"
    assert base64.b64decode(execution.result["body"]) == b"a\x00b"
    assert execution.logs == ["log\ufffdline"]


async def test_a_sync_caller_gets_the_body_with_its_nul(world: World) -> None:
    script_id = await world.script(NUL_OUTPUT)
    route = await _route(world, script_id)
    result = await sync_answer(world, script_id, route, HttpEvent("GET", "/"), timeout=20)
    assert result.response is not None
    assert result.response.body == b"a\x00b"


async def test_an_error_message_with_nul_is_retried_and_dead_lettered(world: World) -> None:
    await kv_trigger(world, 'def handle(e, ctx):\n    raise ValueError("bad\\x00value")\n', "j:*")
    await world.kv.set(world.app_id, "j:1", 1)
    async with world.running():
        await world.wait_count(t.dead_letters)
    (dead,) = await world.rows(t.dead_letters)
    assert dead.error_message == "ValueError: bad\ufffdvalue"
    (execution,) = await world.rows(t.executions)
    assert execution.status == "dead_lettered"
    assert execution.error_message == "ValueError: bad\ufffdvalue"


async def test_a_completion_postgres_refuses_fails_alone_not_its_batch(world: World) -> None:
    """Three no-write completions: the first flushes alone, the next two share a
    statement. If the second cannot be stored, the third is still committed."""
    script_id = await world.script("def handle(e, ctx):\n    pass\n")
    route = await _route(world, script_id)
    rows: list[NewOutboxRow] = [
        http_row(world, script_id, route, HttpEvent("GET", "/")) for _ in range(3)
    ]
    for row in rows:
        await world.outbox.enqueue(row)
    claims = await world.outbox.claim_due("node-x", 10, 60)
    order = {row.execution_id: i for i, row in enumerate(rows)}
    claims.sort(key=lambda c: order[c.row.execution_id])
    results = [ExecResult.succeeded(c.row.execution_id, ScriptResponse.empty()) for c in claims]
    # Nothing a script sends gets this far any more; a future value PostgreSQL refuses
    # must still cost only its own execution.
    object.__setattr__(results[1], "logs", ("poison\x00",))
    completer = BatchCompleter(world.outbox)
    outcomes: dict[int, object] = {}

    async def complete(i: int) -> None:
        try:
            outcomes[i] = await completer.complete(claims[i], results[i])
        except (DBAPIError, psycopg.DataError) as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(complete, i)
    assert outcomes[0] is True
    assert isinstance(outcomes[1], (DBAPIError, psycopg.DataError))
    assert outcomes[2] is True
    done = {r.id for r in await world.rows(t.executions, t.executions.c.status == "succeeded")}
    assert done == {claims[0].row.execution_id, claims[2].row.execution_id}
    assert uuid.UUID(str(claims[1].row.execution_id)) not in done


async def test_an_enqueue_postgres_refuses_fails_alone_not_its_batch(world: World) -> None:
    """Same for the group-committed enqueue: the first row writes alone, the next two
    share a statement, and only the one PostgreSQL refuses fails."""
    script_id = await world.script("def handle(e, ctx):\n    pass\n")
    route = await _route(world, script_id)
    rows = [http_row(world, script_id, route, HttpEvent("GET", "/")) for _ in range(3)]
    # The orchestrator never builds such an event any more (U+FFFD for NUL).
    rows[1] = http_row(world, script_id, route, HttpEvent("GET", "/", body="nul\x00"))
    outcomes: dict[int, object] = {}

    async def enqueue(i: int) -> None:
        try:
            await world.outbox.enqueue(rows[i])
            outcomes[i] = True
        except (DBAPIError, psycopg.DataError) as exc:
            outcomes[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(enqueue, i)
    assert outcomes[0] is True
    assert isinstance(outcomes[1], (DBAPIError, psycopg.DataError))
    assert outcomes[2] is True
    written = {r.id for r in await world.rows(t.executions)}
    assert written == {rows[0].execution_id, rows[2].execution_id}


async def test_a_script_that_catches_a_refused_write_keeps_its_transaction(world: World) -> None:
    """The script is told why (InvalidInput), carries on, and its other writes commit."""
    source = (
        "def handle(event, ctx):\n"
        "    try:\n"
        "        ctx.docs.insert('c', {'a': 'x\\x00'})\n"
        "    except ctx.Error as exc:\n"
        "        ctx.kv.set('why', str(exc))\n"
        "    ctx.docs.insert('c', {'a': 'ok'}, id='d1')\n"
    )
    script_id = await world.script(source)
    route = await _route(world, script_id)
    await world.outbox.enqueue(http_row(world, script_id, route, HttpEvent("GET", "/")))
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    assert "NUL" in await world.kv_value("why")
    (doc,) = await world.rows(t.documents)
    assert doc.data == {"a": "ok"}


class _RefusingHost:
    """An inner host whose repo turned a refused statement into a clear error."""

    async def kv_set(self, key: str, value: object) -> None:
        try:
            raise psycopg.errors.UntranslatableCharacter("unsupported Unicode escape")
        except psycopg.Error as exc:
            raise InvalidInput("the value cannot be stored") from exc


async def test_the_guard_records_a_refusal_a_repo_made_readable() -> None:
    """The transaction behind such an error is aborted: the guard records it, so the
    execution fails cleanly instead of committing on a dead transaction."""

    async def open_inner() -> HostApi:
        return _RefusingHost()  # type: ignore[return-value]

    guard = GuardedHost(open_inner)
    with pytest.raises(InvalidInput):
        await guard.kv_set("k", 1)
    assert isinstance(guard.db_error, psycopg.Error)
    with pytest.raises(HostUnavailable):
        await guard.kv_set("k", 2)


async def _no_write_claims(world: World, n: int, **reply: object) -> list[ClaimedRow]:
    script_id = await world.script("def handle(e, ctx):\n    pass\n")
    route = await _route(world, script_id)
    for _ in range(n):
        await world.outbox.enqueue(
            http_row(world, script_id, route, HttpEvent("GET", "/"), **reply)
        )
    return await world.outbox.claim_due("node-a", n, 60)


@pytest.mark.parametrize(
    ("linger", "running", "sync", "batches"),
    [
        (0.0, 3, False, 2),  # no linger: the first flushes alone, the next two together
        (1.0, 3, False, 1),  # the first waits for the two others still running
        (1.0, 1, False, 2),  # nothing else runs: no reason to wait
        (1.0, 3, True, 2),  # a sync caller waits for its answer: never held back
    ],
    ids=["no-linger", "linger", "alone", "sync"],
)
async def test_completions_linger_only_for_executions_still_running(
    world: World, linger: float, running: int, sync: bool, batches: int
) -> None:
    """Three no-write completions at once. With a linger and other executions in
    flight, the first flush waits for the others: one statement for all three."""
    reply = {"reply_to": world.inbox.register()[0], "reply_node": "node-a"} if sync else {}
    claims = await _no_write_claims(world, 3, **reply)
    completer = BatchCompleter(world.outbox, linger=linger, running=lambda: running)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for claim in claims:
                result = ExecResult.succeeded(claim.row.execution_id, ScriptResponse.empty())
                tg.start_soon(completer.complete, claim, result)
    assert (completer.rows, completer.batches) == (3, batches)
    assert completer.lingered == (1 if batches == 1 else 0)
    assert len(await world.rows(t.executions, t.executions.c.status == "succeeded")) == 3


async def test_a_sync_completion_cuts_a_linger_short(world: World) -> None:
    """Two async completions linger for others still running; a sync one arriving
    meanwhile ends the wait: all three go in one statement at once."""
    claims = await _no_write_claims(world, 2)
    inbox_id, _ = world.inbox.register()
    (sync,) = await _no_write_claims(world, 1, reply_to=inbox_id, reply_node="node-a")
    completer = BatchCompleter(world.outbox, linger=5.0, running=lambda: 3)

    async def complete(claim: ClaimedRow) -> None:
        result = ExecResult.succeeded(claim.row.execution_id, ScriptResponse.empty())
        await completer.complete(claim, result)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            for claim in claims:
                tg.start_soon(complete, claim)
            await anyio.wait_all_tasks_blocked()
            assert (completer.lingered, completer.batches) == (1, 0)
            tg.start_soon(complete, sync)
            await anyio.wait_all_tasks_blocked()
            assert completer.batches == 1  # flushed, the 5 s linger cut short
    assert (completer.rows, completer.batches, completer.lingered) == (3, 1, 1)
