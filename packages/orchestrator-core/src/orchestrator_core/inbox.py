"""``InboxRegistry``: the in-process ``InboxResolver``.

A sync HTTP request registers a one-shot receiver and writes its outbox row with
``reply_to = inbox_id``; the dispatcher delivers the answer here. Pending senders
live in a plain dict keyed by inbox id (the event loop is single-threaded, so no
lock is needed). A receiver that is closed — the client went away, the wait
expired — is gone from the map, so a late delivery comes back ``ABANDONED`` and the
dispatcher records the abandonment.
"""

from __future__ import annotations

import math
from types import TracebackType

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from picloud_shared.ids import InboxId, new_inbox_id
from picloud_shared.inbox import DeliveryStatus, InboxResult


class InboxReceiver:
    """The waiting side of one registration. Close it (or leave its ``with``) when done."""

    def __init__(
        self,
        registry: InboxRegistry,
        inbox_id: InboxId,
        stream: MemoryObjectReceiveStream[InboxResult],
    ) -> None:
        self._registry = registry
        self.inbox_id = inbox_id
        self._stream = stream

    async def receive(self, timeout: float | None = None) -> InboxResult | None:
        """The delivered result, or ``None`` when ``timeout`` seconds pass first."""
        with anyio.move_on_after(math.inf if timeout is None else timeout):
            try:
                return await self._stream.receive()
            except anyio.EndOfStream:
                return None
        return None

    def close(self) -> None:
        """Drop the receiver: later deliveries are abandoned. Idempotent."""
        self._registry.cancel(self.inbox_id)
        self._stream.close()

    def __enter__(self) -> InboxReceiver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class InboxRegistry:
    """Pending one-shot receivers keyed by inbox id (implements ``InboxResolver``)."""

    def __init__(self) -> None:
        self._pending: dict[InboxId, MemoryObjectSendStream[InboxResult]] = {}

    def __len__(self) -> int:
        return len(self._pending)

    def register(self) -> tuple[InboxId, InboxReceiver]:
        """A fresh inbox id and the receiver that will get its one result."""
        inbox_id = new_inbox_id()
        send, receive = anyio.create_memory_object_stream[InboxResult](1)
        self._pending[inbox_id] = send
        return inbox_id, InboxReceiver(self, inbox_id, receive)

    async def deliver(
        self, inbox_id: InboxId, result: InboxResult, reply_node: str | None = None
    ) -> DeliveryStatus:
        """Hand ``result`` to its receiver: ``DELIVERED``, or ``ABANDONED`` when the id is
        unknown or the receiver was dropped."""
        send = self._pending.pop(inbox_id, None)
        if send is None:
            return DeliveryStatus.ABANDONED
        with send:
            try:
                send.send_nowait(result)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.WouldBlock):
                return DeliveryStatus.ABANDONED
        return DeliveryStatus.DELIVERED

    def cancel(self, inbox_id: InboxId) -> bool:
        """Forget a registration; ``True`` if it was pending."""
        send = self._pending.pop(inbox_id, None)
        if send is None:
            return False
        send.close()
        return True
