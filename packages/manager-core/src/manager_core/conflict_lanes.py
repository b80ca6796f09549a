"""Conflict lanes: fairness for executions that keep meeting each other.

Executions run optimistically (SERIALIZABLE) and one that loses a serialization
conflict is re-run. Many executions read-modify-writing one key at once would keep
aborting each other, and an unlucky one could re-run until its sync caller gave up
(504). So an execution of an app that lost a conflict re-runs in that app's lane
on this node: one at a time, in the order they came. While the app is *hot* (one of
its executions lost a conflict within :data:`HOT_SECONDS`), its new executions
queue in the lane too instead of racing it; once it has cooled down they run
concurrently again. Waiting in a lane holds no gate slot.

A lane is per node: executions on other nodes still race optimistically, and
re-run as before.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from picloud_shared.ids import AppId

HOT_SECONDS = 0.5


class _Lane:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = anyio.Lock()  # FIFO: waiters take it in the order they came
        self.users = 0  # holding it or waiting for it


class ConflictLanes:
    """One lane per app whose executions are in conflict on this node."""

    def __init__(self) -> None:
        self._lanes: dict[AppId, _Lane] = {}
        self._hot: dict[AppId, float] = {}  # app → when it last lost a conflict

    def conflicted(self, app_id: AppId) -> None:
        """An execution of the app lost a serialization conflict just now."""
        self._hot[app_id] = time.monotonic()

    def hot(self, app_id: AppId) -> bool:
        """Whether the app's new executions should queue in its lane."""
        at = self._hot.get(app_id)
        if at is None:
            return False
        if time.monotonic() - at < HOT_SECONDS:
            return True
        del self._hot[app_id]
        return False

    @asynccontextmanager
    async def serial(self, app_id: AppId) -> AsyncIterator[None]:
        """Run the body alone among the app's lane users on this node, in order."""
        lane = self._lanes.get(app_id)
        if lane is None:
            lane = self._lanes[app_id] = _Lane()
        lane.users += 1
        try:
            async with lane.lock:
                yield
        finally:
            lane.users -= 1
            if not lane.users:
                del self._lanes[app_id]
