"""Leader/follower batching for statements that many tasks want run at once.

The caller that finds no flush in progress becomes the leader: it flushes
everything pending, then whatever arrived meanwhile, until nothing is left; the
others wait for their item's ``done``. No background task: at low load a batch is
one item and nobody waits; under load batches grow by themselves. The leader's
flushing is shielded from cancellation (the followers' items are in its hands).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

import anyio


class Waiting(Protocol):
    """An item whose ``done`` the flush sets once the item is settled, with the
    ``error`` that settled it, if any."""

    done: anyio.Event
    error: BaseException | None


T = TypeVar("T", bound=Waiting)


class GroupCommit(Generic[T]):
    """Runs ``flush`` over batches of at most ``max_batch`` submitted items; ``flush``
    must set ``done`` on every item it is given, whatever happens."""

    def __init__(self, flush: Callable[[list[T]], Awaitable[None]], max_batch: int) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._pending: list[T] = []
        self._flushing = False

    async def submit(self, item: T) -> None:
        """Return once ``item`` has been flushed (its ``done`` is set); raise its
        ``error`` if the flush failed it."""
        await self._settle(item)
        if item.error is not None:
            raise item.error

    async def _settle(self, item: T) -> None:
        self._pending.append(item)
        if self._flushing:
            await item.done.wait()
            return
        self._flushing = True
        try:
            with anyio.CancelScope(shield=True):
                while self._pending:
                    batch = self._pending[: self._max_batch]
                    del self._pending[: self._max_batch]
                    await self._flush(batch)
        finally:
            self._flushing = False
