"""``PostgresKvRepo``: an app's key-value store, firing KV triggers as it writes.

Every ``set``/``delete`` emits a :class:`~picloud_shared.events.KvEvent` through the
emitter inside the write's own transaction, so the change and its outbox rows
commit together. ``prev_value`` is read under the row lock the write itself holds
(``SELECT … FOR UPDATE``, ``DELETE … RETURNING``), so concurrent writers each see
the value they actually replaced. Each write also appends its storage delta, in its
own statement, and a write that would grow the app past its quota is refused
(:mod:`manager_core.storage`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import attrs
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.db import FOREIGN_KEY_VIOLATION, sqlstate, transaction
from manager_core.outbox_event_emitter import OutboxEventEmitter
from manager_core.postgres._pages import Page, json_bytes, within_bytes
from manager_core.postgres.storage import PostgresStorageRepo, kv_size, record_delta, sized, within
from manager_core.postgres.triggers import check_limit
from manager_core.storage import StorageGrowth, StorageQuota
from picloud_shared import wire
from picloud_shared.errors import InvalidInput, LimitExceeded, NotFound, PayloadTooLarge
from picloud_shared.events import KvEvent, TriggerEvent
from picloud_shared.ids import AppId
from picloud_shared.limits import MAX_KV_KEY_BYTES, MAX_KV_VALUE_BYTES
from picloud_shared.noop import NoopEventEmitter
from picloud_shared.ports import EventEmitter
from picloud_shared.triggers import KvOp
from picloud_shared.wire import Json, JsonObject

__all__ = [
    "KvEntry",
    "PostgresKvRepo",
    "check_key",
    "encode_json",
    "is_bad_json",
    "json_param",
    "like_prefix",
]

_KV = t.kv_entries
# SQLSTATEs of JSON text PostgreSQL refuses (e.g. "\u0000" inside a jsonb string).
_BAD_JSON_STATES = frozenset({"22P05", "22P02", "22023", "22032"})
# A set that finds no row inserts; losing that race to a concurrent insert retries.
_MAX_UPSERT_ROUNDS = 10


@attrs.frozen
class KvEntry:
    """One stored key with its value and write version (bumped on every write)."""

    key: str
    value: Json
    version: int
    updated_at: datetime | None = None

    def to_wire(self) -> JsonObject:
        """The admin API's ``{"key", "value", "version"}``."""
        return {"key": self.key, "value": self.value, "version": self.version}


def check_key(key: object) -> str:
    """A KV key: a string of 1 to ``MAX_KV_KEY_BYTES`` UTF-8 bytes without NUL."""
    if not isinstance(key, str):
        raise InvalidInput("a key must be a string")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput("a key must be valid UTF-8") from None
    if not size:
        raise InvalidInput("a key must not be empty")
    if size > MAX_KV_KEY_BYTES:
        raise LimitExceeded(f"a key must be 1 to {MAX_KV_KEY_BYTES} bytes of UTF-8")
    if "\x00" in key:
        raise InvalidInput("a key must not contain NUL characters")
    return key


def encode_json(value: object, max_bytes: int, what: str) -> str:
    """``value`` as compact JSON text of at most ``max_bytes`` UTF-8 bytes, counted as
    PostgreSQL keeps it (a number's exponent as the digits it stands for:
    ``wire.exponent_growth``).

    Raises :class:`InvalidInput` for anything that is not JSON (NaN, sets …) and
    :class:`PayloadTooLarge` past the limit. (A script's dict keys that are not
    strings are refused in its worker; JSON bodies have none.)
    """
    try:
        text = wire.dumps(value)  # type: ignore[arg-type]
        size = len(text.encode("utf-8"))
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    # Refused here, not by PostgreSQL: in an execution's transaction a statement
    # PostgreSQL refuses aborts the transaction, and every later host call with it.
    problem = wire.unstorable_json(value, text)
    if problem is not None:
        raise InvalidInput(f"{what}: {problem}")
    growth = wire.exponent_growth(text)
    if size + growth > max_bytes:
        kept = f" as stored ({wire.AS_KEPT})" if growth else ""
        raise PayloadTooLarge(f"{what} is {size + growth} bytes{kept}; the limit is {max_bytes}")
    return text


def json_param(text: str) -> Any:
    """A bound JSON text, cast to ``jsonb`` by PostgreSQL (no second serialization)."""
    return sa.cast(sa.literal(text, sa.Text), JSONB)


def like_prefix(prefix: str) -> str:
    r"""A ``LIKE … ESCAPE '\'`` pattern matching strings that start with ``prefix``."""
    escaped = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + "%"


