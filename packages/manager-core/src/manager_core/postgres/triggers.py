"""``PostgresTriggerRepo``: Layout-E triggers (a parent row + one details row per kind).

Matching narrows candidates in SQL (app, kind and — for kv/docs — the glob's literal
prefix through ``ix_triggers_app_id_kind_match_prefix``) and decides the final match
in Python with :mod:`picloud_shared.triggers`, so SQL never has an opinion on ops:
an empty ``ops`` array matches every op.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.db import in_transaction, transaction, translate_integrity_error
from manager_core.postgres._quota import check_quota
from picloud_shared.errors import InvalidInput, InvalidRetryPolicy, NotFound, UnknownScript
from picloud_shared.ids import AppId, ScriptId, TriggerId, UserId
from picloud_shared.limits import MAX_LIST_FETCH, MAX_TRIGGERS_PER_APP
from picloud_shared.outbox import OutboxSourceKind
from picloud_shared.retry import Backoff, RetryPolicy
from picloud_shared.triggers import (
    CreateDeadLetterTrigger,
    CreateDocsTrigger,
    CreateKvTrigger,
    DeadLetterTriggerDetails,
    DeadLetterTriggerMatch,
    DocsOp,
    DocsTriggerDetails,
    DocsTriggerMatch,
    KvOp,
    KvTriggerDetails,
    KvTriggerMatch,
    Trigger,
    TriggerDetails,
    TriggerKind,
    TriggerMatch,
    check_glob,
    glob_literal_prefix,
    kind_of,
)

__all__ = [
    "PostgresTriggerRepo",
    "TriggerChanges",
    "check_limit",
    "retry_from_row",
    "retry_values",
]

_T, _KV, _DOCS, _DL = (
    t.triggers,
    t.kv_trigger_details,
    t.docs_trigger_details,
    t.dead_letter_trigger_details,
)


def retry_values(policy: RetryPolicy) -> dict[str, Any]:
    """The ``retry_*`` columns (of ``triggers`` and ``outbox``) for ``policy``."""
    return {
        "retry_backoff": policy.backoff.value,
        "retry_base_delay_ms": policy.base_delay_ms,
        "retry_max_delay_ms": policy.max_delay_ms,
        "retry_max_attempts": policy.max_attempts,
        "retry_jitter": policy.jitter,
    }


def retry_from_row(row: Any) -> RetryPolicy:
    """The policy stored in a row's ``retry_*`` columns."""
    return RetryPolicy(
        backoff=Backoff(row.retry_backoff),
        base_delay_ms=row.retry_base_delay_ms,
        max_delay_ms=row.retry_max_delay_ms,
        max_attempts=row.retry_max_attempts,
        jitter=row.retry_jitter,
    )


def _named() -> sa.Select[Any]:
    """Triggers with their script's name (``script_name``)."""
    return _FULL.add_columns(t.scripts.c.name.label("script_name")).join(
        t.scripts, t.scripts.c.id == _T.c.script_id
    )


def check_limit(limit: object) -> int:
    """A list limit: an int from 1 to ``MAX_LIST_FETCH``, else :class:`InvalidInput`."""
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise InvalidInput("limit must be an integer")
    if not 1 <= limit <= MAX_LIST_FETCH:
        raise InvalidInput(f"limit must be between 1 and {MAX_LIST_FETCH}")
    return limit


def _all_prefixes(value: str) -> list[str]:
    """Every prefix of ``value``, from ``""`` to ``value`` itself."""
    return [value[:i] for i in range(len(value) + 1)]


_PARENT_COLUMNS = (
    _T.c.id,
    _T.c.app_id,
    _T.c.kind,
    _T.c.script_id,
    _T.c.registered_by_principal,
    _T.c.retry_backoff,
    _T.c.retry_base_delay_ms,
    _T.c.retry_max_delay_ms,
    _T.c.retry_max_attempts,
    _T.c.retry_jitter,
    _T.c.created_at,
)

