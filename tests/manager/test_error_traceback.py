"""An execution's and a dead letter's ``error_traceback`` on real PostgreSQL: stored
from ``ExecError.traceback``, cleared by a later outcome, counted in a page's bytes."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core import tables as t
from manager_core.postgres import outbox_claims
from manager_core.postgres._pages import PAGE_BYTES
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.executions import PostgresExecutionRepo
from manager_core.postgres.outbox import PostgresOutboxRepo
from picloud_shared.execution import ExecError, ExecResult, ScriptResponse
from picloud_shared.ids import AppId, new_execution_id
from picloud_shared.limits import MAX_TRACEBACK_CHARS
from picloud_shared.outbox import NewOutboxRow, OutboxSourceKind
from picloud_shared.status import ExecErrorKind, ExecutionStatus
from tests.manager import factories

pytestmark = pytest.mark.anyio

TB = (
    "Traceback (most recent call last):\n"
    '  File "<script s>", line 4, in handle\n'
    "    inner()\n"
    "ValueError: kaboom\n"
)
KABOOM = ExecError(ExecErrorKind.UNCAUGHT_EXCEPTION, "ValueError: kaboom", TB)
KV_EVENT = {"kind": "kv", "key": "k", "op": "set", "value": 1, "prev_value": None}


async def _claimed(engine: AsyncEngine, app: AppId) -> outbox_claims.ClaimedRow:
    outbox = PostgresOutboxRepo(engine)
    await outbox.enqueue(NewOutboxRow(new_execution_id(), app, OutboxSourceKind.KV, KV_EVENT))
    (claimed,) = await outbox.claim_due("n", 1, 30)
    return claimed


async def test_a_failed_execution_keeps_the_scripts_traceback(engine: AsyncEngine) -> None:
    """finish_with stores ExecError.traceback; the wire form shows it beside kind and
    message."""
    app = await factories.app(engine)
    execution_id = (await _claimed(engine, app)).row.execution_id
    repo = PostgresExecutionRepo(engine)
    await repo.finish_with(
        execution_id, ExecutionStatus.FAILED, ExecResult.failed(execution_id, KABOOM)
    )
    got = await repo.get(app, execution_id)
    assert got is not None
    assert got.error_traceback == TB
    assert got.to_wire()["error"] == {
        "kind": "uncaught_exception",
        "message": "ValueError: kaboom",
        "traceback": TB,
    }


async def test_an_error_without_a_traceback_reads_null(engine: AsyncEngine) -> None:
    """A timeout (no traceback) after an attempt that had one leaves none behind."""
    app = await factories.app(engine)
    execution_id = (await _claimed(engine, app)).row.execution_id
    repo = PostgresExecutionRepo(engine)
    await repo.finish_with(
        execution_id, ExecutionStatus.RETRYING, ExecResult.failed(execution_id, KABOOM)
    )
    slow = ExecError(ExecErrorKind.TIMEOUT, "the script ran past its 1.0 s timeout")
    await repo.finish_with(
        execution_id, ExecutionStatus.FAILED, ExecResult.failed(execution_id, slow)
    )
    got = await repo.get(app, execution_id)
    assert got is not None
    assert got.to_wire()["error"] == {
        "kind": "timeout",
        "message": "the script ran past its 1.0 s timeout",
        "traceback": None,
    }


async def test_a_no_write_success_clears_an_earlier_attempts_traceback(
    engine: AsyncEngine,
) -> None:
    """The batched completion of a success that wrote nothing clears the error of the
    attempt before it, its traceback included."""
    app = await factories.app(engine)
    claim = await _claimed(engine, app)
    execution_id = claim.row.execution_id
    async with engine.begin() as conn:  # the first attempt's error, as it was stored
        await conn.execute(
            sa.update(t.executions)
            .where(t.executions.c.id == execution_id)
            .values(
                status="retrying",
                error_kind=KABOOM.kind.value,
                error_message=KABOOM.message,
                error_traceback=KABOOM.traceback,
            )
        )
    ok = ExecResult.succeeded(execution_id, ScriptResponse.empty())
    async with engine.begin() as conn:
        assert await outbox_claims.complete_batch(conn, [(claim, ok)]) == {claim.row.id}
    (row,) = await factories.rows(engine, t.executions, t.executions.c.id == execution_id)
    assert (row.status, row.error_kind, row.error_message, row.error_traceback) == (
        "succeeded",
        None,
        None,
        None,
    )


async def test_a_dead_letter_keeps_the_scripts_traceback(engine: AsyncEngine) -> None:
    """create stores the traceback it is given; the wire form shows it, and a dead
    letter created without one reads null."""
    app = await factories.app(engine)
    repo = PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine))
    row = (await _claimed(engine, app)).row
    letter = await repo.create(
        row,
        attempts=1,
        error_kind=KABOOM.kind,
        error_message=KABOOM.message,
        error_traceback=KABOOM.traceback,
    )
    got = await repo.get(app, letter.id)
    assert got is not None
    assert got.to_wire()["error"] == {
        "kind": "uncaught_exception",
        "message": "ValueError: kaboom",
        "traceback": TB,
    }
    plain = await repo.create(
        row, attempts=1, error_kind=ExecErrorKind.REJECTED, error_message="no"
    )
    assert plain.to_wire()["error"] == {"kind": "rejected", "message": "no", "traceback": None}


# Rows whose tracebacks alone hold more than a page's bytes (two bytes a character).
_LONG_TB = "é" * MAX_TRACEBACK_CHARS
_ROWS = PAGE_BYTES // (2 * MAX_TRACEBACK_CHARS) + 10


async def test_tracebacks_count_in_a_pages_bytes(engine: AsyncEngine) -> None:
    """A list of executions, or of dead letters, whose tracebacks hold more than
    PAGE_BYTES stops its page there (a cursor leads on) rather than answering them
    all at once."""
    app = await factories.app(engine)
    async with engine.begin() as conn:
        await conn.execute(
            sa.text(
                "INSERT INTO executions (app_id, source_kind, status, error_kind,"
                " error_message, error_traceback)"
                " SELECT :app, 'kv', 'failed', 'uncaught_exception', 'E: x', :tb"
                " FROM generate_series(1, :n)"
            ),
            {"app": app, "tb": _LONG_TB, "n": _ROWS},
        )
        await conn.execute(
            sa.text(
                "INSERT INTO dead_letters (app_id, execution_id, source_kind, payload,"
                " error_kind, error_message, error_traceback)"
                " SELECT :app, gen_random_uuid(), 'kv', '{}'::jsonb, 'uncaught_exception',"
                " 'E: x', :tb FROM generate_series(1, :n)"
            ),
            {"app": app, "tb": _LONG_TB, "n": _ROWS},
        )
    executions = await PostgresExecutionRepo(engine).list(app, 1000)
    letters = await PostgresDeadLetterRepo(engine, PostgresOutboxRepo(engine)).list(app, 1000)
    for page in (executions, letters):
        assert page.cut  # type: ignore[attr-defined]
        assert len(page) * 2 * MAX_TRACEBACK_CHARS <= PAGE_BYTES + 2 * MAX_TRACEBACK_CHARS
