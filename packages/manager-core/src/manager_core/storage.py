"""Bounding what an app stores: the quota check and the compactor task.

What counts and how it is accounted: :mod:`manager_core.postgres.storage`.

**Enforcement is approximate, by design.** A write that would grow the app past its
quota is refused (:class:`~picloud_shared.errors.StorageQuotaExceeded`); deletes
and writes that shrink never are. The check compares against the app's usage
(compacted plus pending deltas) read *outside* the writer's transaction — inside an
execution's transaction that read would conflict with every concurrent writer of
the app — through a per-node cache that reads each app at most once every
``USAGE_REFRESH_SECONDS``, plus the net growth the writing transaction has made so
far (:class:`StorageGrowth`). Writes other transactions commit meanwhile are not
seen until the next read, so an app may overshoot its quota by about a second of
its writes (per node), never by more than one write of a single execution.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

import anyio
import anyio.abc
import attrs

from manager_core.outage_log import OutageLog
from manager_core.postgres.storage import PostgresStorageRepo
from picloud_shared.errors import StorageQuotaExceeded
from picloud_shared.ids import AppId

__all__ = [
    "COMPACT_INTERVAL_SECONDS",
    "MAX_CACHED_APPS",
    "USAGE_REFRESH_SECONDS",
    "StorageCompactor",
    "StorageGrowth",
    "StorageQuota",
]

log = logging.getLogger("picloud.storage")

#: A node reads an app's usage for its quota checks at most this often.
USAGE_REFRESH_SECONDS = 1.0
#: A node remembers the usage of at most this many apps (the least recently checked
#: are forgotten, and read again when next checked).
MAX_CACHED_APPS = 10_000
#: Each node folds the storage deltas into ``app_storage`` this often.
COMPACT_INTERVAL_SECONDS = 5.0


@attrs.define
class StorageGrowth:
    """The net bytes one transaction has added to its app's storage so far (what the
    quota's cached usage does not see yet). The repos add each write's delta."""

    bytes: int = 0


@attrs.define
class _Usage:
    bytes: int
    read_at: float
    lock: anyio.Lock = attrs.field(factory=anyio.Lock)


class StorageQuota:
    """At most ``limit_bytes`` stored per app (``None``: unlimited); see the module.

    One per node, shared by the KV and document repos: its cache is the node's view
    of every app's usage.
    """

    def __init__(
        self,
        storage: PostgresStorageRepo,
        limit_bytes: int | None,
        *,
        refresh: float = USAGE_REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if limit_bytes is not None and limit_bytes < 0:
            raise ValueError("limit_bytes must be non-negative (None: unlimited)")
        self.storage = storage
        self.limit_bytes = limit_bytes
        self._refresh = refresh
        self._clock = clock
        self._usage: OrderedDict[AppId, _Usage] = OrderedDict()
        self.max_cached_apps = MAX_CACHED_APPS

    async def budget(self, app_id: AppId, growth: StorageGrowth | None) -> int | None:
        """How many more bytes a write of ``app_id`` may add (negative when the app
        is over its quota), or ``None`` when unlimited."""
        if self.limit_bytes is None:
            return None
        pending = 0 if growth is None else growth.bytes
        return self.limit_bytes - await self.cached_usage(app_id) - pending

    async def cached_usage(self, app_id: AppId) -> int:
        """The app's usage as this node last read it, read again when older than
        ``refresh`` (by one caller at a time; the others wait for its answer)."""
        entry = self._usage.get(app_id)
        if entry is None:
            entry = self._usage.setdefault(app_id, _Usage(0, float("-inf")))
            while len(self._usage) > self.max_cached_apps:
                self._usage.popitem(last=False)
        else:
            self._usage.move_to_end(app_id)
        if self._clock() - entry.read_at < self._refresh:
            return entry.bytes
        async with entry.lock:
            if self._clock() - entry.read_at >= self._refresh:
                used = (await self.storage.usage([app_id]))[app_id]
                entry.bytes, entry.read_at = used, self._clock()
        return entry.bytes

    def wrote(
        self, app_id: AppId, added: int, growth: StorageGrowth | None, *, committed: bool
    ) -> None:
        """A write added ``added`` net bytes to the app: count them in its
        transaction's ``growth``, and in the node's cached usage if the write's own
        transaction already ``committed`` (a caller's transaction counts its growth
        once it commits: :meth:`committed`)."""
        if growth is not None:
            growth.bytes += added
        if committed:
            self.committed(app_id, added)

    def refused(self, delta: int, budget: int | None) -> bool:
        """Whether a write of ``delta`` bytes was refused by ``budget`` (what the
        write's statement checked with ``within``)."""
        return budget is not None and delta > max(budget, 0)

    def committed(self, app_id: AppId, added: int) -> None:
        """A transaction of this node committed ``added`` net bytes to the app: count
        them in its cached usage at once, rather than at the next read (a lone writer
        went ~10x past a small quota within one refresh)."""
        entry = self._usage.get(app_id)
        if entry is not None and added:
            entry.bytes += added

    def exceeded(self, app_id: AppId, adds: int, budget: int) -> StorageQuotaExceeded:
        """The error for a write of ``adds`` bytes that ``budget`` does not allow."""
        assert self.limit_bytes is not None
        used = self.limit_bytes - budget
        return StorageQuotaExceeded(
            f"the app's storage quota is {self.limit_bytes} bytes; it holds about {used}"
            f" and this write would add {adds}; delete data to make room"
        )


class StorageCompactor:
    """One task per node: folds the storage deltas into ``app_storage`` every
    ``interval`` seconds. Several nodes may compact at once (see
    :meth:`PostgresStorageRepo.compact`)."""

    def __init__(
        self, storage: PostgresStorageRepo, *, interval: float = COMPACT_INTERVAL_SECONDS
    ) -> None:
        self._storage = storage
        self._interval = interval
        self.folded = 0  # delta rows folded by this node
        self.runs = 0
        self._scope: anyio.CancelScope | None = None
        self._stopped = False
        # A pass failing because the database is away is logged when that starts, once
        # a minute while it lasts and when a pass works again: no traceback each time.
        self._outage = OutageLog(log, "folding storage deltas", then=f"next try in {interval:g} s")

    async def compact_once(self) -> int:
        """One fold; returns the delta rows folded."""
        n = await self._storage.compact()
        self.folded += n
        self.runs += 1
        return n

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Compact every ``interval`` until :meth:`stop`; a failed pass is logged (with
        its traceback, unless the database is away: see ``OutageLog``) and the next
        one runs on schedule. A pass cut short by ``stop`` rolls back."""
        with anyio.CancelScope() as self._scope:
            if self._stopped:
                self._scope.cancel()
            task_status.started()
            while True:
                await anyio.sleep(self._interval)
                try:
                    await self.compact_once()
                except Exception as exc:
                    self._outage.failed(exc)
                else:
                    self._outage.succeeded()

    def stop(self) -> None:
        """Make :meth:`run` return (at once, even in the middle of a pass)."""
        self._stopped = True
        if self._scope is not None:
            self._scope.cancel()
