"""``PostgresExecutionRepo``: execution records, as the API reads them and the
dispatcher updates them.

Records are created with their outbox row (``PostgresOutboxRepo.enqueue``, the
emitter's fan-out); this repo reads them (newest first, keyset by the last id),
moves them through ``running`` → a final status, and prunes finished ones past
their retention (``retention.ExecutionRetention``).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import attrs
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.db import transaction
from manager_core.postgres._pages import Page, json_bytes, within_bytes
from manager_core.postgres._prune import prune_by_app
from manager_core.postgres.triggers import check_limit
from picloud_shared import wire
from picloud_shared.execution import ExecResult
from picloud_shared.ids import AppId, ExecutionId, RouteId, ScriptId, TriggerId
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.status import ExecErrorKind, ExecutionStatus
from picloud_shared.wire import Json, JsonObject

__all__ = ["Execution", "PostgresExecutionRepo"]

_E = t.executions
_FINAL_STATUSES = sorted(status.value for status in ExecutionStatus if status.is_final)

# One batch of one app's prunable executions: finished before the cutoff (the
# database's now() less ``:older_than``: the times it compares are the database's, never
# a node's clock), and without an outbox row (a final record never has one; the check
# keeps the cascade from ever taking a live row). The range scan is the listing index's
# (app_id, created_at): finished before the cutoff implies created before it. Rows
# locked by a concurrent pruner (another node) are skipped, not waited for.
_PRUNE_BATCH = sa.text(
    """
    DELETE FROM executions WHERE id = ANY(ARRAY(
        SELECT e.id FROM executions e
        WHERE e.app_id = :app_id
          AND e.created_at < now() - CAST(:older_than AS interval)
          AND e.finished_at < now() - CAST(:older_than AS interval)
          AND e.status = ANY(:final)
          AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.execution_id = e.id)
        LIMIT :batch
        FOR UPDATE OF e SKIP LOCKED
    ))
    """
).bindparams(sa.bindparam("final", _FINAL_STATUSES, type_=sa.ARRAY(sa.Text)))

_PRUNE_ABANDONED = sa.text(
    """
    DELETE FROM abandoned_executions WHERE execution_id = ANY(ARRAY(
        SELECT execution_id FROM abandoned_executions
        WHERE app_id = :app_id AND created_at < now() - CAST(:older_than AS interval)
        LIMIT :batch
        FOR UPDATE SKIP LOCKED
    ))
    """
)


@attrs.frozen
class Execution:
    id: ExecutionId
    app_id: AppId
    source_kind: OutboxSourceKind
    status: ExecutionStatus
    attempts: int
    trigger_depth: int
    error_kind: ExecErrorKind | None
    error_message: str | None
    error_traceback: str | None
    logs: tuple[str, ...]
    result: Json
    trigger_id: TriggerId | None
    route_id: RouteId | None
    script_id: ScriptId | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: sa.Row) -> Execution:  # type: ignore[type-arg]
        return cls(
            id=ExecutionId(row.id),
            app_id=AppId(row.app_id),
            source_kind=OutboxSourceKind(row.source_kind),
            status=ExecutionStatus(row.status),
            attempts=row.attempts,
            trigger_depth=row.trigger_depth,
            error_kind=None if row.error_kind is None else ExecErrorKind(row.error_kind),
            error_message=row.error_message,
            error_traceback=row.error_traceback,
            logs=tuple(row.logs or ()),
            result=row.result,
            trigger_id=None if row.trigger_id is None else TriggerId(row.trigger_id),
            route_id=None if row.route_id is None else RouteId(row.route_id),
            script_id=None if row.script_id is None else ScriptId(row.script_id),
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )

    def to_wire(self) -> JsonObject:
        """The admin API's execution object (API.md)."""
        error: Json = None
        if self.error_kind is not None:
            error = {
                "kind": self.error_kind.value,
                "message": self.error_message or "",
                "traceback": self.error_traceback,
            }
        return {
            "id": str(self.id),
            "status": self.status.value,
            "source_kind": self.source_kind.value,
            "attempts": self.attempts,
            "trigger_depth": self.trigger_depth,
            "error": error,
            "logs": list(self.logs),
            "result": self.result,
            "created_at": wire.timestamp_text(self.created_at),
            "started_at": None if self.started_at is None else wire.timestamp_text(self.started_at),
            "finished_at": None
            if self.finished_at is None
            else wire.timestamp_text(self.finished_at),
        }


