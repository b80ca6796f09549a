"""A short-lived, per-process cache of each app's routes.

Looking an app's routes up is one database round trip per user request; the
routes change rarely. ``CachedRouteTable`` keeps each app's routes for ``ttl``
seconds.

What a node's cache shows:

* A route created or deleted (an app deleted, a script's timeout changed) through
  this node's admin API is served as it is now by this node's next request: the
  composition root wires :meth:`~CachedRouteTable.invalidate` to the repos, and a
  read that was already under way when the change came is not kept.
* A change made through another node's admin API is seen here within ``ttl``
  seconds: the cache is eventually consistent across nodes. Only a request the
  cached routes would answer 404 or 405 re-reads the database first, so a route
  created elsewhere for a path no cached route matches is served at once; one that
  a cached route also matches (``GET /u/me`` next to a cached ``GET /u/{id}``), or a
  route deleted elsewhere, may take up to ``ttl`` to show.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import anyio

from picloud_shared.domain import RouteTarget
from picloud_shared.ports import RouteTable


class CachedRouteTable:
    """Implements ``RouteTable`` over another one, remembering answers for ``ttl`` s."""

    def __init__(
        self,
        inner: RouteTable,
        ttl: float = 1.0,
        *,
        max_apps: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._inner = inner
        self._ttl = ttl
        self._max_apps = max_apps
        self._clock = clock
        self._entries: dict[str, tuple[float, Sequence[RouteTarget]]] = {}
        self._in_flight: dict[str, _Flight] = {}
        # Bumped by every invalidate: a read begun before it may predate the change,
        # so its answer is handed to its waiters but not cached.
        self._generation = 0
        self.hits = 0
        self.misses = 0

    async def routes_for_app(self, app_name: str) -> Sequence[RouteTarget] | None:
        """The cached routes when fresh, else the inner table's answer (cached)."""
        return (await self.lookup(app_name))[0]

    async def lookup(self, app_name: str) -> tuple[Sequence[RouteTarget] | None, bool]:
        """Like :meth:`routes_for_app`, and whether the answer came from the cache."""
        entry = self._entries.get(app_name)
        if entry is not None and entry[0] > self._clock():
            self.hits += 1
            return entry[1], True
        return await self.refresh(app_name), False

    async def refresh(self, app_name: str) -> Sequence[RouteTarget] | None:
        """Read through to the inner table; unknown apps are not cached. Concurrent
        refreshes of one app share a single read (no stampede when an entry expires
        under load)."""
        shared = self._in_flight.get(app_name)
        if shared is not None:
            await shared.done.wait()
            if shared.error is None:
                return shared.targets
            # the shared read failed: read for ourselves (alongside any other waiter)
        flight = _Flight()
        generation = self._generation
        self._in_flight[app_name] = flight
        self.misses += 1
        try:
            targets = await self._inner.routes_for_app(app_name)
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            if self._in_flight.get(app_name) is flight:
                del self._in_flight[app_name]
            flight.done.set()
        flight.targets = targets
        if generation != self._generation:
            return targets
        if targets is None:
            self._entries.pop(app_name, None)
            return None
        if len(self._entries) >= self._max_apps:
            self._entries.clear()
        self._entries[app_name] = (self._clock() + self._ttl, targets)
        return targets

    def invalidate(self, app_name: str | None = None) -> None:
        """Forget one app's routes, or all, with any read of them under way: the next
        lookup reads the table afresh."""
        self._generation += 1
        if app_name is None:
            self._entries.clear()
            self._in_flight.clear()
        else:
            self._entries.pop(app_name, None)
            self._in_flight.pop(app_name, None)


class _Flight:
    """One read of an app's routes that concurrent refreshes wait for."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.targets: Sequence[RouteTarget] | None = None
        self.error: BaseException | None = None
