"""Leader/follower batching for statements that many tasks want run at once.

The caller that finds no flush in progress becomes the leader: it flushes what is
pending (its own item among it). Whoever submits meanwhile waits. When the
leader's batch is done it hands the lead to the first caller still waiting, which
flushes everything that piled up, and so on: each caller does at most the flush
that carries its own item, so under steady load no caller is kept flushing for
others (a leader that looped "until nothing is left" answered its own request
last, up to ~100 ms late at 8 HTTP connections). Only items whose callers are gone
(cancelled) are flushed by whoever leads. No background task: at low load a batch
is one item and nobody waits; under load batches grow by themselves. A ``linger``
may hold a flush back a moment so that a batch grows larger (fewer statements) where
its caller knows more items are about to come; it is asked again as items arrive,
and a 0 then ends the wait. Flushing is shielded from cancellation (other callers'
items are in the leader's hands).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
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
    must set ``done`` on every item it is given, whatever happens. ``linger``: how
    long to wait before flushing what is pending (seconds; 0 flushes at once)."""

    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[None]],
        max_batch: int,
        linger: Callable[[Sequence[T]], float] | None = None,
    ) -> None:
        self._flush = flush
        self._max_batch = max_batch
        self._linger = linger
        self._lingering: anyio.Event | None = None  # set: flush now
        self.lingered = 0  # flushes that waited
        self._pending: list[T] = []
        self._flushing = False
        self._waiting: dict[int, T] = {}  # id → item, of callers waiting, oldest first
        self._promoted: T | None = None  # the waiting caller told to lead next

    async def submit(self, item: T) -> None:
        """Return once ``item`` has been flushed (its ``done`` is set); raise its
        ``error`` if the flush failed it."""
        await self._settle(item)
        if item.error is not None:
            raise item.error

    async def _settle(self, item: T) -> None:
        self._pending.append(item)
        if self._lingering is not None:
            assert self._linger is not None
            if self._linger(self._pending) <= 0:
                self._lingering.set()
        if self._flushing:
            self._waiting[id(item)] = item
            try:
                await item.done.wait()  # flushed, or promoted to lead
            except BaseException:
                if self._promoted is item:  # the lead is ours: others wait on it
                    with anyio.CancelScope(shield=True):
                        await self._lead(item)
                raise
            finally:
                self._waiting.pop(id(item), None)
            if self._promoted is not item:
                return
        await self._lead(item)

    async def _lead(self, item: T) -> None:
        """Flush until ``item`` is settled, then hand the lead to a waiting caller (or
        keep flushing what only abandoned items are left with)."""
        self._flushing = True
        self._promoted = None
        settled = False
        try:
            with anyio.CancelScope(shield=True):
                while self._pending:
                    successor = self._successor() if settled else None
                    if successor is not None:
                        self._promoted = successor
                        successor.done.set()
                        return
                    wait = 0.0 if self._linger is None else self._linger(self._pending)
                    if wait > 0:  # items submitted meanwhile join the batch
                        self.lingered += 1
                        self._lingering = anyio.Event()
                        with anyio.move_on_after(wait):
                            await self._lingering.wait()
                        self._lingering = None
                    batch = self._pending[: self._max_batch]
                    del self._pending[: self._max_batch]
                    await self._flush(batch)
                    settled = settled or any(i is item for i in batch)
        finally:
            if self._promoted is None:
                self._flushing = False

    def _successor(self) -> T | None:
        """The oldest caller still waiting for its item (not one already flushed whose
        task has not run yet)."""
        return next((w for w in self._waiting.values() if not w.done.is_set()), None)
