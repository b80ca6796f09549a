"""The execution gate: one bound on concurrent executions per node.

Shared by the dispatcher (which sizes its claims to the free capacity and holds
a permit while a script runs) and by sync HTTP (which answers 503 when the gate
cannot admit). A :class:`Permit` may be released from any task, exactly once.

Sync HTTP admits per app (``admit(wait, owner=app_id)``): one app holds at most
``owner_share`` slots that way, so a flood of one app's sync requests (anyone on
the network can send one) leaves the rest of the gate to the other apps. Its
requests past the share wait for one of its own slots, and are not in the way of
other apps' requests meanwhile.
"""

from __future__ import annotations

from collections.abc import Hashable
from types import TracebackType

import anyio


class Permit:
    """One admitted execution. Release it (or leave its ``with`` block) exactly once."""

    __slots__ = ("_gate", "_owner", "_released")

    def __init__(self, gate: ExecutionGate, owner: Hashable | None = None) -> None:
        self._gate = gate
        self._owner = owner
        self._released = False

    def release(self) -> None:
        """Give the slot back. Idempotent."""
        if not self._released:
            self._released = True
            self._gate._release(self._owner)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class ExecutionGate:
    """Bounded concurrency with try-acquire and acquire-with-timeout (anyio)."""

    def __init__(self, capacity: int, owner_share: int | None = None) -> None:
        """``owner_share``: the most slots one owner may hold through :meth:`admit`
        (default: all but one, when there are two or more)."""
        if capacity < 1:
            raise ValueError("gate capacity must be at least 1")
        self._capacity = capacity
        self._semaphore = anyio.Semaphore(capacity, max_value=capacity)
        self.owner_share = max(
            1, min(capacity - 1 if owner_share is None else owner_share, capacity)
        )
        self._held_by: dict[Hashable, int] = {}
        self._owner_freed: dict[Hashable, anyio.Event] = {}
        self.saturation_count = 0  # times an admission was refused (a metric)

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def free(self) -> int:
        """Slots free right now."""
        return self._semaphore.value

    @property
    def in_use(self) -> int:
        return self._capacity - self._semaphore.value

    def try_acquire(self) -> Permit | None:
        """A permit if a slot is free now, else ``None`` (never waits)."""
        try:
            self._semaphore.acquire_nowait()
        except anyio.WouldBlock:
            self.saturation_count += 1
            return None
        return Permit(self)

    async def acquire(self, timeout: float | None = None) -> Permit | None:
        """Wait up to ``timeout`` seconds (forever when ``None``) for a slot;
        ``None`` if none came free in time."""
        if timeout is None:
            await self._semaphore.acquire()
            return Permit(self)
        with anyio.move_on_after(timeout):
            await self._semaphore.acquire()
            return Permit(self)
        self.saturation_count += 1
        return None

    def held_by(self, owner: Hashable) -> int:
        """Slots ``owner`` holds through :meth:`admit`."""
        return self._held_by.get(owner, 0)

    async def admit(self, wait: float, owner: Hashable | None = None) -> Permit | None:
        """A permit now, or within ``wait`` seconds (waiters are served in order, before
        any ``try_acquire``); ``None``, counted as one saturation, if none came.

        With an ``owner``, the permit also counts towards the owner's share: while
        the owner holds ``owner_share`` slots, its admissions wait for one of them to
        be released (within the same ``wait``) without taking a place in line."""
        deadline = anyio.current_time() + wait
        if owner is not None:
            while self._held_by.get(owner, 0) >= self.owner_share:
                freed = self._owner_freed.setdefault(owner, anyio.Event())
                with anyio.move_on_after(deadline - anyio.current_time()):
                    await freed.wait()
                if anyio.current_time() >= deadline and self._held_by.get(owner, 0) >= (
                    self.owner_share
                ):
                    self.saturation_count += 1
                    return None
            self._held_by[owner] = self._held_by.get(owner, 0) + 1  # the share is held
        try:
            permit = await self._admit(deadline, owner)
        except BaseException:
            self._drop(owner)
            raise
        if permit is None:
            self._drop(owner)
        return permit

    async def _admit(self, deadline: float, owner: Hashable | None) -> Permit | None:
        try:
            self._semaphore.acquire_nowait()
        except anyio.WouldBlock:
            pass
        else:
            return Permit(self, owner)
        wait = deadline - anyio.current_time()
        if wait > 0:
            with anyio.move_on_after(wait):
                await self._semaphore.acquire()
                return Permit(self, owner)
        self.saturation_count += 1
        return None

    async def wait_free(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until a slot is free, without taking it
        (and without counting a saturation). A slot free already is reported at once:
        on a busy loop even a free semaphore's checkpoint can outlast a short timeout."""
        if self.free:
            return True
        with anyio.move_on_after(timeout):
            await self._semaphore.acquire()
            self._semaphore.release()
            return True
        return False

    def _release(self, owner: Hashable | None) -> None:
        self._semaphore.release()
        self._drop(owner)

    def _drop(self, owner: Hashable | None) -> None:
        """One slot of ``owner``'s share given back (or never taken)."""
        if owner is None:
            return
        n = self._held_by.get(owner, 0) - 1
        if n > 0:
            self._held_by[owner] = n
        else:
            self._held_by.pop(owner, None)
        freed = self._owner_freed.pop(owner, None)
        if freed is not None:
            freed.set()
