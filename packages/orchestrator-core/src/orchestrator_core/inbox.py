"""``InboxRegistry``: the in-process ``InboxResolver``.

A sync HTTP request registers a one-shot receiver and writes its outbox row with
``reply_to = inbox_id``; the dispatcher delivers the answer here. Pending receivers
live in a plain dict keyed by inbox id (the event loop is single-threaded, so no
lock is needed). A receiver that is closed — the client went away, the wait
expired — is gone from the map, so a late delivery comes back ``ABANDONED`` and the
dispatcher records the abandonment.

A sync execution commits only while its caller waits: just before it commits, the
dispatcher *holds* the receiver (:meth:`InboxRegistry.hold`). A held receiver keeps
its caller waiting for the answer past the end of the wait; one whose wait ended
first is closed, the hold fails, and the execution is rolled back. So a caller told
that its request timed out (504) can rely on nothing of it being kept.

When the node stops, :meth:`InboxRegistry.stop_waiting` ends the waits that are
still on (their callers are told the node is stopping, with the same guarantee),
before the HTTP server gives up on them with no answer of picloud's own.
"""

from __future__ import annotations

import math
from types import TracebackType

import anyio

from picloud_shared.ids import InboxId, new_inbox_id
from picloud_shared.inbox import DeliveryStatus, InboxResult


class InboxReceiver:
    """The waiting side of one registration. Close it (or leave its ``with``) when done.

    The answer is kept on the receiver itself (a slot and an event), never handed
    to a waiting task: a wait that times out in the same instant the answer arrives
    cannot lose it, so a caller may wait in several steps."""

    def __init__(self, registry: InboxRegistry, inbox_id: InboxId) -> None:
        self._registry = registry
        self.inbox_id = inbox_id
        self._result: InboxResult | None = None
        self._arrived = anyio.Event()
        self.closed = False
        self.held = False  # an execution is committing: its answer comes next

    async def receive(self, timeout: float | None = None) -> InboxResult | None:
        """The delivered result, or ``None`` when ``timeout`` seconds pass first (or
        the receiver was closed). May be called again after a timeout."""
        if self._result is None and not self.closed:
            with anyio.move_on_after(math.inf if timeout is None else timeout):
                await self._arrived.wait()
        return self._result

    def _deliver(self, result: InboxResult) -> bool:
        if self.closed or self._result is not None:
            return False
        self._result = result
        self._arrived.set()
        return True

    def close(self) -> None:
        """Drop the receiver: later deliveries are abandoned. Idempotent."""
        self._registry.cancel(self.inbox_id)
        self._closed()

    def _closed(self) -> None:
        self.closed = True
        self._arrived.set()  # wake a wait in progress: nothing will come

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
        self._pending: dict[InboxId, InboxReceiver] = {}
        self.stopping = False  # stop_waiting() was called: the node is stopping

    def __len__(self) -> int:
        return len(self._pending)

    def register(self) -> tuple[InboxId, InboxReceiver]:
        """A fresh inbox id and the receiver that will get its one result."""
        inbox_id = new_inbox_id()
        receiver = InboxReceiver(self, inbox_id)
        self._pending[inbox_id] = receiver
        return inbox_id, receiver

    async def deliver(
        self, inbox_id: InboxId, result: InboxResult, reply_node: str | None = None
    ) -> DeliveryStatus:
        """Hand ``result`` to its receiver: ``DELIVERED``, or ``ABANDONED`` when the id is
        unknown or the receiver was dropped."""
        receiver = self._pending.pop(inbox_id, None)
        if receiver is None or not receiver._deliver(result):
            return DeliveryStatus.ABANDONED
        return DeliveryStatus.DELIVERED

    def waiting(self, inbox_id: InboxId) -> bool:
        """Whether a caller still waits for ``inbox_id``."""
        return inbox_id in self._pending

    def hold(self, inbox_id: InboxId) -> bool:
        """Keep the caller of ``inbox_id`` waiting for the answer (its execution is
        about to commit); ``False`` when none waits any more."""
        receiver = self._pending.get(inbox_id)
        if receiver is None:
            return False
        receiver.held = True
        return True

    def stop_waiting(self) -> int:
        """The node is stopping: close every receiver whose execution is not
        committing (not held), so its caller is answered now and nothing of its
        request is kept; a held one still gets its answer. Returns how many were
        closed. Receivers registered afterwards are kept (a request may still
        arrive on a connection being drained)."""
        self.stopping = True
        closing = [i for i, receiver in self._pending.items() if not receiver.held]
        for inbox_id in closing:
            self.cancel(inbox_id)
        return len(closing)

    def cancel(self, inbox_id: InboxId) -> bool:
        """Forget a registration (its receiver gets nothing more); ``True`` if it was
        pending."""
        receiver = self._pending.pop(inbox_id, None)
        if receiver is None:
            return False
        receiver._closed()
        return True
