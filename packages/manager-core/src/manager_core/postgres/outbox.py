"""The outbox on PostgreSQL: ``OutboxSignal`` and ``PostgresOutboxRepo``.

One ``PostgresOutboxRepo`` object is both the orchestrator's
:class:`~picloud_shared.ports.OutboxWriter` (``enqueue``) and the dispatcher's
:class:`~picloud_shared.ports.OutboxRepo` (``claim_due`` … ``wait_for_work``, the SQL
in :mod:`manager_core.postgres.outbox_claims`).

Wake-ups: the dispatcher sleeps in ``wait_for_work`` on an :class:`OutboxSignal`.
Whoever writes outbox rows notifies the signal *after* the transaction commits
(never before: a dispatcher woken early would find nothing and go back to sleep).
Writers that own their transaction do it themselves; a writer that joins a
caller's transaction calls :meth:`OutboxSignal.defer` and the caller, once it has
committed, calls :meth:`OutboxSignal.committed`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import anyio
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.db import transaction
from manager_core.postgres import outbox_claims as claims
from manager_core.postgres.outbox_claims import ClaimedRow, ScriptSources, outbox_row_from_row
from manager_core.postgres.triggers import retry_values
from picloud_shared.errors import NotFound
from picloud_shared.execution import ExecResult
from picloud_shared.ids import (
    ExecutionId,
    InboxId,
)
from picloud_shared.outbox import NewOutboxRow, OutboxRow

__all__ = ["ClaimedRow", "OutboxSignal", "PostgresOutboxRepo", "outbox_row_from_row"]

_O, _E = t.outbox, t.executions


class OutboxSignal:
    """An in-process, level-triggered wake-up for the local dispatcher.

    ``notify()`` makes the next (or the current) ``wait()`` return at once; several
    notifications before a wait collapse into one. Use it from the event loop's own
    thread only.
    """

    def __init__(self) -> None:
        self._pending = False
        self._event: anyio.Event | None = None
        self._deferred: weakref.WeakSet[AsyncConnection] = weakref.WeakSet()

    @property
    def pending(self) -> bool:
        """Whether a notification waits to be consumed."""
        return self._pending

    def notify(self) -> None:
        """Wake the waiter (or the next one)."""
        self._pending = True
        if self._event is not None:
            self._event.set()

    def defer(self, conn: AsyncConnection) -> None:
        """Remember that ``conn``'s open transaction wrote outbox rows: notify once the
        caller reports the commit with :meth:`committed`."""
        self._deferred.add(conn)

    def committed(self, conn: AsyncConnection) -> bool:
        """``conn``'s transaction committed: notify if it wrote outbox rows.
        Returns whether it did."""
        if conn in self._deferred:
            self._deferred.discard(conn)
            self.notify()
            return True
        return False

    def discard(self, conn: AsyncConnection) -> None:
        """``conn``'s transaction rolled back: forget it."""
        self._deferred.discard(conn)

    async def wait(self, timeout: float) -> bool:
        """Return once notified (``True``) or after ``timeout`` seconds (``False``)."""
        if not self._pending:
            if self._event is None or self._event.is_set():
                self._event = anyio.Event()
            with anyio.move_on_after(timeout):
                await self._event.wait()
        woke, self._pending = self._pending, False
        return woke


def _existing(table: sa.Table, value: object) -> Any:
    """``value`` if a row of ``table`` has that id, else NULL: an execution record keeps
    its foreign keys valid when the trigger/route/script vanished meanwhile (the
    outbox row keeps the original id and the dispatcher fails it cleanly)."""
    if value is None:
        return sa.null()
    return sa.select(table.c.id).where(table.c.id == value).scalar_subquery()


