"""Nothing waits for a database connection longer than CONNECTION_WAIT_SECONDS, and
a wait that runs out counts as the database being unavailable (a 503, not a 500)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.db import CONNECTION_WAIT_SECONDS, is_unavailable, make_engine, make_pool

pytestmark = pytest.mark.anyio
BOUND = CONNECTION_WAIT_SECONDS + 5  # not the libraries' 30 s


async def test_a_full_outbox_pool_gives_up_as_unavailable(engine: AsyncEngine) -> None:
    """Every connection of the psycopg pool taken: the next waits CONNECTION_WAIT_SECONDS."""
    pool = make_pool(engine.url.render_as_string(hide_password=False), max_size=1)
    await pool.open(wait=True)
    async with pool, pool.connection():
        started = time.monotonic()
        with pytest.raises(Exception) as info:  # noqa: PT011 - the pool's own error
            async with pool.connection():
                pass
        waited = time.monotonic() - started
    assert is_unavailable(info.value), repr(info.value)
    assert CONNECTION_WAIT_SECONDS - 0.5 <= waited < BOUND


async def test_a_full_engine_pool_gives_up_as_unavailable(engine: AsyncEngine) -> None:
    """Every connection of the SQLAlchemy pool taken: the next waits
    CONNECTION_WAIT_SECONDS, and its error counts as unavailable."""
    small = make_engine(
        engine.url.render_as_string(hide_password=False), pool_size=1, max_overflow=0
    )
    try:
        async with small.connect() as held:
            await held.execute(text("SELECT 1"))
            started = time.monotonic()
            with pytest.raises(Exception) as info:  # noqa: PT011 - SQLAlchemy's TimeoutError
                async with small.connect():
                    pass
            waited = time.monotonic() - started
    finally:
        await small.dispose()
    assert is_unavailable(info.value), repr(info.value)
    assert CONNECTION_WAIT_SECONDS - 0.5 <= waited < BOUND


async def test_connections_carry_the_connect_timeout(engine: AsyncEngine) -> None:
    """A new connection gives up on a server that does not answer (connect_timeout)."""
    async with engine.connect() as conn:
        dsn = (await conn.get_raw_connection()).driver_connection.info.dsn  # type: ignore[union-attr]
    assert f"connect_timeout={CONNECTION_WAIT_SECONDS}" in dsn
