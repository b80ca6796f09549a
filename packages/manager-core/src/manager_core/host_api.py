"""``PostgresHostApi``: a script's ``ctx.kv`` / ``ctx.docs`` / ``ctx.log``, for one
execution.

Built per execution by the dispatcher with the execution's open transaction: every
read and write runs inside it, so a script's writes, the outbox rows they fan out
and the execution record commit together (or not at all). The app and principal
are fixed at construction; reads need ``app_read_data``, writes ``app_write_data``.
Writes emit with ``trigger_depth + 1`` and add their storage delta to the
execution's :class:`~manager_core.storage.StorageGrowth`, which the app's storage
quota check counts on top of the usage it last read.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncConnection

from manager_core.postgres._pages import PAGE_BYTES
from manager_core.postgres.documents import PostgresDocumentRepo
from manager_core.postgres.kv import PostgresKvRepo
from manager_core.storage import StorageGrowth
from picloud_shared.errors import Forbidden, LimitExceeded
from picloud_shared.ids import AppId
from picloud_shared.principals import Capability, Principal
from picloud_shared.wire import Json, JsonObject

__all__ = ["PostgresHostApi"]


class PostgresHostApi:
    """:class:`~picloud_shared.ports.HostApi` inside one execution's transaction."""

    def __init__(
        self,
        conn: AsyncConnection,
        app_id: AppId,
        principal: Principal,
        trigger_depth: int,
        kv_repo: PostgresKvRepo,
        doc_repo: PostgresDocumentRepo,
    ) -> None:
        self._conn = conn
        self._app_id = app_id
        self._principal = principal
        self._depth = trigger_depth
        self._kv = kv_repo
        self._docs = doc_repo
        self.growth = StorageGrowth()  # net bytes this execution's writes added
        self.logs: list[str] = []

    def committed(self) -> None:
        """The execution's transaction committed: its writes count in the node's
        cached usage of the app at once."""
        self._kv.quota.committed(self._app_id, self.growth.bytes)

    def _require(self, capability: Capability) -> None:
        p = self._principal
        if not p.is_instance_admin and p.app_id != self._app_id:
            raise Forbidden("the principal does not belong to this app")
        if not p.can(capability):
            raise Forbidden(f"the script's principal lacks {capability.value}")

    # -- kv -------------------------------------------------------------------------

    async def kv_get(self, key: str) -> Json | None:
        self._require(Capability.APP_READ_DATA)
        entry = await self._kv.get(self._app_id, key, for_update=True, conn=self._conn)
        return None if entry is None else entry.value

    async def kv_set(self, key: str, value: Json) -> None:
        self._require(Capability.APP_WRITE_DATA)
        await self._kv.set(
            self._app_id,
            key,
            value,
            trigger_depth=self._depth + 1,
            growth=self.growth,
            conn=self._conn,
        )

    async def kv_delete(self, key: str) -> bool:
        self._require(Capability.APP_WRITE_DATA)
        return await self._kv.delete(
            self._app_id, key, trigger_depth=self._depth + 1, growth=self.growth, conn=self._conn
        )

    async def kv_list(
        self, prefix: str = "", limit: int = 100, after: str | None = None
    ) -> list[JsonObject]:
        self._require(Capability.APP_READ_DATA)
        entries = await self._kv.list(self._app_id, prefix, limit, after, conn=self._conn)
        _whole(entries)
        return [{"key": e.key, "value": e.value} for e in entries]

    # -- docs -----------------------------------------------------------------------

    async def docs_insert(self, collection: str, data: JsonObject, id: str | None = None) -> str:
        self._require(Capability.APP_WRITE_DATA)
        doc = await self._docs.insert(
            self._app_id,
            collection,
            data,
            id,
            trigger_depth=self._depth + 1,
            growth=self.growth,
            conn=self._conn,
        )
        return doc.id

    async def docs_get(self, collection: str, id: str) -> JsonObject | None:
        self._require(Capability.APP_READ_DATA)
        doc = await self._docs.get(self._app_id, collection, id, for_update=True, conn=self._conn)
        return None if doc is None else doc.data

    async def docs_update(self, collection: str, id: str, data: JsonObject) -> None:
        self._require(Capability.APP_WRITE_DATA)
        await self._docs.update(
            self._app_id,
            collection,
            id,
            data,
            trigger_depth=self._depth + 1,
            growth=self.growth,
            conn=self._conn,
        )

    async def docs_delete(self, collection: str, id: str) -> bool:
        self._require(Capability.APP_WRITE_DATA)
        return await self._docs.delete(
            self._app_id,
            collection,
            id,
            trigger_depth=self._depth + 1,
            growth=self.growth,
            conn=self._conn,
        )

    async def docs_query(
        self,
        collection: str,
        where: JsonObject | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[JsonObject]:
        self._require(Capability.APP_READ_DATA)
        docs = await self._docs.query(
            self._app_id, collection, where, limit, after, conn=self._conn
        )
        _whole(docs)
        return [{"id": d.id, "data": d.data} for d in docs]

    # -- logs -----------------------------------------------------------------------

    async def log(self, line: str) -> None:
        self.logs.append(line)


def _whole(rows: object) -> None:
    """A script's list or query that would answer more than ``PAGE_BYTES`` fails
    instead of answering part of what was asked: a page shorter than its ``limit``
    tells a script paging with ``after`` that it has seen the last one."""
    if getattr(rows, "cut", False):
        raise LimitExceeded(
            f"the answer holds more than {PAGE_BYTES} bytes; ask for fewer (a smaller "
            "limit, then the next page with after=)"
        )
