"""``PostgresDocumentRepo``: an app's document store (JSON objects in collections).

Writes emit a :class:`~picloud_shared.events.DocsEvent` (insert/update/delete with
``data``/``prev_data``) inside the write's own transaction. ``prev_data`` comes from
the row the write locked (``SELECT … FOR UPDATE`` / ``DELETE … RETURNING``). Each
write also appends its storage delta, in its own statement, and a write that would
grow the app past its quota is refused (:mod:`manager_core.storage`).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime

import attrs
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from manager_core import tables as t
from manager_core.db import FOREIGN_KEY_VIOLATION, sqlstate, transaction
from manager_core.postgres._pages import Page, json_bytes, within_bytes
from manager_core.postgres.kv import encode_json, is_bad_json, json_param, notify_committed
from manager_core.postgres.storage import PostgresStorageRepo, doc_size, record_delta, sized, within
from manager_core.postgres.triggers import check_limit
from manager_core.storage import StorageGrowth, StorageQuota
from picloud_shared.domain import check_collection
from picloud_shared.errors import Conflict, InvalidInput, LimitExceeded, NotFound
from picloud_shared.events import DocsEvent
from picloud_shared.ids import AppId
from picloud_shared.limits import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_ID_CHARS, MAX_WHERE_FIELDS
from picloud_shared.noop import NoopEventEmitter
from picloud_shared.ports import EventEmitter
from picloud_shared.triggers import DocsOp
from picloud_shared.wire import JsonObject

__all__ = ["Document", "PostgresDocumentRepo", "check_document", "check_document_id"]

_D = t.documents
_COLUMNS = (_D.c.collection, _D.c.id, _D.c.data, _D.c.version, _D.c.updated_at)


@attrs.frozen
class Document:
    collection: str
    id: str
    data: JsonObject
    version: int
    updated_at: datetime | None = None

    def to_wire(self) -> JsonObject:
        """The admin API's ``{"id", "data"}``."""
        return {"id": self.id, "data": self.data}


def check_document_id(doc_id: object) -> str:
    """A document id: 1 to 128 characters, no NUL (``InvalidInput``; a longer one is
    ``LimitExceeded``, as for a script's ``ctx.docs``)."""
    if not isinstance(doc_id, str) or not doc_id:
        raise InvalidInput(f"a document id must be a string of 1 to {MAX_DOCUMENT_ID_CHARS} chars")
    if len(doc_id) > MAX_DOCUMENT_ID_CHARS:
        raise LimitExceeded(f"a document id is 1-{MAX_DOCUMENT_ID_CHARS} characters")
    if "\x00" in doc_id:
        raise InvalidInput("a document id must not contain NUL characters")
    return doc_id


def check_document(data: object) -> str:
    """A document's JSON text: a JSON object of at most 1 MiB serialized."""
    if not isinstance(data, dict):
        raise InvalidInput("a document must be a JSON object")
    return encode_json(data, MAX_DOCUMENT_BYTES, "the document")


def _from_row(row: sa.Row) -> Document:  # type: ignore[type-arg]
    return Document(row.collection, row.id, row.data, row.version, row.updated_at)


