"""Transactions PostgreSQL aborts for a deadlock or a serialization failure are run
again, where running again is safe: admin deletes, the group-committed enqueue
and completion (the admin API's 503 ``busy``: tests/manager/api/test_busy.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import psycopg
import pytest
import sqlalchemy as sa
from psycopg_pool import PoolTimeout
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.db import CONFLICT_ATTEMPTS, in_transaction, is_unavailable, make_engine
from manager_core.postgres.apps import PostgresAppRepo
from manager_core.postgres.kv import PostgresKvRepo
from manager_core.postgres.routes import PostgresRouteRepo
from picloud_shared.errors import Unavailable
from picloud_shared.events import HttpEvent
from picloud_shared.status import InboxFailureKind
from tests.app.server import free_port
from tests.manager import factories
from tests.manager.dispatch_world import World, make_world
from tests.manager.test_dispatcher import _route, http_row, sync_answer

pytestmark = pytest.mark.anyio


def deadlock() -> OperationalError:
    return OperationalError("stmt", {}, psycopg.errors.DeadlockDetected("deadlock detected"))


async def test_in_transaction_runs_a_conflicting_body_again(engine: AsyncEngine) -> None:
    runs: list[int] = []

    async def body(conn: AsyncConnection) -> int:
        runs.append(1)
        await conn.execute(sa.text("SELECT 1"))
        if len(runs) < 3:
            raise deadlock()
        return len(runs)

    assert await in_transaction(engine, body) == 3


async def test_in_transaction_gives_up_and_does_not_retry_other_errors(
    engine: AsyncEngine,
) -> None:
    runs: list[int] = []

    async def always(conn: AsyncConnection) -> None:
        runs.append(1)
        raise deadlock()

    with pytest.raises(OperationalError):
        await in_transaction(engine, always)
    assert len(runs) == CONFLICT_ATTEMPTS

    async def broken(conn: AsyncConnection) -> None:
        runs.append(1)
        raise ValueError("not a conflict")

    runs.clear()
    with pytest.raises(ValueError, match="not a conflict"):
        await in_transaction(engine, broken)
    assert len(runs) == 1

    async with engine.begin() as conn:  # a caller's transaction: its caller decides
        runs.clear()
        with pytest.raises(OperationalError):
            await in_transaction(conn, always)
        assert len(runs) == 1


async def test_an_app_delete_that_deadlocks_with_a_writer_is_run_again(
    engine: AsyncEngine,
) -> None:
    """A real deadlock: a writer (an execution) holds a row of the app and then wants
    the app row (the key-share lock of a row it fans out), while the delete holds the
    app row and wants that row. PostgreSQL aborts one; when it is the delete, the
    delete runs again and succeeds."""
    app = await factories.app(engine)
    await PostgresKvRepo(engine).set(app, "held", 1)
    row_locked, delete_waits = anyio.Event(), anyio.Event()

    async def writer() -> None:
        try:
            async with engine.begin() as conn:
                await conn.execute(
                    sa.select(t.kv_entries.c.key)
                    .where(t.kv_entries.c.app_id == app)
                    .with_for_update()
                )
                row_locked.set()
                await delete_waits.wait()
                await conn.execute(
                    sa.select(t.apps.c.id).where(t.apps.c.id == app).with_for_update(key_share=True)
                )
        except OperationalError:
            pass  # PostgreSQL chose the writer: fine, the delete goes through either way

    repo = PostgresAppRepo(engine)
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        await row_locked.wait()

        async def delete_soon() -> None:
            await anyio.sleep(0.2)  # let the delete take the app row and wait on the kv row
            delete_waits.set()

        tg.start_soon(delete_soon)
        with anyio.fail_after(30):
            assert await repo.delete(app) is True
    assert await factories.rows(engine, t.apps, t.apps.c.id == app) == []


@pytest.fixture
async def world(engine: AsyncEngine) -> Any:
    async with make_world(engine) as w:
        yield w


def fail_first(
    calls: int, fn: Callable[..., Awaitable[Any]]
) -> tuple[Callable[..., Awaitable[Any]], list[int]]:
    """``fn``, but its first ``calls`` runs end in a deadlock (having done nothing)."""
    seen: list[int] = []

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        seen.append(1)
        if len(seen) <= calls:
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        return await fn(*args, **kwargs)

    return wrapper, seen


async def test_an_enqueue_batch_that_deadlocks_is_written_on_the_next_run(world: World) -> None:
    script_id = await world.script("def handle(e, ctx):\n    pass\n")
    route = await _route(world, script_id)
    writer = world.outbox._writer
    writer._write, seen = fail_first(2, writer._write)  # type: ignore[method-assign]
    row = http_row(world, script_id, route, HttpEvent("GET", "/"))
    await world.outbox.enqueue(row)
    assert len(seen) == 3
    (execution,) = await world.rows(t.executions)
    assert execution.id == row.execution_id


async def test_a_completion_batch_that_deadlocks_is_committed_on_the_next_run(
    world: World,
) -> None:
    script_id = await world.script("def handle(e, ctx):\n    pass\n")
    route = await _route(world, script_id)
    world.outbox.complete_batch, seen = fail_first(  # type: ignore[method-assign]
        1, world.outbox.complete_batch
    )
    await world.outbox.enqueue(http_row(world, script_id, route, HttpEvent("GET", "/")))
    async with world.running():
        await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    assert len(seen) == 2


@pytest.mark.parametrize(
    ("exc", "unavailable"),
    [
        (psycopg.OperationalError("server closed the connection unexpectedly"), True),
        (OperationalError("stmt", {}, psycopg.OperationalError("connection failed")), True),
        (PoolTimeout("couldn't get a connection"), True),
        (psycopg.errors.DeadlockDetected("deadlock detected"), False),
        (psycopg.errors.QueryCanceled("statement timeout"), False),
        (psycopg.errors.UniqueViolation("duplicate key"), False),
        (ValueError("no"), False),
    ],
)
def test_what_counts_as_the_database_being_unavailable(exc: Exception, unavailable: bool) -> None:
    assert is_unavailable(exc) is unavailable


async def test_an_enqueue_the_database_drops_is_unavailable(world: World) -> None:
    """OutboxWriter's callers (the orchestrator) know no database errors: a dropped
    connection is ``Unavailable`` (their 503), and the slot handed in is released."""
    script_id = await world.script("def handle(e, ctx):\n    pass\n")
    route = await _route(world, script_id)

    async def dropped(*args: Any, **kwargs: Any) -> Any:
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    world.outbox._writer._write = dropped  # type: ignore[method-assign]
    permit = world.gate.try_acquire()
    assert permit is not None
    row = http_row(world, script_id, route, HttpEvent("GET", "/"))
    with pytest.raises(Unavailable):
        await world.outbox.enqueue(row, permit=permit)
    assert world.gate.free == world.gate.capacity


async def test_a_route_lookup_without_a_database_is_unavailable() -> None:
    dead = make_engine(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/nowhere")
    try:
        with pytest.raises(Unavailable):
            await PostgresRouteRepo(dead).routes_for_app("shop")
    finally:
        await dead.dispose()


async def test_a_sync_caller_is_answered_at_once_when_its_run_breaks_off(world: World) -> None:
    """The completion cannot be written (the database went away): the caller gets an
    internal failure now, not a timeout at the end of its wait."""
    script_id = await world.script("def handle(e, ctx):\n    return 'x'\n")
    route = await _route(world, script_id)

    async def dropped(*args: Any, **kwargs: Any) -> Any:
        raise psycopg.OperationalError("server closed the connection unexpectedly")

    world.outbox.complete_batch = dropped  # type: ignore[method-assign]
    # The script's timeout is 10 s: an answer within 5 s is not the end of the wait.
    result = await sync_answer(world, script_id, route, HttpEvent("GET", "/"), timeout=5)
    assert result.failure is InboxFailureKind.INTERNAL


async def test_a_claim_that_deadlocks_is_claimed_again_quietly(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A claim aborted for a deadlock (with an app delete, say) is a conflict, not a
    failure: claimed again at once, logged at INFO, no traceback."""
    script_id = await world.script("def handle(e, ctx):\n    pass\n")
    route = await _route(world, script_id)
    world.outbox.claim_due, seen = fail_first(  # type: ignore[method-assign]
        1, world.outbox.claim_due
    )
    await world.outbox.enqueue(http_row(world, script_id, route, HttpEvent("GET", "/")))
    with caplog.at_level("INFO", logger="picloud.dispatcher"):
        async with world.running():
            await world.wait_count(t.executions, t.executions.c.status == "succeeded")
    assert len(seen) >= 2
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert any("claiming again" in r.getMessage() for r in caplog.records)
