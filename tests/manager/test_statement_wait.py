"""Inside ``statement_wait`` a PostgreSQL that stops answering costs a statement a
bounded wait (its connection closed, the error "unavailable"); one that answers but
is slow with the statement (a lock) is waited for, up to the limit (that it is waited
for past the bound shows end to end in tests/app/test_frozen_database.py). Outside
it, waits are what they were."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import anyio
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.db import is_unavailable, make_engine, make_pool, unavailable_message
from manager_core.statement_wait import StatementTimeout, statement_wait
from tests.pg_relay import PgRelay

pytestmark = pytest.mark.anyio
BOUND = 1.0
GIVEN_UP_AFTER = 2 * BOUND  # silent that long, and as long for the look at the server
SLACK = 4  # a loaded 2-core machine
NEVER = 30  # an unbounded wait fails the test here, not at pytest's timeout
LOCK = "SELECT pg_advisory_xact_lock(7)"  # held by whoever took it until its commit


@pytest.fixture
async def relay(db_url: str) -> AsyncIterator[PgRelay]:
    async with PgRelay.running(db_url) as relay:
        yield relay


@pytest.fixture
async def relayed(relay: PgRelay) -> AsyncIterator[AsyncEngine]:
    """The node's kind of engine, on the database through ``relay``."""
    engine = make_engine(relay.url, pool_size=2, max_overflow=0)
    try:
        yield engine
    finally:
        await engine.dispose()


async def test_a_silent_server_costs_a_statement_its_bound(
    relay: PgRelay, relayed: AsyncEngine
) -> None:
    """Frozen mid-transaction: the statement is given up after the bound and a
    connection attempt, as unavailable; the pool serves again once PostgreSQL does."""
    with statement_wait(BOUND):
        async with relayed.connect() as conn:
            await conn.execute(text("SELECT 1"))
            relay.freeze()
            started = time.monotonic()
            with anyio.fail_after(NEVER), pytest.raises(Exception) as info:  # noqa: PT011
                await conn.execute(text("SELECT 2"))
            waited = time.monotonic() - started
            assert conn.invalidated  # closed: never handed out again
    assert isinstance(getattr(info.value, "orig", None), StatementTimeout), repr(info.value)
    assert is_unavailable(info.value)
    assert unavailable_message(info.value) == "the database did not answer within 1 s"
    assert GIVEN_UP_AFTER - 0.5 <= waited < GIVEN_UP_AFTER + SLACK
    relay.thaw()
    with statement_wait(BOUND):
        async with relayed.connect() as conn:
            assert (await conn.execute(text("SELECT 3"))).scalar() == 3
    assert relayed.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_the_outbox_pool_is_bounded_alike(relay: PgRelay) -> None:
    """The psycopg pool's autocommitted statements are bounded alike, and the
    connection given up is discarded: once PostgreSQL answers, the pool serves again."""
    pool = make_pool(relay.url, max_size=2)
    await pool.open(wait=True)
    try:
        with statement_wait(BOUND):
            async with pool.connection() as conn:
                relay.freeze()
                started = time.monotonic()
                with anyio.fail_after(NEVER), pytest.raises(StatementTimeout):
                    await conn.execute("SELECT 1")
                assert time.monotonic() - started < GIVEN_UP_AFTER + SLACK
                assert conn.closed
            relay.thaw()
            with anyio.fail_after(NEVER):
                async with pool.connection() as conn:
                    assert await (await conn.execute("SELECT 2")).fetchone() == (2,)
        assert pool.get_stats().get("returns_bad", 0) + pool.get_stats().get("connections_lost", 0)
    finally:
        await pool.close()


async def test_the_limit_holds_even_while_the_server_answers(
    relayed: AsyncEngine, engine: AsyncEngine
) -> None:
    """A lock that is never released: the statement is given up at the limit."""
    async with engine.connect() as blocker:
        await blocker.execute(text(LOCK))
        started = time.monotonic()
        with (
            anyio.fail_after(NEVER),
            statement_wait(BOUND, limit=3 * BOUND),
            pytest.raises(Exception) as info,  # noqa: PT011 - SQLAlchemy's wrapper
        ):
            async with relayed.connect() as conn:
                await conn.execute(text(LOCK))
        waited = time.monotonic() - started
        await blocker.rollback()
    assert "did not finish a statement in 3 s" in unavailable_message(info.value)
    assert 3 * BOUND - 0.5 <= waited < 3 * BOUND + SLACK


async def test_outside_statement_wait_a_wait_is_not_bounded(
    relayed: AsyncEngine, engine: AsyncEngine
) -> None:
    """The dispatcher's kind of wait: no bound, no look at the server (a frozen one
    is waited for as long as it takes)."""
    async with engine.connect() as blocker:
        await blocker.execute(text(LOCK))
        with anyio.move_on_after(GIVEN_UP_AFTER + 1) as scope:
            async with relayed.connect() as conn:
                await conn.execute(text(LOCK))
        assert scope.cancelled_caught  # still waiting: nothing gave it up
        await blocker.rollback()
