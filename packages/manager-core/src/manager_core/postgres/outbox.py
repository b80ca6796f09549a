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
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

import anyio
import sqlalchemy as sa
from psycopg_pool import AsyncConnectionPool
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.db import INTEGRITY_ERRORS, SqlConn, transaction, unavailable_as_error
from manager_core.postgres import outbox_claims as claims
from manager_core.postgres import outbox_enqueue as enqueue_sql
from manager_core.postgres.outbox_claims import (
    ClaimedRow,
    ScriptSources,
    new_claim_token,
    outbox_row_from_row,
)
from manager_core.postgres.outbox_enqueue import GroupWriter, Pending
from picloud_shared.errors import NotFound
from picloud_shared.execution import ExecResult
from picloud_shared.gate import Permit
from picloud_shared.ids import (
    ExecutionId,
    InboxId,
)
from picloud_shared.outbox import NewOutboxRow, OutboxRow

__all__ = ["ClaimedRow", "LocalRunner", "OutboxSignal", "PostgresOutboxRepo", "outbox_row_from_row"]

_O, _E = t.outbox, t.executions


class LocalRunner(Protocol):
    """A dispatcher running on this node, ready to run rows the moment they are
    written (see :meth:`PostgresOutboxRepo.enqueue`)."""

    @property
    def node_id(self) -> str: ...

    @property
    def lease_seconds(self) -> float: ...

    def reserve(self, row: NewOutboxRow, held: Permit | None = None) -> Permit | None:
        """A gate slot to run ``row`` at once, or ``None`` (saturated, stopping).
        ``held``: the writer's own slot for it, used or released."""

    def run_claimed(self, claim: ClaimedRow, permit: Permit) -> None:
        """Start running a row this node just wrote claimed, holding ``permit``."""


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


