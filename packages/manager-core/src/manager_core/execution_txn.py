"""One execution's transaction and the small pieces the dispatcher runs it with.

:class:`ExecutionTransaction` is opened lazily, at the script's first host call: it
locks the claimed row and serves the host calls; on success the script's effects,
the fan-out they caused, the execution record and the row's removal commit together
(``EXECUTION_ISOLATION``). :class:`Slot` is the execution's gate permit. The
exceptions say why a run stops short: :class:`Rerun` (a serialization conflict: run
the script again), :class:`Lost` (another claim owns the row), :class:`Unrunnable`
(the row cannot run at all).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import anyio
import attrs
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core.db import (
    is_connection_lost,
    is_retryable_conflict,
    shielded_commit,
    shielded_rollback,
)
from manager_core.guarded_host import GuardedHost
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.executions import PostgresExecutionRepo
from manager_core.postgres.outbox import ClaimedRow, PostgresOutboxRepo
from picloud_shared.execution import ExecError, ExecResult
from picloud_shared.gate import ExecutionGate, Permit
from picloud_shared.ids import AppId
from picloud_shared.ports import HostApi
from picloud_shared.principals import Principal
from picloud_shared.status import ExecutionStatus

# Each execution's effects run in one REPEATABLE READ transaction whose host reads
# lock what they read (``ctx.kv.get``/``ctx.docs.get`` are ``SELECT … FOR UPDATE``):
# a read-modify-write of a key is serialized with every other execution touching
# that key, and a write that lost a race (a row changed or inserted after the
# snapshot) fails with a serialization error, which re-runs the script
# transparently. SERIALIZABLE would also do, but its page-level predicate locks
# made executions writing *different* keys abort each other (1.5 re-runs per
# execution in bench), so only real contention costs a re-run here.
EXECUTION_ISOLATION = "REPEATABLE READ"

# An execution's transaction may sit idle (between statements) as long as its script
# may run, from its first host call to its timeout, and then while its outcome
# commits. Past its script's ``timeout_seconds`` plus this margin, PostgreSQL ends it
# (``idle_in_transaction_session_timeout``, set for that transaction only): its node
# is stalled (SIGSTOP, a frozen VM), and its row and key locks would otherwise hold up
# every execution needing them, the one re-running it after its lease ran out
# included. The margin covers the commit's few statements on a busy event loop.
IDLE_IN_TRANSACTION_MARGIN_SECONDS = 10.0

# How many times an execution runs again at once when its transaction's connection
# turned out to be lost at a host call (``db.is_connection_lost``: a stale pooled
# connection after a PostgreSQL restart). Nothing of it committed, and a script has no
# outside effects. The failed connection made SQLAlchemy discard every connection
# pooled before it, so a second run meets a fresh one; a database still away fails
# that run too, and the execution then fails as any platform error does.
LOST_CONNECTION_RERUNS = 1

HostFactory = Callable[[AsyncConnection, AppId, Principal, int], HostApi]
"""Builds the ``HostApi`` of one execution: (transaction, app, principal, trigger depth)."""


class Notify(Protocol):
    def notify(self) -> None: ...


@attrs.frozen
class TransactionDeps:
    """What an execution's transaction needs from its dispatcher."""

    engine: AsyncEngine
    outbox: PostgresOutboxRepo
    executions: PostgresExecutionRepo
    dead_letters: PostgresDeadLetterRepo
    host_factory: HostFactory
    signal: Notify


class Rerun(Exception):
    """The transaction hit a serialization conflict; run the script again."""


class ConnectionLost(Exception):
    """A host call found the transaction's connection lost before anything of it
    committed; run the script again on a new one (``LOST_CONNECTION_RERUNS``)."""


class Slot:
    """The gate permit of one execution: released as soon as its script has run
    (committing the outcome needs no slot), taken again for a conflict re-run."""

    def __init__(self, permit: Permit, on_release: Callable[[], None]) -> None:
        self._permit = permit
        self._on_release = on_release
        self._held = True

    def release(self) -> None:
        self._permit.release()
        if self._held:
            self._held = False
            self._on_release()

    async def reacquire(self, gate: ExecutionGate) -> None:
        self.release()
        permit = await gate.acquire()
        assert permit is not None
        self._permit = permit
        self._held = True


class _Opener:
    """Opens an execution's transaction at its first host call. Apart from the
    transaction object, so that the host (which holds this) and the transaction
    (which holds the host) form no reference cycle: a cycle per execution is garbage
    only the cyclic collector frees, and under load that collector was a tenth of a
    request's CPU."""

    __slots__ = ("claim", "conn", "deps", "principal")

    def __init__(self, deps: TransactionDeps, claim: ClaimedRow, principal: Principal) -> None:
        self.deps = deps
        self.claim = claim
        self.principal = principal
        self.conn: AsyncConnection | None = None

    async def __call__(self) -> HostApi:
        d, row = self.deps, self.claim.row
        conn = await d.engine.connect()
        self.conn = conn
        await conn.execution_options(isolation_level=EXECUTION_ISOLATION)
        await conn.begin()
        script = self.claim.script
        assert script is not None  # a row whose script is gone is never run
        idle = script.timeout_seconds + IDLE_IN_TRANSACTION_MARGIN_SECONDS
        if not await d.outbox.take(
            row.id, self.claim.token, row.attempt_count, conn=conn, idle_seconds=idle
        ):
            raise Lost
        return d.host_factory(conn, row.app_id, self.principal, row.trigger_depth)


class ExecutionTransaction:
    """One execution's transaction, opened at the script's first host call: it locks
    the claimed row, and serves the host calls."""

    def __init__(self, deps: TransactionDeps, claim: ClaimedRow, principal: Principal) -> None:
        self._d = deps
        self._claim = claim
        self._opener = _Opener(deps, claim, principal)
        self.host = GuardedHost(self._opener)

    @property
    def conn(self) -> AsyncConnection | None:
        """The open transaction's connection; ``None`` until the first host call."""
        return self._opener.conn

    async def commit_success(self, result: ExecResult) -> None:
        row = self._claim.row
        conn = self.conn
        assert conn is not None
        try:
            await self._d.outbox.delete(row.id, conn=conn)
            await self._d.executions.finish_with(
                row.execution_id, ExecutionStatus.SUCCEEDED, result, conn=conn
            )
            if row.is_dead_letter_handler and row.dead_letter_id is not None:
                await self._d.dead_letters.mark(
                    row.app_id, row.dead_letter_id, "handled", conn=conn
                )
            await shielded_commit(conn)
        except DBAPIError as exc:
            await shielded_rollback(conn)
            if is_retryable_conflict(exc):
                raise Rerun from None
            raise
        self.host.committed()
        self._d.signal.notify()  # the script's writes may have fanned out new rows

    async def rollback(self) -> None:
        if self.conn is not None and self.conn.in_transaction():
            try:
                await shielded_rollback(self.conn)
            except DBAPIError as exc:
                # The session is gone (PostgreSQL ended it, say for sitting idle past
                # IDLE_IN_TRANSACTION_MARGIN_SECONDS), and its transaction with it.
                if not is_connection_lost(exc):
                    raise

    async def close(self) -> None:
        conn = self._opener.conn
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await conn.close()
            self._opener.conn = None


class Unrunnable(Exception):
    def __init__(self, error: ExecError) -> None:
        super().__init__(error.message)
        self.error = error


class Lost(Exception):
    """Another claim owns the row now; leave it alone."""
