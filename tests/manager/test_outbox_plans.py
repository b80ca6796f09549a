"""The dispatcher's periodic and hot statements keep a sane plan when the outbox grew
after their plan was made.

A queue table is empty most of the time, so a node's connections first run their
statements against an empty outbox — and psycopg prepares a statement once it has
run five times. A statement without parameters then keeps its *generic* plan,
made for an empty table, until the next analyze invalidates it. The lease recovery
kept a nested loop whose inner side scanned the whole outbox once per row: at a
few thousand rows each recovery took seconds, and the dispatcher claims nothing
while it recovers (a 45 s drain of 4000 rows in the HTTP benchmark).

Checked on the executed plan of the real calls (``auto_explain`` reports it to the
client), not by timing: no node may read the whole outbox more than once.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.db import make_engine, make_pool
from manager_core.postgres import outbox_claims
from manager_core.postgres.outbox_claims import ScriptSources
from picloud_shared.execution import ExecResult, ScriptResponse
from tests.manager import factories

pytestmark = pytest.mark.anyio

ROWS = 2000
WARM_CALLS = 15  # psycopg prepares after 5 runs; PostgreSQL may go generic after 5 more


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


class _Plans:
    """Executed plans of the statements run on one connection (auto_explain → client)."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def notice(self, diag: psycopg.errors.Diagnostic) -> None:
        text = diag.message_primary or ""
        start = text.find("{")
        if start >= 0:
            self.seen.append(json.loads(text[start:])["Plan"])

    def outbox_reads(self) -> list[tuple[str, float, float]]:
        """(node type, loops, rows per loop) of every scan of the outbox in the last plan."""
        return [
            (n["Node Type"], n["Actual Loops"], n["Actual Rows"])
            for n in _nodes(self.seen[-1])
            if n.get("Relation Name") == "outbox" and "Scan" in n["Node Type"]
        ]

    def rows_read(self) -> float:
        return sum(loops * max(rows, 1) for _, loops, rows in self.outbox_reads())


_EXPLAIN = (
    "LOAD 'auto_explain'",
    "SET auto_explain.log_min_duration = 0",
    "SET auto_explain.log_analyze = on",
    "SET auto_explain.log_format = json",
    "SET client_min_messages = log",
)


def _url(engine: AsyncEngine) -> str:
    return engine.url.render_as_string(hide_password=False)


@asynccontextmanager
async def _explained(engine: AsyncEngine) -> AsyncIterator[tuple[psycopg.AsyncConnection, _Plans]]:
    """A connection of the outbox's pool (``make_pool``, as the node opens it) whose
    executed plans are collected."""
    pool = make_pool(_url(engine), max_size=1)
    await pool.open()
    plans = _Plans()
    try:
        async with pool.connection() as conn:
            conn.add_notice_handler(plans.notice)
            for setting in _EXPLAIN:
                await conn.execute(setting)
            yield conn, plans
    finally:
        await pool.close()


