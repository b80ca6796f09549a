"""Group commit for executions that touched no data.

A script that made no host call leaves nothing to commit but its own bookkeeping:
remove the outbox row, mark the execution succeeded (and a handled dead letter).
Those finish together in one statement and one commit
(:class:`~manager_core.group_commit.GroupCommit`).

Under load a flush first lingers (``linger`` seconds, at most once per flush) while
other executions are still running and could join it: a statement then carries ~10
rows rather than ~5, and PostgreSQL's commits per execution fall by about a third
(bench/RESULTS.md, session 8). Nobody waits for these commits except a sync caller,
so a batch holding a sync row never lingers, nor does a flush when nothing else
runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import anyio
import attrs

from manager_core.db import run_batch
from manager_core.group_commit import GroupCommit
from manager_core.outage_log import OutageLog
from manager_core.postgres.outbox import ClaimedRow, PostgresOutboxRepo
from picloud_shared.execution import ExecResult

log = logging.getLogger("picloud.dispatcher")

# A flush lingers only while fewer rows than this are pending.
LINGER_BELOW = 16


@attrs.define(eq=False)
class _Item:
    claim: ClaimedRow
    result: ExecResult
    done: anyio.Event = attrs.Factory(anyio.Event)
    owned: bool = False
    error: BaseException | None = None


class BatchCompleter:
    """Collects successful no-write executions and commits them in batches."""

    def __init__(
        self,
        outbox: PostgresOutboxRepo,
        max_batch: int = 256,
        *,
        linger: float = 0.0,
        running: Callable[[], int] = lambda: 0,
    ) -> None:
        """``running``: how many executions are in flight on the node (those being
        completed included)."""
        self._outbox = outbox
        self._linger = linger
        self._running = running
        self._group = GroupCommit[_Item](
            lambda batch: self._flush(batch), max_batch, self._linger_for if linger else None
        )
        self.batches = 0
        self.rows = 0
        self._outage = OutageLog(
            log, "completing executions", then="their rows come back when their lease expires"
        )

    @property
    def lingered(self) -> int:
        """Flushes that waited for more rows."""
        return self._group.lingered

    async def complete(self, claim: ClaimedRow, result: ExecResult) -> bool:
        """Wait until the row is committed as succeeded; ``False`` if this node no
        longer owned it. Raises the database error of a failed flush."""
        item = _Item(claim, result)
        await self._group.submit(item)
        return item.owned

    def _linger_for(self, pending: Sequence[_Item]) -> float:
        if len(pending) >= LINGER_BELOW or self._running() <= len(pending):
            return 0.0  # a batch already, or nothing else running could join it
        if any(item.claim.row.reply_to is not None for item in pending):
            return 0.0  # a caller waits for its answer
        return self._linger

    async def _flush(self, batch: list[_Item]) -> None:
        await run_batch(batch, self._complete, self._fail)

    async def _complete(self, batch: list[_Item]) -> None:
        owned = await self._outbox.complete_batch([(i.claim, i.result) for i in batch])
        self._outage.succeeded()
        self.batches += 1
        self.rows += len(batch)
        for item in batch:
            item.owned = item.claim.row.id in owned
            item.done.set()

    def _fail(self, batch: list[_Item], exc: Exception) -> None:
        if not self._outage.counted(exc):  # the database away: one line, not one a batch
            log.exception("completing %d execution(s) failed", len(batch))
        for item in batch:
            item.error = exc
            item.done.set()
