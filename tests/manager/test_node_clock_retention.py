"""Retention's cutoff is the database's: a node whose clock is years off deletes
exactly what finished (or was settled) more than ``keep_for`` before PostgreSQL's
``now()`` (``tests.manager.node_clock``)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.executions import PostgresExecutionRepo
from manager_core.postgres.outbox import PostgresOutboxRepo
from manager_core.retention import ExecutionRetention
from picloud_shared.ids import AppId
from tests.manager import factories
from tests.manager.node_clock import skew_node_clock

pytestmark = pytest.mark.anyio


async def _finished_execution(engine: AsyncEngine, app: AppId, age: timedelta) -> uuid.UUID:
    """A succeeded execution record that finished ``age`` ago by the database's clock."""
    async with engine.begin() as conn:
        stmt = sa.text(
            "INSERT INTO executions (id, app_id, source_kind, status, created_at, finished_at)"
            " VALUES (gen_random_uuid(), :app, 'kv', 'succeeded',"
            " now() - :age - interval '1 second', now() - :age) RETURNING id"
        )
        execution_id: uuid.UUID = (await conn.execute(stmt, {"app": app, "age": age})).scalar_one()
    return execution_id


async def _handled_dead_letter(engine: AsyncEngine, app: AppId, age: timedelta) -> uuid.UUID:
    """A dead letter handled ``age`` ago by the database's clock."""
    async with engine.begin() as conn:
        stmt = sa.text(
            "INSERT INTO dead_letters (app_id, execution_id, source_kind, payload, resolution,"
            " resolved_at, created_at) VALUES (:app, gen_random_uuid(), 'kv', '{}', 'handled',"
            " now() - :age, now() - :age - interval '1 second') RETURNING id"
        )
        letter_id: uuid.UUID = (await conn.execute(stmt, {"app": app, "age": age})).scalar_one()
    return letter_id


async def _ids(engine: AsyncEngine, table: sa.Table) -> set[uuid.UUID]:
    async with engine.connect() as conn:
        return set((await conn.execute(sa.select(table.c.id))).scalars())


@pytest.mark.parametrize(
    "skew", [timedelta(days=3650), -timedelta(days=3650)], ids=["years-ahead", "years-behind"]
)
async def test_retention_keeps_what_is_recent_by_the_databases_clock(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, skew: timedelta
) -> None:
    """A retention pass on a node whose clock is ten years off deletes exactly what
    finished (or was settled) more than ``keep_for`` before the database's now():
    nothing recent (clock ahead), and still what is old (clock behind)."""
    skew_node_clock(monkeypatch, skew)
    app = await factories.app(engine)
    recent = {
        await _finished_execution(engine, app, timedelta(minutes=1)),
        await _finished_execution(engine, app, timedelta(days=13)),
    }
    old = {await _finished_execution(engine, app, timedelta(days=15))}
    recent_letters = {await _handled_dead_letter(engine, app, timedelta(minutes=1))}
    old_letters = {await _handled_dead_letter(engine, app, timedelta(days=15))}
    retention = ExecutionRetention(
        PostgresExecutionRepo(engine),
        timedelta(days=14),
        dead_letters=PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine)),
    )

    assert await retention.prune_once() == len(old)

    assert await _ids(engine, t.executions) == recent
    assert await _ids(engine, t.dead_letters) == recent_letters
    assert (retention.pruned, retention.pruned_dead_letters) == (len(old), len(old_letters))


async def test_a_prune_takes_an_age_not_a_point_in_time(engine: AsyncEngine) -> None:
    """A cutoff computed on a node's clock is refused: the repos take an age."""
    with pytest.raises(TypeError, match="age"):
        await PostgresExecutionRepo(engine).prune(datetime.now(UTC))  # type: ignore[arg-type]
