"""A ``HostApi`` wrapper that keeps database trouble away from the script.

The wrapped host is built lazily, at the script's first host call (for the
dispatcher: that is when the execution's transaction opens, so a script that never
touches data never holds a connection). Host calls run inside the execution's
transaction. If one fails with a database
error — most often a serialization failure under concurrent executions — the
script must not be able to swallow it and "succeed" on an aborted transaction.
The guard records the first such error, answers the script with an opaque
internal error, and refuses every later call; the dispatcher then rolls back and
either re-runs the execution (a conflict) or fails it (anything else). A clear error
a repo made of a refused statement reaches the script as it is, and is recorded
the same way: the transaction is aborted.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import psycopg
from sqlalchemy.exc import DBAPIError

from picloud_shared.errors import PicloudError
from picloud_shared.ports import HostApi
from picloud_shared.wire import Json, JsonObject

T = TypeVar("T")
_DB_ERRORS = (DBAPIError, psycopg.Error)


class HostUnavailable(PicloudError):
    """The platform could not serve this call; the execution will be retried."""

    code = "host_unavailable"
    http_status = 503


class GuardedHost:
    """Implements ``HostApi`` by delegating to the host ``open_inner`` builds, under the guard."""

    def __init__(self, open_inner: Callable[[], Awaitable[HostApi]]) -> None:
        self._open_inner = open_inner
        self._inner: HostApi | None = None
        self.db_error: BaseException | None = None

    @property
    def opened(self) -> bool:
        """Whether the script made a host call that needed the inner host."""
        return self._inner is not None

    async def _call(self, fn: Callable[[HostApi], Awaitable[T]]) -> T:
        if self.db_error is not None:
            raise HostUnavailable
        try:
            if self._inner is None:
                self._inner = await self._open_inner()
            return await fn(self._inner)
        except PicloudError as exc:
            # A repo may answer a statement PostgreSQL refused with a clear error for
            # the script; the transaction is aborted all the same.
            if isinstance(exc.__cause__, _DB_ERRORS):
                self.db_error = exc.__cause__
            raise
        except Exception as exc:
            self.db_error = exc
            raise HostUnavailable from None

    def committed(self) -> None:
        """Tell the inner host its transaction committed (if it wants to know)."""
        committed = getattr(self._inner, "committed", None)
        if committed is not None:
            committed()

    async def kv_get(self, key: str) -> Json | None:
        return await self._call(lambda h: h.kv_get(key))

    async def kv_set(self, key: str, value: Json) -> None:
        return await self._call(lambda h: h.kv_set(key, value))

    async def kv_delete(self, key: str) -> bool:
        return await self._call(lambda h: h.kv_delete(key))

    async def kv_list(
        self, prefix: str = "", limit: int = 100, after: str | None = None
    ) -> list[JsonObject]:
        return await self._call(lambda h: h.kv_list(prefix, limit, after))

    async def docs_insert(self, collection: str, data: JsonObject, id: str | None = None) -> str:
        return await self._call(lambda h: h.docs_insert(collection, data, id))

    async def docs_get(self, collection: str, id: str) -> JsonObject | None:
        return await self._call(lambda h: h.docs_get(collection, id))

    async def docs_update(self, collection: str, id: str, data: JsonObject) -> None:
        return await self._call(lambda h: h.docs_update(collection, id, data))

    async def docs_delete(self, collection: str, id: str) -> bool:
        return await self._call(lambda h: h.docs_delete(collection, id))

    async def docs_query(
        self,
        collection: str,
        where: JsonObject | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[JsonObject]:
        return await self._call(lambda h: h.docs_query(collection, where, limit, after))

    async def log(self, line: str) -> None:
        if self._inner is not None:
            await self._inner.log(line)
