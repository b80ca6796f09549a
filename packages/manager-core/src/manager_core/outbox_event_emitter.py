"""``OutboxEventEmitter``: a data change becomes one outbox row per matching trigger.

It replaces :class:`~picloud_shared.noop.NoopEventEmitter`. ``emit`` runs inside the
writer's transaction (it never commits): it asks the
:class:`~manager_core.postgres.triggers.PostgresTriggerRepo` for the matching
triggers and writes, in ONE statement, a ``queued`` execution record and an outbox
row per match — the event's wire form as payload, the trigger's id, script and
retry policy, and the ``trigger_depth`` it was given. Because the rows only become
visible at the writer's commit, the emitter defers its wake-up to the signal
(:meth:`OutboxSignal.defer`); whoever commits calls :meth:`committed`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.ext.asyncio import AsyncConnection

from manager_core.postgres.outbox import OutboxSignal
from manager_core.postgres.triggers import PostgresTriggerRepo
from picloud_shared.events import DeadLetterEvent, DocsEvent, KvEvent, TriggerEvent
from picloud_shared.ids import AppId, DeadLetterId
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.triggers import TriggerMatch
from picloud_shared.wire import JsonObject

__all__ = ["OutboxEventEmitter"]

_FAN_OUT = sa.text(
    """
    WITH m AS (
        SELECT * FROM unnest(
            :execution_ids, :trigger_ids, :script_ids,
            :backoffs, :base_delays, :max_delays, :max_attempts, :jitters
        ) AS m(execution_id, trigger_id, script_id,
               retry_backoff, retry_base_delay_ms, retry_max_delay_ms,
               retry_max_attempts, retry_jitter)
    ), e AS (
        INSERT INTO executions (id, app_id, source_kind, trigger_id, script_id,
                                status, trigger_depth)
        SELECT m.execution_id, :app_id, :source_kind, t.id, s.id, 'queued', :depth
        FROM m
        LEFT JOIN triggers t ON t.id = m.trigger_id
        LEFT JOIN scripts s ON s.id = m.script_id
        RETURNING id
    )
    INSERT INTO outbox (execution_id, app_id, source_kind, trigger_id, script_id, payload,
                        is_dead_letter_handler, dead_letter_id, trigger_depth,
                        retry_backoff, retry_base_delay_ms, retry_max_delay_ms,
                        retry_max_attempts, retry_jitter)
    SELECT m.execution_id, :app_id, :source_kind, m.trigger_id, m.script_id, :payload,
           :is_dead_letter_handler, :dead_letter_id, :depth,
           m.retry_backoff, m.retry_base_delay_ms, m.retry_max_delay_ms,
           m.retry_max_attempts, m.retry_jitter
    FROM m JOIN e ON e.id = m.execution_id
    """
)


class OutboxEventEmitter:
    """:class:`~picloud_shared.ports.EventEmitter` writing to the outbox.

    ``signal`` must be the one the node's
    :class:`~manager_core.postgres.outbox.PostgresOutboxRepo` waits on.
    """

    def __init__(self, triggers: PostgresTriggerRepo, signal: OutboxSignal) -> None:
        self._triggers = triggers
        self.signal = signal

    async def emit(
        self, conn: object, app_id: AppId, event: TriggerEvent, trigger_depth: int
    ) -> int:
        if not isinstance(conn, AsyncConnection):
            raise TypeError("OutboxEventEmitter.emit needs the writer's AsyncConnection")
        if isinstance(event, KvEvent):
            return await self.emit_kv(conn, app_id, event, trigger_depth)
        if isinstance(event, DocsEvent):
            return await self.emit_docs(conn, app_id, event, trigger_depth)
        if isinstance(event, DeadLetterEvent):
            return await self.emit_dead_letter(conn, app_id, event, trigger_depth)
        raise TypeError(f"{type(event).__name__} is not a data-change event")

    async def emit_kv(
        self, conn: AsyncConnection, app_id: AppId, event: KvEvent, trigger_depth: int
    ) -> int:
        matches = await self._triggers.list_matching_kv(app_id, event.key, event.op, conn=conn)
        return await self._fan_out(
            conn, app_id, OutboxSourceKind.KV, event.to_wire(), matches, trigger_depth
        )

    async def emit_docs(
        self, conn: AsyncConnection, app_id: AppId, event: DocsEvent, trigger_depth: int
    ) -> int:
        matches = await self._triggers.list_matching_docs(
            app_id, event.collection, event.op, conn=conn
        )
        return await self._fan_out(
            conn, app_id, OutboxSourceKind.DOCS, event.to_wire(), matches, trigger_depth
        )

    async def emit_dead_letter(
        self, conn: AsyncConnection, app_id: AppId, event: DeadLetterEvent, trigger_depth: int
    ) -> int:
        """Fan a dead letter out to the app's dead-letter triggers; the rows are
        ``is_dead_letter_handler`` and point back at the dead letter."""
        matches = await self._triggers.list_matching_dead_letter(
            app_id, event.source_kind, conn=conn
        )
        return await self._fan_out(
            conn,
            app_id,
            OutboxSourceKind.DEAD_LETTER,
            event.to_wire(),
            matches,
            trigger_depth,
            dead_letter_id=event.dead_letter_id,
        )

    def committed(self, conn: AsyncConnection) -> bool:
        """Call after committing ``conn``: wakes the dispatcher if rows were written."""
        return self.signal.committed(conn)

    async def _fan_out(
        self,
        conn: AsyncConnection,
        app_id: AppId,
        source_kind: OutboxSourceKind,
        payload: JsonObject,
        matches: Sequence[TriggerMatch],
        trigger_depth: int,
        *,
        dead_letter_id: DeadLetterId | None = None,
    ) -> int:
        if not matches:
            return 0
        uuids, texts, ints = ARRAY(UUID(as_uuid=True)), ARRAY(sa.Text), ARRAY(sa.Integer)
        stmt = _FAN_OUT.bindparams(
            sa.bindparam("execution_ids", [uuid.uuid4() for _ in matches], uuids),
            sa.bindparam("trigger_ids", [m.trigger_id for m in matches], uuids),
            sa.bindparam("script_ids", [m.script_id for m in matches], uuids),
            sa.bindparam("backoffs", [m.retry.backoff.value for m in matches], texts),
            sa.bindparam("base_delays", [m.retry.base_delay_ms for m in matches], ints),
            sa.bindparam("max_delays", [m.retry.max_delay_ms for m in matches], ints),
            sa.bindparam("max_attempts", [m.retry.max_attempts for m in matches], ints),
            sa.bindparam("jitters", [m.retry.jitter for m in matches], ARRAY(sa.Double)),
            sa.bindparam("app_id", app_id, UUID(as_uuid=True)),
            sa.bindparam("source_kind", source_kind.value, sa.Text),
            sa.bindparam("depth", trigger_depth, sa.Integer),
            sa.bindparam("payload", payload, JSONB),
            sa.bindparam("is_dead_letter_handler", dead_letter_id is not None, sa.Boolean),
            sa.bindparam("dead_letter_id", dead_letter_id, UUID(as_uuid=True)),
        )
        written = (await conn.execute(stmt)).rowcount
        if written:
            self.signal.defer(conn)
        return int(written)
