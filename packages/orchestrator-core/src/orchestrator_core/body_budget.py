"""The body budget: one bound on the request-body bytes a node holds at once.

Every user-route request takes its share as its body's bytes arrive, and gives it
back when the body is no longer needed (its row is written, or the request failed).
A request that cannot get its share within a short wait is refused (503): a flood of
large bodies then costs at most the budget, not a body per connection. The share is
never taken from a declared ``Content-Length`` ahead of the bytes: a client that
only declares holds nothing (65 such connections held the whole budget for the
30 s of the body timeout, at ~80 bytes each).

Waiters are served in arrival order: a large share is not starved by small ones. A
:class:`BodyShare` may grow and is released exactly once (idempotent), from any
task of the event loop.
"""

from __future__ import annotations

from collections import deque
from types import TracebackType

import anyio


class _Waiter:
    __slots__ = ("event", "granted", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.event = anyio.Event()
        self.granted = False


class BodyBudget:
    """At most ``capacity`` bytes of request bodies held at once (anyio, one loop)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("body budget capacity must be at least 1 byte")
        self._capacity = capacity
        self._in_use = 0
        self._waiters: deque[_Waiter] = deque()
        self.refusals = 0  # shares refused because none came free in time (a metric)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        """Bytes held by shares right now."""
        return self._in_use

    def share(self) -> BodyShare:
        """A new, empty share of this budget."""
        return BodyShare(self)

    async def _take(self, size: int, wait: float) -> bool:
        """Take ``size`` bytes now or within ``wait`` seconds, after every earlier
        waiter; ``False``, counted as one refusal, when they did not come free."""
        if size <= 0:
            return True
        if size > self._capacity:  # can never fit: do not make everyone behind it wait
            self.refusals += 1
            return False
        if not self._waiters and self._in_use + size <= self._capacity:
            self._in_use += size
            return True
        waiter = _Waiter(size)
        self._waiters.append(waiter)
        try:
            with anyio.move_on_after(wait):
                await waiter.event.wait()
        except BaseException:  # cancelled: whatever it was granted goes back
            self._leave(waiter)
            raise
        if waiter.granted:
            return True
        self._leave(waiter)
        self.refusals += 1
        return False

    def _leave(self, waiter: _Waiter) -> None:
        if waiter.granted:
            self._give(waiter.size)
        else:
            self._waiters.remove(waiter)
            self._grant()  # the head may have changed: those behind may fit now

    def _give(self, size: int) -> None:
        self._in_use -= size
        self._grant()

    def _grant(self) -> None:
        """Hand free bytes to the waiters at the head of the queue, in order."""
        while self._waiters and self._in_use + self._waiters[0].size <= self._capacity:
            waiter = self._waiters.popleft()
            self._in_use += waiter.size
            waiter.granted = True
            waiter.event.set()


class BodyShare:
    """One request's bytes of the budget. Release it (or leave its ``with``) once."""

    __slots__ = ("_budget", "held")

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self.held = 0

    async def cover(self, size: int, wait: float) -> bool:
        """Hold at least ``size`` bytes, waiting up to ``wait`` seconds for what is
        missing; ``False`` when it did not come (what is held stays held)."""
        if size <= self.held:
            return True
        if not await self._budget._take(size - self.held, wait):
            return False
        self.held = size
        return True

    def release(self) -> None:
        """Give every held byte back. Idempotent."""
        if self.held:
            held, self.held = self.held, 0
            self._budget._give(held)

    def __enter__(self) -> BodyShare:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
