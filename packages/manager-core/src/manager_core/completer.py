"""Group commit for executions that touched no data.

A script that made no host call leaves nothing to commit but its own bookkeeping:
remove the outbox row, mark the execution succeeded (and a handled dead letter).
Those finish together in one statement and one commit
(:class:`~manager_core.group_commit.GroupCommit`).
"""

from __future__ import annotations

import logging

import anyio
import attrs

from manager_core.db import run_batch
from manager_core.group_commit import GroupCommit
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
        self._group = GroupCommit[_Item](lambda batch: self._flush(batch), max_batch)
        self.batches = 0
        self.rows = 0

    async def complete(self, claim: ClaimedRow, result: ExecResult) -> bool:
        """Wait until the row is committed as succeeded; ``False`` if this node no
        longer owned it. Raises the database error of a failed flush."""
        item = _Item(claim, result)
        await self._group.submit(item)
        return item.owned

    async def _flush(self, batch: list[_Item]) -> None:
        await run_batch(batch, self._complete, _fail)

    async def _complete(self, batch: list[_Item]) -> None:
        owned = await self._outbox.complete_batch([(i.claim, i.result) for i in batch])
        self.batches += 1
        self.rows += len(batch)
        for item in batch:
            item.owned = item.claim.row.id in owned
            item.done.set()


def _fail(batch: list[_Item], exc: Exception) -> None:
    log.exception("completing %d execution(s) failed", len(batch))
    for item in batch:
        item.error = exc
        item.done.set()
