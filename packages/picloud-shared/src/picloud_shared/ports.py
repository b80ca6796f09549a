"""The ports: every boundary between packages, as Protocols.

Adapters live elsewhere (``manager_core.postgres``, ``executor_core``,
``orchestrator_core``); in-memory twins live in :mod:`picloud_shared.testing` and
the ``Noop*`` classes in :mod:`picloud_shared.noop`. Each method says what it
raises; anything not listed is a bug.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from picloud_shared.domain import RouteTarget
from picloud_shared.events import TriggerEvent
from picloud_shared.execution import ExecRequest, ExecResult
from picloud_shared.gate import Permit
from picloud_shared.ids import AppId, ExecutionId, InboxId, TriggerId
from picloud_shared.inbox import DeliveryStatus, InboxResult
from picloud_shared.outbox import NewOutboxRow, OutboxRow, OutboxSourceKind
from picloud_shared.triggers import (
    CreateDeadLetterTrigger,
    CreateDocsTrigger,
    CreateKvTrigger,
    DeadLetterTriggerMatch,
    DocsOp,
    DocsTriggerMatch,
    KvOp,
    KvTriggerMatch,
    Trigger,
)
from picloud_shared.wire import Json, JsonObject


@runtime_checkable
class HostApi(Protocol):
    """What a running script may ask of the host, for one execution of one app.

    One object serves one execution: the app, the principal and (for the
    Postgres-backed one) the transaction are fixed when it is built, never taken
    from the script. Every method raises a :class:`~picloud_shared.errors.PicloudError`
    subclass on bad input — ``LimitExceeded``/``PayloadTooLarge`` past a limit,
    ``InvalidInput``/``InvalidName`` on a malformed key, collection or id,
    ``Forbidden`` when the principal lacks ``app_read_data``/``app_write_data``,
    ``NotFound`` where stated — and the bridge re-raises it inside the script.
    """

    async def kv_get(self, key: str) -> Json | None:
        """The value stored under ``key``, or ``None`` when there is none."""
        ...

    async def kv_set(self, key: str, value: Json) -> None:
        """Store ``value`` (any JSON) under ``key``; fires matching ``set`` triggers."""
        ...

    async def kv_delete(self, key: str) -> bool:
        """Remove ``key``; ``True`` if it existed (only then ``delete`` triggers fire)."""
        ...

    async def kv_list(
        self, prefix: str = "", limit: int = 100, after: str | None = None
    ) -> list[JsonObject]:
        """Up to ``limit`` entries ``{"key", "value"}`` whose key starts with ``prefix``,
        ordered by key; with ``after`` (checked as a key is), only keys that sort
        after it, so the last key of a page asks for the next. A host that bounds an
        answer's bytes (PostgreSQL's: 8 MiB) raises ``LimitExceeded`` past them
        rather than answer part of the page."""
        ...

    async def docs_insert(self, collection: str, data: JsonObject, id: str | None = None) -> str:
        """Insert a document and return its id (generated when ``id`` is None).
        Raises ``Conflict`` when ``id`` is taken."""
        ...

    async def docs_get(self, collection: str, id: str) -> JsonObject | None:
        """The document's data, or ``None``."""
        ...

    async def docs_update(self, collection: str, id: str, data: JsonObject) -> None:
        """Replace a document's data. Raises ``NotFound`` when it does not exist."""
        ...

    async def docs_delete(self, collection: str, id: str) -> bool:
        """Delete a document; ``True`` if it existed."""
        ...

    async def docs_query(
        self,
        collection: str,
        where: JsonObject | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[JsonObject]:
        """Up to ``limit`` documents ``{"id", "data"}`` whose top-level fields equal
        every pair of ``where``, ordered by id; with ``after`` (checked as an id is),
        only ids that sort after it, so the last id of a page asks for the next. As
        ``kv_list``, never answers part of a page."""
        ...

    async def log(self, line: str) -> None:
        """One line the script logged (already capped by the executor). May drop it."""
        ...


@runtime_checkable
class Executor(Protocol):
    """Runs untrusted scripts in isolation."""

    async def execute(self, request: ExecRequest, host: HostApi) -> ExecResult:
        """Run ``request`` once, serving its host calls from ``host``.

        Never raises for anything the script does: every failure comes back as an
        :class:`ExecResult` with an :class:`ExecError`. Cancellation propagates (the
        worker is killed). Raises ``RuntimeError`` only when the executor is closed.
        """
        ...

    async def aclose(self) -> None:
        """Stop every worker and release every resource. Idempotent."""
        ...


@runtime_checkable
class EventEmitter(Protocol):
    """Turns a data change into outbox rows, inside the writer's transaction.

    ``conn`` is the adapter's open transaction (for the Postgres adapter, a
    SQLAlchemy ``AsyncConnection``); the emitter writes through it and never
    commits. ``trigger_depth`` is the depth the new rows carry: the writing
    execution's ``trigger_depth + 1``, or ``0`` for a write through the admin API.
    """

    async def emit(
        self, conn: object, app_id: AppId, event: TriggerEvent, trigger_depth: int
    ) -> int:
        """Fan ``event`` out to every matching trigger; returns the number of rows
        written. Raises whatever the transaction raises; never partially writes."""
        ...


@runtime_checkable
class TriggerRepo(Protocol):
    """Layout-E triggers: create, list, delete, and match for fan-out."""

    async def create_kv_trigger(self, create: CreateKvTrigger) -> Trigger:
        """Store a KV trigger. Raises ``UnknownScript`` when the script is not in the app."""
        ...

    async def create_docs_trigger(self, create: CreateDocsTrigger) -> Trigger:
        """Store a docs trigger. Raises ``UnknownScript``."""
        ...

    async def create_dead_letter_trigger(self, create: CreateDeadLetterTrigger) -> Trigger:
        """Store a dead-letter trigger. Raises ``UnknownScript``."""
        ...

    async def get(self, app_id: AppId, trigger_id: TriggerId) -> Trigger | None:
        """One trigger of the app, or ``None`` (also for another app's trigger)."""
        ...

    async def list(
        self, app_id: AppId, limit: int = 100, after: TriggerId | None = None
    ) -> Sequence[Trigger]:
        """The app's triggers in id order, starting after ``after``."""
        ...

    async def delete(self, app_id: AppId, trigger_id: TriggerId) -> bool:
        """Delete a trigger and its details; ``True`` if it existed in this app."""
        ...

    async def list_matching_kv(self, app_id: AppId, key: str, op: KvOp) -> Sequence[KvTriggerMatch]:
        """KV triggers of the app whose glob matches ``key`` and whose ops contain
        ``op`` or are empty."""
        ...

    async def list_matching_docs(
        self, app_id: AppId, collection: str, op: DocsOp
    ) -> Sequence[DocsTriggerMatch]:
        """Docs triggers whose collection glob matches and whose ops admit ``op``."""
        ...

    async def list_matching_dead_letter(
        self, app_id: AppId, source_kind: OutboxSourceKind
    ) -> Sequence[DeadLetterTriggerMatch]:
        """Dead-letter triggers whose source kinds contain ``source_kind`` or are empty."""
        ...


@runtime_checkable
class OutboxWriter(Protocol):
    """The orchestrator's surface of the outbox: enqueue one execution."""

    async def enqueue(self, row: NewOutboxRow, *, permit: Permit | None = None) -> None:
        """Write ``row`` and its ``queued`` execution record in one transaction, then
        wake the local dispatcher. The execution is readable once this returns.
        Raises ``NotFound`` when the row's app no longer exists.

        ``permit``: a slot of the ``ExecutionGate`` the caller already holds for this
        row (a sync request it admitted). The writer owns it from the call on: the
        row runs on it at once, or the writer releases it."""
        ...


class ClaimedOutboxRow(Protocol):
    """A row as ``OutboxRepo.claim_due`` hands it out: the row and its claim token
    (adapters add whatever else running it needs)."""

    @property
    def row(self) -> OutboxRow: ...

    @property
    def token(self) -> str: ...


@runtime_checkable
class OutboxRepo(Protocol):
    """The dispatcher's surface of the outbox.

    A claim leases rows to one node under a per-claim ``token``; the attempt is
    counted when it is claimed. Adapters add the calls that join an execution's
    own transaction (lock a claimed row, remove it, finish a batch).
    """

    async def claim_due(
        self, node: str, limit: int, lease_seconds: float
    ) -> Sequence[ClaimedOutboxRow]:
        """Claim up to ``limit`` due rows for ``node`` (``FOR UPDATE SKIP LOCKED``),
        leased for ``lease_seconds``, each attempt counted."""
        ...

    async def recover_expired(self) -> int:
        """Make rows whose lease expired (and that nobody is running) due again."""
        ...

    async def renew_leases(self, leases: Mapping[int, str], lease_seconds: float) -> int:
        """Extend the leases of rows this node is still running, ``{row id: claim
        token}``: a row whose lease ran out and that another claim took since is left
        as it is (its token differs). Returns how many were extended."""
        ...

    async def reschedule(self, row_id: int, *, delay_ms: float) -> None:
        """Give a claimed row back, due after ``delay_ms``; its attempt stays counted."""
        ...

    async def give_back(self, row_id: int, token: str, *, delay_ms: float = 0.0) -> None:
        """Give a claimed row back without counting its attempt (saturation, shutdown)."""
        ...

    async def record_abandoned(
        self, execution_id: ExecutionId, inbox_id: InboxId, reason: str, result: ExecResult | None
    ) -> None:
        """Record that a sync HTTP answer found no receiver."""
        ...

    async def wait_for_work(self, timeout: float) -> None:
        """Return as soon as a row was enqueued on this node, or after ``timeout``."""
        ...


@runtime_checkable
class RouteTable(Protocol):
    """Looks up an app's user routes by app name (the orchestrator's read side)."""

    async def routes_for_app(self, app_name: str) -> Sequence[RouteTarget] | None:
        """Every route of the app named ``app_name``, or ``None`` when there is no
        such app. Raises nothing else."""
        ...


@runtime_checkable
class AsyncBacklog(Protocol):
    """How many executions an app may have queued before its async routes refuse
    more: the orchestrator asks before it writes an async request's row."""

    def admit(self, app_id: AppId) -> bool:
        """Whether ``app_id`` may queue one more async request (counted if so).
        Never blocks; raises nothing."""
        ...


@runtime_checkable
class InboxResolver(Protocol):
    """Hands a sync execution's answer to the HTTP caller waiting for it."""

    async def deliver(
        self, inbox_id: InboxId, result: InboxResult, reply_node: str | None = None
    ) -> DeliveryStatus:
        """``DELIVERED`` when a receiver took it, ``ABANDONED`` when none waits
        (unknown id, receiver dropped, or wait expired). Never raises for that."""
        ...

    def waiting(self, inbox_id: InboxId) -> bool:
        """Whether a caller still waits for this answer (its wait has not expired and
        it has not gone away)."""
        ...

    def hold(self, inbox_id: InboxId) -> bool:
        """Whether the caller still waits, and if so keep it waiting for the answer
        past the end of its wait: the execution commits now and answers right after.
        ``False``: the caller has gone (or been told its request timed out), so the
        execution must not commit."""
        ...


__all__ = [
    "EventEmitter",
    "Executor",
    "HostApi",
    "InboxResolver",
    "OutboxRepo",
    "OutboxWriter",
    "RouteTable",
    "TriggerRepo",
]
