"""``OutboxBacklog``: an app's async routes stop queueing work it cannot run.

A sync request holds a slot of the execution gate, so a flood of them is refused
at the door. An async request only writes its outbox row and answers 202: without a
bound, a client calling an app's public async route faster than the app's
executions finish would grow the outbox (each row keeps its request body, up to
1 MiB) until PostgreSQL's disk was full, for every app.

So each app may have at most ``limit`` executions in the outbox (queued, running or
retrying, of any kind) before its async routes answer 503 ``overloaded`` with
``Retry-After``. The count comes from PostgreSQL, so it covers the whole cluster,
and is refreshed every ``interval`` for the apps that sent async requests lately;
between refreshes this node adds the requests it admits itself. The bound is
therefore soft by at most what the other nodes admit in one ``interval``. A count
never costs more than ``limit`` index entries (``ix_outbox_app_id``). KV, document
and dead-letter trigger rows are never refused (they commit with the writes that
cause them), but they count.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio
import anyio.abc
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.ext.asyncio import AsyncEngine

from picloud_shared.ids import AppId

log = logging.getLogger("picloud.backlog")

# For each app: its outbox rows, counted up to :cap (an index range scan of at most
# :cap entries, however many rows the app has).
_COUNT = sa.text(
    """
    SELECT a.app_id, (
        SELECT count(*) FROM (SELECT 1 FROM outbox o WHERE o.app_id = a.app_id LIMIT :cap) s
    ) AS queued
    FROM unnest(:apps) AS a(app_id)
    """
).bindparams(sa.bindparam("apps", type_=ARRAY(UUID(as_uuid=True))))


class OutboxBacklog:
    """The :class:`~picloud_shared.ports.AsyncBacklog` over the outbox; see the module.

    ``limit`` 0 admits everything (and :meth:`run` counts nothing)."""

    def __init__(
        self,
        engine: AsyncEngine,
        limit: int,
        *,
        interval: float = 1.0,
        active_for: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit < 0:
            raise ValueError("limit must be 0 (unbounded) or more")
        self._engine = engine
        self.limit = limit
        self._interval = interval
        self._active_for = active_for
        self._clock = clock
        self._queued: dict[AppId, int] = {}  # last count, plus what this node admitted since
        self._seen: dict[AppId, float] = {}  # when each app last asked (clock)
        self.refusals = 0  # ``/metrics``
        self._scope: anyio.CancelScope | None = None
        self._stopped = False

    def admit(self, app_id: AppId) -> bool:
        if not self.limit:
            return True
        self._seen[app_id] = self._clock()
        queued = self._queued.get(app_id, 0)
        if queued >= self.limit:
            self.refusals += 1
            return False
        self._queued[app_id] = queued + 1
        return True

    def queued(self, app_id: AppId) -> int:
        """The app's executions in the outbox as this node knows them now."""
        return self._queued.get(app_id, 0)

    async def refresh(self) -> None:
        """Count the outbox rows of every app that asked within ``active_for``; the
        others are forgotten (counted again when they next ask)."""
        horizon = self._clock() - self._active_for
        for app_id in [a for a, at in self._seen.items() if at < horizon]:
            del self._seen[app_id]
            self._queued.pop(app_id, None)
        apps = list(self._seen)
        if not apps:
            return
        async with self._engine.connect() as conn:
            rows = (await conn.execute(_COUNT, {"apps": apps, "cap": self.limit})).all()
            await conn.rollback()
        # Admissions made while the statement ran are counted by it, or not yet
        # written: both are near enough for a bound meant against floods.
        self._queued = {AppId(app_id): queued for app_id, queued in rows}

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Refresh every ``interval`` until :meth:`stop`; a failed refresh is logged
        and the last counts stay."""
        with anyio.CancelScope() as self._scope:
            if self._stopped or not self.limit:
                self._scope.cancel()
            task_status.started()
            failing = False
            while True:
                try:
                    await self.refresh()
                    failing = False
                except Exception:
                    if not failing:  # once per outage, not every second
                        log.exception("counting queued executions failed; keeping the last")
                    failing = True
                await anyio.sleep(self._interval)

    def stop(self) -> None:
        """Make :meth:`run` return (at once, even in the middle of a refresh)."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()