_FULL = sa.select(
    *_PARENT_COLUMNS,
    _KV.c.key_glob,
    _KV.c.ops.label("kv_ops"),
    _DOCS.c.collection_glob,
    _DOCS.c.ops.label("docs_ops"),
    _DL.c.source_kinds,
).select_from(
    _T.outerjoin(_KV, _KV.c.trigger_id == _T.c.id)
    .outerjoin(_DOCS, _DOCS.c.trigger_id == _T.c.id)
    .outerjoin(_DL, _DL.c.trigger_id == _T.c.id)
)


def _details_from_row(row: Any) -> TriggerDetails:
    kind = TriggerKind(row.kind)
    if kind is TriggerKind.KV:
        return KvTriggerDetails(row.key_glob, tuple(KvOp(o) for o in row.kv_ops))
    if kind is TriggerKind.DOCS:
        return DocsTriggerDetails(row.collection_glob, tuple(DocsOp(o) for o in row.docs_ops))
    return DeadLetterTriggerDetails(tuple(OutboxSourceKind(k) for k in row.source_kinds))


def _trigger_from_row(row: Any) -> Trigger:
    return Trigger(
        id=TriggerId(row.id),
        app_id=AppId(row.app_id),
        script_id=ScriptId(row.script_id),
        registered_by_principal=(
            None if row.registered_by_principal is None else UserId(row.registered_by_principal)
        ),
        retry=retry_from_row(row),
        details=_details_from_row(row),
        created_at=row.created_at,
    )


def _match_from_row(row: Any) -> TriggerMatch:
    return TriggerMatch(
        trigger_id=TriggerId(row.id),
        script_id=ScriptId(row.script_id),
        registered_by_principal=(
            None if row.registered_by_principal is None else UserId(row.registered_by_principal)
        ),
        retry=retry_from_row(row),
    )


@attrs.frozen
class TriggerChanges:
    """What a PATCH of a trigger changes (``None``: keep). ``glob`` is a kv trigger's
    ``key_glob`` or a docs trigger's ``collection_glob``; ``ops`` are of the trigger's
    kind; ``source_kinds`` are a dead-letter trigger's; a dead-letter trigger takes
    no ``retry``."""

    script_id: ScriptId | None = None
    retry: RetryPolicy | None = None
    glob: str | None = None
    ops: tuple[KvOp, ...] | tuple[DocsOp, ...] | None = None
    source_kinds: tuple[OutboxSourceKind, ...] | None = None

    def check(self, kind: TriggerKind) -> None:
        """Raise unless every change fits a trigger of ``kind``."""
        if kind is TriggerKind.DEAD_LETTER:
            if self.retry is not None:
                raise InvalidRetryPolicy(
                    "a dead-letter trigger takes no retry policy: its script runs once per "
                    "dead letter and is never retried"
                )
            if self.glob is not None or self.ops is not None:
                raise InvalidInput("a dead-letter trigger has no glob and no ops")
            return
        if self.source_kinds is not None:
            raise InvalidInput(f"a {kind.value} trigger has no source_kinds")
        if self.glob is not None:
            check_glob(self.glob)
        op_kind = KvOp if kind is TriggerKind.KV else DocsOp
        if self.ops is not None and not all(isinstance(o, op_kind) for o in self.ops):
            raise InvalidInput(f"ops of a {kind.value} trigger must be {op_kind.__name__}s")


