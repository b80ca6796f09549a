"""``ExecutionRetention``: finished execution records do not pile up for ever.

Every execution — each HTTP call, each trigger firing — leaves a record, so on a
small box the ``executions`` table would otherwise grow without bound. One task per
node deletes the records that finished more than ``keep_for`` ago, and the dead
letters settled (handled, resolved or replayed) more than ``keep_for`` ago, every
``interval`` (first shortly after start), in batches so no statement holds many
locks or a long transaction. Several nodes may prune at once: each skips rows
another is deleting. Records still queued, running or retrying are never touched,
nor dead letters still waiting for their owner (unresolved, or ``handler_failed``).

"Ago" is by the database's clock, which wrote ``finished_at`` and ``resolved_at``:
the statements delete what is older than ``keep_for`` before PostgreSQL's ``now()``.
The node's own clock plays no part, so a node whose clock is far ahead cannot delete
the cluster's recent history (nor one far behind keep old records for ever).
"""

from __future__ import annotations

import logging
from datetime import timedelta

import anyio
import anyio.abc

from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.executions import PostgresExecutionRepo

log = logging.getLogger("picloud.retention")


class ExecutionRetention:
    """Prunes finished execution records older than ``keep_for``; see the module."""

    def __init__(
        self,
        executions: PostgresExecutionRepo,
        keep_for: timedelta,
        *,
        dead_letters: PostgresDeadLetterRepo | None = None,
        interval: float = 3600.0,
        first_after: float = 60.0,
        batch: int = 1000,
    ) -> None:
        if keep_for <= timedelta(0):
            raise ValueError("keep_for must be positive (to keep records for ever, run no task)")
        self._executions = executions
        self._dead_letters = dead_letters
        self.keep_for = keep_for
        self._interval = interval
        self._first_after = first_after
        self._batch = batch
        self.pruned = 0  # execution records deleted by this node (``/metrics``)
        self.pruned_dead_letters = 0
        self.runs = 0
        self._scope: anyio.CancelScope | None = None
        self._stopped = False

    async def prune_once(self) -> int:
        """One pass over every app; returns the execution records deleted."""
        n = await self._executions.prune(self.keep_for, batch=self._batch)
        self.pruned += n
        letters = 0
        if self._dead_letters is not None:
            letters = await self._dead_letters.prune(self.keep_for, batch=self._batch)
            self.pruned_dead_letters += letters
        self.runs += 1
        if n or letters:
            log.info(
                "pruned %d execution record(s) and %d dead letter(s) settled over %s ago",
                n,
                letters,
                self.keep_for,
            )
        return n

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Prune every ``interval`` until :meth:`stop`; a failed pass is logged and the
        next one runs on schedule. A pass cut short by ``stop`` rolls back its batch."""
        with anyio.CancelScope() as self._scope:
            if self._stopped:
                self._scope.cancel()
            task_status.started()
            await anyio.sleep(self._first_after)
            while True:
                try:
                    await self.prune_once()
                except Exception:
                    log.exception(
                        "pruning execution records failed; next try in %.0f s", self._interval
                    )
                await anyio.sleep(self._interval)

    def stop(self) -> None:
        """Make :meth:`run` return (at once, even in the middle of a pass)."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()
