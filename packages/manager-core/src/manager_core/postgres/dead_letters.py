"""``PostgresDeadLetterRepo``: executions that ran out of attempts.

``create`` stores one (and, given an emitter, fans it out to the app's dead-letter
triggers in the same transaction); ``replay`` re-enqueues the original payload as a
fresh execution; ``resolve``/``mark`` set the ``resolution``; ``prune`` deletes the
ones settled long ago (``retention.ExecutionRetention``).

``replayed`` is final: a replayed letter is never replayed again, and neither a
human's ``resolve`` (``Conflict``) nor a handler's late outcome (``mark``) overwrites
it. Every other resolution may be followed by a replay or a resolve.

A handler's outcome never hides what is known already (:func:`may_become`): its
success makes a letter ``handled`` only while it has no resolution; its failure makes
it ``handler_failed`` over none or ``handled`` (with several handlers, one failure
wins whatever order they finish in); neither overwrites a human's ``resolved`` or a
``replayed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import attrs
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.db import transaction
from manager_core.postgres._pages import Page, json_bytes, within_bytes
from manager_core.postgres._prune import prune_by_app
from manager_core.postgres.kv import notify_committed
from manager_core.postgres.outbox import PostgresOutboxRepo
from manager_core.postgres.triggers import check_limit, retry_from_row
from picloud_shared import wire
from picloud_shared.errors import Conflict, InvalidInput, NotFound
from picloud_shared.events import DeadLetterEvent, received_event
from picloud_shared.ids import (
    AppId,
    DeadLetterId,
    ExecutionId,
    RouteId,
    ScriptId,
    TriggerId,
    new_execution_id,
)
from picloud_shared.outbox import NewOutboxRow, OutboxRow, OutboxSourceKind
from picloud_shared.ports import EventEmitter
from picloud_shared.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from picloud_shared.status import ExecErrorKind
from picloud_shared.wire import JsonObject, WireError

__all__ = ["DeadLetter", "PostgresDeadLetterRepo"]

_DL = t.dead_letters


@attrs.frozen
class DeadLetter:
    id: DeadLetterId
    app_id: AppId
    execution_id: ExecutionId
    source_kind: OutboxSourceKind
    trigger_id: TriggerId | None
    route_id: RouteId | None
    script_id: ScriptId | None
    payload: JsonObject
    attempts: int
    trigger_depth: int
    error_kind: ExecErrorKind | None
    error_message: str | None
    error_traceback: str | None
    resolution: str | None
    resolved_at: datetime | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: sa.Row) -> DeadLetter:  # type: ignore[type-arg]
        return cls(
            id=DeadLetterId(row.id),
            app_id=AppId(row.app_id),
            execution_id=ExecutionId(row.execution_id),
            source_kind=OutboxSourceKind(row.source_kind),
            trigger_id=None if row.trigger_id is None else TriggerId(row.trigger_id),
            route_id=None if row.route_id is None else RouteId(row.route_id),
            script_id=None if row.script_id is None else ScriptId(row.script_id),
            payload=row.payload,
            attempts=row.attempts,
            trigger_depth=row.trigger_depth,
            error_kind=None if row.error_kind is None else ExecErrorKind(row.error_kind),
            error_message=row.error_message,
            error_traceback=row.error_traceback,
            resolution=row.resolution,
            resolved_at=row.resolved_at,
            created_at=row.created_at,
        )

    @property
    def error(self) -> JsonObject:
        """The error as dead-letter handlers receive it (the event's ``error``): its
        kind and message; the admin API adds the ``traceback``."""
        return {
            "kind": None if self.error_kind is None else self.error_kind.value,
            "message": self.error_message,
        }

    @property
    def event(self) -> JsonObject:
        """The event the failed script received (for ``http``, the route event inside
        the stored dispatch payload); the stored payload if that cannot be decoded."""
        try:
            return received_event(self.source_kind, self.payload)
        except WireError:
            return self.payload

    def to_event(self) -> DeadLetterEvent:
        """The event dead-letter handlers receive."""
        return DeadLetterEvent(self.id, self.source_kind, self.event, self.error, self.attempts)

    def to_wire(self) -> JsonObject:
        return {
            "id": str(self.id),
            "execution_id": str(self.execution_id),
            "source_kind": self.source_kind.value,
            "trigger_id": None if self.trigger_id is None else str(self.trigger_id),
            "route_id": None if self.route_id is None else str(self.route_id),
            "script_id": None if self.script_id is None else str(self.script_id),
            "payload": self.event,
            "attempts": self.attempts,
            "trigger_depth": self.trigger_depth,
            "error": {**self.error, "traceback": self.error_traceback},
            "resolution": self.resolution,
            "resolved_at": None
            if self.resolved_at is None
            else wire.timestamp_text(self.resolved_at),
            "created_at": wire.timestamp_text(self.created_at),
        }


_REPLAYED = "this dead letter was already replayed"
_NOT_REPLAYED = _DL.c.resolution.is_distinct_from("replayed")


def may_become(resolution: str) -> sa.ColumnElement[bool]:
    """Whether a letter's current resolution may be replaced by ``resolution``: a
    handler's ``handled`` only over none, its ``handler_failed`` over none or
    ``handled``; a human's ``resolved`` and a ``replayed`` over anything but
    ``replayed``. (``outbox_claims._COMPLETE_BATCH`` spells the ``handled`` rule in
    its SQL.)"""
    current = _DL.c.resolution
    if resolution == "handled":
        return current.is_(None)
    if resolution == "handler_failed":
        return sa.or_(current.is_(None), current == "handled")
    return _NOT_REPLAYED


# Settled: nothing is left to do about them. ``handler_failed`` and unresolved ones
# wait for their owner and are never pruned.
SETTLED = ("handled", "resolved", "replayed")
UNRESOLVED = "unresolved"  # no resolution yet (``null``), for the list's filter
RESOLUTIONS = (UNRESOLVED, *t.DEAD_LETTER_RESOLUTIONS)

# One batch of one app's dead letters settled before the cutoff (the database's now()
# less ``:older_than``), found through (app_id, created_at): settled before it implies
# created before it.
_PRUNE_BATCH = sa.text(
    """
    DELETE FROM dead_letters WHERE id = ANY(ARRAY(
        SELECT id FROM dead_letters
        WHERE app_id = :app_id
          AND created_at < now() - CAST(:older_than AS interval)
          AND resolved_at < now() - CAST(:older_than AS interval)
          AND resolution = ANY(:settled)
        LIMIT :batch
        FOR UPDATE SKIP LOCKED
    ))
    """
).bindparams(sa.bindparam("settled", list(SETTLED), type_=sa.ARRAY(sa.Text)))


class PostgresDeadLetterRepo:
    """Dead letters. ``emitter`` (optional) fans new dead letters out to dead-letter
    triggers; ``outbox`` is where ``replay`` enqueues. Every method takes an optional
    ``conn`` to join the caller's transaction."""

    def __init__(
        self,
        engine: AsyncEngine,
        outbox: PostgresOutboxRepo,
        emitter: EventEmitter | None = None,
    ) -> None:
        self._engine = engine
        self._outbox = outbox
        self._emitter = emitter

    async def create(
        self,
        row: OutboxRow,
        *,
        attempts: int,
        error_kind: ExecErrorKind | None,
        error_message: str | None,
        error_traceback: str | None = None,
        conn: AsyncConnection | None = None,
    ) -> DeadLetter:
        """Dead-letter the execution of outbox ``row`` (payload, source, trigger, route,
        script, depth) after ``attempts``, with its last error (``error_traceback``: the
        script's own, ``ExecError.traceback``); fans out to dead-letter triggers with
        the row's depth + 1 (never for a dead-letter handler's own row)."""
        stmt = (
            sa.insert(_DL)
            .values(
                app_id=row.app_id,
                execution_id=row.execution_id,
                source_kind=row.source_kind.value,
                trigger_id=row.trigger_id,
                route_id=row.route_id,
                script_id=row.script_id,
                payload=row.payload,
                attempts=attempts,
                trigger_depth=row.trigger_depth,
                error_kind=None if error_kind is None else error_kind.value,
                error_message=error_message,
                error_traceback=error_traceback,
            )
            .returning(_DL)
        )
        async with transaction(conn or self._engine) as c:
            letter = DeadLetter.from_row((await c.execute(stmt)).one())
            if self._emitter is not None and not row.is_dead_letter_handler:
                await self._emitter.emit(c, row.app_id, letter.to_event(), row.trigger_depth + 1)
        if conn is None and self._emitter is not None:
            notify_committed(self._emitter, c)
        return letter

    async def get(
        self, app_id: AppId, dead_letter_id: DeadLetterId, *, conn: AsyncConnection | None = None
    ) -> DeadLetter | None:
        stmt = sa.select(_DL).where(_DL.c.app_id == app_id, _DL.c.id == dead_letter_id)
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        return None if row is None else DeadLetter.from_row(row)

    async def list(
        self,
        app_id: AppId,
        limit: int = 100,
        after: tuple[datetime, DeadLetterId] | None = None,
        *,
        resolution: str | None = None,
        source_kind: OutboxSourceKind | None = None,
        conn: AsyncConnection | None = None,
    ) -> Sequence[DeadLetter]:
        """Newest first, starting after ``after`` (the previous page's last
        ``(created_at, id)``: it need not exist any more); only those with
        ``resolution`` (one of :data:`RESOLUTIONS`; ``unresolved`` is none yet) and of
        ``source_kind``, when given."""
        stmt = (
            sa.select(_DL)
            .where(_DL.c.app_id == app_id)
            .order_by(_DL.c.created_at.desc(), _DL.c.id.desc())
            .limit(check_limit(limit))
        )
        if resolution is not None:
            if resolution not in RESOLUTIONS:
                raise InvalidInput(f"resolution must be one of: {', '.join(RESOLUTIONS)}")
            stmt = stmt.where(
                _DL.c.resolution.is_(None)
                if resolution == UNRESOLVED
                else _DL.c.resolution == resolution
            )
        if source_kind is not None:
            stmt = stmt.where(_DL.c.source_kind == OutboxSourceKind(source_kind).value)
        if after is not None:  # (created_at, id) strictly after the cursor, newest first
            created, last = after
            stmt = stmt.where(
                sa.tuple_(_DL.c.created_at, _DL.c.id)
                < sa.tuple_(
                    sa.literal(created, _DL.c.created_at.type), sa.literal(last, _DL.c.id.type)
                )
            )
        stmt = within_bytes(
            stmt,
            json_bytes(_DL.c.payload, _DL.c.error_message, _DL.c.error_traceback),
            (_DL.c.created_at.desc(), _DL.c.id.desc()),
        )
        async with transaction(conn or self._engine) as c:
            rows = list((await c.execute(stmt)).all())
        return Page.of((DeadLetter.from_row(r) for r in rows), rows)

    async def mark(
        self,
        app_id: AppId,
        dead_letter_id: DeadLetterId,
        resolution: str,
        *,
        conn: AsyncConnection | None = None,
    ) -> bool:
        """Set the resolution where it may replace the current one (:func:`may_become`);
        ``False`` when the app has no such dead letter or it keeps its resolution: a
        handler's success after a failure, a resolve or a replay, a handler's failure
        after a resolve or a replay (``replayed`` is final)."""
        if resolution not in t.DEAD_LETTER_RESOLUTIONS:
            raise InvalidInput(f"unknown resolution {resolution!r}")
        stmt = (
            sa.update(_DL)
            .where(_DL.c.app_id == app_id, _DL.c.id == dead_letter_id, may_become(resolution))
            .values(resolution=resolution, resolved_at=sa.func.now())
        )
        async with transaction(conn or self._engine) as c:
            result = await c.execute(stmt)
        return bool(result.rowcount)

    async def prune(self, older_than: timedelta, *, batch: int = 1000) -> int:
        """Delete the dead letters settled (``SETTLED``) more than ``older_than`` before
        the database's ``now()``, ``batch`` rows per statement and transaction, app by
        app; returns how many."""
        return await prune_by_app(self._engine, _PRUNE_BATCH, older_than, batch)

    async def resolve(
        self, app_id: AppId, dead_letter_id: DeadLetterId, *, conn: AsyncConnection | None = None
    ) -> DeadLetter:
        """Mark ``resolved`` (a human dealt with it) and return the letter. Raises
        ``NotFound``, or ``Conflict`` if it was replayed: that stays on record, and a
        replay waiting on the row lock is seen (the update re-reads the row)."""
        stmt = (
            sa.update(_DL)
            .where(_DL.c.app_id == app_id, _DL.c.id == dead_letter_id, _NOT_REPLAYED)
            .values(resolution="resolved", resolved_at=sa.func.now())
            .returning(_DL)
        )
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
            if row is None:
                if await self.get(app_id, dead_letter_id, conn=c) is None:
                    raise NotFound("no such dead letter")
                raise Conflict(_REPLAYED)
        return DeadLetter.from_row(row)

    async def replay(
        self, app_id: AppId, dead_letter_id: DeadLetterId, *, conn: AsyncConnection | None = None
    ) -> ExecutionId:
        """Re-enqueue the original payload as a new execution (fresh id, attempt 0, the
        trigger's current retry policy, async even for an HTTP source) and mark the
        dead letter ``replayed``. Raises ``NotFound``, or ``Conflict`` if already
        replayed or if it could never run: its trigger (route for ``http``) or its
        script no longer exists. Then nothing is written."""
        locked = (
            sa.select(_DL)
            .where(_DL.c.app_id == app_id, _DL.c.id == dead_letter_id)
            .with_for_update()
        )
        execution_id = new_execution_id()
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(locked)).one_or_none()
            if row is None:
                raise NotFound("no such dead letter")
            letter = DeadLetter.from_row(row)
            if letter.resolution == "replayed":
                raise Conflict(_REPLAYED)
            retry = await _runnable(c, letter)
            await self._outbox.enqueue(
                NewOutboxRow(
                    execution_id=execution_id,
                    app_id=app_id,
                    source_kind=letter.source_kind,
                    payload=letter.payload,
                    script_id=letter.script_id,
                    trigger_id=letter.trigger_id,
                    route_id=letter.route_id,
                    trigger_depth=letter.trigger_depth,
                    retry=retry,
                ),
                conn=c,
            )
            await self.mark(app_id, dead_letter_id, "replayed", conn=c)
        if conn is None:
            self._outbox.signal.committed(c)
        return execution_id