class PostgresExecutionRepo:
    """Execution records. Every method takes an optional ``conn`` to join the
    caller's transaction (the dispatcher finishes a record in the execution's own)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def get(
        self, app_id: AppId, execution_id: ExecutionId, *, conn: AsyncConnection | None = None
    ) -> Execution | None:
        stmt = sa.select(_E).where(_E.c.app_id == app_id, _E.c.id == execution_id)
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        return None if row is None else Execution.from_row(row)

    async def list(
        self,
        app_id: AppId,
        limit: int = 100,
        after: tuple[datetime, ExecutionId] | None = None,
        *,
        status: ExecutionStatus | None = None,
        source_kind: OutboxSourceKind | None = None,
        conn: AsyncConnection | None = None,
    ) -> Sequence[Execution]:
        """Newest first (``created_at DESC, id DESC``), starting after ``after`` (the
        previous page's last ``(created_at, id)``: it need not exist any more, pruned
        meanwhile, say); optionally filtered; a
        :class:`~manager_core.postgres._pages.Page` of at most ``PAGE_BYTES``."""
        stmt = (
            sa.select(_E)
            .where(_E.c.app_id == app_id)
            .order_by(_E.c.created_at.desc(), _E.c.id.desc())
            .limit(check_limit(limit))
        )
        if status is not None:
            stmt = stmt.where(_E.c.status == ExecutionStatus(status).value)
        if source_kind is not None:
            stmt = stmt.where(_E.c.source_kind == OutboxSourceKind(source_kind).value)
        if after is not None:  # (created_at, id) strictly after the cursor, newest first
            created, last = after
            stmt = stmt.where(
                sa.tuple_(_E.c.created_at, _E.c.id)
                < sa.tuple_(
                    sa.literal(created, _E.c.created_at.type), sa.literal(last, _E.c.id.type)
                )
            )
        stmt = within_bytes(
            stmt,
            json_bytes(_E.c.result, _E.c.logs, _E.c.error_message, _E.c.error_traceback),
            (_E.c.created_at.desc(), _E.c.id.desc()),
        )
        async with transaction(conn or self._engine) as c:
            rows = list((await c.execute(stmt)).all())
        return Page.of((Execution.from_row(r) for r in rows), rows)

    async def mark_running(
        self, execution_id: ExecutionId, attempt: int, *, conn: AsyncConnection | None = None
    ) -> None:
        """The execution's ``attempt`` (1-based) starts now."""
        stmt = (
            sa.update(_E)
            .where(_E.c.id == execution_id)
            .values(
                status=ExecutionStatus.RUNNING.value,
                attempts=attempt,
                started_at=sa.func.coalesce(_E.c.started_at, sa.func.now()),
            )
        )
        async with transaction(conn or self._engine) as c:
            await c.execute(stmt)

    async def finish(
        self,
        execution_id: ExecutionId,
        status: ExecutionStatus,
        *,
        error_kind: ExecErrorKind | None = None,
        error_message: str | None = None,
        error_traceback: str | None = None,
        logs: Sequence[str] = (),
        result: Json = None,
        final: bool | None = None,
        attempts: int | None = None,
        conn: AsyncConnection | None = None,
    ) -> None:
        """Record an outcome (replacing the error of an earlier attempt: columns not
        given are cleared). ``finished_at`` is set for final statuses (or when ``final``
        says so); ``retrying`` keeps the record open. ``attempts`` replaces the count
        the claim set (for a claim that did not run the script)."""
        is_final = status.is_final if final is None else final
        stmt = (
            sa.update(_E)
            .where(_E.c.id == execution_id)
            .values(
                status=status.value,
                error_kind=None if error_kind is None else error_kind.value,
                error_message=error_message,
                error_traceback=error_traceback,
                logs=list(logs),
                result=sa.null() if result is None else result,
                # clock_timestamp(), not now(): an execution's transaction opens at its
                # first host call, and now() is that moment, not the finish
                finished_at=sa.func.clock_timestamp() if is_final else None,
            )
        )
        if attempts is not None:
            stmt = stmt.values(attempts=attempts)
        async with transaction(conn or self._engine) as c:
            await c.execute(stmt)

    async def finish_with(
        self,
        execution_id: ExecutionId,
        status: ExecutionStatus,
        outcome: ExecResult,
        *,
        attempts: int | None = None,
        conn: AsyncConnection | None = None,
    ) -> None:
        """``finish`` from an :class:`ExecResult`: its error (kind, message and the
        script's traceback, if it has one), logs and response."""
        error = outcome.error
        await self.finish(
            execution_id,
            status,
            error_kind=None if error is None else error.kind,
            error_message=None if error is None else error.message,
            error_traceback=None if error is None else error.traceback,
            logs=outcome.logs,
            result=None if outcome.response is None else outcome.response.to_wire(),
            attempts=attempts,
            conn=conn,
        )

    async def prune(self, older_than: timedelta, *, batch: int = 1000) -> int:
        """Delete the execution records that finished more than ``older_than`` before
        the database's ``now()`` (and the abandoned-answer records written before that),
        ``batch`` rows per statement and transaction, app by app. Never touches an
        execution still queued, running or retrying. Returns how many execution records
        were deleted."""
        deleted = await prune_by_app(self._engine, _PRUNE_BATCH, older_than, batch)
        await prune_by_app(self._engine, _PRUNE_ABANDONED, older_than, batch)
        return deleted
