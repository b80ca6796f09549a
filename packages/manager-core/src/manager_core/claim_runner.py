"""How one claimed outbox row runs to its outcome (seed, commit 5).

The ``Dispatcher`` decides when and which rows run; a :class:`ClaimRunner` runs
each one: the seed's ``resolve_trigger`` and ``build_exec_request``, the script
through the ``Executor`` inside the execution's transaction, and the outcome.

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
  commit; an absent receiver is recorded in ``abandoned_executions``. It runs and
  commits only while its caller waits: not at all when the caller is gone before it
  starts, and rolled back when the caller's wait ended before it could commit
  (``InboxResolver.hold``): a caller answered 504 keeps nothing of its request;
* dead-letter handler — never retried, never dead-lettered; marks its dead letter
  ``handled`` or ``handler_failed``;
* otherwise — rescheduled by the row's retry policy with jitter, or at
  ``max_attempts`` (or at once for ``rejected`` / ``principal_revoked``, and when
  its trigger, route or script no longer exists) dead-lettered and fanned out to
  dead-letter triggers;
* ``trigger_depth > max_trigger_depth`` — not run, recorded ``skipped`` (no attempt);
  never a dead-letter handler's row, which runs one past its execution's depth.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import anyio
import psycopg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from manager_core.completer import BatchCompleter
from manager_core.conflict_lanes import ConflictLanes
from manager_core.db import is_connection_lost, is_retryable_conflict, transaction
from manager_core.dispatch_settings import DispatcherMetrics, DispatcherSettings
from manager_core.execution_txn import (
    LOST_CONNECTION_RERUNS,
    ConnectionLost,
    ExecutionTransaction,
    Lost,
    Rerun,
    Slot,
    TransactionDeps,
    Unrunnable,
)
from manager_core.outage_log import OutageLog
from manager_core.postgres.outbox import ClaimedRow
from manager_core.postgres.outbox_claims import record_skipped
from manager_core.principals import AdminPrincipalResolver
from picloud_shared.errors import PrincipalRevoked
from picloud_shared.events import HttpEvent, event_from_wire, script_event
from picloud_shared.execution import ExecError, ExecRequest, ExecResult
from picloud_shared.gate import ExecutionGate
from picloud_shared.ids import ExecutionId
from picloud_shared.inbox import DeliveryStatus, InboxResult
from picloud_shared.outbox import HttpDispatchPayload, OutboxSourceKind
from picloud_shared.ports import Executor, InboxResolver
from picloud_shared.principals import Principal
from picloud_shared.status import NON_RETRYABLE, ExecErrorKind, ExecutionStatus
from picloud_shared.wire import JsonObject, WireError

log = logging.getLogger("picloud.dispatcher")
_DB_ERRORS = (DBAPIError, psycopg.Error)  # an error PostgreSQL (or its driver) made


class ClaimRunner:
    """Runs claimed rows to their outcome for one dispatcher (whose settings and
    metrics it shares); see the module docstring."""

    def __init__(
        self,
        *,
        deps: TransactionDeps,
        executor: Executor,
        gate: ExecutionGate,
        inbox: InboxResolver,
        completer: BatchCompleter,
        principals: AdminPrincipalResolver,
        settings: DispatcherSettings,
        metrics: DispatcherMetrics,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._txn_deps = deps
        self._engine = deps.engine
        self._outbox = deps.outbox
        self._executions = deps.executions
        self._dead_letters = deps.dead_letters
        self._signal = deps.signal
        self._executor = executor
        self._gate = gate
        self._inbox = inbox
        self._completer = completer
        self._principals = principals
        self.settings = settings
        self.metrics = metrics
        self._rand = rand
        self._lanes = ConflictLanes()
        # Host calls failing because the database is away (every execution running
        # then): logged when that starts, once a minute while it lasts, when it ends.
        self._host_outage = OutageLog(
            log, "serving host calls", then="their executions fail with an internal error"
        )

    async def run(self, claim: ClaimedRow, slot: Slot) -> str:
        """Run one claimed row to its outcome; returns the outcome's metric label."""
        row = claim.row
        # A dead letter's handler runs whatever its depth (one past its execution's, at
        # most the limit + 1): the owner's alerting must not stop at deep chains. Its
        # writes fan out one deeper and are checked here; it is never retried nor
        # dead-lettered, so no loop can come of it.
        if row.trigger_depth > self.settings.max_trigger_depth and not row.is_dead_letter_handler:
            return await self._skip(claim)
        if row.is_sync_http and (row.attempt_count > 1 or row.reply_node != self.settings.node_id):
            # The node whose caller waited for this died (before or while running it),
            # or lost the database while running it past its lease: the caller is gone
            # or was answered, so the request is failed, not run.
            return await self._book_failure(
                claim,
                ExecResult.failed(row.execution_id, ExecError(ExecErrorKind.WORKER_CRASH, CUT_OFF)),
                ran=False,
            )
        if row.reply_to is not None and not self._inbox.waiting(row.reply_to):
            return await self._book_failure(claim, _caller_gone(row.execution_id), ran=False)
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
                ran=False,
            )
        try:
            principal = self._resolve_trigger(claim)
            request = self._build_exec_request(claim, principal)
        except Unrunnable as exc:  # no later attempt could run it either
            failed = ExecResult.failed(row.execution_id, exc.error)
            return await self._book_failure(claim, failed, final=True, ran=False)
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
                script_capabilities=claim.script.data_capabilities,
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
        if not self._lanes.hot(row.app_id):
            try:
                return await self._attempt(claim, request, principal, slot)
            except Rerun:
                self.metrics.conflict_reruns += 1
                self._lanes.conflicted(row.app_id)
        # A conflict, now or in the app's other executions: one at a time, in order
        # (module conflict_lanes). Neither the waiters nor the lane's head hold a gate
        # slot: a head waiting for one held by rows queued behind the waiters (for the
        # runners the waiters occupy) would wait for ever. So each hot app may run one
        # execution past the gate's size.
        slot.release()
        async with self._lanes.serial(row.app_id):
            for _ in range(self.settings.max_conflict_reruns):
                try:
                    return await self._attempt(claim, request, principal, slot)
                except Rerun:  # an execution outside the lane won
                    self.metrics.conflict_reruns += 1
                    self._lanes.conflicted(row.app_id)
                    await anyio.sleep(self._rand() * 0.005)
        return ExecResult.failed(
            row.execution_id,
            ExecError(
                ExecErrorKind.INTERNAL, "gave up after too many conflicting concurrent executions"
            ),
        )

    async def _attempt(
        self, claim: ClaimedRow, request: ExecRequest, principal: Principal, slot: Slot
    ) -> ExecResult | None:
        """One run of the script (:meth:`_run_once`), run again at once (at most
        ``LOST_CONNECTION_RERUNS`` times) when a host call found its transaction's
        connection lost: nothing of it committed (a stale pooled connection after a
        PostgreSQL restart). A database still away fails the last run as any platform
        error does. A run again holds no gate slot (its first released it), as a
        conflict's does not: waiting for one could wait on rows queued to the runners."""
        for reruns_left in range(LOST_CONNECTION_RERUNS, -1, -1):
            try:
                return await self._run_once(
                    claim, request, principal, slot, rerun_if_lost=reruns_left > 0
                )
            except ConnectionLost as exc:
                log.info(
                    "execution %s runs again: its connection was lost before anything of it "
                    "committed (%s)",
                    claim.row.execution_id,
                    exc,
                )
        raise AssertionError("unreachable")

    async def _run_once(
        self,
        claim: ClaimedRow,
        request: ExecRequest,
        principal: Principal,
        slot: Slot,
        *,
        rerun_if_lost: bool,
    ) -> ExecResult | None:
        """One run of the script. ``None`` when its success is committed; the failed
        result (nothing of it committed) otherwise. Raises ``Rerun`` on a
        serialization conflict, ``Lost`` when another claim owns the row, and
        ``ConnectionLost`` (if ``rerun_if_lost``) when a host call lost its
        connection."""
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
                if rerun_if_lost and is_connection_lost(error):
                    raise ConnectionLost(_first_line(error)) from None
                if not self._host_outage.counted(error):
                    # A statement PostgreSQL refused is one line; anything else (a bug in
                    # the host API) comes with its traceback.
                    log.error(
                        "host call failed in execution %s: %r",
                        row.execution_id,
                        error,
                        exc_info=None if isinstance(error, _DB_ERRORS) else error,
                    )
                return ExecResult.failed(
                    row.execution_id,
                    ExecError(ExecErrorKind.INTERNAL, "a platform error interrupted the script"),
                    result.logs,
                    result.duration_ms,
                )
            if txn.host.opened:
                self._host_outage.succeeded()
            if not result.ok:
                await txn.rollback()
                return result
            if row.reply_to is not None and not self._inbox.hold(row.reply_to):
                await txn.rollback()  # its caller was answered 504 or went away
                return _caller_gone(row.execution_id, result)
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

    async def _book_failure(
        self, claim: ClaimedRow, result: ExecResult, *, final: bool = False, ran: bool = True
    ) -> str:
        """Record a failed execution: reply, mark, reschedule, or dead-letter (at once
        when ``final``: its trigger, route or script is gone, or its payload is
        unreadable). ``ran=False``: this claim did not run the script, so it is no
        attempt: the record and any dead letter count the runs before it."""
        row = claim.row
        error = result.error
        assert error is not None
        attempts = row.attempt_count
        runs = None if ran else attempts - 1  # the record's count, when not the claim's
        outcome = "failed"
        for _ in range(self.settings.max_conflict_reruns):
            try:
                async with transaction(self._engine) as conn:
                    if not await self._outbox.take(
                        row.id, claim.token, row.attempt_count, conn=conn
                    ):
                        raise Lost
                    if row.is_sync_http or row.is_dead_letter_handler:
                        await self._outbox.delete(row.id, conn=conn)
                        await self._executions.finish_with(
                            row.execution_id,
                            ExecutionStatus.FAILED,
                            result,
                            attempts=runs,
                            conn=conn,
                        )
                        if row.dead_letter_id is not None:
                            await self._dead_letters.mark(
                                row.app_id, row.dead_letter_id, "handler_failed", conn=conn
                            )
                    elif final or error.kind in NON_RETRYABLE or attempts >= row.retry.max_attempts:
                        dead = result
                        if final and attempts > 1:  # (from the record, on every re-run)
                            dead = await self._with_last_error(conn, claim, result)
                        await self._dead_letter(conn, claim, dead, attempts=runs)
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

    async def _with_last_error(
        self, conn: AsyncConnection, claim: ClaimedRow, result: ExecResult
    ) -> ExecResult:
        """A retrying row that cannot run again (its trigger, route or script is gone,
        its registrant lost the right): its dead letter says so, and keeps what the
        last attempt that ran failed with (message, the script's traceback and its
        logs), which the record held until now."""
        row, error = claim.row, result.error
        assert error is not None
        record = await self._executions.get(row.app_id, row.execution_id, conn=conn)
        if record is None or record.error_kind is None:
            return result
        earlier = f"attempt {row.attempt_count - 1} had failed: {record.error_kind.value}"
        if record.error_message:
            earlier += f": {record.error_message}"
        last = ExecError(error.kind, f"{error.message} ({earlier})", record.error_traceback)
        return ExecResult.failed(row.execution_id, last, record.logs)

    async def _dead_letter(
        self,
        conn: AsyncConnection,
        claim: ClaimedRow,
        result: ExecResult,
        *,
        attempts: int | None = None,
    ) -> None:
        """Dead-letter the row (the repo fans it out to dead-letter triggers) after
        ``attempts`` runs (default: the claim's count, this one included)."""
        row = claim.row
        error = result.error
        assert error is not None
        runs = row.attempt_count if attempts is None else attempts
        dead = await self._dead_letters.create(
            row,
            attempts=runs,
            error_kind=error.kind,
            error_message=error.message,
            error_traceback=error.traceback,
            conn=conn,
        )
        await self._outbox.delete(row.id, conn=conn)
        await self._executions.finish_with(
            row.execution_id, ExecutionStatus.DEAD_LETTERED, result, attempts=attempts, conn=conn
        )
        # The kind only: the message is the script's text (an exception's, a rejection's),
        # which may quote the app's data or forge log lines; its record has it.
        log.info("execution %s dead-lettered as %s (%s)", row.execution_id, dead.id, error.kind)

    async def _skip(self, claim: ClaimedRow) -> str:
        """Past the depth limit: not run, so recorded ``skipped`` with no attempt and an
        ``internal`` error saying why (no other kind fits a row that never ran)."""
        row = claim.row
        limit = self.settings.max_trigger_depth
        why = f"trigger depth {row.trigger_depth} exceeds the limit {limit}"
        log.warning("execution %s skipped: %s", row.execution_id, why)
        async with transaction(self._engine) as conn:
            if not await self._outbox.take(row.id, claim.token, row.attempt_count, conn=conn):
                raise Lost
            await self._outbox.delete(row.id, conn=conn)
            await record_skipped(conn, row.execution_id, f"not run: {why}")
        self.metrics.skipped_for_depth += 1
        return "skipped"

    async def fail_unanswerable(self, claims: list[ClaimedRow]) -> list[ClaimedRow]:
        """Of rows about to be given back, book the sync ones whose caller no longer
        waits failed now (its caller was answered or went away; nothing of it is
        kept); returns the others."""
        rest: list[ClaimedRow] = []
        for claim in claims:
            row = claim.row
            if row.reply_to is None or self._inbox.waiting(row.reply_to):
                rest.append(claim)
                continue
            try:
                await self._book_failure(claim, _caller_gone(row.execution_id))
            except Lost:
                pass
            except Exception:
                log.exception(
                    "booking execution %s failed; its lease will expire", row.execution_id
                )
        return rest

    async def answer_interrupted(self, claim: ClaimedRow) -> None:
        """A sync row whose run broke off on a platform error (the database went away,
        say): answer its caller now rather than at the end of its wait. The row comes
        back after its lease and is booked failed then (a sync row is never re-run)."""
        await self._answer_failed(claim, "a platform error interrupted the execution")

    async def answer_lost(self, claim: ClaimedRow) -> None:
        """A sync row this node lost while it ran: deleted with its app, or claimed by
        another node after its lease ran out (that node books it failed, unrun). No
        node will answer its caller then, and one held for the commit (a no-write
        completion that found no row) would wait a minute past its timeout: answer
        now (500 ``internal``)."""
        await self._answer_failed(
            claim,
            "the execution's outbox row was taken while it ran (its app was deleted, or "
            "its lease ran out); nothing of the request was kept",
        )

    async def _answer_failed(self, claim: ClaimedRow, message: str) -> None:
        row = claim.row
        if row.reply_to is None or not self._inbox.waiting(row.reply_to):
            return
        result = ExecResult.failed(row.execution_id, ExecError(ExecErrorKind.INTERNAL, message))
        try:
            await self._inbox.deliver(
                row.reply_to, InboxResult.from_exec_result(result), row.reply_node
            )
        except Exception:
            log.exception("answering the caller of execution %s failed", row.execution_id)

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


# The record of a sync request whose run was cut off and whose caller no longer waits.
CUT_OFF = (
    "the node serving this request stopped, or lost the database, while it ran; "
    "its caller no longer waits and nothing of it was kept"
)


def _first_line(error: BaseException) -> str:
    """The first line of what a database error says (its original's, if wrapped)."""
    orig = getattr(error, "orig", None) or error
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0][:200]


def _caller_gone(execution_id: ExecutionId, ran: ExecResult | None = None) -> ExecResult:
    """The failure of a sync execution whose caller stopped waiting (its wait ended, or
    it went away) before the execution could commit: nothing of it is kept."""
    return ExecResult.failed(
        execution_id,
        ExecError(
            ExecErrorKind.TIMEOUT,
            "its caller stopped waiting before it could commit; nothing it wrote was kept",
        ),
        () if ran is None else ran.logs,
        0.0 if ran is None else ran.duration_ms,
    )
