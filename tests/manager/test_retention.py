"""Execution retention: finished records are pruned past their age, nothing else."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres import dead_letters as dead_letters_module
from manager_core.postgres import executions as executions_module
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.executions import PostgresExecutionRepo
from manager_core.postgres.outbox import PostgresOutboxRepo
from manager_core.retention import ExecutionRetention
from picloud_shared.errors import InvalidInput
from picloud_shared.ids import AppId, ExecutionId, new_execution_id
from picloud_shared.outbox import NewOutboxRow, OutboxSourceKind
from picloud_shared.status import ExecutionStatus as S
from tests.manager import factories

pytestmark = pytest.mark.anyio

# Records are aged by writing their times directly; the prune keeps what is younger
# than KEEP by the database's clock (this machine's, in the tests).
NOW = datetime.now(UTC)
OLD = NOW - timedelta(days=20)
KEEP = timedelta(days=14)


async def _execution(
    engine: AsyncEngine,
    app: AppId,
    status: S,
    *,
    created: datetime,
    finished: datetime | None = None,
    keep_outbox_row: bool | None = None,
) -> ExecutionId:
    """An execution written as the platform writes it (with its outbox row), moved to
    ``status``; a final one loses its outbox row unless ``keep_outbox_row``."""
    execution_id = new_execution_id()
    payload = {"kind": "kv", "key": "k", "op": "set", "value": 1, "prev_value": None}
    await PostgresOutboxRepo(engine).enqueue(
        NewOutboxRow(execution_id, app, OutboxSourceKind.KV, payload)
    )
    repo = PostgresExecutionRepo(engine)
    if status is not S.QUEUED:
        await repo.finish(execution_id, status)
    if keep_outbox_row is None:
        keep_outbox_row = not status.is_final
    async with engine.begin() as conn:
        if not keep_outbox_row:
            await conn.execute(sa.delete(t.outbox).where(t.outbox.c.execution_id == execution_id))
        await conn.execute(
            sa.update(t.executions)
            .where(t.executions.c.id == execution_id)
            .values(created_at=created, finished_at=finished if status.is_final else None)
        )
    return execution_id


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():  # noqa: ASYNC110 - polling the task's counters in a test
        await anyio.sleep(0.01)


async def _ids(engine: AsyncEngine, table: sa.Table, column: str = "id") -> set[uuid.UUID]:
    async with engine.connect() as conn:
        return set((await conn.execute(sa.select(table.c[column]))).scalars())


async def test_prune_deletes_exactly_the_records_finished_before_the_cutoff(
    engine: AsyncEngine,
) -> None:
    """Final records finished before the cutoff go, in every app; records still queued,
    running or retrying, records finished since, and any record an outbox row still
    points at stay (with that row)."""
    app, other = await factories.app(engine), await factories.app(engine)
    gone = {
        await _execution(engine, app, status, created=OLD, finished=OLD)
        for status in (S.SUCCEEDED, S.FAILED, S.DEAD_LETTERED, S.SKIPPED)
    }
    gone.add(await _execution(engine, other, S.SUCCEEDED, created=OLD, finished=OLD))
    kept = {
        await _execution(engine, app, S.SUCCEEDED, created=NOW, finished=NOW),
        await _execution(engine, app, S.FAILED, created=OLD, finished=NOW),  # long retries
        await _execution(engine, app, S.QUEUED, created=OLD),
        await _execution(engine, app, S.RUNNING, created=OLD),
        await _execution(engine, app, S.RETRYING, created=OLD),
        await _execution(engine, app, S.SUCCEEDED, created=OLD, finished=OLD, keep_outbox_row=True),
    }
    outbox_before = await _ids(engine, t.outbox)

    deleted = await PostgresExecutionRepo(engine).prune(KEEP)

    assert deleted == len(gone) == 5
    assert await _ids(engine, t.executions) == kept
    assert await _ids(engine, t.outbox) == outbox_before


async def test_prune_goes_on_batch_after_batch(engine: AsyncEngine) -> None:
    """More prunable records than one batch: every one of them is deleted."""
    app = await factories.app(engine)
    for _ in range(7):
        await _execution(engine, app, S.SUCCEEDED, created=OLD, finished=OLD)
    assert await PostgresExecutionRepo(engine).prune(KEEP, batch=3) == 7
    assert await _ids(engine, t.executions) == set()


async def test_prune_deletes_old_abandoned_answers(engine: AsyncEngine) -> None:
    """Records of sync answers nobody took are pruned by their age too."""
    app = await factories.app(engine)
    old, new = new_execution_id(), new_execution_id()
    async with engine.begin() as conn:
        for execution_id, created in ((old, OLD), (new, NOW)):
            await conn.execute(
                sa.insert(t.abandoned_executions).values(
                    execution_id=execution_id,
                    app_id=app,
                    inbox_id=uuid.uuid4(),
                    reason="receiver gone",
                    created_at=created,
                )
            )
    assert await PostgresExecutionRepo(engine).prune(KEEP) == 0  # counts executions only
    assert await _ids(engine, t.abandoned_executions, "execution_id") == {new}


async def _dead_letter(
    engine: AsyncEngine,
    app: AppId,
    resolution: str | None,
    *,
    created: datetime,
    resolved: datetime | None = None,
) -> uuid.UUID:
    async with engine.begin() as conn:
        stmt = (
            sa.insert(t.dead_letters)
            .values(
                app_id=app,
                execution_id=new_execution_id(),
                source_kind="kv",
                payload={"kind": "kv", "key": "k", "op": "set", "value": 1, "prev_value": None},
                attempts=5,
                resolution=resolution,
                resolved_at=resolved if resolution is not None else None,
                created_at=created,
            )
            .returning(t.dead_letters.c.id)
        )
        return (await conn.execute(stmt)).scalar_one()


async def test_prune_deletes_dead_letters_settled_before_the_cutoff(engine: AsyncEngine) -> None:
    """Dead letters handled, resolved or replayed before the cutoff go; unresolved and
    ``handler_failed`` ones wait for their owner whatever their age, and ones settled
    since stay."""
    app, other = await factories.app(engine), await factories.app(engine)
    gone = {
        await _dead_letter(engine, app, r, created=OLD, resolved=OLD)
        for r in ("handled", "resolved", "replayed")
    }
    gone.add(await _dead_letter(engine, other, "handled", created=OLD, resolved=OLD))
    kept = {
        await _dead_letter(engine, app, None, created=OLD),
        await _dead_letter(engine, app, "handler_failed", created=OLD, resolved=OLD),
        await _dead_letter(engine, app, "resolved", created=OLD, resolved=NOW),
        await _dead_letter(engine, app, "handled", created=NOW, resolved=NOW),
    }
    repo = PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine))
    assert await repo.prune(KEEP, batch=2) == len(gone) == 4
    assert await _ids(engine, t.dead_letters) == kept


async def test_prune_rejects_an_empty_batch(engine: AsyncEngine) -> None:
    """A batch below one row is refused before any statement runs."""
    with pytest.raises(InvalidInput, match="batch"):
        await PostgresExecutionRepo(engine).prune(KEEP, batch=0)


async def test_the_task_prunes_on_its_schedule_until_stopped(engine: AsyncEngine) -> None:
    """The task prunes (records and settled dead letters) at start and every interval,
    counts what it deleted, and stops."""
    app = await factories.app(engine)
    await _execution(engine, app, S.SUCCEEDED, created=OLD, finished=OLD)
    await _dead_letter(engine, app, "handled", created=OLD, resolved=OLD)
    retention = ExecutionRetention(
        PostgresExecutionRepo(engine),
        timedelta(days=14),
        dead_letters=PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine)),
        interval=0.01,
        first_after=0,
    )
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(retention.run)
            await _until(lambda: retention.runs >= 3)
            await _execution(engine, app, S.SUCCEEDED, created=OLD, finished=OLD)
            runs = retention.runs
            await _until(lambda: retention.runs >= runs + 2)
            retention.stop()
    assert (retention.pruned, retention.pruned_dead_letters) == (2, 1)
    assert await _ids(engine, t.executions) == set()
    assert await _ids(engine, t.dead_letters) == set()


async def test_a_task_stopped_before_it_runs_returns_at_once(engine: AsyncEngine) -> None:
    """stop() before run(): run returns without a pass."""
    retention = ExecutionRetention(PostgresExecutionRepo(engine), timedelta(days=1), first_after=0)
    retention.stop()
    with anyio.fail_after(5):
        await retention.run()
    assert retention.runs == 0


class _FlakyRepo:
    """A repo whose first prune fails (the database is what is not the point here)."""

    def __init__(self) -> None:
        self.calls = 0

    async def prune(self, older_than: timedelta, *, batch: int = 1000) -> int:
        self.calls += 1
        if self.calls == 1:
            raise OSError("connection refused")
        return 1


async def test_a_failed_pass_does_not_stop_the_task() -> None:
    """A pass that raises is logged; the next one runs on schedule."""
    repo = _FlakyRepo()
    retention = ExecutionRetention(
        repo,  # type: ignore[arg-type]
        timedelta(days=1),
        interval=0.01,
        first_after=0,
    )
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            await tg.start(retention.run)
            await _until(lambda: retention.pruned >= 2)
            retention.stop()
    assert repo.calls >= 3


def test_keep_for_must_be_positive() -> None:
    """Retention of zero or less is refused: keeping records for ever runs no task."""
    with pytest.raises(ValueError, match="positive"):
        ExecutionRetention(None, timedelta(0))  # type: ignore[arg-type]


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", ()):
        found += _nodes(child)
    return found


_FILL = {
    "executions": (
        "INSERT INTO executions (id, app_id, source_kind, status, created_at, finished_at) "
        "SELECT gen_random_uuid(), :app, 'kv', 'succeeded', "
        "now() - make_interval(days => 30 - g % 30), now() - make_interval(days => 29 - g % 30) "
        "FROM generate_series(1, 2000) g"
    ),
    "dead_letters": (
        "INSERT INTO dead_letters (app_id, execution_id, source_kind, payload, resolution, "
        "resolved_at, created_at) SELECT :app, gen_random_uuid(), 'kv', '{}', 'handled', "
        "now() - make_interval(days => 29 - g % 30), now() - make_interval(days => 30 - g % 30) "
        "FROM generate_series(1, 2000) g"
    ),
}
_TEXT_ARRAY = sa.ARRAY(sa.Text)
_PRUNES = {  # each statement, with the typed parameter it carries
    "executions": (
        executions_module._PRUNE_BATCH,
        sa.bindparam("final", executions_module._FINAL_STATUSES, type_=_TEXT_ARRAY),
    ),
    "dead_letters": (
        dead_letters_module._PRUNE_BATCH,
        sa.bindparam("settled", list(dead_letters_module.SETTLED), type_=_TEXT_ARRAY),
    ),
}


@pytest.mark.parametrize("table", ["executions", "dead_letters"])
async def test_a_prune_batch_reads_one_app_by_the_listing_index(
    engine: AsyncEngine, table: str
) -> None:
    """On a table of many apps' records, a batch's plan finds its rows through the
    (app_id, created_at) index, not by reading every record."""
    apps = [await factories.app(engine) for _ in range(3)]
    async with engine.begin() as conn:
        for app in apps:
            await conn.execute(sa.text(_FILL[table]), {"app": app})
        await conn.execute(sa.text(f"ANALYZE {table}"))
    prune, typed = _PRUNES[table]
    explain = sa.text("EXPLAIN (FORMAT JSON) " + prune.text).bindparams(typed)
    async with engine.begin() as conn:
        plan = (
            await conn.execute(explain, {"app_id": apps[1], "older_than": KEEP, "batch": 1000})
        ).scalar_one()[0]["Plan"]
    nodes = _nodes(plan)
    by_index = [n for n in nodes if n.get("Index Name") == f"ix_{table}_app_id_created_at_id"]
    assert by_index, nodes
    assert "app_id" in str(by_index[0].get("Index Cond")), by_index
    assert not [n for n in nodes if n["Node Type"] == "Seq Scan"], nodes