async def _runnable(c: AsyncConnection, letter: DeadLetter) -> RetryPolicy:
    """The retry policy a replay of ``letter`` runs under: its trigger's (the default
    for ``http``). Raises ``Conflict`` when what it ran — its trigger or route, and its
    script — is gone from the app, as the dispatcher would find when claiming it."""
    retry = DEFAULT_RETRY_POLICY
    if letter.source_kind is OutboxSourceKind.HTTP:
        routes = t.routes
        found = sa.select(routes.c.id).where(
            routes.c.app_id == letter.app_id, routes.c.id == letter.route_id
        )
        if (await c.execute(found)).one_or_none() is None:
            raise Conflict("the route no longer exists")
    else:
        triggers = t.triggers
        found = sa.select(triggers).where(
            triggers.c.app_id == letter.app_id, triggers.c.id == letter.trigger_id
        )
        trig = (await c.execute(found)).one_or_none()
        if trig is None:
            raise Conflict("the trigger no longer exists")
        retry = retry_from_row(trig)
    scripts = t.scripts
    script = sa.select(scripts.c.id).where(
        scripts.c.app_id == letter.app_id, scripts.c.id == letter.script_id
    )
    if (await c.execute(script)).one_or_none() is None:
        raise Conflict("the script no longer exists")
    return retry
