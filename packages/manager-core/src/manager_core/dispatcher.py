"""The ``Dispatcher``: the one path by which every execution runs (seed, commit 5).

One task per node. It wakes when a row is committed on this node (in-process
signal) and polls every ``poll_interval`` as a fallback for rows written
elsewhere. It holds a gate permit *before* it claims, and claims at most as many
rows as it holds permits, so the batch is sized to the free capacity of the
``ExecutionGate`` it shares with sync HTTP. A saturated gate therefore leaves rows
due in the outbox — never dropped, never double-run, no attempt counted.

Rows written on this node can skip the claim: while the dispatcher runs it is
attached to the ``PostgresOutboxRepo`` as a ``LocalRunner``, and ``enqueue`` (in its
own transaction) writes a row it can run at once already claimed — lease, token,
attempt 1 — and hands it over in memory (:meth:`Dispatcher.run_claimed`). The gate
slot is reserved before the write; without one the row is written due, for a later
claim. A handed-off row is as crash safe as a claimed one: its lease expires.

Routing is generic: ``kv | docs | dead_letter`` rows decode their trigger event;
``http`` rows decode the ``HttpDispatchPayload``. Both become one ``ExecRequest``
run as the registrant (``AdminPrincipalResolver``).

Outcomes (DESIGN.md, "The execution pipeline"):

* success — effects, fan-out, execution record and the row's removal commit in
  one transaction (see ``execution_txn.EXECUTION_ISOLATION``); a serialization failure re-runs
  the script transparently (not an attempt). A script that touched no data has
  nothing but bookkeeping to commit: that goes through the group-commit
  ``BatchCompleter``, without waiting for the disk (``outbox_claims._COMPLETE_BATCH``);
* ``reply_to`` set — never retried; the answer goes to the ``InboxResolver`` after
  commit; an absent receiver is recorded in ``abandoned_executions``;
* dead-letter handler — never retried, never dead-lettered; marks its dead letter
  ``handled`` or ``handler_failed``;
* otherwise — rescheduled by the row's retry policy with jitter, or at
  ``max_attempts`` (or at once for ``rejected`` / ``principal_revoked``)
  dead-lettered and fanned out to dead-letter triggers;
* ``trigger_depth > max_trigger_depth`` — not run, recorded ``skipped``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol

import anyio
import anyio.abc
import attrs
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core.completer import BatchCompleter
from manager_core.db import is_retryable_conflict, transaction
from manager_core.execution_txn import (
    ExecutionTransaction,
    HostFactory,
    Lost,
    Rerun,
    Slot,
    TransactionDeps,
    Unrunnable,
)
from manager_core.postgres.dead_letters import PostgresDeadLetterRepo
from manager_core.postgres.executions import PostgresExecutionRepo
from manager_core.postgres.outbox import ClaimedRow, PostgresOutboxRepo
from manager_core.principals import AdminPrincipalResolver
from picloud_shared.errors import PrincipalRevoked
from picloud_shared.events import HttpEvent, event_from_wire, script_event
from picloud_shared.execution import ExecError, ExecRequest, ExecResult
from picloud_shared.gate import ExecutionGate, Permit
from picloud_shared.inbox import DeliveryStatus, InboxResult
from picloud_shared.outbox import HttpDispatchPayload, NewOutboxRow, OutboxSourceKind
from picloud_shared.ports import Executor, InboxResolver
from picloud_shared.principals import Principal
from picloud_shared.status import NON_RETRYABLE, ExecErrorKind, ExecutionStatus
from picloud_shared.wire import JsonObject, WireError

log = logging.getLogger("picloud.dispatcher")


class WorkSignal(Protocol):
    """The in-process wake-up: producers on this node ``notify`` after commit."""

    def notify(self) -> None: ...

    async def wait(self, timeout: float) -> None: ...


@attrs.frozen
class DispatcherSettings:
    node_id: str
    poll_interval: float = 0.1
    batch_size: int = 64
    max_trigger_depth: int = 8
    lease_seconds: float = 60.0
    shutdown_grace: float = 10.0
    max_conflict_reruns: int = 100
    recover_interval: float = 1.0
    claim_linger: float = 0.002  # see Dispatcher._gather_slots


@attrs.define
class DispatcherMetrics:
    """Counters the binary exposes on ``/metrics``."""

    executions: Counter[tuple[str, str]] = attrs.Factory(Counter)  # (source_kind, outcome)
    duration_seconds: Counter[str] = attrs.Factory(Counter)  # source_kind → total seconds
    retries: int = 0
    dead_letters: int = 0
    skipped_for_depth: int = 0
    abandoned: int = 0
    conflict_reruns: int = 0
    claimed: int = 0
    claim_batches: int = 0
    handed_off: int = 0  # rows written claimed by this node and run without a claim


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
        self._executor = executor
        self._gate = gate
        self._inbox = inbox
        self._executions = executions
        self._dead_letters = dead_letters
        self._outbox = outbox
        self._host_factory = host_factory
        self._signal = signal
        self.settings = settings
        self._principals = principals or AdminPrincipalResolver()
        self._rand = rand
        self.metrics = DispatcherMetrics()
        self._stopping = anyio.Event()
        self._running = False
        self._in_flight = 0
        self._idle = anyio.Event()
        self._idle.set()
        self._completer = BatchCompleter(outbox)
        self._leased: dict[int, str] = {}  # rows this node is running → claim token
        self._txn_deps = TransactionDeps(
            engine, outbox, executions, dead_letters, host_factory, signal
        )
        self._runs: anyio.abc.ObjectSendStream[tuple[ClaimedRow, Permit]] | None = None
        self._slots_gathered: anyio.Event | None = None

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

    def reserve(self, row: NewOutboxRow) -> Permit | None:
        """A gate slot for a row this node is about to write and run at once
        (``PostgresOutboxRepo.enqueue``); ``None`` when saturated or stopping.

        A row nobody waits for (async) is taken only while at least half the gate is
        free: under load it is cheaper to leave it to a batched claim."""
        if not self.ready:
            return None
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
        """Stop claiming; :meth:`run` returns after draining."""
        self._stopping.set()
        self._signal.notify()

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
            try:
                claims = await self._claim(limit)
            except Exception:
                log.exception("claiming outbox rows failed; retrying after the poll interval")
                await anyio.sleep(self.settings.poll_interval)
                continue
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
            if n:
                log.warning("%d outbox row(s) had an expired lease and are due again", n)
                self._signal.notify()
        except Exception:
            log.exception("recovering expired leases failed")

    async def _heartbeat(self) -> None:
        """Keep the leases of rows still running here from expiring."""
        if not self._leased:
            return
        try:
            await self._outbox.renew_leases(list(self._leased), self.settings.lease_seconds)
        except Exception:
            log.exception("renewing leases failed")

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
                outcome = await self._run_claim(claim, slot)
            except Lost:
                outcome = "lost"
            finally:
                slot.release()
            self.metrics.executions[(kind, outcome)] += 1
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._give_back(claim)
            raise
        except Exception:
            log.exception("dispatching outbox row %s failed; it will come back", claim.row.id)
            self.metrics.executions[(kind, "error")] += 1
        finally:
            self._leased.pop(claim.row.id, None)
            self.metrics.duration_seconds[kind] += time.monotonic() - started
            self._finished()

    async def _give_back(self, claim: ClaimedRow) -> None:
        await self._give_back_all([claim])

    async def _give_back_all(self, claims: list[ClaimedRow]) -> None:
        """Return claimed rows due at once, their attempt not counted."""
        try:
            async with transaction(self._engine) as conn:
                for claim in claims:
                    await self._outbox.give_back(claim.row.id, claim.token, conn=conn)
        except Exception:
            log.exception("could not give back %d row(s); their leases will expire", len(claims))

    async def _run_claim(self, claim: ClaimedRow, slot: Slot) -> str:
        """Run one claimed row to its outcome; returns the outcome's metric label."""
        row = claim.row
        if row.trigger_depth > self.settings.max_trigger_depth:
            return await self._skip(claim)
        if row.is_sync_http and (row.attempt_count > 1 or row.reply_node != self.settings.node_id):
            # The node whose caller waited for this died (before or while running it);
            # the caller is gone with it, so the request is failed, not run.
            return await self._book_failure(
                claim,
                ExecResult.failed(
                    row.execution_id,
                    ExecError(ExecErrorKind.WORKER_CRASH, "the node serving this request stopped"),
                ),
            )
        if row.attempt_count > row.retry.max_attempts:
            return await self._book_failure(
                claim,
                ExecResult.failed(
                    row.execution_id,
                    ExecError(
                        ExecErrorKind.WORKER_CRASH,
                        "the execution never finished (its node stopped)",
                    ),
                ),
            )
        try:
            principal = self._resolve_trigger(claim)
            request = self._build_exec_request(claim, principal)
        except Unrunnable as exc:
            return await self._book_failure(claim, ExecResult.failed(row.execution_id, exc.error))
        result = await self._run_in_transaction(claim, request, principal, slot)
        if result is None:
            return "succeeded"
        return await self._book_failure(claim, result)

    def _resolve_trigger(self, claim: ClaimedRow) -> Principal:
        """The seed's ``resolve_trigger``: the trigger (or route) and its script still
        exist, and whom the script runs as (the claim already joined them)."""
        row = claim.row
        if not claim.owner_exists:
            what = "route" if row.source_kind is OutboxSourceKind.HTTP else "trigger"
            raise Unrunnable(ExecError(ExecErrorKind.INTERNAL, f"the {what} no longer exists"))
        if claim.script is None:
            raise Unrunnable(ExecError(ExecErrorKind.INTERNAL, "the script no longer exists"))
        try:
            principal = self._principals.resolve(
                app_id=row.app_id,
                source_kind=row.source_kind,
                user_id=claim.principal_id,
                user_exists=claim.user_exists,
                is_instance_admin=claim.is_instance_admin,
                capabilities=claim.capabilities,
            )
        except PrincipalRevoked as exc:
            raise Unrunnable(ExecError(ExecErrorKind.PRINCIPAL_REVOKED, exc.message)) from None
        return principal

    def _build_exec_request(self, claim: ClaimedRow, principal: Principal) -> ExecRequest:
        """The seed's ``build_exec_request``: one generic arm for kv | docs | dead_letter
        (the trigger event), one for http (the ``HttpDispatchPayload``)."""
        row = claim.row
        try:
            if row.source_kind is OutboxSourceKind.HTTP:
                payload = HttpDispatchPayload.from_wire(row.payload)
                event: JsonObject = script_event(HttpEvent.from_wire(payload.event))
            else:
                event = script_event(event_from_wire(row.payload))
        except WireError as exc:
            raise Unrunnable(
                ExecError(ExecErrorKind.INTERNAL, f"undecodable outbox payload: {exc}")
            ) from None
        script = claim.script
        assert script is not None
        return ExecRequest(
            execution_id=row.execution_id,
            app_id=row.app_id,
            app_name=claim.app_name,
            script_id=script.id,
            script_version=script.version,
            source=script.source,
            event=event,
            principal=principal,
            timeout_seconds=script.timeout_seconds,
            memory_limit_mb=script.memory_limit_mb,
            attempt=row.attempt_count,
            trigger_depth=row.trigger_depth,
        )

    async def _run_in_transaction(
        self, claim: ClaimedRow, request: ExecRequest, principal: Principal, slot: Slot
    ) -> ExecResult | None:
        """Run the script and commit its effects with the row's completion.

        Returns ``None`` on a committed success, or the failed result (nothing of
        the script's effects committed) for :meth:`_book_failure`.
        """
        row = claim.row
        for _ in range(self.settings.max_conflict_reruns):
            try:
                return await self._attempt(claim, request, principal, slot)
            except Rerun:
                self.metrics.conflict_reruns += 1
                await anyio.sleep(self._rand() * 0.005)
                await slot.reacquire(self._gate)
        return ExecResult.failed(
            row.execution_id,
            ExecError(
                ExecErrorKind.INTERNAL, "gave up after too many conflicting concurrent executions"
            ),
        )

    async def _attempt(
        self, claim: ClaimedRow, request: ExecRequest, principal: Principal, slot: Slot
    ) -> ExecResult | None:
        """One run of the script. ``None`` when its success is committed; the failed
        result (nothing of it committed) otherwise. Raises ``Rerun`` on a
        serialization conflict and ``Lost`` when another claim owns the row."""
        row = claim.row
        txn = ExecutionTransaction(self._txn_deps, claim, principal)
        try:
            result = await self._executor.execute(request, txn.host)
            # The script is done: its gate slot is free while the outcome commits.
            slot.release()
            error = txn.host.db_error
            if error is not None:
                await txn.rollback()
                if isinstance(error, Lost):
                    raise Lost from None
                if is_retryable_conflict(error):
                    raise Rerun from None
                log.error("host call failed in execution %s: %r", row.execution_id, error)
                return ExecResult.failed(
                    row.execution_id,
                    ExecError(ExecErrorKind.INTERNAL, "a platform error interrupted the script"),
                    result.logs,
                    result.duration_ms,
                )
            if not result.ok:
                await txn.rollback()
                return result
            if txn.conn is None:
                # The script touched no data: group-commit its bookkeeping.
                if not await self._completer.complete(claim, result):
                    raise Lost
            else:
                await txn.commit_success(result)
        finally:
            await txn.close()
        if row.reply_to is not None:
            await self._deliver(claim, result)
        return None

    async def _book_failure(self, claim: ClaimedRow, result: ExecResult) -> str:
        """Record a failed execution: reply, mark, reschedule, or dead-letter."""
        row = claim.row
        error = result.error
        assert error is not None
        attempts = row.attempt_count
        outcome = "failed"
        for _ in range(self.settings.max_conflict_reruns):
            try:
                async with transaction(self._engine) as conn:
                    if not await self._outbox.take(row.id, claim.token, conn=conn):
                        raise Lost
                    if row.is_sync_http or row.is_dead_letter_handler:
                        await self._outbox.delete(row.id, conn=conn)
                        await self._executions.finish_with(
                            row.execution_id, ExecutionStatus.FAILED, result, conn=conn
                        )
                        if row.dead_letter_id is not None:
                            await self._dead_letters.mark(
                                row.app_id, row.dead_letter_id, "handler_failed", conn=conn
                            )
                    elif error.kind in NON_RETRYABLE or attempts >= row.retry.max_attempts:
                        await self._dead_letter(conn, claim, result)
                        outcome = "dead_lettered"
                    else:
                        delay = row.retry.delay_ms(attempts, self._rand())
                        await self._outbox.reschedule(row.id, delay_ms=delay, conn=conn)
                        await self._executions.finish_with(
                            row.execution_id, ExecutionStatus.RETRYING, result, conn=conn
                        )
                        outcome = "retrying"
                break
            except DBAPIError as exc:
                if not is_retryable_conflict(exc):
                    raise
                self.metrics.conflict_reruns += 1
        if outcome == "retrying":
            self.metrics.retries += 1
        elif outcome == "dead_lettered":
            self.metrics.dead_letters += 1
            self._signal.notify()
        if row.reply_to is not None:
            await self._deliver(claim, result)
        return outcome

    async def _dead_letter(
        self, conn: AsyncConnection, claim: ClaimedRow, result: ExecResult
    ) -> None:
        """Dead-letter the row (the repo fans it out to dead-letter triggers)."""
        row = claim.row
        error = result.error
        assert error is not None
        dead = await self._dead_letters.create(
            row,
            attempts=row.attempt_count,
            error_kind=error.kind,
            error_message=error.message,
            conn=conn,
        )
        await self._outbox.delete(row.id, conn=conn)
        await self._executions.finish_with(
            row.execution_id, ExecutionStatus.DEAD_LETTERED, result, conn=conn
        )
        log.info("execution %s dead-lettered as %s: %s", row.execution_id, dead.id, error.message)

    async def _skip(self, claim: ClaimedRow) -> str:
        row = claim.row
        log.warning(
            "execution %s skipped: trigger depth %d exceeds the limit %d",
            row.execution_id,
            row.trigger_depth,
            self.settings.max_trigger_depth,
        )
        async with transaction(self._engine) as conn:
            if not await self._outbox.take(row.id, claim.token, conn=conn):
                raise Lost
            await self._outbox.delete(row.id, conn=conn)
            await self._executions.finish(
                row.execution_id,
                ExecutionStatus.SKIPPED,
                error_kind=ExecErrorKind.INTERNAL,
                error_message=f"trigger depth {row.trigger_depth} exceeds max_trigger_depth "
                f"{self.settings.max_trigger_depth}",
                conn=conn,
            )
        self.metrics.skipped_for_depth += 1
        return "skipped"

    async def _deliver(self, claim: ClaimedRow, result: ExecResult) -> None:
        """Answer the waiting caller; record the answer if nobody waits any more."""
        row = claim.row
        assert row.reply_to is not None
        answer = InboxResult.from_exec_result(result)
        status = await self._inbox.deliver(row.reply_to, answer, row.reply_node)
        if status is DeliveryStatus.DELIVERED:
            return
        self.metrics.abandoned += 1
        await self._outbox.record_abandoned(row.execution_id, row.reply_to, "receiver gone", result)
