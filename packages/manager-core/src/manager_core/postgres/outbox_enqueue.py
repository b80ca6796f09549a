"""Writing outbox rows with their execution records: one statement per batch.

:func:`write` inserts the ``executions`` records and the ``outbox`` rows of a batch
together (data-modifying CTEs: one round trip, one commit). An execution keeps its
foreign keys valid when the trigger, route or script vanished meanwhile (those ids
become NULL there; the outbox row keeps the originals and the dispatcher fails it
cleanly); a row whose app is missing is not written.

A row may be written already claimed by this node (a :class:`Pending` with a
``token``): the lease set, the attempt counted, the execution ``running``. It comes
back with everything needed to run it
(:data:`~manager_core.postgres.outbox_claims.CLAIM_CONTEXT`), so a node that runs
the row itself skips the claim transaction.

:class:`GroupWriter` batches concurrent enqueues (group commit, no background task).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import attrs

from manager_core.db import SqlConn, fetch, run_batch
from manager_core.group_commit import GroupCommit
from manager_core.postgres.outbox_claims import (
    CLAIM_CONTEXT,
    ClaimedRow,
    ScriptSources,
    claimed_rows,
)
from manager_core.postgres.triggers import retry_values
from picloud_shared import wire
from picloud_shared.ids import ExecutionId
from picloud_shared.outbox import NewOutboxRow

log = logging.getLogger("picloud.outbox")

# ``durable`` false: the commit need not wait for the disk. That is right when every
# row is a sync HTTP row: if its record is lost in a crash, its caller is gone with
# it, and the execution's own completion commits durably (WAL order makes this one
# durable too). Anything else is durable: an async row's 202 promised acceptance.
# The rows travel as one JSON array (one parameter, one ``json.dumps``), typed by
# ``jsonb_populate_recordset`` against the outbox's own row type on the server.
_WRITE = (
    """
    WITH commit_mode AS (
        SELECT set_config('synchronous_commit', CASE WHEN %(durable)s
               THEN current_setting('synchronous_commit') ELSE 'off' END, true) AS mode
    ), r AS (
        SELECT * FROM jsonb_populate_recordset(NULL::outbox, CAST(%(rows)s AS jsonb))
    ), execution AS (
        INSERT INTO executions (id, app_id, source_kind, trigger_id, route_id, script_id,
                                status, attempts, trigger_depth, started_at)
        SELECT r.execution_id, a.id, r.source_kind,
               (SELECT id FROM triggers WHERE id = r.trigger_id),
               (SELECT id FROM routes WHERE id = r.route_id),
               (SELECT id FROM scripts WHERE id = r.script_id),
               CASE WHEN r.claimed_by IS NULL THEN 'queued' ELSE 'running' END,
               r.attempt_count, r.trigger_depth,
               CASE WHEN r.claimed_by IS NULL THEN NULL ELSE now() END
        FROM r JOIN apps a ON a.id = r.app_id
        RETURNING id
    ), claimed AS (
        INSERT INTO outbox (execution_id, app_id, source_kind, trigger_id, route_id,
                            script_id, payload, reply_to, reply_node, is_dead_letter_handler,
                            dead_letter_id, trigger_depth, attempt_count, retry_backoff,
                            retry_base_delay_ms, retry_max_delay_ms, retry_max_attempts,
                            retry_jitter, run_at, claimed_by, claimed_until)
        SELECT execution.id, r.app_id, r.source_kind, r.trigger_id, r.route_id, r.script_id,
               r.payload, r.reply_to, r.reply_node, r.is_dead_letter_handler,
               r.dead_letter_id, r.trigger_depth, r.attempt_count, r.retry_backoff,
               r.retry_base_delay_ms, r.retry_max_delay_ms, r.retry_max_attempts,
               r.retry_jitter, coalesce(r.run_at, now()), r.claimed_by,
               CASE WHEN r.claimed_by IS NULL THEN NULL
                    ELSE now() + make_interval(secs => CAST(%(lease)s AS float8)) END
        FROM r JOIN execution ON execution.id = r.execution_id
        RETURNING *
    )
    """
    + CLAIM_CONTEXT
    + " CROSS JOIN commit_mode"
)


@attrs.frozen
class Pending:
    """One row to write: due (``token`` None) or already claimed under ``token``."""

    row: NewOutboxRow
    token: str | None = None


def _document(p: Pending) -> dict[str, Any]:
    row = p.row

    def text(value: object) -> str | None:
        return None if value is None else str(value)

    return {
        "execution_id": str(row.execution_id),
        "app_id": str(row.app_id),
        "source_kind": row.source_kind.value,
        "trigger_id": text(row.trigger_id),
        "route_id": text(row.route_id),
        "script_id": text(row.script_id),
        "payload": row.payload,
        "reply_to": text(row.reply_to),
        "reply_node": row.reply_node,
        "is_dead_letter_handler": row.is_dead_letter_handler,
        "dead_letter_id": text(row.dead_letter_id),
        "trigger_depth": row.trigger_depth,
        "attempt_count": 0 if p.token is None else 1,
        "run_at": None if row.run_at is None else row.run_at.isoformat(),
        "claimed_by": p.token,
        **retry_values(row.retry),
    }


async def write(
    conn: SqlConn,
    batch: Sequence[Pending],
    *,
    lease_seconds: float,
    sources: ScriptSources,
    own_transaction: bool = False,
) -> dict[ExecutionId, ClaimedRow]:
    """Insert every row of ``batch`` with its execution record in one statement.

    Returns the rows written, by execution id, as :class:`ClaimedRow` (for a row
    written due, ``token`` is None and only ``row`` matters); a row whose app does
    not exist is missing from the result. With ``own_transaction`` (the statement is
    autocommitted) it waits for the disk unless every row is a sync HTTP row; in a
    caller's transaction it never changes how that transaction commits.
    """
    params = {
        "rows": wire.dumps([_document(p) for p in batch]),
        "lease": lease_seconds,
        "durable": not own_transaction or any(p.row.reply_to is None for p in batch),
    }
    rows = await fetch(conn, _WRITE, params)
    return {c.row.execution_id: c for c in await claimed_rows(conn, rows, sources)}


@attrs.define(eq=False)
class _Waiter:
    pending: Pending
    on_written: Callable[[ClaimedRow | None], None]
    done: anyio.Event = attrs.Factory(anyio.Event)
    result: ClaimedRow | None = None
    error: BaseException | None = None


class GroupWriter:
    """Concurrent enqueues share statements and commits
    (:class:`~manager_core.group_commit.GroupCommit`). ``on_written`` runs for every
    row as soon as its batch committed, whoever waits for it (a claimed row must
    reach its runner even when its caller is gone).
    """

    def __init__(
        self,
        connect: Callable[[], AbstractAsyncContextManager[SqlConn]],
        *,
        lease_seconds: Callable[[], float],
        sources: ScriptSources,
        max_batch: int = 128,
    ) -> None:
        self._connect = connect
        self._lease_seconds = lease_seconds
        self._sources = sources
        self._group = GroupCommit[_Waiter](self._flush, max_batch)
        self.batches = 0
        self.rows = 0

    async def write(
        self, pending: Pending, on_written: Callable[[ClaimedRow | None], None]
    ) -> ClaimedRow | None:
        """Write one row; its :class:`ClaimedRow`, or ``None`` when its app does not
        exist. Raises the database error of a failed write."""
        waiter = _Waiter(pending, on_written)
        await self._group.submit(waiter)
        return waiter.result

    async def _flush(self, batch: list[_Waiter]) -> None:
        # A deadlock (with an admin delete, say) runs again; a row whose app vanished
        # meanwhile, or that PostgreSQL refuses, fails alone.
        await run_batch(batch, self._write_all, _fail)

    async def _write_all(self, batch: list[_Waiter]) -> None:
        written = await self._write([w.pending for w in batch])
        self.batches += 1
        self.rows += len(batch)
        for w in batch:
            w.result = written.get(w.pending.row.execution_id)
            _finish(w, w.result)

    async def _write(self, batch: list[Pending]) -> dict[ExecutionId, ClaimedRow]:
        async with self._connect() as conn:
            return await write(
                conn,
                batch,
                lease_seconds=self._lease_seconds(),
                sources=self._sources,
                own_transaction=True,
            )


def _fail(batch: list[_Waiter], error: Exception) -> None:
    for w in batch:
        w.error = error
        _finish(w, None)


def _finish(waiter: _Waiter, claim: ClaimedRow | None) -> None:
    try:
        waiter.on_written(claim)
    except Exception:  # never leave the rest of the batch waiting
        log.exception("handing over outbox row %s failed", waiter.pending.row.execution_id)
    finally:
        waiter.done.set()
