"""How the manager recovers once PostgreSQL is back, and what a stalled node may hold.

* The outbox pool (``make_pool``) serves within about a second of the database
  answering again, however long it was away (psycopg's reconnect backoff grows to a
  minute and more if left to itself).
* An execution's transaction cannot sit idle longer than its script's timeout plus
  ``IDLE_IN_TRANSACTION_MARGIN_SECONDS``: PostgreSQL ends it, and its locks are free.
* An execution whose connection turned out to be lost (a PostgreSQL restart closed
  it while it sat in the pool) runs again at once, once: nothing of it committed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs
import psycopg
import pytest
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import execution_txn
from manager_core.db import is_connection_lost, is_unavailable, make_engine, make_pool
from manager_core.dispatcher import Dispatcher, DispatcherSettings
from manager_core.execution_txn import ExecutionTransaction, TransactionDeps
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.executions import PostgresExecutionRepo
from manager_core.postgres.outbox import ClaimedRow
from picloud_shared.events import HttpEvent
from picloud_shared.ids import AppId
from picloud_shared.ports import HostApi
from picloud_shared.principals import Principal
from picloud_shared.status import InboxFailureKind
from tests.manager import factories
from tests.manager.dispatch_world import World, make_world
from tests.manager.test_dispatcher import http_row
from tests.pg_relay import PgRelay

pytestmark = pytest.mark.anyio

OUTAGE_SECONDS = 8.0  # psycopg's default backoff would wait until ~15 s to try again
SERVES_WITHIN = 2.5  # "about a second", with slack for a loaded machine

IDLE_SETTING = "SELECT setting FROM pg_settings WHERE name = 'idle_in_transaction_session_timeout'"
COUNT = """
def handle(event, ctx):
    n = (ctx.kv.get("n") or 0) + 1
    ctx.kv.set("n", n)
    return {"n": n}
"""


@attrs.define(eq=False)
class SwitchedRelay(PgRelay):
    """A :class:`PgRelay` that can also go away as a stopped PostgreSQL does: every
    relayed connection is cut, and new ones are closed at once (refused), until
    :meth:`come_back`."""

    away: bool = False
    links: set[anyio.CancelScope] = attrs.field(factory=set)

    def go_away(self) -> None:
        self.away = True
        for scope in list(self.links):
            scope.cancel()

    def come_back(self) -> None:
        self.away = False

    async def _serve(self, client: Any) -> None:
        if self.away:
            client[1].close()
            return
        with anyio.CancelScope() as scope:
            self.links.add(scope)
            try:
                await super()._serve(client)
            finally:
                self.links.discard(scope)
                client[1].close()  # cut while it connected upstream, too


def plain(url: str) -> str:
    """A ``postgresql://`` URL psycopg takes."""
    return "postgresql://" + url.split("://", 1)[1]


async def select_one(pool: Any, timeout: float) -> None:
    async with pool.connection(timeout=timeout) as conn:
        await conn.execute("SELECT 1")


def _transaction(world: World, claim: ClaimedRow) -> ExecutionTransaction:
    """The execution transaction the dispatcher would open for ``claim``."""
    deps = TransactionDeps(
        world.engine,
        world.outbox,
        PostgresExecutionRepo(world.engine),
        PostgresDeadLetterRepo(world.engine, world.outbox, world.emitter),
        world.host_factory,
        world.signal,
    )
    return ExecutionTransaction(deps, claim, factories.principal(world.app_id))


async def test_the_outbox_pool_serves_within_a_second_once_postgresql_is_back(
    db_url: str,
) -> None:
    """PostgreSQL away for OUTAGE_SECONDS while requests keep asking the pool for a
    connection (each refused as unavailable): once it is back, the pool serves within
    about a second, not when its reconnect backoff next comes round."""
    async with SwitchedRelay.running(db_url) as relay:
        pool = make_pool(relay.url, max_size=2)
        await pool.open(wait=True)
        async with pool:
            await select_one(pool, 5)
            relay.go_away()
            ends = time.monotonic() + OUTAGE_SECONDS
            while time.monotonic() < ends:
                with pytest.raises(Exception) as info:  # noqa: PT011 - psycopg's or the pool's
                    await select_one(pool, 0.5)
                assert is_unavailable(info.value), repr(info.value)
                await anyio.sleep(0.2)
            relay.come_back()
            back = time.monotonic()
            with anyio.fail_after(60):
                while True:
                    try:
                        await select_one(pool, 0.5)
                    except Exception as exc:
                        error: BaseException = exc
                    else:
                        break
                    assert is_unavailable(error), repr(error)
                    await anyio.sleep(0.05)
            waited = time.monotonic() - back
    assert waited < SERVES_WITHIN, f"the pool served {waited:.1f} s after PostgreSQL was back"