async def _empty_statistics(engine: AsyncEngine) -> None:
    """Statistics of an empty outbox, kept (no autovacuum during the test)."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(isolation_level="AUTOCOMMIT")
        for table in ("outbox", "executions"):
            await conn.exec_driver_sql(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        await conn.exec_driver_sql("VACUUM ANALYZE outbox")


async def _fill(engine: AsyncEngine, *, leased: bool, n: int = ROWS) -> None:
    """``n`` rows that no analyze has seen; with ``leased``, their leases ran out."""
    app = await factories.app(engine)
    async with engine.begin() as conn:
        await conn.exec_driver_sql(
            """
            WITH e AS (
                INSERT INTO executions (id, app_id, source_kind, status, attempts, trigger_depth)
                SELECT gen_random_uuid(), %(app)s, 'kv', 'queued', 0, 0
                FROM generate_series(1, %(n)s)
                RETURNING id
            )
            INSERT INTO outbox (execution_id, app_id, source_kind, payload, claimed_by,
                                claimed_until, attempt_count)
            SELECT e.id, %(app)s, 'kv', '{}'::jsonb,
                   CASE WHEN %(leased)s THEN 'gone/1' END,
                   CASE WHEN %(leased)s THEN now() - interval '1 minute' END,
                   CASE WHEN %(leased)s THEN 1 ELSE 0 END
            FROM e
            """,
            {"app": str(app), "n": n, "leased": leased},
        )


async def test_lease_recovery_reads_the_outbox_once_after_it_grew(engine: AsyncEngine) -> None:
    """Recovery run while the outbox was empty, then over ROWS expired leases: every
    scan of the outbox runs once (the cached plan ran its inner scan once per row),
    and every row comes back."""
    await _empty_statistics(engine)
    async with _explained(engine) as (conn, plans):
        for _ in range(WARM_CALLS):
            assert await outbox_claims.recover_expired(conn) == 0
        await _fill(engine, leased=True)
        assert await outbox_claims.recover_expired(conn) == ROWS
    reads = plans.outbox_reads()
    assert reads, plans.seen[-1]
    assert all(loops == 1 for kind, loops, _ in reads if kind == "Seq Scan"), reads
    assert plans.rows_read() <= 3 * ROWS, reads
    rows = await factories.rows(engine, t.outbox)
    assert len(rows) == ROWS
    assert all(r.claimed_by is None and r.claimed_until is None for r in rows)


@pytest.mark.parametrize("apps", [1, 40])
async def test_a_claim_reads_little_of_an_outbox_that_grew(engine: AsyncEngine, apps: int) -> None:
    """Claims run while the outbox was empty, then one of 16 rows out of ROWS due (of
    one app, or spread over 40): it reads about its batch, not the backlog (once, or
    once per row or app)."""
    await _empty_statistics(engine)
    sources = ScriptSources()
    async with _explained(engine) as (conn, plans):
        for _ in range(WARM_CALLS):
            claimed = await outbox_claims.claim(
                conn, node_id="n", limit=16, lease_seconds=30, sources=sources
            )
            assert claimed == []
        for _ in range(apps):
            await _fill(engine, leased=False, n=ROWS // apps)
        claimed = await outbox_claims.claim(
            conn, node_id="n", limit=16, lease_seconds=30, sources=sources
        )
    assert len(claimed) == 16
    reads = plans.outbox_reads()
    assert reads, plans.seen[-1]
    assert plans.rows_read() <= 100, reads


async def test_a_completion_reads_little_of_an_outbox_that_grew(engine: AsyncEngine) -> None:
    """Completions run while the outbox held a row at a time, then one of 16 rows out
    of ROWS: it finds its rows by id, not by scanning the backlog."""
    await _empty_statistics(engine)
    sources = ScriptSources()

    async def claim_and_complete(conn: psycopg.AsyncConnection, n: int) -> set[int]:
        claimed = await outbox_claims.claim(
            conn, node_id="n", limit=n, lease_seconds=30, sources=sources
        )
        assert len(claimed) == n
        done = [
            (c, ExecResult.succeeded(c.row.execution_id, ScriptResponse.empty())) for c in claimed
        ]
        owned = await outbox_claims.complete_batch(conn, done, own_transaction=True)
        assert owned == {c.row.id for c in claimed}
        return owned

    async with _explained(engine) as (conn, plans):
        for _ in range(WARM_CALLS):
            await _fill(engine, leased=False, n=1)
            await claim_and_complete(conn, 1)
        await _fill(engine, leased=False)
        await claim_and_complete(conn, 16)
    reads = plans.outbox_reads()
    assert reads, plans.seen[-1]
    assert plans.rows_read() <= ROWS / 4, reads
    assert len(await factories.rows(engine, t.outbox)) == ROWS - 16


async def test_taking_a_row_reads_only_that_row_of_an_outbox_that_grew(
    engine: AsyncEngine,
) -> None:
    """An execution's transaction locks its row by id (``take``), on an engine
    connection (``make_engine``) that took rows while the outbox held one at a time:
    after ROWS more arrived it still reads that one row — a scan of the table would
    also lock all of it against every concurrent serializable execution."""
    await _empty_statistics(engine)
    own = make_engine(_url(engine), pool_size=1, max_overflow=0)
    plans = _Plans()
    try:
        async with own.connect() as conn:
            raw = await conn.get_raw_connection()
            raw.driver_connection.add_notice_handler(plans.notice)  # type: ignore[union-attr]
            for setting in _EXPLAIN:
                await conn.exec_driver_sql(setting)
            await conn.commit()
            for _ in range(WARM_CALLS + 1):
                async with conn.begin():
                    assert not await outbox_claims.take(conn, 1, "n/none", 1)
            await _fill(engine, leased=True)
            (row_id,) = (await conn.exec_driver_sql("SELECT min(id) FROM outbox")).one()
            await conn.commit()
            async with conn.begin():
                assert await outbox_claims.take(conn, row_id, "gone/1", 1)
            reads = plans.outbox_reads()
    finally:
        await own.dispose()
    assert reads, plans.seen[-1]
    assert plans.rows_read() <= 4, reads