class PostgresOutboxRepo:
    """:class:`~picloud_shared.ports.OutboxWriter` and
    :class:`~picloud_shared.ports.OutboxRepo` on PostgreSQL.

    ``signal`` is the node's wake-up (a fresh one when not given); share it with the
    :class:`~manager_core.outbox_event_emitter.OutboxEventEmitter`. ``pool`` (see
    :func:`manager_core.db.make_pool`, opened and closed by the caller) serves the hot
    single statements. Every method takes an optional ``conn`` to join the caller's
    transaction.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        signal: OutboxSignal | None = None,
        *,
        pool: AsyncConnectionPool | None = None,
    ) -> None:
        self._engine = engine
        # The hot statements (enqueue, claim, completion, leases) are single statements:
        # autocommitted, on ``pool`` when given (plain psycopg, cheapest), else on the
        # engine.
        self._pool = pool
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._runners: dict[str, LocalRunner] = {}
        self.signal = signal if signal is not None else OutboxSignal()
        self._sources = ScriptSources()
        self._rotation = claims.AppRotation()  # this node's turn round the apps
        self._writer = GroupWriter(
            lambda: self._hot(None), lease_seconds=self._lease_seconds, sources=self._sources
        )

    # -- OutboxWriter ----------------------------------------------------------------

    async def enqueue(
        self,
        row: NewOutboxRow,
        *,
        conn: AsyncConnection | None = None,
        permit: Permit | None = None,
    ) -> None:
        """Write the row and its execution record.

        ``permit``: a gate slot the caller holds for this row (``OutboxWriter``); it
        passes to the local dispatcher with the row, or is released.

        In the caller's transaction (``conn``): one statement. In its own: concurrent
        enqueues share one statement and one commit (:class:`GroupWriter`), and a row
        that a dispatcher attached on this node can run at once is written already
        claimed by it and handed over in memory (:meth:`attach`): no claim
        transaction, no wake-up. A sync HTTP row goes only to the dispatcher of its
        ``reply_node``.
        """
        if conn is not None:
            if permit is not None:
                permit.release()
            try:
                written = await enqueue_sql.write(
                    conn, [Pending(row)], lease_seconds=0, sources=self._sources
                )
            except IntegrityError as exc:
                raise NotFound("app not found") from exc
            if not written:
                raise NotFound("app not found")
            self.signal.defer(conn)
            return
        runner = self._runner_for(row)
        if runner is not None:
            permit = runner.reserve(row, permit)
        elif permit is not None:
            permit.release()
            permit = None
        token = None if runner is None or permit is None else new_claim_token(runner.node_id)

        def on_written(claim: ClaimedRow | None) -> None:
            if permit is None:
                if claim is not None:
                    self.signal.notify()
            elif claim is None:
                permit.release()
            else:
                assert runner is not None
                runner.run_claimed(claim, permit)

        try:
            with unavailable_as_error():
                claim = await self._writer.write(Pending(row, token), on_written)
        except INTEGRITY_ERRORS as exc:  # the app vanished while the row was written
            raise NotFound("app not found") from exc
        if claim is None:
            raise NotFound("app not found")

    @property
    def write_batches(self) -> tuple[int, int]:
        """(statements, rows) of the group-committed enqueues so far."""
        return self._writer.batches, self._writer.rows

    def _lease_seconds(self) -> float:
        return max((r.lease_seconds for r in self._runners.values()), default=60.0)

    @asynccontextmanager
    async def _hot(self, conn: AsyncConnection | None) -> AsyncIterator[SqlConn]:
        """The caller's transaction, else an autocommit connection."""
        if conn is not None:
            yield conn
        elif self._pool is not None:
            async with self._pool.connection() as c:
                yield c
        else:
            async with self._autocommit.connect() as c:
                yield c

    # -- local runners ------------------------------------------------------------------

    def attach(self, runner: LocalRunner) -> None:
        """Let ``enqueue`` hand rows it writes to ``runner`` (a running dispatcher)."""
        self._runners[runner.node_id] = runner

    def detach(self, runner: LocalRunner) -> None:
        if self._runners.get(runner.node_id) is runner:
            del self._runners[runner.node_id]

    def _runner_for(self, row: NewOutboxRow) -> LocalRunner | None:
        if row.reply_to is not None:
            return self._runners.get(row.reply_node) if row.reply_node is not None else None
        return next(iter(self._runners.values()), None)

    # -- OutboxRepo: the dispatcher's surface (SQL in ``outbox_claims``) ------------

    async def claim_due(self, node: str, limit: int, lease_seconds: float) -> list[ClaimedRow]:
        """Claim up to ``limit`` due rows for ``node`` with everything needed to run
        them, shared fairly between apps (see :func:`outbox_claims.claim`). Always
        autocommitted statements: they commit without waiting for the disk."""
        if limit < 1:
            return []
        async with self._hot(None) as c:
            return await claims.claim(
                c,
                node_id=node,
                limit=limit,
                lease_seconds=lease_seconds,
                sources=self._sources,
                rotation=self._rotation,
            )

    async def recover_expired(self, *, conn: AsyncConnection | None = None) -> int:
        """Make rows whose lease expired, and that nobody is running, due again."""
        async with self._hot(conn) as c:
            return await claims.recover_expired(c)

    async def renew_leases(
        self,
        leases: Mapping[int, str],
        lease_seconds: float,
        *,
        conn: AsyncConnection | None = None,
    ) -> int:
        """Extend the leases of rows this node is still running (the heartbeat):
        ``leases`` maps each row's id to its claim token (``ClaimedRow.token``). A row
        whose lease ran out and that another claim owns now keeps its new owner's
        lease. Returns the rows renewed."""
        if not isinstance(leases, Mapping):
            raise TypeError("renew_leases takes {row id: claim token}, not row ids alone")
        if not leases:
            return 0
        async with self._hot(conn) as c:
            return await claims.renew_leases(c, leases, lease_seconds)

    async def take(
        self,
        row_id: int,
        token: str,
        attempt_count: int,
        *,
        conn: AsyncConnection,
        idle_seconds: float | None = None,
    ) -> bool:
        """Lock a claimed row for ``conn``'s transaction (which may then sit idle at
        most ``idle_seconds``, when given); ``False`` if another claim owns it now
        (``attempt_count``: the claim's, see ``outbox_claims.take``)."""
        return await claims.take(conn, row_id, token, attempt_count, idle_seconds=idle_seconds)

    async def reschedule(
        self, row_id: int, *, delay_ms: float, conn: AsyncConnection | None = None
    ) -> None:
        """Give a claimed row back due after ``delay_ms`` (its attempt stays counted)."""
        async with transaction(conn or self._engine) as c:
            await claims.reschedule(c, row_id, delay_ms=delay_ms)

    async def give_back(
        self,
        row_id: int,
        token: str,
        *,
        delay_ms: float = 0.0,
        attempt_count: int | None = None,
        conn: AsyncConnection | None = None,
    ) -> None:
        """Return a claimed row without counting its attempt (saturation, shutdown);
        with the claim's ``attempt_count``, also once lease recovery released it."""
        async with transaction(conn or self._engine) as c:
            await claims.give_back(c, row_id, token, delay_ms=delay_ms, attempt_count=attempt_count)
        self._wake(conn)

    async def complete_batch(
        self, items: Sequence[tuple[ClaimedRow, ExecResult]], *, conn: AsyncConnection | None = None
    ) -> set[int]:
        """Finish successful executions that wrote nothing in one statement; the ids
        of the rows this node still owned. In its own transaction the commit does not
        wait for the disk (``outbox_claims.complete_batch``)."""
        async with self._hot(conn) as c:
            return await claims.complete_batch(c, items, own_transaction=conn is None)

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
