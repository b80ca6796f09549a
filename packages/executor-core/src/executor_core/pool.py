"""Leasing workers to tenants: warm per tenant, a few unassigned spares, bounded, LRU.

* A tenant is an app together with the data rights its executions have (which of
  ``app_read_data`` / ``app_write_data``). A worker belongs to the first tenant it
  is leased to and is never leased to another one: not to another app, and not to
  executions of the same app with other data rights. Code a script plants in its
  worker (a patched module, a thread) only ever meets executions that could do
  what it can anyway.
* ``max_workers`` bounds every process the pool owns: leased, idle, spare,
  starting and dying ones.
* ``spares`` unassigned workers are kept started while capacity allows, so a
  new app's first call (or a second concurrent call of a warm app) does not wait
  for a cold spawn. They are refilled in the background.
* One app never holds every worker: with more than one, an app's leases wait once
  it holds all but one (``app_share``), so other apps always find a worker even
  while one app runs long executions on all the others.
* When a lease finds no warm worker, no spare and no free capacity, the
  least-recently-used idle worker of any tenant is evicted.
* Idle workers are retired after ``idle_ttl`` seconds.
* An idle worker runs nothing of ours: one that keeps using CPU (a thread or a
  signal handler its script left behind) is stopped within about a second
  (``IDLE_CPU_CHECK_SECONDS``, ``IDLE_CPU_ALLOWANCE_SECONDS``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import anyio

from executor_core.process import SpawnFailed, WorkerProcess, WorkerSpec, spawn

if TYPE_CHECKING:
    from anyio.abc import TaskGroup

    from picloud_shared.ids import AppId
    from picloud_shared.principals import Capability

# How often idle workers are checked for CPU use, and how much they may use in all
# while idle (waiting on their pipe costs next to nothing).
IDLE_CPU_CHECK_SECONDS = 0.5
IDLE_CPU_ALLOWANCE_SECONDS = 0.1

# An app and the data capabilities of the executions a worker serves.
Tenant = tuple["AppId", frozenset["Capability"]]


class WorkerPool:
    def __init__(self, spec: WorkerSpec, *, max_workers: int, spares: int, idle_ttl: float) -> None:
        if max_workers < 1:
            raise ValueError("max_workers must be at least 1")
        self.spec = spec
        self.max_workers = max_workers
        self.target_spares = max(0, min(spares, max_workers))
        self.idle_ttl = idle_ttl
        self._idle: dict[Tenant, list[WorkerProcess]] = {}
        self._spares: list[WorkerProcess] = []
        self._leased: set[WorkerProcess] = set()
        self._leased_by_app: dict[AppId, int] = {}
        # The most workers one app may hold at once: all but one, when there are two.
        self.app_share = max(1, max_workers - 1)
        self._free_slots = list(range(max_workers - 1, -1, -1))
        self._spawning_spares = 0
        self._changed = anyio.Event()  # for leases waiting on capacity
        self._waiting = 0
        self._refill = anyio.Event()  # for the refill loop: a spare taken, a slot freed
        self._tg: TaskGroup | None = None
        self.closed = False
        self.spawned = 0
        self.spawn_errors = 0
        self.cold_leases = 0  # leases that had to wait for a spawn
        self.busy_idle_stopped = 0  # idle workers stopped for using CPU

    # --- lifecycle --------------------------------------------------------------

    def start(self, tg: TaskGroup) -> None:
        self._tg = tg
        tg.start_soon(self._refill_loop)
        tg.start_soon(self._ttl_loop)
        tg.start_soon(self._idle_cpu_loop)

    async def aclose(self) -> None:
        self.closed = True
        self._notify()
        workers = [*self._spares, *self._leased]
        for idle in self._idle.values():
            workers += idle
        self._spares.clear()
        self._idle.clear()
        for w in workers:
            w.kill()
        with anyio.CancelScope(shield=True):
            for w in workers:
                await w.reap()

    # --- leasing ----------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.max_workers - len(self._free_slots)

    def spare_pids(self) -> list[int]:
        return [w.pid for w in self._spares]

    def idle_workers(self) -> list[WorkerProcess]:
        return [w for ws in self._idle.values() for w in ws]

    async def acquire(self, tenant: Tenant, address_space: int) -> WorkerProcess:
        """A ready worker leased to ``tenant`` with at least ``address_space`` bytes."""
        app = tenant[0]
        while True:
            if self.closed:
                raise RuntimeError("the executor is closed")
            if self._leased_by_app.get(app, 0) >= self.app_share:
                await self._wait_for_change()
                continue
            self._count(app, +1)  # held from here, across a spawn, so the share holds
            try:
                worker = self._take_warm(tenant, address_space)
                if worker is None and self._spares:
                    worker = self._spares.pop()
                    self._wake_refill()
                if worker is None and self._free_slots:
                    self.cold_leases += 1
                    worker = await self._spawn(self._free_slots.pop())
            except BaseException:
                self._count(app, -1)
                raise
            if worker is not None:
                worker.tenant = tenant
                worker.idle_cpu = None
                self._leased.add(worker)
                return worker
            self._count(app, -1)
            victim = self._lru_idle()
            if victim is not None:
                self._discard(victim)
            await self._wait_for_change()

    def _count(self, app: AppId, delta: int) -> None:
        n = self._leased_by_app.get(app, 0) + delta
        if n:
            self._leased_by_app[app] = n
        else:
            self._leased_by_app.pop(app, None)

    async def _wait_for_change(self) -> None:
        """Until a worker is released or discarded (or the pool closes)."""
        self._waiting += 1
        try:
            await self._changed.wait()
        finally:
            self._waiting -= 1

    def release(self, worker: WorkerProcess, *, reuse: bool) -> None:
        """Give a worker back: warm for its tenant, or retired (killed and reaped)."""
        if worker in self._leased:
            self._leased.remove(worker)
            assert worker.tenant is not None
            self._count(worker.tenant[0], -1)
            self._notify()  # a lease may wait for its app's share
        if reuse and not self.closed and not worker.killed:
            worker.last_used = time.monotonic()
            assert worker.tenant is not None
            self._idle.setdefault(worker.tenant, []).append(worker)
            self._notify()
        else:
            self._discard(worker)

    def _take_warm(self, tenant: Tenant, address_space: int) -> WorkerProcess | None:
        idle = self._idle.get(tenant)
        if not idle:
            return None
        for gone in [w for w in idle if not w.usable]:  # stopped while idle
            self._discard(gone)
        idle = self._idle.get(tenant)
        if not idle:
            return None
        for i in range(len(idle) - 1, -1, -1):  # most recently used first
            if idle[i].address_space >= address_space:
                worker = idle.pop(i)
                if not idle:
                    del self._idle[tenant]
                return worker
        return None

    def _lru_idle(self) -> WorkerProcess | None:
        oldest: WorkerProcess | None = None
        for ws in self._idle.values():
            for w in ws:
                if oldest is None or w.last_used < oldest.last_used:
                    oldest = w
        return oldest

    def _remove_idle(self, worker: WorkerProcess) -> None:
        if worker.tenant is not None and worker in self._idle.get(worker.tenant, ()):
            self._idle[worker.tenant].remove(worker)
            if not self._idle[worker.tenant]:
                del self._idle[worker.tenant]

    def _discard(self, worker: WorkerProcess) -> None:
        self._remove_idle(worker)
        worker.kill()
        if self.closed:  # the task group may be gone; the process is already dead-ish
            worker.reap_blocking()
            return
        assert self._tg is not None
        self._tg.start_soon(self._reap, worker)

    async def _reap(self, worker: WorkerProcess) -> None:
        await worker.reap()
        self._free_slots.append(worker.slot)
        self._notify()

    async def _spawn(self, slot: int) -> WorkerProcess:
        """Start a worker on a slot already taken off ``_free_slots``."""
        try:
            worker = await spawn(self.spec, slot)
        except BaseException:
            self._free_slots.append(slot)
            self.spawn_errors += 1
            self._notify()
            raise
        self.spawned += 1
        return worker

    def _notify(self) -> None:
        """Wake leases waiting for capacity (cheap no-op when none wait) and the refill."""
        if self._waiting:
            self._changed.set()
            self._changed = anyio.Event()
        self._wake_refill()

    def _wake_refill(self) -> None:
        if len(self._spares) + self._spawning_spares < self.target_spares or self.closed:
            self._refill.set()

    # --- background -------------------------------------------------------------

    async def _refill_loop(self) -> None:
        while not self.closed:
            while (
                len(self._spares) + self._spawning_spares < self.target_spares
                and self._free_slots
                and not self.closed
            ):
                self._spawning_spares += 1
                assert self._tg is not None
                self._tg.start_soon(self._spawn_spare, self._free_slots.pop())
            self._refill = anyio.Event()
            await self._refill.wait()

    async def _spawn_spare(self, slot: int) -> None:
        try:
            worker = await self._spawn(slot)
        except SpawnFailed:
            await anyio.sleep(1.0)  # do not spin on a broken spawn
            return
        finally:
            self._spawning_spares -= 1
        if self.closed:
            await worker.reap()
            self._free_slots.append(worker.slot)
            return
        self._spares.append(worker)
        self._notify()

    async def _ttl_loop(self) -> None:
        while not self.closed:
            await anyio.sleep(min(max(self.idle_ttl / 4, 0.05), 5.0))
            cutoff = time.monotonic() - self.idle_ttl
            for worker in [w for w in self.idle_workers() if w.last_used < cutoff]:
                self._discard(worker)

    async def _idle_cpu_loop(self) -> None:
        while not self.closed:
            await anyio.sleep(IDLE_CPU_CHECK_SECONDS)
            for worker in self.idle_workers():  # spares never ran a script
                used = worker.cpu_seconds()
                if used is None:
                    continue
                if worker.idle_cpu is None:  # the baseline, for the rest of its idle time
                    worker.idle_cpu = used
                elif used - worker.idle_cpu > IDLE_CPU_ALLOWANCE_SECONDS:
                    self.busy_idle_stopped += 1
                    self._discard(worker)
