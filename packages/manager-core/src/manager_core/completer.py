"""Group commit for executions that touched no data.

A script that made no host call leaves nothing to commit but its own bookkeeping:
remove the outbox row, mark the execution succeeded (and a handled dead letter).
Those finish together, leader/follower style, with no background task: the caller
of :meth:`BatchCompleter.complete` that finds no flush in progress flushes
everything pending in one statement and one commit, then whatever arrived
meanwhile; the others wait. At low load a batch is one row and nothing waits;
under load batches grow by themselves.
"""

from __future__ import annotations

import logging

import anyio
import attrs

from manager_core.postgres.outbox import ClaimedRow, PostgresOutboxRepo
from picloud_shared.execution import ExecResult

log = logging.getLogger("picloud.dispatcher")


@attrs.define(eq=False)
class _Item:
    claim: ClaimedRow
    result: ExecResult
    done: anyio.Event = attrs.Factory(anyio.Event)
    owned: bool = False
    error: BaseException | None = None


class BatchCompleter:
    """Collects successful no-write executions and commits them in batches."""

    def __init__(self, outbox: PostgresOutboxRepo, max_batch: int = 256) -> None:
        self._outbox = outbox
        self._max_batch = max_batch
        self._pending: list[_Item] = []
        self._flushing = False
        self.batches = 0
        self.rows = 0

    async def complete(self, claim: ClaimedRow, result: ExecResult) -> bool:
        """Wait until the row is committed as succeeded; ``False`` if this node no
        longer owned it. Raises the database error of a failed flush."""
        item = _Item(claim, result)
        self._pending.append(item)
        if self._flushing:
            await item.done.wait()
        else:
            self._flushing = True
            try:
                # Shielded: the followers' rows are in this caller's hands.
                with anyio.CancelScope(shield=True):
                    while self._pending:
                        batch = self._pending[: self._max_batch]
                        del self._pending[: self._max_batch]
                        await self._flush(batch)
            finally:
                self._flushing = False
        if item.error is not None:
            raise item.error
        return item.owned

    async def _flush(self, batch: list[_Item]) -> None:
        try:
            owned = await self._outbox.complete_batch([(i.claim, i.result) for i in batch])
        except Exception as exc:
            log.exception("completing %d execution(s) failed", len(batch))
            for item in batch:
                item.error = exc
                item.done.set()
            return
        self.batches += 1
        self.rows += len(batch)
        for item in batch:
            item.owned = item.claim.row.id in owned
            item.done.set()