class PostgresTriggerRepo:
    """:class:`~picloud_shared.ports.TriggerRepo` on PostgreSQL.

    Every method takes an optional ``conn`` to join the caller's transaction.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    # -- create ------------------------------------------------------------------

    async def create_kv_trigger(
        self, create: CreateKvTrigger, *, conn: AsyncConnection | None = None
    ) -> Trigger:
        details = KvTriggerDetails(create.key_glob, create.ops)
        return await self._create(create, details, conn)

    async def create_docs_trigger(
        self, create: CreateDocsTrigger, *, conn: AsyncConnection | None = None
    ) -> Trigger:
        details = DocsTriggerDetails(create.collection_glob, create.ops)
        return await self._create(create, details, conn)

    async def create_dead_letter_trigger(
        self, create: CreateDeadLetterTrigger, *, conn: AsyncConnection | None = None
    ) -> Trigger:
        details = DeadLetterTriggerDetails(tuple(sorted(set(create.source_kinds))))
        return await self._create(create, details, conn)

    async def _create(
        self,
        create: CreateKvTrigger | CreateDocsTrigger | CreateDeadLetterTrigger,
        details: TriggerDetails,
        conn: AsyncConnection | None,
    ) -> Trigger:
        kind = kind_of(details)
        if isinstance(details, KvTriggerDetails):
            prefix: str | None = glob_literal_prefix(details.key_glob)
        elif isinstance(details, DocsTriggerDetails):
            prefix = glob_literal_prefix(details.collection_glob)
        else:
            prefix = None
        # INSERT … SELECT FROM scripts: a script of another app (or none) inserts nothing.
        s = t.scripts
        parent = (
            sa.insert(_T)
            .from_select(
                [
                    "app_id",
                    "kind",
                    "script_id",
                    "registered_by_principal",
                    "match_prefix",
                    *retry_values(create.retry),
                ],
                sa.select(
                    s.c.app_id,
                    sa.literal(kind.value),
                    s.c.id,
                    sa.literal(create.registered_by_principal, t.users.c.id.type),
                    sa.literal(prefix, sa.Text),
                    *(sa.literal(v) for v in retry_values(create.retry).values()),
                ).where(s.c.id == create.script_id, s.c.app_id == create.app_id),
            )
            .returning(_T.c.id, _T.c.created_at)
        )
        try:
            async with transaction(conn or self._engine) as c:
                await check_quota(c, _T, create.app_id, MAX_TRIGGERS_PER_APP, "triggers")
                row = (await c.execute(parent)).one_or_none()
                if row is None:
                    raise UnknownScript()
                if isinstance(details, KvTriggerDetails):
                    stmt = sa.insert(_KV).values(
                        trigger_id=row.id,
                        key_glob=details.key_glob,
                        ops=[o.value for o in details.ops],
                    )
                elif isinstance(details, DocsTriggerDetails):
                    stmt = sa.insert(_DOCS).values(
                        trigger_id=row.id,
                        collection_glob=details.collection_glob,
                        ops=[o.value for o in details.ops],
                    )
                else:
                    stmt = sa.insert(_DL).values(
                        trigger_id=row.id, source_kinds=[k.value for k in details.source_kinds]
                    )
                await c.execute(stmt)
        except IntegrityError as exc:
            raise translate_integrity_error(
                exc, what="trigger", foreign_key=NotFound("no such app, script or user")
            ) from exc
        return Trigger(
            id=TriggerId(row.id),
            app_id=create.app_id,
            script_id=create.script_id,
            registered_by_principal=create.registered_by_principal,
            retry=create.retry,
            details=details,
            created_at=row.created_at,
        )

    # -- update ------------------------------------------------------------------------

    async def update(
        self,
        app_id: AppId,
        trigger_id: TriggerId,
        changes: TriggerChanges,
        *,
        registered_by_principal: UserId | None,
        conn: AsyncConnection | None = None,
    ) -> tuple[Trigger, str] | None:
        """Change one of the app's triggers (its kind never changes) and make
        ``registered_by_principal`` its registrant, even when nothing else changes:
        whoever decides what a trigger runs is whom it runs as (as at create).

        Returns the trigger with its script's name, or ``None`` when the app has no
        such trigger. Raises ``UnknownScript`` (``changes.script_id`` is no script of
        the app), ``InvalidRetryPolicy`` / ``InvalidInput`` / ``InvalidGlob`` (a change
        that does not fit the trigger's kind), ``NotFound`` (the user is gone).

        Only events fired from now on see the change: rows already in the outbox keep
        the script and retry policy they were written with.
        """
        this = sa.and_(_T.c.app_id == app_id, _T.c.id == trigger_id)

        async def body(c: AsyncConnection) -> tuple[Trigger, str] | None:
            locked = sa.select(_T.c.kind).where(this).with_for_update()
            kind_name = await c.scalar(locked)
            if kind_name is None:
                return None
            kind = TriggerKind(kind_name)
            changes.check(kind)
            values: dict[str, Any] = {"registered_by_principal": registered_by_principal}
            if changes.script_id is not None:
                s = t.scripts
                # KEY SHARE: a concurrent delete of the script waits for this commit
                # (then meets the trigger's reference) instead of racing it.
                found = await c.scalar(
                    sa.select(s.c.id)
                    .where(s.c.id == changes.script_id, s.c.app_id == app_id)
                    .with_for_update(key_share=True)
                )
                if found is None:
                    raise UnknownScript()
                values["script_id"] = changes.script_id
            if changes.retry is not None:
                values.update(retry_values(changes.retry))
            if changes.glob is not None:
                values["match_prefix"] = glob_literal_prefix(changes.glob)
            await c.execute(sa.update(_T).where(this).values(**values))
            details: dict[str, Any] = {}
            if changes.ops is not None:
                details["ops"] = [o.value for o in changes.ops]
            if kind is TriggerKind.KV:
                table, glob_column = _KV, "key_glob"
            elif kind is TriggerKind.DOCS:
                table, glob_column = _DOCS, "collection_glob"
            else:
                table, glob_column = _DL, ""
                if changes.source_kinds is not None:
                    details["source_kinds"] = sorted({k.value for k in changes.source_kinds})
            if changes.glob is not None:
                details[glob_column] = changes.glob
            if details:
                stmt = sa.update(table).where(table.c.trigger_id == trigger_id).values(**details)
                await c.execute(stmt)
            row = (await c.execute(_named().where(this))).one()
            return _trigger_from_row(row), row.script_name

        try:
            return await in_transaction(conn or self._engine, body)
        except IntegrityError as exc:
            raise translate_integrity_error(
                exc, what="trigger", foreign_key=NotFound("no such app, script or user")
            ) from exc

    # -- read / delete ---------------------------------------------------------------

    async def get(
        self, app_id: AppId, trigger_id: TriggerId, *, conn: AsyncConnection | None = None
    ) -> Trigger | None:
        stmt = _FULL.where(_T.c.app_id == app_id, _T.c.id == trigger_id)
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        return None if row is None else _trigger_from_row(row)

    async def list(
        self,
        app_id: AppId,
        limit: int = 100,
        after: TriggerId | None = None,
        *,
        conn: AsyncConnection | None = None,
    ) -> Sequence[Trigger]:
        stmt = _FULL.where(_T.c.app_id == app_id).order_by(_T.c.id).limit(check_limit(limit))
        if after is not None:
            stmt = stmt.where(_T.c.id > after)
        async with transaction(conn or self._engine) as c:
            rows = (await c.execute(stmt)).all()
        return [_trigger_from_row(r) for r in rows]

    async def list_named(
        self,
        app_id: AppId,
        limit: int = 100,
        after: TriggerId | None = None,
        *,
        conn: AsyncConnection | None = None,
    ) -> Sequence[tuple[Trigger, str]]:
        """Like :meth:`list`, each trigger with its script's name (the admin API's)."""
        stmt = _named().where(_T.c.app_id == app_id).order_by(_T.c.id).limit(check_limit(limit))
        if after is not None:
            stmt = stmt.where(_T.c.id > after)
        async with transaction(conn or self._engine) as c:
            rows = (await c.execute(stmt)).all()
        return [(_trigger_from_row(r), r.script_name) for r in rows]

    async def get_named(
        self, app_id: AppId, trigger_id: TriggerId, *, conn: AsyncConnection | None = None
    ) -> tuple[Trigger, str] | None:
        """Like :meth:`get`, with the trigger's script's name."""
        stmt = _named().where(_T.c.app_id == app_id, _T.c.id == trigger_id)
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        return None if row is None else (_trigger_from_row(row), row.script_name)

    async def delete(
        self, app_id: AppId, trigger_id: TriggerId, *, conn: AsyncConnection | None = None
    ) -> bool:
        # The details row goes with it (ON DELETE CASCADE).
        stmt = sa.delete(_T).where(_T.c.app_id == app_id, _T.c.id == trigger_id)

        async def body(c: AsyncConnection) -> bool:
            return bool((await c.execute(stmt)).rowcount)

        return await in_transaction(conn or self._engine, body)

    # -- matching ----------------------------------------------------------------------

    async def list_matching_kv(
        self, app_id: AppId, key: str, op: KvOp, *, conn: AsyncConnection | None = None
    ) -> Sequence[KvTriggerMatch]:
        stmt = sa.select(*_PARENT_COLUMNS, _KV.c.key_glob, _KV.c.ops).join(
            _KV, _KV.c.trigger_id == _T.c.id
        )
        stmt = self._narrow(stmt, app_id, TriggerKind.KV, key)
        async with transaction(conn or self._engine) as c:
            rows = (await c.execute(stmt)).all()
        return [
            _match_from_row(r)
            for r in rows
            if KvTriggerDetails(r.key_glob, tuple(KvOp(o) for o in r.ops)).matches(key, op)
        ]

    async def list_matching_docs(
        self, app_id: AppId, collection: str, op: DocsOp, *, conn: AsyncConnection | None = None
    ) -> Sequence[DocsTriggerMatch]:
        stmt = sa.select(*_PARENT_COLUMNS, _DOCS.c.collection_glob, _DOCS.c.ops).join(
            _DOCS, _DOCS.c.trigger_id == _T.c.id
        )
        stmt = self._narrow(stmt, app_id, TriggerKind.DOCS, collection)
        async with transaction(conn or self._engine) as c:
            rows = (await c.execute(stmt)).all()
        return [
            _match_from_row(r)
            for r in rows
            if DocsTriggerDetails(r.collection_glob, tuple(DocsOp(o) for o in r.ops)).matches(
                collection, op
            )
        ]

    async def list_matching_dead_letter(
        self,
        app_id: AppId,
        source_kind: OutboxSourceKind,
        *,
        conn: AsyncConnection | None = None,
    ) -> Sequence[DeadLetterTriggerMatch]:
        stmt = (
            sa.select(*_PARENT_COLUMNS, _DL.c.source_kinds)
            .join(_DL, _DL.c.trigger_id == _T.c.id)
            .where(_T.c.app_id == app_id, _T.c.kind == TriggerKind.DEAD_LETTER.value)
            .order_by(_T.c.id)
        )
        async with transaction(conn or self._engine) as c:
            rows = (await c.execute(stmt)).all()
        return [
            _match_from_row(r)
            for r in rows
            if DeadLetterTriggerDetails(tuple(OutboxSourceKind(k) for k in r.source_kinds)).matches(
                source_kind
            )
        ]

    @staticmethod
    def _narrow(stmt: sa.Select[Any], app_id: AppId, kind: TriggerKind, value: str) -> Any:
        """Candidates: the app's triggers of ``kind`` whose glob's literal prefix is a
        prefix of ``value`` (rows without a stored prefix are always candidates)."""
        return stmt.where(
            _T.c.app_id == app_id,
            _T.c.kind == kind.value,
            sa.or_(
                _T.c.match_prefix == sa.any_(sa.literal(_all_prefixes(value), _PREFIXES)),
                _T.c.match_prefix.is_(None),
            ),
        ).order_by(_T.c.id)


_PREFIXES = sa.ARRAY(sa.Text)
