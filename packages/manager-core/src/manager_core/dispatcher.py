"""The ``Dispatcher``: the one path by which every execution runs (seed, commit 5).

One task per node. It wakes when a row is committed on this node (in-process
signal) and polls every ``poll_interval`` as a fallback for rows written
elsewhere. It holds a gate permit *before* it claims, and claims at most as many
rows as it holds permits, so the batch is sized to the free capacity of the
``ExecutionGate`` it shares with sync HTTP. A saturated gate therefore leaves rows
due in the outbox — never dropped, never double-run, no attempt counted.
A claim divides its batch between the apps that have rows due, and claims take
turns round them (``outbox_claims._CLAIM``): one app's backlog never queues another
app's executions behind it.

Rows written on this node can skip the claim: while the dispatcher runs it is
attached to the ``PostgresOutboxRepo`` as a ``LocalRunner``, and ``enqueue`` (in its
own transaction) writes a row it can run at once already claimed — lease, token,
attempt 1 — and hands it over in memory (:meth:`Dispatcher.run_claimed`). The gate
slot is reserved before the write; without one the row is written due, for a later
claim. A handed-off row is as crash safe as a claimed one: its lease expires.

Each claimed row then runs to its outcome in a ``claim_runner.ClaimRunner``:
routing, the execution's transaction, retries, dead letters, replies.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable

import anyio
import anyio.abc
from sqlalchemy.ext.asyncio import AsyncEngine

from manager_core.claim_runner import ClaimRunner
from manager_core.completer import BatchCompleter
from manager_core.db import conflict_pause, is_retryable_conflict, sqlstate, transaction
from manager_core.dispatch_settings import DispatcherMetrics, DispatcherSettings, WorkSignal
from manager_core.execution_txn import HostFactory, Lost, Slot, TransactionDeps
from manager_core.outage_log import OutageLog
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.executions import PostgresExecutionRepo
from manager_core.postgres.outbox import ClaimedRow, PostgresOutboxRepo
from manager_core.principals import AdminPrincipalResolver
from picloud_shared.gate import ExecutionGate, Permit
from picloud_shared.outbox import NewOutboxRow
from picloud_shared.ports import Executor, InboxResolver

__all__ = ["Dispatcher", "DispatcherMetrics", "DispatcherSettings", "WorkSignal"]

log = logging.getLogger("picloud.dispatcher")
CLAIM_ABORT_AFTER_STOP = 1.0  # seconds a claim in progress may still take after stop()


class Dispatcher:
    """Claims due outbox rows and runs them; see the module docstring."""

    def __init__(
        self,
        *,
        engine: AsyncEngine,
        executor: Executor,
        gate: ExecutionGate,
        inbox: InboxResolver,
        host_factory: HostFactory,
        executions: PostgresExecutionRepo,
        dead_letters: PostgresDeadLetterRepo,
        outbox: PostgresOutboxRepo,
        signal: WorkSignal,
        settings: DispatcherSettings,
        principals: AdminPrincipalResolver | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._engine = engine
        self._gate = gate
        self._outbox = outbox
        self._signal = signal
        self.settings = settings
        self.metrics = DispatcherMetrics()
        self._stopping = anyio.Event()
        self._claim_outage = OutageLog(log, "claiming outbox rows")
        # Lease upkeep and the rows run meet the database being away too: each logs
        # that when it starts, once a minute while it lasts and when it ends.
        self._recover_outage = OutageLog(
            log, "recovering expired leases", then=f"next try in {settings.recover_interval:g} s"
        )
        self._heartbeat_outage = OutageLog(
            log, "renewing leases", then=f"next try in {settings.lease_seconds / 3:g} s"
        )
        self._row_outage = OutageLog(
            log, "dispatching outbox rows", then="they come back when their lease expires"
        )
        self._running = False
        self._in_flight = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._completer = BatchCompleter(
            outbox, linger=settings.completion_linger, running=lambda: self._in_flight
        )
        self._leased: dict[int, str] = {}  # rows this node is running → claim token
        self._claims = ClaimRunner(
            deps=TransactionDeps(engine, outbox, executions, dead_letters, host_factory, signal),
            executor=executor,
            gate=gate,
            inbox=inbox,
            completer=self._completer,
            principals=principals or AdminPrincipalResolver(),
            settings=settings,
            metrics=self.metrics,
            rand=rand,
        )
        self._runs: anyio.abc.ObjectSendStream[tuple[ClaimedRow, Permit]] | None = None
        self._slots_gathered: anyio.Event | None = None
        self._claiming: anyio.CancelScope | None = None  # around a claim in progress

    @property
    def completion_batches(self) -> tuple[int, int]:
        """(statements, rows) of the group-committed no-write completions so far."""
        return self._completer.batches, self._completer.rows

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        """True while the claim loop runs."""
        return self._running and not self._stopping.is_set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Run until :meth:`stop`; then let in-flight executions finish within the
        grace period and give the rest back."""
        # Executions run on a fixed set of runner tasks fed through a stream: spawning
        # a task per execution cost ~50 us of CPU, a hand-over through the stream ~5.
        send, receive = anyio.create_memory_object_stream[tuple[ClaimedRow, Permit]](
            max_buffer_size=math.inf
        )
        try:
            async with anyio.create_task_group() as executions:
                for _ in range(2 * self._gate.capacity):
                    executions.start_soon(self._runner, receive)
                executions.start_soon(self._maintain)
                self._runs = send
                self._running = True
                self._outbox.attach(self)
                task_status.started()
                try:
                    await self._claim_loop()
                finally:
                    self._outbox.detach(self)
                    self._running = False
                    with (
                        anyio.CancelScope(shield=True),
                        anyio.move_on_after(self.settings.shutdown_grace),
                    ):
                        await self._idle.wait()
                    self._runs = None
                    executions.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._give_back_unstarted(receive)
            send.close()
            receive.close()

    async def _runner(self, runs: anyio.abc.ObjectReceiveStream[tuple[ClaimedRow, Permit]]) -> None:
        while True:
            # A row already waiting is taken without ``receive``'s checkpoint (one more
            # pass of the event loop per execution); the execution awaited plenty.
            try:
                claim, permit = runs.receive_nowait()
            except anyio.WouldBlock:
                try:
                    claim, permit = await runs.receive()
                except anyio.EndOfStream:
                    return
            except anyio.EndOfStream:
                return
            await self._execute(claim, permit)

    async def _give_back_unstarted(
        self, runs: anyio.abc.ObjectReceiveStream[tuple[ClaimedRow, Permit]]
    ) -> None:
        """Rows handed to the runners that no runner took before the stop."""
        left: list[ClaimedRow] = []
        while True:
            try:
                claim, permit = runs.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
            permit.release()
            left.append(claim)
        if left:
            await self._give_back_all(left)
            for _ in left:
                self._finished()

    def _start(self, claim: ClaimedRow, permit: Permit) -> bool:
        """Hand a claimed row to a runner; ``False`` once stopped."""
        if self._runs is None:
            return False
        self._started()
        self._runs.send_nowait((claim, permit))
        return True

    # ------------------------------------------------------------------ local hand-off

    @property
    def node_id(self) -> str:
        return self.settings.node_id

    @property
    def lease_seconds(self) -> float:
        return self.settings.lease_seconds

    def reserve(self, row: NewOutboxRow, held: Permit | None = None) -> Permit | None:
        """A gate slot for a row this node is about to write and run at once
        (``PostgresOutboxRepo.enqueue``); ``None`` when saturated or stopping.

        ``held``: a slot the writer already holds for the row (a sync request admitted
        by the gate): it is the one used, or released when the row cannot run here.
        A row nobody waits for (async) is taken only while at least half the gate is
        free: under load it is cheaper to leave it to a batched claim."""
        if not self.ready:
            if held is not None:
                held.release()
            return None
        if held is not None:
            return held
        if row.reply_to is None and self._gate.free < self._batch_floor:
            return None
        return self._gate.try_acquire()

    def run_claimed(self, claim: ClaimedRow, permit: Permit) -> None:
        """Run a row this node wrote already claimed (no claim transaction)."""
        if not self._start(claim, permit):  # stopped since reserve(): its lease brings it back
            permit.release()
            log.warning("outbox row %s was handed over after stop", claim.row.id)
            return
        self.metrics.handed_off += 1

    def stop(self) -> None:
        """Stop claiming; :meth:`run` returns after draining.

        A claim in progress gets ``CLAIM_ABORT_AFTER_STOP`` seconds to end: one
        waiting for a connection to a database that went away would otherwise hold
        the stop for the pool's whole timeout (30 s). Rows an aborted claim took come
        back when their lease expires."""
        self._stopping.set()
        self._signal.notify()
        if self._claiming is not None:
            self._claiming.deadline = min(
                self._claiming.deadline, anyio.current_time() + CLAIM_ABORT_AFTER_STOP
            )

    # ------------------------------------------------------------------ claiming

    async def _maintain(self) -> None:
        """Lease recovery every ``recover_interval`` and the heartbeat every third of
        a lease, beside the claim loop (a slow recovery must not stop claiming) and
        until the runners stop (leases of executions finishing within the shutdown
        grace keep being renewed)."""
        next_heartbeat = time.monotonic() + self.settings.lease_seconds / 3
        while True:
            if not self._stopping.is_set():
                await self._recover()
            if time.monotonic() >= next_heartbeat:
                next_heartbeat = time.monotonic() + self.settings.lease_seconds / 3
                await self._heartbeat()
            await anyio.sleep(self.settings.recover_interval)

    async def _claim_loop(self) -> None:
        while not self._stopping.is_set():
            free = self._gate.free
            if free == 0:
                await self._gate.wait_free(self.settings.poll_interval)
                continue
            if self.settings.claim_linger and free < self._batch_floor and self._in_flight > 0:
                free = await self._gather_slots()
            limit = min(self.settings.batch_size, free)
            claims: list[ClaimedRow] = []
            try:
                with anyio.CancelScope() as scope:
                    self._claiming = scope
                    try:
                        claims = await self._claim(limit)
                    finally:
                        self._claiming = None
                if scope.cancelled_caught:
                    break  # cut short by stop()
            except Exception as exc:
                if is_retryable_conflict(exc):  # e.g. with an app delete: claim again
                    log.info("a claim met a conflict (%s); claiming again", sqlstate(exc))
                    await conflict_pause(0)
                    continue
                self._claim_outage.failed(exc)
                await anyio.sleep(self.settings.poll_interval)
                continue
            self._claim_outage.succeeded()
            saturated: list[ClaimedRow] = []
            for claim in claims:
                permit = self._gate.try_acquire()
                if permit is None:  # sync HTTP took the slot meanwhile
                    saturated.append(claim)
                    continue
                if not self._start(claim, permit):
                    permit.release()
                    saturated.append(claim)
            if saturated:
                await self._give_back_all(saturated)
            if len(claims) < limit:
                # Drained: sleep until a local commit, stop(), or the poll interval.
                await self._signal.wait(self.settings.poll_interval)

    @property
    def _batch_floor(self) -> int:
        return max(1, min(self.settings.batch_size, self._gate.capacity // 2))

    async def _gather_slots(self) -> int:
        """Under load, let a few more running executions give their slot back (at most
        ``claim_linger`` seconds) so the next claim is a batch, not a row at a time:
        a claim costs a round trip whatever its size. Returns the free slots."""
        self._slots_gathered = anyio.Event()
        with anyio.move_on_after(self.settings.claim_linger):
            await self._slots_gathered.wait()
        self._slots_gathered = None
        return self._gate.free

    def _slot_released(self) -> None:
        if self._slots_gathered is not None and (
            self._gate.free >= self._batch_floor or self._in_flight <= 1
        ):
            self._slots_gathered.set()

    async def _claim(self, limit: int) -> list[ClaimedRow]:
        claims = await self._outbox.claim_due(
            self.settings.node_id, limit, self.settings.lease_seconds
        )
        if claims:
            self.metrics.claimed += len(claims)
            self.metrics.claim_batches += 1
        return claims

    async def _recover(self) -> None:
        try:
            n = await self._outbox.recover_expired()
        except Exception as exc:
            self._recover_outage.failed(exc)
            return
        self._recover_outage.succeeded()
        if n:
            log.warning("%d outbox row(s) had an expired lease and are due again", n)
            self._signal.notify()

    async def _heartbeat(self) -> None:
        """Keep the leases of rows still running here from expiring."""
        if not self._leased:
            return
        try:
            await self._outbox.renew_leases(dict(self._leased), self.settings.lease_seconds)
        except Exception as exc:
            self._heartbeat_outage.failed(exc)
        else:
            self._heartbeat_outage.succeeded()

    def _started(self) -> None:
        self._in_flight += 1
        self._idle = anyio.Event() if self._idle.is_set() else self._idle

    def _finished(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    # ------------------------------------------------------------------ one row

    async def _execute(self, claim: ClaimedRow, permit: Permit) -> None:
        started = time.monotonic()
        kind = claim.row.source_kind.value
        self._leased[claim.row.id] = claim.token
        try:
            slot = Slot(permit, self._slot_released)
            try:
                outcome = await self._claims.run(claim, slot)
            except Lost:
                outcome = "lost"
                await self._claims.answer_lost(claim)
            finally:
                slot.release()
            self.metrics.executions[(kind, outcome)] += 1
            self._row_outage.succeeded()
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._give_back(claim)
            raise
        except Exception as exc:
            if not self._row_outage.counted(exc):  # the database away: no traceback per row
                log.exception("dispatching outbox row %s failed; it will come back", claim.row.id)
            self.metrics.executions[(kind, "error")] += 1
            await self._claims.answer_interrupted(claim)
        finally:
            self._leased.pop(claim.row.id, None)
            self.metrics.duration_seconds.observe(kind, time.monotonic() - started)
            self._finished()

    async def _give_back(self, claim: ClaimedRow) -> None:
        await self._give_back_all([claim])

    async def _give_back_all(self, claims: list[ClaimedRow]) -> None:
        """Return claimed rows due at once, their attempt not counted. A sync row whose
        caller no longer waits here (the node is stopping: InboxRegistry.stop_waiting)
        is booked failed instead: no other node may run it, and given back it stayed
        queued until one failed it at the end of the longest wait (minutes)."""
        claims = await self._claims.fail_unanswerable(claims)
        if not claims:
            return
        try:
            async with transaction(self._engine) as conn:
                for claim in claims:
                    await self._outbox.give_back(
                        claim.row.id,
                        claim.token,
                        attempt_count=claim.row.attempt_count,
                        conn=conn,
                    )
        except Exception:
            log.exception("could not give back %d row(s); their leases will expire", len(claims))