async def _backend_alive(engine: AsyncEngine, pid: int) -> bool:
    async with engine.connect() as conn:
        found = await conn.exec_driver_sql(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %(pid)s", {"pid": pid}
        )
        return found.first() is not None


async def test_an_execution_transaction_left_idle_is_ended_with_its_locks(
    world: World, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An execution's transaction that holds its row's and a key's locks, then sits
    idle (its node stalled) past its script's timeout plus the margin, is ended by
    PostgreSQL: its session is gone and another transaction takes those locks at once.
    Before that it stays (a script may be idle that long between host calls)."""
    monkeypatch.setattr(execution_txn, "IDLE_IN_TRANSACTION_MARGIN_SECONDS", 0.5)
    script = await world.script("def handle(event, ctx):\n    pass\n", timeout=1)
    route = await world.route(script, "/idle")
    await world.outbox.enqueue(http_row(world, script, route, HttpEvent("GET", "/")))
    (claim,) = await world.outbox.claim_due("node-a", 1, 60)
    assert claim.script is not None
    assert claim.script.timeout_seconds == 1
    txn = _transaction(world, claim)
    try:
        await txn.host.kv_set("held", 1)  # opens the transaction: the row and the key locked
        conn = txn.conn
        assert conn is not None
        pid = (await conn.exec_driver_sql("SELECT pg_backend_pid()")).scalar_one()
        await anyio.sleep(1.0)  # the script's timeout: still there
        assert await _backend_alive(engine, pid)
        await anyio.sleep(1.5)  # past timeout + margin
        assert not await _backend_alive(engine, pid)
        async with engine.begin() as other:
            await other.exec_driver_sql("SET LOCAL lock_timeout = '2s'")
            locked = await other.exec_driver_sql(
                "SELECT id FROM outbox WHERE id = %(id)s FOR UPDATE", {"id": claim.row.id}
            )
            assert locked.scalar_one() == claim.row.id
            await other.exec_driver_sql(
                "UPDATE kv_entries SET value = '2' WHERE app_id = %(app)s AND key = 'held'",
                {"app": world.app_id},
            )
    finally:
        await txn.rollback()  # nothing to roll back: PostgreSQL ended it
        await txn.close()


async def test_the_idle_bound_leaves_a_pooled_connection_as_it_was(world: World) -> None:
    """The bound is the transaction's own (``set_config(…, true)``): once it ends, the
    pooled connection has the server's setting again."""
    script = await world.script("def handle(event, ctx):\n    pass\n", timeout=3)
    route = await world.route(script, "/bound")
    await world.outbox.enqueue(http_row(world, script, route, HttpEvent("GET", "/")))
    (claim,) = await world.outbox.claim_due("node-a", 1, 60)
    txn = _transaction(world, claim)
    try:
        await txn.host.kv_set("k", 1)
        conn = txn.conn
        assert conn is not None
        inside = await conn.exec_driver_sql(IDLE_SETTING)
        margin = execution_txn.IDLE_IN_TRANSACTION_MARGIN_SECONDS
        assert inside.scalar_one() == str(int((3 + margin) * 1000))  # milliseconds
        await txn.rollback()
        assert (await conn.exec_driver_sql(IDLE_SETTING)).scalar_one() == "0"
        await conn.rollback()
    finally:
        await txn.close()


@pytest.fixture
async def world(engine: AsyncEngine) -> AsyncIterator[World]:
    async with make_world(engine) as w:
        yield w


def dispatcher(world: World, host_factory: Callable[..., HostApi]) -> Dispatcher:
    """``world``'s dispatcher, its executions' hosts built by ``host_factory``."""
    return Dispatcher(
        engine=world.engine,
        executor=world.executor,
        gate=world.gate,
        inbox=world.inbox,
        host_factory=host_factory,
        executions=PostgresExecutionRepo(world.engine),
        dead_letters=PostgresDeadLetterRepo(world.engine, world.outbox, world.emitter),
        outbox=world.outbox,
        signal=world.signal,
        settings=DispatcherSettings(node_id="node-a", poll_interval=0.02, lease_seconds=30.0),
    )


@asynccontextmanager
async def own_world(db_url: str) -> AsyncIterator[World]:
    """A world on an engine of its own (the test terminates its connections)."""
    own = make_engine(db_url, pool_size=2, max_overflow=2)
    try:
        async with make_world(own) as w:
            yield w
    finally:
        await own.dispose()


async def test_an_execution_whose_pooled_connection_went_stale_runs_again(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL closed every connection (a restart, here ``pg_terminate_backend``)
    while they sat in the pools. The next sync request's execution meets its stale
    engine connection at its first host call: nothing of it committed, so it runs
    again at once on a new connection, and its caller gets its answer, not a 500."""
    caplog.set_level(logging.INFO, "picloud.dispatcher")
    async with own_world(db_url) as world:
        script = await world.script(COUNT)
        route = await world.route(script, "/count", method="POST")
        inbox_id, receiver = world.inbox.register()
        row = http_row(
            world, script, route, HttpEvent("POST", "/"), reply_to=inbox_id, reply_node="node-a"
        )
        with receiver:
            await world.outbox.enqueue(row)
            async with await psycopg.AsyncConnection.connect(
                plain(db_url), autocommit=True
            ) as admin:
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            d = dispatcher(world, world.host_factory)
            async with world.running(d):
                answer = await receiver.receive(timeout=30)
        assert answer is not None
        assert answer.failure is None, answer
        assert answer.http_status == 200
        assert answer.response is not None
        assert answer.response.body == b'{"n":1}'
        assert d.metrics.executions.get(("http", "succeeded")) == 1
        assert "host call failed" not in caplog.text
        assert f"execution {row.execution_id} runs again" in caplog.text


@attrs.define
class LosingHost:
    """A host whose every data call finds its connection lost."""

    inner: HostApi
    calls: list[str]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def kv_get(self, key: str) -> Any:
        self.calls.append(key)
        orig = psycopg.OperationalError("server closed the connection unexpectedly")
        raise DBAPIError("SELECT …", {}, orig, connection_invalidated=True)


async def test_a_connection_lost_again_fails_the_execution_as_before(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """The database stays away: the execution runs again once, meets a lost
    connection again, and fails as any platform error does (500 ``internal``)."""
    calls: list[str] = []

    def losing(conn: AsyncConnection, app_id: AppId, principal: Principal, depth: int) -> HostApi:
        return LosingHost(world.host_factory(conn, app_id, principal, depth), calls)  # type: ignore[return-value]

    script = await world.script(COUNT)
    route = await world.route(script, "/lost", method="POST")
    inbox_id, receiver = world.inbox.register()
    row = http_row(
        world, script, route, HttpEvent("POST", "/"), reply_to=inbox_id, reply_node="node-a"
    )
    d = dispatcher(world, losing)
    with receiver:
        await world.outbox.enqueue(row)
        async with world.running(d):
            answer = await receiver.receive(timeout=30)
    assert answer is not None
    assert answer.failure is InboxFailureKind.INTERNAL, answer
    assert answer.http_status == 500
    assert len(calls) == 1 + execution_txn.LOST_CONNECTION_RERUNS
    # The database away: logged as an outage (one line, no traceback), not per call.
    assert "serving host calls failed: the database is unavailable" in caplog.text
    assert not [r for r in caplog.records if r.exc_info]


def test_a_lost_connection_is_told_from_other_errors() -> None:
    """``is_connection_lost``: a connection SQLAlchemy invalidated, or a plain psycopg
    connection error; not a refused statement, a conflict or a cancelled one."""
    closed = psycopg.OperationalError("server closed the connection unexpectedly")
    assert is_connection_lost(DBAPIError("SELECT 1", {}, closed, connection_invalidated=True))
    assert not is_connection_lost(DBAPIError("SELECT 1", {}, closed))
    assert is_connection_lost(closed)
    assert is_connection_lost(psycopg.errors.AdminShutdown("terminating connection"))
    assert is_connection_lost(psycopg.errors.IdleInTransactionSessionTimeout("terminating"))
    assert not is_connection_lost(psycopg.errors.QueryCanceled("canceling statement"))
    assert not is_connection_lost(psycopg.errors.SerializationFailure("could not serialize"))
    assert not is_connection_lost(ValueError("not a database error"))
