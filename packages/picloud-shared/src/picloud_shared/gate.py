"""The execution gate: one bound on concurrent executions per node.

Shared by the dispatcher (which sizes its claims to the free capacity and holds
a permit while a script runs) and by sync HTTP (which answers 503 when the gate
cannot admit). A :class:`Permit` may be released from any task, exactly once.
"""

from __future__ import annotations

from types import TracebackType

import anyio


class Permit:
    """One admitted execution. Release it (or leave its ``with`` block) exactly once."""

    __slots__ = ("_gate", "_released")

    def __init__(self, gate: ExecutionGate) -> None:
        self._gate = gate
        self._released = False

    def release(self) -> None:
        """Give the slot back. Idempotent."""
        if not self._released:
            self._released = True
            self._gate._release()

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

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("gate capacity must be at least 1")
        self._capacity = capacity
        self._semaphore = anyio.Semaphore(capacity, max_value=capacity)
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

    async def admit(self, wait: float) -> Permit | None:
        """A permit now, or within ``wait`` seconds (waiters are served in order, before
        any ``try_acquire``); ``None``, counted as one saturation, if none came."""
        try:
            self._semaphore.acquire_nowait()
        except anyio.WouldBlock:
            pass
        else:
            return Permit(self)
        if wait > 0:
            with anyio.move_on_after(wait):
                await self._semaphore.acquire()
                return Permit(self)
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

    def _release(self) -> None:
        self._semaphore.release()