class PostgresDocumentRepo:
    """Per-app document store.

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

    async def insert(
        self,
        app_id: AppId,
        collection: str,
        data: JsonObject,
        id: str | None = None,
        *,
        trigger_depth: int = 0,
        growth: StorageGrowth | None = None,
        conn: AsyncConnection | None = None,
    ) -> Document:
        """Insert a document (id: ``uuid4().hex`` when None). Raises ``Conflict`` when
        ``id`` is taken, ``StorageQuotaExceeded`` when it would grow the app past its
        quota."""
        check_collection(collection)
        doc_id = uuid.uuid4().hex if id is None else check_document_id(id)
        text = check_document(data)
        budget = await self.quota.budget(app_id, growth)
        new = sized(json_param(text), len(collection.encode()) + len(doc_id.encode()))
        rows = sa.select(
            sa.literal(app_id, _D.c.app_id.type),
            sa.literal(collection),
            sa.literal(doc_id),
            new.c.value,
        ).where(*within(new.c.delta, budget))
        written = (
            pg_insert(_D)
            .from_select([_D.c.app_id, _D.c.collection, _D.c.id, _D.c.data], rows)
            .on_conflict_do_nothing(index_elements=[_D.c.app_id, _D.c.collection, _D.c.id])
            .returning(*_COLUMNS)
            .cte("written")
        )
        stmt = (
            sa.select(new.c.delta, *written.c)
            .select_from(new.outerjoin(written, sa.true()))
            .add_cte(record_delta(app_id, new.c.delta, new.join(written, sa.true())))
        )
        async with self._writing(conn) as c:
            row = (await c.execute(stmt)).one()
            if row.version is None:  # the id is taken, or the quota refused it
                if self.quota.refused(row.delta, budget):
                    taken = sa.select(_D.c.id).where(
                        _D.c.app_id == app_id, _D.c.collection == collection, _D.c.id == doc_id
                    )
                    if (await c.execute(taken)).first() is None:
                        raise self.quota.exceeded(app_id, row.delta, budget)
                raise Conflict(f"document {doc_id!r} already exists in {collection!r}")
            doc = _from_row(row)
            event = DocsEvent(collection, doc_id, DocsOp.INSERT, doc.data, None)
            await self._emitter.emit(c, app_id, event, trigger_depth)
        self.quota.wrote(app_id, row.delta, growth, committed=conn is None)
        return doc

    async def get(
        self,
        app_id: AppId,
        collection: str,
        id: str,
        *,
        for_update: bool = False,
        conn: AsyncConnection | None = None,
    ) -> Document | None:
        """One document, or ``None``. ``for_update`` locks it until the caller's
        transaction ends (a script's read-modify-write)."""
        check_collection(collection)
        check_document_id(id)
        stmt = sa.select(*_COLUMNS).where(
            _D.c.app_id == app_id, _D.c.collection == collection, _D.c.id == id
        )
        if for_update:
            stmt = stmt.with_for_update()
        async with transaction(conn or self._engine) as c:
            row = (await c.execute(stmt)).one_or_none()
        return None if row is None else _from_row(row)

    async def update(
        self,
        app_id: AppId,
        collection: str,
        id: str,
        data: JsonObject,
        *,
        trigger_depth: int = 0,
        growth: StorageGrowth | None = None,
        conn: AsyncConnection | None = None,
    ) -> Document:
        """Replace a document's data. Raises ``NotFound`` when it does not exist,
        ``StorageQuotaExceeded`` when it would grow the app past its quota."""
        check_collection(collection)
        check_document_id(id)
        text = check_document(data)
        budget = await self.quota.budget(app_id, growth)
        key = (_D.c.app_id == app_id, _D.c.collection == collection, _D.c.id == id)
        locked = (
            sa.select(_D.c.data, doc_size(_D.c.collection, _D.c.id, _D.c.data).label("size"))
            .where(*key)
            .with_for_update()
        )
        async with self._writing(conn) as c:
            old = (await c.execute(locked)).one_or_none()
            if old is None:
                raise NotFound(f"no document {id!r} in {collection!r}")
            names = len(collection.encode()) + len(id.encode())
            new = sized(json_param(text), names - old.size)
            delta = sa.select(new.c.delta).scalar_subquery()
            written = (
                sa.update(_D)
                .where(*key, *within(delta, budget))
                .values(
                    data=sa.select(new.c.value).scalar_subquery(),
                    version=_D.c.version + 1,
                    updated_at=sa.func.now(),
                )
                .returning(*_COLUMNS, delta.label("delta"))
                .cte("written")
            )
            stmt = (
                sa.select(new.c.delta, *(written.c[col.name] for col in _COLUMNS))
                .select_from(new.outerjoin(written, sa.true()))
                .add_cte(record_delta(app_id, written.c.delta, written))
            )
            row = (await c.execute(stmt)).one()
            if row.version is None:
                assert budget is not None
                raise self.quota.exceeded(app_id, row.delta, budget)
            doc = _from_row(row)
            event = DocsEvent(collection, id, DocsOp.UPDATE, doc.data, old.data)
            await self._emitter.emit(c, app_id, event, trigger_depth)
        self.quota.wrote(app_id, row.delta, growth, committed=conn is None)
        return doc

    async def delete(
        self,
        app_id: AppId,
        collection: str,
        id: str,
        *,
        trigger_depth: int = 0,
        growth: StorageGrowth | None = None,
        conn: AsyncConnection | None = None,
    ) -> bool:
        """Delete a document; ``True`` if it existed (only then is an event emitted)."""
        check_collection(collection)
        check_document_id(id)
        gone = (
            sa.delete(_D)
            .where(_D.c.app_id == app_id, _D.c.collection == collection, _D.c.id == id)
            .returning(_D.c.data, doc_size(_D.c.collection, _D.c.id, _D.c.data).label("size"))
            .cte("gone")
        )
        stmt = sa.select(gone.c.data, gone.c.size).add_cte(record_delta(app_id, -gone.c.size, gone))
        async with self._writing(conn) as c:
            row = (await c.execute(stmt)).one_or_none()
            if row is not None:
                event = DocsEvent(collection, id, DocsOp.DELETE, None, row.data)
                await self._emitter.emit(c, app_id, event, trigger_depth)
        if row is not None:
            self.quota.wrote(app_id, -row.size, growth, committed=conn is None)
        return row is not None

    async def query(
        self,
        app_id: AppId,
        collection: str,
        where: JsonObject | None = None,
        limit: int = 100,
        after: str | None = None,
        *,
        conn: AsyncConnection | None = None,
    ) -> Sequence[Document]:
        """Up to ``limit`` documents whose top-level fields equal every pair of
        ``where``, in id order, starting after the id ``after``."""
        check_collection(collection)
        stmt = (
            sa.select(*_COLUMNS)
            .where(_D.c.app_id == app_id, _D.c.collection == collection)
            .order_by(_D.c.id)
            .limit(check_limit(limit))
        )
        if where:
            stmt = stmt.where(*_equal_fields(where))
        if after is not None:
            stmt = stmt.where(_D.c.id > check_document_id(after))
        stmt = within_bytes(stmt, json_bytes(_D.c.data), (_D.c.id,))
        async with transaction(conn or self._engine) as c:
            rows = list((await c.execute(stmt)).all())
        return Page.of((_from_row(r) for r in rows), rows)

    async def list(
        self,
        app_id: AppId,
        collection: str,
        limit: int = 100,
        after: str | None = None,
        *,
        conn: AsyncConnection | None = None,
    ) -> Sequence[Document]:
        """A collection's documents in id order (keyset pagination)."""
        return await self.query(app_id, collection, None, limit, after, conn=conn)

    @asynccontextmanager
    async def _writing(self, conn: AsyncConnection | None) -> AsyncIterator[AsyncConnection]:
        """``transaction()`` for a write: JSON PostgreSQL refuses becomes
        ``InvalidInput``; after a commit this repo owns, the dispatcher is woken."""
        try:
            async with transaction(conn or self._engine) as c:
                yield c
        except DBAPIError as exc:
            if is_bad_json(exc):
                raise InvalidInput("the document cannot be stored (NUL character?)") from exc
            if conn is None and sqlstate(exc) == FOREIGN_KEY_VIOLATION:
                raise NotFound("app not found") from exc  # deleted while this was written
            raise
        if conn is None:
            notify_committed(self._emitter, c)


def _equal_fields(where: object) -> list[sa.ColumnElement[bool]]:
    """``data @> where`` (containment, index-friendly) plus exact equality for the
    fields whose value is an array or object (where containment is looser)."""
    if not isinstance(where, dict):
        raise InvalidInput("where must be a JSON object")
    if len(where) > MAX_WHERE_FIELDS:
        raise LimitExceeded(f"where has at most {MAX_WHERE_FIELDS} fields")
    text = encode_json(where, MAX_DOCUMENT_BYTES, "where")
    clauses: list[sa.ColumnElement[bool]] = [_D.c.data.contains(json_param(text))]
    for name, value in where.items():
        if isinstance(value, list | dict):
            exact = json_param(encode_json(value, MAX_DOCUMENT_BYTES, "where"))
            clauses.append(_D.c.data[name] == exact)
    return clauses
