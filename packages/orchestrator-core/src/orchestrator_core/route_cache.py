"""A short-lived, per-process cache of each app's routes.

Looking an app's routes up is one database round trip per user request; the
routes change rarely. ``CachedRouteTable`` keeps each app's routes for ``ttl``
seconds. The orchestrator re-reads the database before it answers 404 or 405
from a cached answer, so a route created on any node is served at once. A deleted
route (or a changed script timeout) is forgotten at once on the node whose admin
API made the change (the composition root wires ``invalidate`` to the repos) and
may be seen on other nodes for up to ``ttl`` more.
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
        if targets is None:
            self._entries.pop(app_name, None)
            return None
        if len(self._entries) >= self._max_apps:
            self._entries.clear()
        self._entries[app_name] = (self._clock() + self._ttl, targets)
        return targets

    def invalidate(self, app_name: str | None = None) -> None:
        """Forget one app's routes, or all."""
        if app_name is None:
            self._entries.clear()
        else:
            self._entries.pop(app_name, None)


class _Flight:
    """One read of an app's routes that concurrent refreshes wait for."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.targets: Sequence[RouteTarget] | None = None
        self.error: BaseException | None = None