class PostgresOutboxRepo:
    """:class:`~picloud_shared.ports.OutboxWriter` and
    :class:`~picloud_shared.ports.OutboxRepo` on PostgreSQL.

    ``signal`` is the node's wake-up (a fresh one when not given); share it with the
    :class:`~manager_core.outbox_event_emitter.OutboxEventEmitter`. Every method takes
    an optional ``conn`` to join the caller's transaction.
    """

    def __init__(self, engine: AsyncEngine, signal: OutboxSignal | None = None) -> None:
        self._engine = engine
        self.signal = signal if signal is not None else OutboxSignal()
        self._sources = ScriptSources()

    # -- OutboxWriter ----------------------------------------------------------------

    async def enqueue(self, row: NewOutboxRow, *, conn: AsyncConnection | None = None) -> None:
        execution = (
            sa.insert(_E)
            .from_select(
                [
                    "id",
                    "app_id",
                    "source_kind",
                    "trigger_id",
                    "route_id",
                    "script_id",
                    "status",
                    "trigger_depth",
                ],
                sa.select(
                    sa.literal(row.execution_id, _E.c.id.type),
                    t.apps.c.id,
                    sa.literal(row.source_kind.value),
                    _existing(t.triggers, row.trigger_id),
                    _existing(t.routes, row.route_id),
                    _existing(t.scripts, row.script_id),
                    sa.literal("queued"),
                    sa.literal(row.trigger_depth),
                ).where(t.apps.c.id == row.app_id),
            )
            .returning(_E.c.id)
        )
        try:
            async with transaction(conn or self._engine) as c:
                if (await c.execute(execution)).one_or_none() is None:
                    raise NotFound("app not found")
                await c.execute(sa.insert(_O).values(**_outbox_values(row)))
        except IntegrityError as exc:  # the app vanished between the two statements
            raise NotFound("app not found") from exc
        if conn is None:
            self.signal.notify()
        else:
            self.signal.defer(conn)

    # -- OutboxRepo: the dispatcher's surface (SQL in ``outbox_claims``) ------------

    async def claim_due(
        self, node: str, limit: int, lease_seconds: float, *, conn: AsyncConnection | None = None
    ) -> list[ClaimedRow]:
        """Claim up to ``limit`` due rows for ``node`` with everything needed to run
        them (see :func:`outbox_claims.claim`)."""
        if limit < 1:
            return []
        async with transaction(conn or self._engine) as c:
            return await claims.claim(
                c, node_id=node, limit=limit, lease_seconds=lease_seconds, sources=self._sources
            )

    async def recover_expired(self, *, conn: AsyncConnection | None = None) -> int:
        """Make rows whose lease expired, and that nobody is running, due again."""
        async with transaction(conn or self._engine) as c:
            return await claims.recover_expired(c)

    async def renew_leases(
        self, row_ids: Sequence[int], lease_seconds: float, *, conn: AsyncConnection | None = None
    ) -> int:
        """Extend the leases of rows this node is still running (the heartbeat)."""
        if not row_ids:
            return 0
        async with transaction(conn or self._engine) as c:
            return await claims.renew_leases(c, row_ids, lease_seconds)

    async def take(self, row_id: int, token: str, *, conn: AsyncConnection) -> bool:
        """Lock a claimed row for ``conn``'s transaction; ``False`` if another claim
        owns it now."""
        return await claims.take(conn, row_id, token)

    async def reschedule(
        self, row_id: int, *, delay_ms: float, conn: AsyncConnection | None = None
    ) -> None:
        """Give a claimed row back due after ``delay_ms`` (its attempt stays counted)."""
        async with transaction(conn or self._engine) as c:
            await claims.reschedule(c, row_id, delay_ms=delay_ms)

    async def give_back(
        self, row_id: int, token: str, *, delay_ms: float = 0.0, conn: AsyncConnection | None = None
    ) -> None:
        """Return a claimed row without counting its attempt (saturation, shutdown)."""
        async with transaction(conn or self._engine) as c:
            await claims.give_back(c, row_id, token, delay_ms=delay_ms)
        self._wake(conn)

    async def complete_batch(
        self, items: Sequence[tuple[ClaimedRow, ExecResult]], *, conn: AsyncConnection | None = None
    ) -> set[int]:
        """Finish successful executions that wrote nothing in one statement; the ids
        of the rows this node still owned."""
        async with transaction(conn or self._engine) as c:
            return await claims.complete_batch(c, items)

    async def delete(self, row_id: int, *, conn: AsyncConnection | None = None) -> bool:
        """Remove a finished row (in the execution's own transaction)."""
        async with transaction(conn or self._engine) as c:
            result = await c.execute(sa.delete(_O).where(_O.c.id == row_id))
        return bool(result.rowcount)

    async def get(self, row_id: int, *, conn: AsyncConnection | None = None) -> OutboxRow | None:
        """One row by id, claimed or not."""
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(sa.select(_O).where(_O.c.id == row_id))).one_or_none()
        return None if row is None else outbox_row_from_row(row)

    async def record_abandoned(
        self,
        execution_id: ExecutionId,
        inbox_id: InboxId,
        reason: str,
        result: ExecResult | None,
        *,
        conn: AsyncConnection | None = None,
    ) -> None:
        a = t.abandoned_executions
        stmt = (
            pg_insert(a)
            .from_select(
                ["execution_id", "app_id", "inbox_id", "reason", "result"],
                sa.select(
                    _E.c.id,
                    _E.c.app_id,
                    sa.literal(inbox_id, a.c.inbox_id.type),
                    sa.literal(reason, sa.Text),
                    sa.literal(None if result is None else result.to_wire(), a.c.result.type),
                ).where(_E.c.id == execution_id),
            )
            .on_conflict_do_nothing(index_elements=["execution_id"])
        )
        async with transaction(conn or self._engine) as c:
            await c.execute(stmt)

    async def wait_for_work(self, timeout: float) -> None:
        await self.signal.wait(timeout)

    def _wake(self, conn: AsyncConnection | None) -> None:
        if conn is None:
            self.signal.notify()
        else:
            self.signal.defer(conn)


def _outbox_values(row: NewOutboxRow) -> dict[str, Any]:
    values: dict[str, Any] = {
        "execution_id": row.execution_id,
        "app_id": row.app_id,
        "source_kind": row.source_kind.value,
        "trigger_id": row.trigger_id,
        "route_id": row.route_id,
        "script_id": row.script_id,
        "payload": row.payload,
        "reply_to": row.reply_to,
        "reply_node": row.reply_node,
        "is_dead_letter_handler": row.is_dead_letter_handler,
        "dead_letter_id": row.dead_letter_id,
        "trigger_depth": row.trigger_depth,
        **retry_values(row.retry),
    }
    if row.run_at is not None:
        values["run_at"] = row.run_at
    return values