def is_bad_json(exc: DBAPIError) -> bool:
    """PostgreSQL refused the JSON text (e.g. a NUL character): a client error."""
    return sqlstate(exc) in _BAD_JSON_STATES


def notify_committed(emitter: EventEmitter, conn: AsyncConnection) -> None:
    """After a repo committed its own transaction: wake the dispatcher if it emitted."""
    if isinstance(emitter, OutboxEventEmitter):
        emitter.committed(conn)


class PostgresKvRepo:
    """Per-app key-value store.

    ``emitter`` fans writes out to triggers (default: none); ``quota`` bounds what an
    app stores (default: unlimited, still accounted). Every method takes an optional
    ``conn`` to join the caller's transaction; writes take the ``trigger_depth``
    their outbox rows carry (0 for admin writes), and the ``growth`` their
    transaction has made so far (see :class:`~manager_core.storage.StorageGrowth`).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        emitter: EventEmitter | None = None,
        quota: StorageQuota | None = None,
    ) -> None:
        self._engine = engine
        self._emitter: EventEmitter = emitter if emitter is not None else NoopEventEmitter()
        self.quota = quota if quota is not None else StorageQuota(PostgresStorageRepo(engine), None)

    async def get(
        self,
        app_id: AppId,
        key: str,
        *,
        for_update: bool = False,
        conn: AsyncConnection | None = None,
    ) -> KvEntry | None:
        """The entry, or ``None``. ``for_update`` locks it until the caller's
        transaction ends (a script's read-modify-write)."""
        check_key(key)
        stmt = sa.select(_KV.c.key, _KV.c.value, _KV.c.version, _KV.c.updated_at).where(
            _KV.c.app_id == app_id, _KV.c.key == key
        )
        if for_update:
            stmt = stmt.with_for_update()
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        return None if row is None else KvEntry(row.key, row.value, row.version, row.updated_at)

    async def set(
        self,
        app_id: AppId,
        key: str,
        value: Json,
        *,
        trigger_depth: int = 0,
        growth: StorageGrowth | None = None,
        conn: AsyncConnection | None = None,
    ) -> KvEntry:
        """Store ``value``; returns the entry with its new version. Raises
        ``StorageQuotaExceeded`` when it would grow the app past its quota."""
        check_key(key)
        text = encode_json(value, MAX_KV_VALUE_BYTES, "the value")
        key_bytes = len(key.encode("utf-8"))
        budget = await self.quota.budget(app_id, growth)
        where = (_KV.c.app_id == app_id, _KV.c.key == key)
        locked = (
            sa.select(_KV.c.value, kv_size(_KV.c.key, _KV.c.value).label("size"))
            .where(*where)
            .with_for_update()
        )
        try:
            async with transaction(conn or self._engine) as c:
                for _ in range(_MAX_UPSERT_ROUNDS):
                    old = (await c.execute(locked)).one_or_none()
                    if old is not None:
                        prev: Json = old.value
                        row = (
                            await c.execute(
                                _overwrite(app_id, key, text, key_bytes - old.size, budget)
                            )
                        ).one()
                    else:
                        prev = None
                        row = (await c.execute(_insert(app_id, key, text, key_bytes, budget))).one()
                    if row.version is None and self.quota.refused(row.delta, budget):
                        raise self.quota.exceeded(app_id, row.delta, budget)
                    if row.version is not None:
                        break
                    # No row yet and a concurrent writer inserted first: the next
                    # round locks (and reports) its row.
                else:  # pragma: no cover - needs a key deleted and re-inserted 10 times
                    raise RuntimeError(f"could not write key {key!r}: too much contention")
                await self._emit(c, app_id, KvEvent(key, KvOp.SET, row.value, prev), trigger_depth)
        except DBAPIError as exc:
            if is_bad_json(exc):
                raise InvalidInput("the value cannot be stored (NUL character?)") from exc
            if conn is None and sqlstate(exc) == FOREIGN_KEY_VIOLATION:
                raise NotFound("app not found") from exc  # deleted while this was written
            raise
        self.quota.wrote(app_id, row.delta, growth, committed=conn is None)
        if conn is None:
            notify_committed(self._emitter, c)
        return KvEntry(key, row.value, row.version, row.updated_at)

    async def delete(
        self,
        app_id: AppId,
        key: str,
        *,
        trigger_depth: int = 0,
        growth: StorageGrowth | None = None,
        conn: AsyncConnection | None = None,
    ) -> bool:
        """Remove ``key``; ``True`` if it existed (only then is an event emitted)."""
        check_key(key)
        gone = (
            sa.delete(_KV)
            .where(_KV.c.app_id == app_id, _KV.c.key == key)
            .returning(_KV.c.value, kv_size(_KV.c.key, _KV.c.value).label("size"))
            .cte("gone")
        )
        stmt = sa.select(gone.c.value, gone.c.size).add_cte(
            record_delta(app_id, -gone.c.size, gone)
        )
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
            if row is not None:
                event = KvEvent(key, KvOp.DELETE, None, row.value)
                await self._emit(c, app_id, event, trigger_depth)
        if row is not None:
            self.quota.wrote(app_id, -row.size, growth, committed=conn is None)
        if conn is None and row is not None:
            notify_committed(self._emitter, c)
        return row is not None

    async def list(
        self,
        app_id: AppId,
        prefix: str = "",
        limit: int = 100,
        after: str | None = None,
        *,
        conn: AsyncConnection | None = None,
    ) -> Sequence[KvEntry]:
        """Up to ``limit`` entries whose key starts with ``prefix``, in key order,
        starting after the key ``after`` (keyset pagination)."""
        if not isinstance(prefix, str) or "\x00" in prefix:
            raise InvalidInput("a prefix must be a string without NUL characters")
        if len(prefix.encode("utf-8", "surrogatepass")) > MAX_KV_KEY_BYTES:
            raise LimitExceeded(f"a prefix is at most {MAX_KV_KEY_BYTES} bytes")
        stmt = (
            sa.select(_KV.c.key, _KV.c.value, _KV.c.version, _KV.c.updated_at)
            .where(_KV.c.app_id == app_id)
            .order_by(_KV.c.key)
            .limit(check_limit(limit))
        )
        if prefix:
            stmt = stmt.where(_KV.c.key.like(like_prefix(prefix), escape="\\"))
        if after is not None:
            stmt = stmt.where(_KV.c.key > check_key(after))
        stmt = within_bytes(stmt, json_bytes(_KV.c.key, _KV.c.value), (_KV.c.key,))
        async with transaction(conn or self._engine) as c:
            rows = list((await c.execute(stmt)).all())
        return Page.of((KvEntry(r.key, r.value, r.version, r.updated_at) for r in rows), rows)

    async def _emit(
        self, conn: AsyncConnection, app_id: AppId, event: TriggerEvent, depth: int
    ) -> None:
        await self._emitter.emit(conn, app_id, event, depth)


def _overwrite(app_id: AppId, key: str, text: str, fixed: int, budget: int | None) -> sa.Select:  # type: ignore[type-arg]
    """Replace the (locked) value of ``key`` unless the growth passes ``budget``; one
    row ``(delta, value, version, updated_at)``, ``version`` NULL when refused."""
    new = sized(json_param(text), fixed)
    delta = sa.select(new.c.delta).scalar_subquery()
    written = (
        sa.update(_KV)
        .where(_KV.c.app_id == app_id, _KV.c.key == key, *within(delta, budget))
        .values(
            value=sa.select(new.c.value).scalar_subquery(),
            version=_KV.c.version + 1,
            updated_at=sa.func.now(),
        )
        .returning(_KV.c.value, _KV.c.version, _KV.c.updated_at, delta.label("delta"))
        .cte("written")
    )
    return (
        sa.select(new.c.delta, written.c.value, written.c.version, written.c.updated_at)
        .select_from(new.outerjoin(written, sa.true()))
        .add_cte(record_delta(app_id, written.c.delta, written))
    )


def _insert(app_id: AppId, key: str, text: str, fixed: int, budget: int | None) -> sa.Select:  # type: ignore[type-arg]
    """Insert ``key`` unless it exists or its size passes ``budget``; one row
    ``(delta, value, version, updated_at)``, ``version`` NULL when nothing was
    inserted."""
    new = sized(json_param(text), fixed)
    rows = sa.select(sa.literal(app_id, _KV.c.app_id.type), sa.literal(key), new.c.value).where(
        *within(new.c.delta, budget)
    )
    written = (
        pg_insert(_KV)
        .from_select([_KV.c.app_id, _KV.c.key, _KV.c.value], rows)
        .on_conflict_do_nothing(index_elements=[_KV.c.app_id, _KV.c.key])
        .returning(_KV.c.value, _KV.c.version, _KV.c.updated_at)
        .cte("written")
    )
    return (
        sa.select(new.c.delta, written.c.value, written.c.version, written.c.updated_at)
        .select_from(new.outerjoin(written, sa.true()))
        .add_cte(record_delta(app_id, new.c.delta, new.join(written, sa.true())))
    )
